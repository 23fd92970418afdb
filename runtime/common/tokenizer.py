"""Prompt -> token ids, exactly as the Qwen3-based pipelines do: chat template, then the tokenizer.json model.

Both pipelines wrap the prompt as one user turn with ``add_generation_prompt=True``; they differ in
``enable_thinking``. For Qwen's ChatML template the text is
``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``, followed by an empty think block
(``<think>\\n\\n</think>\\n\\n``) when thinking is disabled (FLUX.2 [klein]) and the template knows the switch, as
Qwen3's does; Z-Image enables thinking, which adds nothing. Other templates are rendered with jinja2.
"""

from __future__ import annotations

from typing import Any

from imgpack.schemas.errors import ImgpackError

MAX_SEQUENCE_LENGTH = 512
#: What Qwen3's template appends after the generation prompt when ``enable_thinking`` is false.
EMPTY_THINK_BLOCK = "<think>\n\n</think>\n\n"
#: Qwen's pad token, used when tokenizer_config.json names none.
DEFAULT_PAD_TOKEN = "<|endoftext|>"


def render_chat(prompt: str, template: str | None, enable_thinking: bool = True) -> str:
    """The pipeline's chat-templated prompt: ChatML for Qwen templates (and when there is none); any other
    template is rendered with jinja2, which must then be installed."""
    if not template or "<|im_start|>" in template:
        text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        if not enable_thinking and (not template or "enable_thinking" in template):
            text += EMPTY_THINK_BLOCK
        return text
    try:
        import jinja2.sandbox
    except ImportError:
        raise ImgpackError(
            "tokenizer: the chat template is not ChatML and jinja2 is not installed to render it (pip install jinja2)"
        ) from None
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return env.from_string(template).render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True, enable_thinking=enable_thinking
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
        pad = config.get("pad_token") or DEFAULT_PAD_TOKEN
        self.pad_token = pad.get("content", DEFAULT_PAD_TOKEN) if isinstance(pad, dict) else str(pad)

    def prompt_text(self, prompt: str, enable_thinking: bool = True) -> str:
        return render_chat(prompt, self.chat_template, enable_thinking)

    def encode(self, prompt: str, max_length: int = MAX_SEQUENCE_LENGTH, enable_thinking: bool = True) -> list[int]:
        """Token ids of the templated prompt, truncated like the pipeline's ``max_sequence_length``."""
        ids = self.tokenizer.encode(self.prompt_text(prompt, enable_thinking), add_special_tokens=True).ids
        if not ids:
            raise ImgpackError("the prompt encodes to no tokens")
        return ids[:max_length]

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.token_to_id(self.pad_token)
        if pad is None:
            raise ImgpackError(f"tokenizer: the pad token {self.pad_token!r} is not in tokenizer.json")
        return pad

    def encode_padded(
        self, prompt: str, length: int = MAX_SEQUENCE_LENGTH, enable_thinking: bool = True
    ) -> tuple[list[int], list[int]]:
        """(ids, attention mask) right-padded to exactly ``length``, as ``padding="max_length", truncation=True``."""
        ids = self.encode(prompt, length, enable_thinking)
        pad = length - len(ids)
        return ids + [self.pad_id] * pad, [1] * len(ids) + [0] * pad
