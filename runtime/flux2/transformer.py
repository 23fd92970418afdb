"""The FLUX.2 diffusion transformer (``Flux2Transformer2DModel``), built from ``transformer/config.json``.

Double-stream blocks keep text and image tokens in separate weights but attend jointly (text first); single-stream
blocks then run the concatenation through one fused attention+MLP projection. Every block reads the same three
timestep modulations, computed once per forward. Positions are 4-axis (t, h, w, l) ids rotating interleaved pairs;
no Linear has a bias and the LayerNorms have no affine parameters. Latents arrive already packed as tokens
(2x2 latent patches flattened to channels), so the transformer itself has patch size 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from imgpack.architectures.flux2 import TRANSFORMER_DEFAULTS, with_defaults
from imgpack.runtime.backend import modulated_layer_norm, mx, nn, silu_mul
from imgpack.runtime.common.attention import rope_attention
from imgpack.runtime.common.timestep import timestep_features
from imgpack.schemas.errors import ImgpackError


@dataclass
class Flux2Config:
    """diffusers' ``Flux2Transformer2DModel`` arguments; a key the config omits takes diffusers' default."""

    in_channels: int
    out_channels: int | None
    num_layers: int
    num_single_layers: int
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int
    timestep_guidance_channels: int
    mlp_ratio: float
    axes_dims_rope: list[int]
    rope_theta: float
    eps: float
    guidance_embeds: bool
    patch_size: int

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "transformer/config.json") -> Flux2Config:
        full = with_defaults(config, TRANSFORMER_DEFAULTS)
        values = {k: v for k, v in full.items() if k in cls.__dataclass_fields__}
        try:
            cfg = cls(**values)
        except TypeError as e:
            raise ImgpackError(f"{where}: {e}") from None
        for name in ("in_channels", "num_attention_heads", "attention_head_dim", "joint_attention_dim"):
            value = getattr(cfg, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ImgpackError(f"{where}: field {name!r} must be a positive integer, got {value!r}")
        if cfg.patch_size != 1:
            raise ImgpackError(f"{where}: patch_size {cfg.patch_size} is not supported (the pipeline packs 2x2)")
        if (cfg.out_channels or cfg.in_channels) != cfg.in_channels:
            raise ImgpackError(f"{where}: out_channels {cfg.out_channels} != in_channels {cfg.in_channels}")
        if sum(cfg.axes_dims_rope) != cfg.attention_head_dim or any(d % 2 for d in cfg.axes_dims_rope):
            raise ImgpackError(
                f"{where}: axes_dims_rope {cfg.axes_dims_rope} must be even and sum to attention_head_dim"
                f" {cfg.attention_head_dim}"
            )
        return cfg


# -- positions ---------------------------------------------------------------------------------------------


def text_ids(length: int) -> np.ndarray:
    """(length, 4) ids of the text tokens: (0, 0, 0, i) — only the last axis moves."""
    ids = np.zeros((length, 4), np.int64)
    ids[:, 3] = np.arange(length)
    return ids


def image_ids(height: int, width: int) -> np.ndarray:
    """(height*width, 4) ids of the packed latent tokens in raster order: (0, row, column, 0)."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ids = np.zeros((height * width, 4), np.int64)
    ids[:, 1], ids[:, 2] = rows.reshape(-1), cols.reshape(-1)
    return ids


def rope_tables(ids: np.ndarray, cfg: Flux2Config) -> tuple[mx.array, mx.array]:
    """(tokens, 4) ids -> cos and sin of shape (1, tokens, 1, head_dim/2), one block of frequencies per axis.

    Computed in float64 and rounded once, as diffusers does (its float32 tables come from float64 cos/sin).
    """
    angles = []
    for axis, dim in enumerate(cfg.axes_dims_rope):
        freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        angles.append(np.outer(ids[:, axis].astype(np.float64), freqs))
    table = np.concatenate(angles, axis=-1)
    cos = mx.array(np.cos(table).astype(np.float32))[None, :, None, :]
    sin = mx.array(np.sin(table).astype(np.float32))[None, :, None, :]
    return cos, sin


def joint_attention(q: mx.array, k: mx.array, v: mx.array, cos: mx.array, sin: mx.array,
                    q_norm: nn.RMSNorm | None = None, k_norm: nn.RMSNorm | None = None) -> mx.array:
    """Unmasked attention of (batch, tokens, heads, head_dim) after the per-head norms (when given; on CPU in the
    same pass as RoPE) and RoPE -> (batch, tokens, heads*head_dim)."""
    return rope_attention(q, k, v, cos, sin, q.shape[-1] ** -0.5, None, q_norm, k_norm)


# -- modules -----------------------------------------------------------------------------------------------


