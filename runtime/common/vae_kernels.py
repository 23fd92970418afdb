"""CPU kernels for the VAE decoder: 3x3 convolutions as large sgemms, the nearest-x2 upsample folded into the
following convolution, and GroupNorm + SiLU in one pass.

MLX's CPU convolutions do not reach a fast sgemm, and a decode is almost all 3x3 convolutions (about 2.5 TFLOP
for a FLUX-shaped VAE at 512x512). These kernels run the arithmetic in numpy's bundled OpenBLAS (built for every
x86 microarchitecture, threads included) over the MLX buffers, the way ``backend.attention`` does:

* a 3x3 'same' convolution is one ``[pixels, 9*Cin] x [9*Cin, Cout]`` matmul over an im2col band. The band is
  cut from a zero-padded copy of the input rows whose width is padded too, so every tap is a constant offset into
  the flattened band: the im2col is a single strided copy, and the two padding columns of each output row are
  computed and dropped.
* ``conv(upsample_nearest_x2(x))`` is computed without the upsampled tensor: each of the four output phases
  (even/odd row x even/odd column) sees only 2x2 distinct input pixels, so it is a 2x2 convolution of ``x``
  with the 3x3 kernel's taps summed per phase: 16 instead of 36 taps per 2x2 output pixels, exact up to rounding.
* GroupNorm statistics accumulate in float64 chunk by chunk; scale, shift and SiLU are applied per cache-sized
  chunk, so the activation is read twice and written once.

Everything works band by band, so the extra memory is bounded (about ``BAND_FLOATS`` floats) at any resolution.
Set ``IMGPACK_FAST_CONV=0`` to use MLX's own kernels (always the case on Metal/CUDA).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from imgpack.runtime.backend import _writable_view, is_cpu, mx

FAST_CONV_ENV = "IMGPACK_FAST_CONV"
#: Floats in one band's im2col buffer (x4 bytes): 9 x 4 M, the same bound as the MLX path's banding.
BAND_FLOATS = 9 * 4 * 1024 * 1024
#: Floats per chunk of the GroupNorm passes: small enough to stay in cache between the chained numpy ops.
NORM_CHUNK = 256 * 1024


def fast_conv(*arrays: mx.array) -> bool:
    """Whether the numpy kernels apply: on CPU, float32 only, unless ``IMGPACK_FAST_CONV=0``."""
    return (
        is_cpu()
        and os.environ.get(FAST_CONV_ENV, "1") != "0"
        and all(a.dtype == mx.float32 for a in arrays)
    )


def _output(shape: tuple[int, ...]) -> tuple[mx.array, np.ndarray]:
    """A fresh MLX float32 buffer and a writable numpy view of it (results are written straight into MLX)."""
    out = mx.zeros(shape, dtype=mx.float32)
    mx.eval(out)
    view = _writable_view(out)
    if view is None:  # pragma: no cover - MLX always materialises zeros on CPU
        raise RuntimeError("could not map an MLX buffer into numpy")
    return out, view


def _read(x: mx.array) -> np.ndarray:
    mx.eval(x)
    return np.asarray(x)


def _cached(module: Any, weight: mx.array, build: Any) -> Any:
    """numpy weight layouts, rebuilt only when the module's weight array is replaced (a load, an update)."""
    caches = module.__dict__.setdefault("_vae_kernel_cache", {})
    cache = caches.get(build.__name__)
    if cache is None or cache[0] is not weight:
        cache = caches[build.__name__] = (weight, build(np.asarray(weight, dtype=np.float32)))
    return cache[1]


def _direct_weights(w: np.ndarray) -> np.ndarray:
    """MLX (Cout, 3, 3, Cin) -> (9*Cin, Cout), taps in (dy, dx) order, channels fastest: the im2col layout."""
    cout, _, _, cin = w.shape
    return np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(9 * cin, cout))


