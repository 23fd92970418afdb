"""Prompt -> token ids, exactly as the Z-Image pipeline does: chat template, then the tokenizer.json model.

The pipeline wraps the prompt as one user turn with ``add_generation_prompt=True, enable_thinking=True``. For
Qwen's ChatML template that is ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``; when jinja2 is
installed and the tokenizer config carries a template, the template itself is rendered instead.
"""

from __future__ import annotations

from typing import Any

from imgpack.schemas.errors import ImgpackError

MAX_SEQUENCE_LENGTH = 512


def render_chat(prompt: str, template: str | None) -> str:
    if template:
        try:
            import jinja2.sandbox
        except ImportError:
            jinja2 = None  # type: ignore[assignment]
        if jinja2 is not None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            return env.from_string(template).render(
                messages=[{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                enable_thinking=True,
            )
        if "<|im_start|>" not in template:
            raise ImgpackError(
                "tokenizer: the chat template is not ChatML and jinja2 is not installed to render it"
                " (pip install jinja2)"
            )
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


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