class TimestepEmbedding(nn.Module):
    """Sinusoid (cos first, max period 10000) -> Linear -> SiLU -> Linear, all without bias."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.channels = channels
        self.linear_1 = nn.Linear(channels, dim, bias=False)
        self.linear_2 = nn.Linear(dim, dim, bias=False)

    def __call__(self, t: mx.array) -> mx.array:
        emb = timestep_features(t, self.channels)
        return self.linear_2(nn.silu(self.linear_1(emb.astype(self.linear_1.weight.dtype))))


class TimeGuidanceEmbed(nn.Module):
    """Holds the timestep embedder (and the guidance embedder of guidance-distilled checkpoints, which the klein
    pipeline never feeds: it always passes ``guidance=None``, so those weights are not loaded)."""

    def __init__(self, cfg: Flux2Config) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(cfg.timestep_guidance_channels, cfg.dim)

    def __call__(self, t: mx.array) -> mx.array:
        return self.timestep_embedder(t)


class Modulation(nn.Module):
    """SiLU -> Linear to ``sets`` x (shift, scale, gate), each (batch, 1, dim); shared by every block of a kind."""

    def __init__(self, dim: int, sets: int) -> None:
        super().__init__()
        self.sets = sets
        self.linear = nn.Linear(dim, 3 * sets * dim, bias=False)

    def __call__(self, temb: mx.array) -> list[mx.array]:
        parts = mx.split(self.linear(nn.silu(temb))[:, None], 3 * self.sets, axis=-1)
        return list(parts)  # split by a count: a list of arrays


class FeedForward(nn.Module):
    """SwiGLU with the gate and up projections fused: ``linear_out(silu(a) * b)`` for ``[a | b] = linear_in(x)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.linear_in(x), 2, axis=-1)
        return self.linear_out(silu_mul(gate, up))


class JointAttention(nn.Module):
    """Double-stream attention: image (``to_*``) and text (``add_*``) projections, one attention over both."""

    def __init__(self, cfg: Flux2Config) -> None:
        super().__init__()
        dim, hd = cfg.dim, cfg.attention_head_dim
        self.head_dim = hd
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.norm_q = nn.RMSNorm(hd, eps=cfg.eps)
        self.norm_k = nn.RMSNorm(hd, eps=cfg.eps)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.add_q_proj = nn.Linear(dim, dim, bias=False)
        self.add_k_proj = nn.Linear(dim, dim, bias=False)
        self.add_v_proj = nn.Linear(dim, dim, bias=False)
        self.norm_added_q = nn.RMSNorm(hd, eps=cfg.eps)
        self.norm_added_k = nn.RMSNorm(hd, eps=cfg.eps)
        self.to_add_out = nn.Linear(dim, dim, bias=False)

    def __call__(
        self, x: mx.array, c: mx.array, cos: mx.array, sin: mx.array
    ) -> tuple[mx.array, mx.array]:
        b, n, _ = x.shape
        t = c.shape[1]

        def heads(a: mx.array) -> mx.array:
            return a.reshape(b, a.shape[1], -1, self.head_dim)

        q = mx.concatenate([self.norm_added_q(heads(self.add_q_proj(c))), self.norm_q(heads(self.to_q(x)))], axis=1)
        k = mx.concatenate([self.norm_added_k(heads(self.add_k_proj(c))), self.norm_k(heads(self.to_k(x)))], axis=1)
        v = mx.concatenate([heads(self.add_v_proj(c)), heads(self.to_v(x))], axis=1)
        out = joint_attention(q, k, v, cos, sin)
        return self.to_out(out[:, t:]), self.to_add_out(out[:, :t])


