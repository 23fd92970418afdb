"""Qwen3 text encoder: the prompt embedding Z-Image and FLUX.2 [klein] condition on.

One implementation, configured by which entries of transformers' ``output_hidden_states`` a pipeline reads
(``num_hidden_layers + 1`` of them: the token embeddings, each decoder layer's raw output, and the last one after
the final norm). Z-Image reads [-2] of the unpadded prompt; FLUX.2 reads 9, 18 and 27 of a prompt padded to 512
tokens, concatenated along features. Only the layers up to the deepest one read are built and loaded; deeper
layers, the final norm (unless the last state is read) and ``lm_head`` are never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgpack.runtime.backend import mx, nn, silu
from imgpack.schemas.errors import ImgpackError


@dataclass
class Qwen3Config:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    attention_bias: bool = False

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "text_encoder/config.json") -> Qwen3Config:
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            rope = config.get("rope_parameters") or {}
            scaling = config.get("rope_scaling") or {}
            rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
            if rope_type != "default":
                raise ImgpackError(f"{where}: rope type {rope_type!r} is not supported (only default RoPE)")
            if config.get("hidden_act", "silu") != "silu":
                raise ImgpackError(f"{where}: hidden_act {config['hidden_act']!r} is not supported (only silu)")
            layers = int(config["num_hidden_layers"])
            return cls(
                hidden_size=hidden,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                intermediate_size=int(config["intermediate_size"]),
                vocab_size=int(config["vocab_size"]),
                head_dim=int(config.get("head_dim") or hidden // heads),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta") or config.get("rope_theta") or 1_000_000.0),
                attention_bias=bool(config.get("attention_bias", False)),
            )
        except KeyError as e:
            raise ImgpackError(f"{where}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ImgpackError(f"{where}: bad field value: {e}") from None


def rope_periods(head_dim: int, theta: float) -> mx.array:
    """transformers' float32 inverse frequencies ``1 / theta**(2i/d)``, as the periods ``mx.fast.rope`` takes.

    MLX's own ``base=`` frequencies differ in the last bits; at the 512 positions FLUX.2 encodes that moves the
    angles by up to 2e-5 rad, so the exact float32 values transformers uses are passed instead.
    """
    exponents = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.float32(theta) ** exponents).astype(np.float32)
    return mx.array((1.0 / inv_freq.astype(np.float64)).astype(np.float32))


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self._rope_periods = rope_periods(cfg.head_dim, cfg.rope_theta)  # "_": not a parameter
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | str) -> mx.array:
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, n, self.n_heads, self.head_dim)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(b, n, self.n_kv_heads, self.head_dim)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, n, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=None, scale=1.0, offset=0, freqs=self._rope_periods)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=None, scale=1.0, offset=0, freqs=self._rope_periods)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, n, -1))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3Layer(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = Qwen3MLP(cfg)

    def __call__(self, x: mx.array, mask: mx.array | str) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3TextEncoder(nn.Module):
    """Qwen3 truncated to the layers whose hidden states the pipeline reads.

    ``hidden_states`` indexes transformers' ``output_hidden_states`` tuple (negative counts from the end); the
    encoder returns those states concatenated along the feature axis, in the order given.
    """

    def __init__(self, cfg: Qwen3Config, hidden_states: Sequence[int] = (-2,)) -> None:
        super().__init__()
        self.config = cfg
        count = cfg.num_hidden_layers + 1
        for index in hidden_states:
            if not -count <= index < count:
                raise ImgpackError(
                    f"text_encoder/config.json: num_hidden_layers {cfg.num_hidden_layers} gives no hidden state"
                    f" {index}, which the pipeline reads"
                )
        self.outputs = tuple(index % count for index in hidden_states)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [Qwen3Layer(cfg) for _ in range(max(self.outputs))]
        #: The final norm only matters when the last hidden state is read (it is applied to it alone).
        self.final_norm = cfg.num_hidden_layers in self.outputs
        if self.final_norm:
            self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """(batch, tokens) int ids -> (batch, tokens, len(hidden_states) * hidden).

        ``attention_mask`` (batch, tokens), 1 for real tokens and 0 for padding, hides padded keys on top of the
        causal mask, as transformers does; padded rows still get (well-defined) states. Without it the
        prompt is taken to be unpadded.
        """
        x = self.embed_tokens(input_ids)
        mask: mx.array | str = "causal"
        if attention_mask is not None:
            n = input_ids.shape[1]
            causal = mx.tril(mx.ones((n, n), dtype=mx.bool_))
            mask = causal[None, None] & (attention_mask[:, None, None, :] != 0)
        states = {0: x} if 0 in self.outputs else {}
        for depth, layer in enumerate(self.layers, start=1):
            x = layer(x, mask)
            if depth in self.outputs:
                states[depth] = x
        if self.final_norm:
            states[self.config.num_hidden_layers] = self.norm(x)
        picked = [states[index] for index in self.outputs]
        return picked[0] if len(picked) == 1 else mx.concatenate(picked, axis=-1)

    def checkpoint_key(self, param: str) -> str:
        """As saved by ``Qwen3ForCausalLM`` (with ``model.``); keys without the prefix load too."""
        return "model." + param

    def param_name(self, key: str) -> str | None:
        """Manifest key -> parameter path; accepts keys with or without ``model.``, drops unused tensors."""
        if key.startswith("model."):
            key = key[len("model.") :]
        if key.startswith("lm_head.") or (key == "norm.weight" and not self.final_norm):
            return None
        if key.startswith("layers."):
            index = key.split(".", 2)[1]
            if index.isdigit() and len(self.layers) <= int(index) < self.config.num_hidden_layers:
                return None  # deeper than any hidden state the pipeline reads
        return key