#: For output phase p (0 even, 1 odd) of a nearest-x2 upsample, which of the 3 taps fall on input offset 0 / 1.
_PHASE_TAPS = {0: ((0,), (1, 2)), 1: ((0, 1), (2,))}


def _phase_weights(w: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """(Cout, 3, 3, Cin) -> per phase (py, px) the (4*Cin, Cout) weights of its 2x2 convolution."""
    cout, _, _, cin = w.shape
    out = {}
    for py in (0, 1):
        for px in (0, 1):
            taps = np.empty((2, 2, cin, cout), np.float32)
            for a, rows in enumerate(_PHASE_TAPS[py]):
                for b, cols in enumerate(_PHASE_TAPS[px]):
                    taps[a, b] = w[:, rows][:, :, cols].sum(axis=(1, 2)).T
            out[py, px] = np.ascontiguousarray(taps.reshape(4 * cin, cout))
    return out


def _padded_band(x: np.ndarray, top: int, bottom: int, into: np.ndarray) -> np.ndarray:
    """Rows ``top-1 .. bottom`` of ``x`` (h, w, c) zero-padded by one pixel all round, plus one spare zero row
    (the dropped padding columns of the last output row read into it), flattened to (pixels, c)."""
    h, w, c = x.shape
    rows = bottom - top
    band = into[: (rows + 3) * (w + 2) * c].reshape(rows + 3, w + 2, c)
    src_top, src_bottom = max(top - 1, 0), min(bottom + 1, h)
    dst_top = src_top - (top - 1)
    band[:, 0] = 0.0
    band[:, w + 1] = 0.0
    band[:dst_top] = 0.0
    band[dst_top + src_bottom - src_top :] = 0.0
    band[dst_top : dst_top + src_bottom - src_top, 1 : w + 1] = x[src_top:src_bottom]
    return band.reshape(-1, c)


def _taps_view(flat: np.ndarray, offset: int, n: int, width: int, taps: int) -> np.ndarray:
    """(n, taps, taps*c) view of a flattened padded band: row p holds the ``taps`` x ``taps`` window at pixel
    ``p + offset`` (padded row width ``width``); each window row is ``taps*c`` contiguous floats."""
    c = flat.shape[1]
    item = flat.itemsize
    return as_strided(flat[offset:], shape=(n, taps, taps * c), strides=(c * item, width * c * item, item))


def _band_rows(h: int, w: int, floats_per_pixel: int) -> int:
    return max(1, min(h, BAND_FLOATS // max(1, (w + 2) * floats_per_pixel)))


def conv3x3(x: mx.array, weight: mx.array, bias: mx.array, module: Any) -> mx.array:
    """3x3 stride-1 'same' convolution of NHWC ``x`` with MLX-layout ``weight`` (Cout, 3, 3, Cin)."""
    wmat = _cached(module, weight, _direct_weights)
    b, h, w, cin = x.shape
    cout = wmat.shape[1]
    xs = _read(x)
    bias_np = np.asarray(bias, dtype=np.float32)
    out, view = _output((b, h, w, cout))
    rows = _band_rows(h, w, 9 * cin)
    wp = w + 2
    pad_buf = np.empty((rows + 3) * wp * cin, np.float32)
    col = np.empty((rows * wp, 9 * cin), np.float32)
    res = np.empty((rows * wp, cout), np.float32)
    for i in range(b):
        for top in range(0, h, rows):
            bottom = min(h, top + rows)
            n = (bottom - top) * wp
            flat = _padded_band(xs[i], top, bottom, pad_buf)
            np.copyto(col[:n].reshape(n, 3, 3 * cin), _taps_view(flat, 0, n, wp, 3))
            np.matmul(col[:n], wmat, out=res[:n])
            np.add(res[:n].reshape(-1, wp, cout)[:, :w], bias_np, out=view[i, top:bottom])
    return out


def upsample_conv3x3(x: mx.array, weight: mx.array, bias: mx.array, module: Any) -> mx.array:
    """``conv3x3(nearest_upsample_x2(x))`` without the upsampled tensor: four 2x2 phase convolutions of ``x``."""
    phases = _cached(module, weight, _phase_weights)
    b, h, w, cin = x.shape
    cout = phases[0, 0].shape[1]
    xs = _read(x)
    bias_np = np.asarray(bias, dtype=np.float32)
    out, view = _output((b, 2 * h, 2 * w, cout))
    rows = _band_rows(h, w, 4 * cin)
    wp = w + 2
    pad_buf = np.empty((rows + 3) * wp * cin, np.float32)
    col = np.empty((rows * wp, 4 * cin), np.float32)
    res = np.empty((rows * wp, cout), np.float32)
    for i in range(b):
        grid = view[i].reshape(h, 2, w, 2, cout)
        for top in range(0, h, rows):
            bottom = min(h, top + rows)
            n = (bottom - top) * wp
            flat = _padded_band(xs[i], top, bottom, pad_buf)
            for (py, px), wmat in phases.items():
                np.copyto(col[:n].reshape(n, 2, 2 * cin), _taps_view(flat, py * wp + px, n, wp, 2))
                np.matmul(col[:n], wmat, out=res[:n])
                np.add(res[:n].reshape(-1, wp, cout)[:, :w], bias_np, out=grid[top:bottom, py, :, px])
    return out


def conv1x1(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    """A 1x1 convolution (MLX weight (Cout, 1, 1, Cin)) as one matmul over all pixels."""
    b, h, w, cin = x.shape
    cout = weight.shape[0]
    xs = np.ascontiguousarray(_read(x)).reshape(-1, cin)
    wmat = np.asarray(weight, dtype=np.float32).reshape(cout, cin)
    out, view = _output((b, h, w, cout))
    flat = view.reshape(-1, cout)
    np.matmul(xs, wmat.T, out=flat)
    if bias is not None:
        flat += np.asarray(bias, dtype=np.float32)
    return out


def group_norm_silu(
    x: mx.array, weight: mx.array, bias: mx.array, groups: int, eps: float, silu: bool = True
) -> mx.array:
    """GroupNorm over NHWC (PyTorch's channel grouping), optionally followed by SiLU, in two passes over ``x``:
    float64 sums and sums of squares per group, then ``x * scale + shift`` (and SiLU) per chunk."""
    b, h, w, c = x.shape
    xs = np.ascontiguousarray(_read(x)).reshape(b, h * w, c)
    gamma = np.asarray(weight, dtype=np.float32)
    beta = np.asarray(bias, dtype=np.float32)
    out, view = _output((b, h, w, c))
    flat_out = view.reshape(b, h * w, c)
    rows = max(1, NORM_CHUNK // c)
    count = h * w * (c // groups)
    tmp = np.empty((rows, c), np.float32)
    for i in range(b):
        sums = np.zeros(c, np.float64)
        squares = np.zeros(c, np.float64)
        for start in range(0, h * w, rows):
            chunk = xs[i, start : start + rows].astype(np.float64)
            sums += chunk.sum(axis=0)
            squares += np.einsum("ij,ij->j", chunk, chunk)
        mean = sums.reshape(groups, -1).sum(axis=1) / count
        var = np.maximum(squares.reshape(groups, -1).sum(axis=1) / count - mean * mean, 0.0)
        inv = 1.0 / np.sqrt(var + eps)
        scale = (np.repeat(inv, c // groups) * gamma).astype(np.float32)
        shift = (beta - np.repeat(mean * inv, c // groups) * gamma).astype(np.float32)
        for start in range(0, h * w, rows):
            src = xs[i, start : start + rows]
            dst = flat_out[i, start : start + rows]
            np.multiply(src, scale, out=dst)
            dst += shift
            if silu:
                t = tmp[: len(dst)]
                np.negative(dst, out=t)
                np.exp(t, out=t)
                t += 1.0
                np.divide(dst, t, out=dst)
    return out