class DoubleStreamBlock(nn.Module):
    """``transformer_blocks.N``: modulated attention and feed-forward, per stream, around one joint attention."""

    def __init__(self, cfg: Flux2Config) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.attn = JointAttention(cfg)
        self.ff = FeedForward(cfg.dim, cfg.mlp_dim)
        self.ff_context = FeedForward(cfg.dim, cfg.mlp_dim)

    def norm(self, x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
        return modulated_layer_norm(x, self.eps, scale, shift)

    def __call__(
        self, x: mx.array, c: mx.array, mod_img: list[mx.array], mod_txt: list[mx.array], cos: mx.array, sin: mx.array
    ) -> tuple[mx.array, mx.array]:
        shift1, scale1, gate1, shift2, scale2, gate2 = mod_img
        c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = mod_txt
        attn_x, attn_c = self.attn(self.norm(x, shift1, scale1), self.norm(c, c_shift1, c_scale1), cos, sin)
        x = x + gate1 * attn_x
        x = x + gate2 * self.ff(self.norm(x, shift2, scale2))
        c = c + c_gate1 * attn_c
        c = c + c_gate2 * self.ff_context(self.norm(c, c_shift2, c_scale2))
        return x, c


class ParallelSelfAttention(nn.Module):
    """Single-stream ``attn``: one projection to [q | k | v | mlp gate | mlp up], one from [attention | mlp]."""

    def __init__(self, cfg: Flux2Config) -> None:
        super().__init__()
        dim, hd = cfg.dim, cfg.attention_head_dim
        self.head_dim = hd
        self.dim, self.mlp_dim = dim, cfg.mlp_dim
        self.to_qkv_mlp_proj = nn.Linear(dim, 3 * dim + 2 * cfg.mlp_dim, bias=False)
        self.norm_q = nn.RMSNorm(hd, eps=cfg.eps)
        self.norm_k = nn.RMSNorm(hd, eps=cfg.eps)
        self.to_out = nn.Linear(dim + cfg.mlp_dim, dim, bias=False)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        b, s, _ = x.shape
        d, m = self.dim, self.mlp_dim
        y = self.to_qkv_mlp_proj(x)
        q, k, v = (y[..., i * d : (i + 1) * d].reshape(b, s, -1, self.head_dim) for i in range(3))
        out = joint_attention(q, k, v, cos, sin, self.norm_q, self.norm_k)
        mlp = silu_mul(y[..., 3 * d : 3 * d + m], y[..., 3 * d + m :])
        return self.to_out(mx.concatenate([out, mlp], axis=-1))


class SingleStreamBlock(nn.Module):
    """``single_transformer_blocks.N``: ``z += gate * attn(LN(z) * (1 + scale) + shift)``."""

    def __init__(self, cfg: Flux2Config) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.attn = ParallelSelfAttention(cfg)

    def __call__(self, z: mx.array, mod: list[mx.array], cos: mx.array, sin: mx.array) -> mx.array:
        shift, scale, gate = mod
        normed = modulated_layer_norm(z, self.eps, scale, shift)
        return z + gate * self.attn(normed, cos, sin)


class OutputNorm(nn.Module):
    """``norm_out``: LayerNorm modulated by ``Linear(SiLU(temb))``, whose rows are [scale; shift] (scale first)."""

    def __init__(self, cfg: Flux2Config) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.linear = nn.Linear(cfg.dim, 2 * cfg.dim, bias=False)

    def __call__(self, x: mx.array, temb: mx.array) -> mx.array:
        scale, shift = mx.split(self.linear(nn.silu(temb))[:, None], 2, axis=-1)
        return modulated_layer_norm(x, self.eps, scale, shift)


class Flux2Transformer(nn.Module):
    def __init__(self, cfg: Flux2Config) -> None:
        super().__init__()
        self.config = cfg
        dim = cfg.dim
        self.time_guidance_embed = TimeGuidanceEmbed(cfg)
        self.double_stream_modulation_img = Modulation(dim, 2)
        self.double_stream_modulation_txt = Modulation(dim, 2)
        self.single_stream_modulation = Modulation(dim, 1)
        self.x_embedder = nn.Linear(cfg.in_channels, dim, bias=False)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, dim, bias=False)
        self.transformer_blocks = [DoubleStreamBlock(cfg) for _ in range(cfg.num_layers)]
        self.single_transformer_blocks = [SingleStreamBlock(cfg) for _ in range(cfg.num_single_layers)]
        self.norm_out = OutputNorm(cfg)
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * cfg.in_channels, bias=False)

    # -- weights -------------------------------------------------------------------------------------------

    def param_name(self, key: str) -> str | None:
        """diffusers key -> parameter path: ``attn.to_out.0`` (a ModuleList with dropout) is ``attn.to_out``, and
        the guidance embedder, never fed by the klein pipeline, is not loaded."""
        if key.startswith("time_guidance_embed.guidance_embedder."):
            return None
        return key.replace(".attn.to_out.0.", ".attn.to_out.")

    def checkpoint_key(self, param: str) -> str:
        """Parameter path -> diffusers checkpoint key (the inverse of ``param_name``), for messages and tools."""
        if param.startswith("transformer_blocks."):
            return param.replace(".attn.to_out.", ".attn.to_out.0.")
        return param

    # -- forward -------------------------------------------------------------------------------------------

    def __call__(
        self,
        hidden_states: mx.array,
        encoder_hidden_states: mx.array,
        timestep: float,
        img_ids: np.ndarray,
        txt_ids: np.ndarray,
    ) -> mx.array:
        """Predict the flow of the packed latent tokens under each prompt embedding.

        hidden_states: (1 or batch, image tokens, in_channels); encoder_hidden_states: (batch, text tokens,
        joint_attention_dim); ``timestep`` is sigma (diffusers' ``timestep / 1000``); ids are (tokens, 4).
        Returns (batch, image tokens, in_channels).
        """
        dtype = self.x_embedder.weight.dtype
        batch, t_len = encoder_hidden_states.shape[:2]
        t = mx.full((batch,), timestep, dtype=mx.float32) * 1000
        temb = self.time_guidance_embed(t).astype(dtype)
        mod_img = self.double_stream_modulation_img(temb)
        mod_txt = self.double_stream_modulation_txt(temb)
        mod_single = self.single_stream_modulation(temb)

        x = self.x_embedder(hidden_states.astype(dtype))
        x = mx.broadcast_to(x, (batch, *x.shape[1:]))
        c = self.context_embedder(encoder_hidden_states.astype(dtype))
        cos, sin = rope_tables(np.concatenate([txt_ids, img_ids], axis=0), self.config)

        for block in self.transformer_blocks:
            x, c = block(x, c, mod_img, mod_txt, cos, sin)
            mx.eval(x, c)  # bound the graph, and so the live activations, to one block
        z = mx.concatenate([c, x], axis=1)
        for single in self.single_transformer_blocks:
            z = single(z, mod_single, cos, sin)
            mx.eval(z)
        return self.proj_out(self.norm_out(z[:, t_len:], temb))
