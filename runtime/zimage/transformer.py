"""The Z-Image diffusion transformer (single-stream DiT), built from ``transformer/config.json``.

Image patches and caption tokens are each padded to a multiple of 32 with learned pad tokens, refined
separately (image tokens with timestep modulation, caption tokens without), then concatenated image-first and run
through the main modulated blocks. Positions are 3-axis (caption index, row, column) and rotate interleaved pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgpack.architectures.zimage import ADALN_EMBED_DIM, FREQUENCY_EMBEDDING_SIZE, TIMESTEP_MID_SIZE
from imgpack.runtime.backend import RMSNorm, mx, nn, silu_mul
from imgpack.runtime.common.attention import rope_attention
from imgpack.runtime.common.timestep import timestep_features
from imgpack.schemas.errors import ImgpackError

SEQ_MULTIPLE = 32


@dataclass
class ZImageConfig:
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: list[int] = field(default_factory=lambda: [32, 48, 48])
    axes_lens: list[int] = field(default_factory=lambda: [1024, 512, 512])
    patch_size: int = 2
    f_patch_size: int = 1
    #: Sinusoidal frequencies of the timestep embedding: part of the architecture (diffusers' constant).
    t_freq_dim: int = FREQUENCY_EMBEDDING_SIZE
    #: Hidden width of the timestep MLP: fixed by the architecture (diffusers' constant, the tensor rules' too).
    t_mid_dim: int = TIMESTEP_MID_SIZE

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_EMBED_DIM)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return int(self.dim / 3 * 8)

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "transformer/config.json") -> ZImageConfig:
        known = set(cls.__dataclass_fields__) - {"t_freq_dim", "t_mid_dim", "patch_size", "f_patch_size"}
        values = {k: v for k, v in config.items() if k in known}
        for required in ("dim", "n_layers", "n_heads", "cap_feat_dim"):
            if not isinstance(config.get(required), int) or config[required] <= 0:
                raise ImgpackError(f"{where}: field {required!r} is missing or not a positive integer")
        if config.get("siglip_feat_dim"):
            raise ImgpackError(f"{where}: siglip_feat_dim is set (Z-Image Omni); only text-to-image is supported")
        patches = list(config.get("all_patch_size", [2]))
        f_patches = list(config.get("all_f_patch_size", [1]))
        if not patches or len(patches) != len(f_patches):
            raise ImgpackError(f"{where}: all_patch_size and all_f_patch_size must be non-empty and equal length")
        values["patch_size"], values["f_patch_size"] = int(patches[0]), int(f_patches[0])
        if values["f_patch_size"] != 1:
            raise ImgpackError(f"{where}: f_patch_size {values['f_patch_size']} is not supported (images have 1 frame)")
        n_kv = config.get("n_kv_heads", config.get("n_heads"))
        if n_kv != config.get("n_heads", n_kv):
            raise ImgpackError(f"{where}: n_kv_heads {n_kv} != n_heads; Z-Image attention uses n_heads for K and V")
        try:
            cfg = cls(**values)
        except TypeError as e:
            raise ImgpackError(f"{where}: {e}") from None
        if cfg.dim % cfg.n_heads:
            raise ImgpackError(f"{where}: dim {cfg.dim} is not divisible by n_heads {cfg.n_heads}")
        if sum(cfg.axes_dims) != cfg.head_dim or any(d % 2 for d in cfg.axes_dims):
            raise ImgpackError(
                f"{where}: axes_dims {cfg.axes_dims} must be even and sum to the head dim {cfg.head_dim}"
            )
        if len(cfg.axes_lens) != len(cfg.axes_dims):
            raise ImgpackError(f"{where}: axes_lens and axes_dims must have the same length")
        return cfg


def rope_angles(positions: np.ndarray, cfg: ZImageConfig) -> np.ndarray:
    """(tokens, 3) integer positions -> (tokens, head_dim/2) float32 angles, one block per axis."""
    parts = []
    for axis, (dim, length) in enumerate(zip(cfg.axes_dims, cfg.axes_lens, strict=True)):
        pos = positions[:, axis]
        if pos.size and int(pos.max()) >= length:
            raise ImgpackError(
                f"position {int(pos.max())} on axis {axis} exceeds the model's axes_lens {length};"
                " use a shorter prompt or a smaller --size"
            )
        freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        parts.append(np.outer(pos.astype(np.float64), freqs).astype(np.float32))
    return np.concatenate(parts, axis=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, cfg: ZImageConfig) -> None:
        super().__init__()
        self.freq_dim = cfg.t_freq_dim
        self.linear_1 = nn.Linear(cfg.t_freq_dim, cfg.t_mid_dim)
        self.linear_2 = nn.Linear(cfg.t_mid_dim, cfg.adaln_dim)

    def __call__(self, t: mx.array) -> mx.array:
        emb = timestep_features(t, self.freq_dim)
        return self.linear_2(nn.silu(self.linear_1(emb.astype(self.linear_1.weight.dtype))))


class Attention(nn.Module):
    def __init__(self, cfg: ZImageConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.to_q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.to_k = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.to_v = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.to_out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.norm_q = nn.RMSNorm(cfg.head_dim, eps=1e-5)
            self.norm_k = nn.RMSNorm(cfg.head_dim, eps=1e-5)
        self.qk_norm = cfg.qk_norm

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array | None) -> mx.array:
        b, s, _ = x.shape
        q = self.to_q(x).reshape(b, s, self.n_heads, self.head_dim)
        k = self.to_k(x).reshape(b, s, self.n_heads, self.head_dim)
        v = self.to_v(x).reshape(b, s, self.n_heads, self.head_dim)
        norms = (self.norm_q, self.norm_k) if self.qk_norm else (None, None)
        out = rope_attention(q, k, v, cos, sin, self.head_dim**-0.5, mask, *norms)
        return self.to_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(silu_mul(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    """Pre/post-normed attention and SwiGLU; with ``modulated`` the timestep scales and gates both branches."""

    def __init__(self, cfg: ZImageConfig, modulated: bool) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm1 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention_norm2 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.modulated = modulated
        if modulated:
            self.adaLN_modulation = nn.Linear(cfg.adaln_dim, 4 * cfg.dim)

    def __call__(
        self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array | None, adaln: mx.array | None = None
    ) -> mx.array:
        if not self.modulated:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), cos, sin, mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        assert adaln is not None, "a modulated block needs the timestep embedding"
        scale_msa, gate_msa, scale_mlp, gate_mlp = mx.split(self.adaLN_modulation(adaln)[:, None], 4, axis=-1)
        attn = self.attention(self.attention_norm1(x) * (1.0 + scale_msa), cos, sin, mask)
        x = x + mx.tanh(gate_msa) * self.attention_norm2(attn)
        ffn = self.feed_forward(self.ffn_norm1(x) * (1.0 + scale_mlp))
        return x + mx.tanh(gate_mlp) * self.ffn_norm2(ffn)


class FinalLayer(nn.Module):
    def __init__(self, cfg: ZImageConfig, out_dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.dim, eps=1e-6, affine=False)
        self.linear = nn.Linear(cfg.dim, out_dim)
        self.adaLN_modulation = nn.Linear(cfg.adaln_dim, cfg.dim)

    def __call__(self, x: mx.array, adaln: mx.array) -> mx.array:
        scale = 1.0 + self.adaLN_modulation(nn.silu(adaln))
        return self.linear(self.norm_final(x) * scale[:, None])


class ZImageTransformer(nn.Module):
    def __init__(self, cfg: ZImageConfig) -> None:
        super().__init__()
        self.config = cfg
        patch_dim = cfg.f_patch_size * cfg.patch_size**2 * cfg.in_channels
        self.x_embedder = nn.Linear(patch_dim, cfg.dim)
        self.final_layer = FinalLayer(cfg, patch_dim)
        self.t_embedder = TimestepEmbedder(cfg)
        self.cap_norm = nn.RMSNorm(cfg.cap_feat_dim, eps=cfg.norm_eps)
        self.cap_proj = nn.Linear(cfg.cap_feat_dim, cfg.dim)
        self.x_pad_token = mx.zeros((1, cfg.dim))
        self.cap_pad_token = mx.zeros((1, cfg.dim))
        self.noise_refiner = [TransformerBlock(cfg, modulated=True) for _ in range(cfg.n_refiner_layers)]
        self.context_refiner = [TransformerBlock(cfg, modulated=False) for _ in range(cfg.n_refiner_layers)]
        self.layers = [TransformerBlock(cfg, modulated=True) for _ in range(cfg.n_layers)]

    # -- weights -------------------------------------------------------------------------------------

    def param_name(self, key: str) -> str | None:
        """diffusers key -> parameter path (Sequential indices and the patch-size dicts flattened away)."""
        cfg = self.config
        patch_key = f"{cfg.patch_size}-{cfg.f_patch_size}"
        for prefix, target in (("all_x_embedder.", "x_embedder."), ("all_final_layer.", "final_layer.")):
            if key.startswith(prefix):
                size, _, rest = key[len(prefix) :].partition(".")
                if size != patch_key:
                    return None  # another patch size; the pipeline only uses the first
                key = target + rest
        renames = (
            ("t_embedder.mlp.0.", "t_embedder.linear_1."),
            ("t_embedder.mlp.2.", "t_embedder.linear_2."),
            ("cap_embedder.0.", "cap_norm."),
            ("cap_embedder.1.", "cap_proj."),
            ("final_layer.adaLN_modulation.1.", "final_layer.adaLN_modulation."),
        )
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old) :]
        return key.replace(".adaLN_modulation.0.", ".adaLN_modulation.").replace(".to_out.0.", ".to_out.")

    def checkpoint_key(self, param: str) -> str:
        """Parameter path -> diffusers checkpoint key (the inverse of ``param_name``), for messages and tools."""
        cfg = self.config
        patch_key = f"{cfg.patch_size}-{cfg.f_patch_size}"
        for prefix, target in (
            ("x_embedder.", f"all_x_embedder.{patch_key}."),
            ("final_layer.adaLN_modulation.", f"all_final_layer.{patch_key}.adaLN_modulation.1."),
            ("final_layer.", f"all_final_layer.{patch_key}."),
            ("t_embedder.linear_1.", "t_embedder.mlp.0."),
            ("t_embedder.linear_2.", "t_embedder.mlp.2."),
            ("cap_norm.", "cap_embedder.0."),
            ("cap_proj.", "cap_embedder.1."),
        ):
            if param.startswith(prefix):
                return target + param[len(prefix) :]
        return param.replace(".adaLN_modulation.", ".adaLN_modulation.0.").replace(".to_out.", ".to_out.0.")

    # -- forward -------------------------------------------------------------------------------------

    def __call__(self, latents: mx.array, t: float, captions: list[mx.array]) -> mx.array:
        """Predict the flow for one latent image under each caption.

        latents: (channels, height, width); captions: per batch item (tokens, cap_feat_dim).
        Returns (batch, channels, height, width).
        """
        cfg = self.config
        p = cfg.patch_size
        c, h, w = latents.shape
        if h % p or w % p:
            raise ImgpackError(f"latent size {h}x{w} is not a multiple of the patch size {p}")
        ht, wt = h // p, w // p
        n_img = ht * wt
        img_len = n_img + (-n_img) % SEQ_MULTIPLE
        batch = len(captions)
        cap_lens = [int(cap.shape[0]) for cap in captions]
        cap_padded = [n + (-n) % SEQ_MULTIPLE for n in cap_lens]
        max_cap = max(cap_padded)
        dtype = self.x_embedder.weight.dtype

        # Image tokens: (ht*wt, p*p*c) in (row, col, py, px, channel) order, padded with the pad token.
        patches = latents.reshape(c, ht, p, wt, p).transpose(1, 3, 2, 4, 0).reshape(n_img, p * p * c)
        x = self.x_embedder(patches.astype(dtype))
        if img_len > n_img:
            x = mx.concatenate([x, mx.broadcast_to(self.x_pad_token, (img_len - n_img, cfg.dim))], axis=0)
        x = mx.broadcast_to(x[None], (batch, img_len, cfg.dim))

        # Caption tokens: embedded, padded to a multiple of 32 with the pad token, then to the batch maximum.
        caps = []
        for cap, n, n_pad in zip(captions, cap_lens, cap_padded, strict=True):
            emb = self.cap_proj(self.cap_norm(cap.astype(dtype)))
            pieces = [emb]
            if n_pad > n:
                pieces.append(mx.broadcast_to(self.cap_pad_token, (n_pad - n, cfg.dim)))
            if max_cap > n_pad:
                pieces.append(mx.zeros((max_cap - n_pad, cfg.dim), dtype=dtype))
            caps.append(mx.concatenate(pieces, axis=0))
        cap_x = mx.stack(caps)

        # Positions: caption j at (1+j, 0, 0); image (r, c) at (caption_len+1, r, c); image padding at 0.
        img_angles, cap_angles = [], []
        rows, cols = np.meshgrid(np.arange(ht), np.arange(wt), indexing="ij")
        for n_pad in cap_padded:
            img_pos = np.zeros((img_len, 3), np.int64)
            img_pos[:n_img, 0] = n_pad + 1
            img_pos[:n_img, 1] = rows.reshape(-1)
            img_pos[:n_img, 2] = cols.reshape(-1)
            cap_pos = np.zeros((max_cap, 3), np.int64)
            cap_pos[:, 0] = np.arange(max_cap) + 1
            img_angles.append(rope_angles(img_pos, cfg))
            cap_angles.append(rope_angles(cap_pos, cfg))
        img_angles_mx = mx.array(np.stack(img_angles))[:, :, None, :]
        cap_angles_mx = mx.array(np.stack(cap_angles))[:, :, None, :]
        img_cos, img_sin = mx.cos(img_angles_mx), mx.sin(img_angles_mx)
        cap_cos, cap_sin = mx.cos(cap_angles_mx), mx.sin(cap_angles_mx)

        # Key masks only where batch items differ in caption length.
        cap_mask = None
        if any(n != max_cap for n in cap_padded):
            valid = np.arange(max_cap)[None, :] < np.array(cap_padded)[:, None]
            cap_mask = mx.array(valid)[:, None, None, :]
        unified_mask = None
        if cap_mask is not None:
            unified_mask = mx.concatenate([mx.ones((batch, 1, 1, img_len), dtype=mx.bool_), cap_mask], axis=-1)

        adaln = self.t_embedder(mx.full((batch,), t * cfg.t_scale, dtype=mx.float32)).astype(dtype)
        for block in self.noise_refiner:
            x = block(x, img_cos, img_sin, None, adaln)
        for block in self.context_refiner:
            cap_x = block(cap_x, cap_cos, cap_sin, cap_mask)

        unified = mx.concatenate([x, cap_x], axis=1)
        cos = mx.concatenate([img_cos, cap_cos], axis=1)
        sin = mx.concatenate([img_sin, cap_sin], axis=1)
        for block in self.layers:
            unified = block(unified, cos, sin, unified_mask, adaln)
        out = self.final_layer(unified[:, :n_img], adaln)
        out = out.reshape(batch, ht, wt, p, p, c).transpose(0, 5, 1, 3, 2, 4)
        return out.reshape(batch, c, h, w)
