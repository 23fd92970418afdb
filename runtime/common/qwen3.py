"""Qwen3 text encoder: the prompt embedding Z-Image conditions on.

The pipeline takes hidden state [-2] of Qwen3 — the output of the second-to-last decoder layer, before the final
norm — so only the first ``num_hidden_layers - 1`` layers are built and loaded; the last layer, the final norm
and ``lm_head`` are never read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
            if layers < 2:
                raise ImgpackError(f"{where}: num_hidden_layers must be at least 2 (the pipeline uses layer -2)")
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


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, n, self.n_heads, self.head_dim)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(b, n, self.n_kv_heads, self.head_dim)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, n, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=0)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=0)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask="causal")
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

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3TextEncoder(nn.Module):
    """Qwen3 truncated to the layers whose output the pipeline uses (all but the last)."""

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [Qwen3Layer(cfg) for _ in range(cfg.num_hidden_layers - 1)]

    def __call__(self, input_ids: mx.array) -> mx.array:
        """(batch, tokens) int ids -> (batch, tokens, hidden) hidden state [-2]."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x

    def checkpoint_key(self, param: str) -> str:
        """As saved by ``Qwen3ForCausalLM`` (with ``model.``); keys without the prefix load too."""
        return "model." + param

    def param_name(self, key: str) -> str | None:
        """Manifest key -> parameter path; accepts keys with or without ``model.``, drops unused tensors."""
        if key.startswith("model."):
            key = key[len("model.") :]
        if key.startswith("lm_head.") or key == "norm.weight":
            return None
        if key.startswith("layers."):
            index = key.split(".", 2)[1]
            if index.isdigit() and int(index) == len(self.layers):
                return None  # the last layer: its output is hidden state [-1], which the pipeline does not use
        return key
