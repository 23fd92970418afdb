"""Multi-head attention with rotary positions over (batch, tokens, heads, head_dim): one implementation for every
architecture.

Both transformers rotate interleaved pairs ``(x[2k], x[2k+1])`` of each head by per-token angles, after an
optional per-head RMSNorm. On CPU the norm, the softmax scale and the rotation (the pairs are complex64 numbers in
memory, so it is one complex multiply) run as one numpy pass per band of tokens, spread over the cores, into
buffers that feed ``backend.attention_arrays`` directly (no head transposes, no MLX elementwise kernels, which run
on one core); elsewhere this is MLX's ops and fused attention.
"""

from __future__ import annotations

import numpy as np

from imgpack.runtime.backend import attention, attention_arrays, mx, nn, numpy_kernels
from imgpack.runtime.cpu_pool import run_all

#: Tokens per band of the CPU norm-and-rotate pass (small enough to stay in cache between its chained ops).
ROPE_BAND_TOKENS = 64


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs of (batch, tokens, heads, head_dim) by angles whose cos/sin are
    (batch or 1, tokens, 1, head_dim/2), in float32."""
    b, s, h, d = x.shape
    pairs = x.astype(mx.float32).reshape(b, s, h, d // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    out = mx.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return out.reshape(b, s, h, d).astype(x.dtype)


def rope_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    cos: mx.array,
    sin: mx.array,
    scale: float,
    mask: mx.array | None = None,
    q_norm: nn.RMSNorm | None = None,
    k_norm: nn.RMSNorm | None = None,
) -> mx.array:
    """``softmax(rope(norm(q)) rope(norm(k))^T * scale) v`` for (batch, tokens, heads, head_dim) inputs; ``mask``
    (broadcastable to batch, heads, queries, keys) is True where keys may be seen. Returns (batch, tokens,
    heads * head_dim)."""
    b, s, h, d = q.shape
    floats = (mx.float32, mx.bfloat16, mx.float16)
    if not (numpy_kernels() and all(a.dtype in floats for a in (q, k, v)) and k.shape[2] == h):
        if q_norm is not None:
            q = q_norm(q)
        if k_norm is not None:
            k = k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), scale, mask)
        return out.transpose(0, 2, 1, 3).reshape(b, s, -1)
    # CPU computes in float32; a half-precision input (a norm kept as stored) is widened here, not in MLX's sdpa.
    q, k, v = (a if a.dtype == mx.float32 else a.astype(mx.float32) for a in (q, k, v))
    mx.eval(q, k, v, cos, sin)
    # Interleaved pairs are complex64 numbers in memory: the rotation is one complex multiply by cos + i sin.
    rotation = np.empty((cos.shape[0], s, 1, d // 2), np.complex64)
    rotation.real, rotation.imag = np.asarray(cos), np.asarray(sin)
    rotation = np.broadcast_to(rotation, (b, s, 1, d // 2))
    queries = _norm_rope(np.asarray(q), q_norm, rotation, scale)
    keys = _norm_rope(np.asarray(k), k_norm, rotation, 1.0)
    values = np.asarray(v)
    bias = None
    if mask is not None:
        mx.eval(mask)
        bias = np.asarray(mask)
    out = attention_arrays(queries.transpose(0, 2, 1, 3), keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3),
                           scale=1.0, mask=bias)
    return out.transpose(0, 2, 1, 3).reshape(b, s, -1)


def _norm_rope(x: np.ndarray, norm: nn.RMSNorm | None, rotation: np.ndarray, scale: float) -> np.ndarray:
    """RMSNorm each head (if ``norm``), scale, and rotate its pairs by ``rotation`` (complex64, broadcastable to
    (batch, tokens, 1, dim/2)): a new (batch, tokens, heads, dim) array."""
    b, s, h, d = x.shape
    out = np.empty((b, s, h, d), np.float32)
    weight = eps = None
    if norm is not None:
        weight_f32 = norm.weight.astype(mx.float32)
        mx.eval(weight_f32)
        weight = np.asarray(weight_f32) * np.float32(scale)
        eps = np.float32(norm.eps)

    def band(job: tuple[int, int, int]) -> None:
        bi, t0, t1 = job
        src = x[bi, t0:t1]
        dst = out[bi, t0:t1]
        if weight is not None:
            mean_square = np.einsum("thd,thd->th", src, src)[..., None]
            mean_square *= np.float32(1.0 / d)
            mean_square += eps
            np.sqrt(mean_square, out=mean_square)
            np.divide(src, mean_square, out=dst)
            dst *= weight
        else:
            np.multiply(src, np.float32(scale), out=dst)
        pairs = dst.view(np.complex64)
        pairs *= rotation[bi, t0:t1]

    jobs = [(bi, t0, min(s, t0 + ROPE_BAND_TOKENS)) for bi in range(b) for t0 in range(0, s, ROPE_BAND_TOKENS)]
    run_all(band, jobs)
    return out


__all__ = ["apply_rope", "rope_attention"]
