"""Prompt -> token ids, exactly as the Z-Image pipeline does: chat template, then the tokenizer.json model.

The pipeline wraps the prompt as one user turn with ``add_generation_prompt=True, enable_thinking=True``. For
Qwen's ChatML template that is ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`` (no think block:
``enable_thinking=True`` adds none); other templates are rendered with jinja2.
"""

from __future__ import annotations

from typing import Any

from imgpack.schemas.errors import ImgpackError

MAX_SEQUENCE_LENGTH = 512


def render_chat(prompt: str, template: str | None) -> str:
    """The pipeline's chat-templated prompt: ChatML for Qwen templates (and when there is none); any other
    template is rendered with jinja2, which must then be installed."""
    if not template or "<|im_start|>" in template:
        return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    try:
        import jinja2.sandbox
    except ImportError:
        raise ImgpackError(
            "tokenizer: the chat template is not ChatML and jinja2 is not installed to render it (pip install jinja2)"
        ) from None
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return env.from_string(template).render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True, enable_thinking=True
        )
    except jinja2.TemplateError as e:
        raise ImgpackError(f"tokenizer: the chat template cannot be rendered: {e}") from None


class PromptTokenizer:
    def __init__(self, tokenizer_json: bytes, tokenizer_config: dict[str, Any] | None, chat_template: str | None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImgpackError("the 'tokenizers' package is missing; pip install 'imgpack[runtime]'") from None
        try:
            self.tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as e:
            raise ImgpackError(f"tokenizer/tokenizer.json: cannot be loaded: {e}") from None
        config = tokenizer_config or {}
        template = chat_template or config.get("chat_template")
        if isinstance(template, list):  # a list of named templates: use "default"
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        self.chat_template = template if isinstance(template, str) else None

    def prompt_text(self, prompt: str) -> str:
        return render_chat(prompt, self.chat_template)

    def encode(self, prompt: str, max_length: int = MAX_SEQUENCE_LENGTH) -> list[int]:
        """Token ids of the templated prompt, truncated like the pipeline's ``max_sequence_length``."""
        ids = self.tokenizer.encode(self.prompt_text(prompt), add_special_tokens=True).ids
        if not ids:
            raise ImgpackError("the prompt encodes to no tokens")
        return ids[:max_length]
