"""CPU kernels for the VAE decoder: 3x3 convolutions as large sgemms, the nearest-x2 upsample folded into the
following convolution, and GroupNorm + SiLU in one pass.

A decode is almost all 3x3 convolutions (about 2.5 TFLOP for a FLUX-shaped VAE at 512x512, direct), which MLX's
CPU kernels compute in the direct form, below the sgemm rate on some CPUs (``bench/vae_kernels.py`` prints both
sides per layer). These kernels run the arithmetic in numpy's bundled OpenBLAS (built for every
x86 microarchitecture, threads included) over the MLX buffers, the way ``backend.attention`` does:

* a 3x3 'same' convolution is one ``[pixels, 9*Cin] x [9*Cin, Cout]`` matmul over an im2col band. The band is
  cut from a zero-padded copy of the input rows whose width is padded too, so every tap is a constant offset into
  the flattened band: the im2col is a single strided copy, and the two padding columns of each output row are
  computed and dropped. From ``WINOGRAD_MIN_CIN`` input channels the convolution runs as Winograd F(4x4, 3x3)
  instead: 36 matmuls ``[tiles, Cin] x [Cin, Cout]`` do 4x fewer multiply-adds, and each tile transform (both
  axes at once) is one more sgemm over the band's tiles (error ~1e-5 relative in float32 at 512 channels); into
  a few output channels (the output conv) nine shifted sgemms accumulate into the band's result instead.
* ``conv(upsample_nearest_x2(x))`` is computed without the upsampled tensor: each of the four output phases
  (even/odd row x even/odd column) sees only 2x2 distinct input pixels, so it is a 2x2 convolution of ``x``
  with the 3x3 kernel's taps summed per phase (16 instead of 36 taps per 2x2 output pixels), each run as
  Winograd F(2x2, 2x2): 9 matmuls ``[tiles, Cin] x [Cin, Cout]``, transforms of adds only.
* GroupNorm's statistics take one pass (float32 moments per chunk, combined in float64); its scale, shift and
  SiLU are then applied to each band a convolution copies in (``Prenorm``), so the normalised activation is never
  stored, and the ResNet skip is added in the convolution's last pass.

Everything works band by band, so the extra memory is bounded (about ``BAND_FLOATS`` floats) at any resolution,
and the bands are spread over ``cpu_pool``'s workers, numpy's BLAS single-threaded in each.
Set ``IMGPACK_FAST_CONV=0`` to use MLX's own kernels (always the case on Metal/CUDA).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from numpy.lib.stride_tricks import as_strided

from imgpack.runtime.backend import _writable_view, is_cpu, mx, output_buffer, silu_into
from imgpack.runtime.cpu_pool import (
    Scratch,
    blas_in_workers,
    can_accumulate,
    matmul_into,
    run_all,
    split_work,
    worker_count,
)

T = TypeVar("T")

FAST_CONV_ENV = "IMGPACK_FAST_CONV"
#: Floats in one band's im2col buffer (x4 bytes): 9 x 4 M, the same bound as the MLX path's banding.
BAND_FLOATS = 9 * 4 * 1024 * 1024
#: Floats in the Winograd bands' buffers, all workers together (at 512 channels 256 tiles a band fit).
WINOGRAD_BAND_FLOATS = 24 * 1024 * 1024
#: At most this many tiles per Winograd band (the sgemms' M; measured on 2 cores, 512 -> 512 at 256x256: 0.61 s
#: at 128 tiles, 0.53 at 256 or 512; 128 -> 128 at 1024x1024: 0.83 at 128 or 256, 0.93 at 512).
WINOGRAD_BAND_TILES = 256
#: At most this many Winograd tiles (2x2 input pixels) per band of the folded upsample (2 cores, 512 channels at
#: 256x256 -> 512x512: 1.71 s at 512, 1.78 at 256, 1.92 at 1024; 256 channels at 512x512: 1.84, 2.08, 1.98).
UPSAMPLE_BAND_TILES = 512
#: Input channels from which a 3x3 convolution runs as Winograd (or shifted sgemms) rather than im2col: im2col is
#: faster at 16 (16 -> 512 at 128x128: 0.023 s against 0.039), even at 32 (bench/vae_kernels.py prints each).
WINOGRAD_MIN_CIN = 32
#: Output channels up to which a convolution from ``WINOGRAD_MIN_CIN`` inputs runs as nine shifted sgemms rather
#: than Winograd, whose output transform costs as much as its products there. Measured on 2 cores at 1024x1024
#: from 128 channels: into 3 (the output conv) 0.28 s against 0.32, into 16 0.30 against 0.37, into 32 0.51
#: against 0.47; 128 -> 128 0.83 against 1.31-1.36.
SHIFTED_MAX_COUT = 16
#: Output pixels per band of the shifted convolution (16-32 rows at 512-1024 wide measured best).
SHIFTED_BAND_PIXELS = 16 * 1024
#: Input floats per chunk of a 1x1 convolution over its own input (``conv1x1_over_input``): the chunks run one
#: after another, each split over the workers.
IN_PLACE_CHUNK_FLOATS = 8 * 1024 * 1024
#: Floats per chunk of the GroupNorm passes: small enough to stay in cache between the chained numpy ops.
NORM_CHUNK = 256 * 1024


def fast_conv(*arrays: mx.array) -> bool:
    """Whether the numpy kernels apply: on CPU, float32 only, unless ``IMGPACK_FAST_CONV=0``."""
    return (
        is_cpu()
        and os.environ.get(FAST_CONV_ENV, "1") != "0"
        and all(a.dtype == mx.float32 for a in arrays)
    )


def _read(x: mx.array) -> np.ndarray:
    mx.eval(x)
    return np.asarray(x)


def _layout(weight: mx.array, build: Callable[[np.ndarray], T]) -> T:
    """A numpy weight layout for one call. Not cached: building all of a decoder's takes ~0.15 s, while keeping
    them (Winograd's are 16/9 the weights' size) would hold ~0.6 GB of a FLUX VAE for the process' life."""
    return build(np.asarray(weight, dtype=np.float32))


def _torch_order(w: np.ndarray) -> np.ndarray:
    """MLX (Cout, 3, 3, Cin) -> (Cout, Cin, 3, 3); free when, as loaded, it is a transposed view of that."""
    return np.ascontiguousarray(w.transpose(0, 3, 1, 2))


def _direct_weights(w: np.ndarray) -> np.ndarray:
    """MLX (Cout, 3, 3, Cin) -> (9*Cin, Cout), taps in (dy, dx) order, channels fastest: the im2col layout
    (a transposed view of a (Cout, 9*Cin) array: sgemm reads it transposed, no copy)."""
    cout, _, _, cin = w.shape
    return np.ascontiguousarray(w).reshape(cout, 9 * cin).T


#: For output phase p (0 even, 1 odd) of a nearest-x2 upsample, which of the 3 taps fall on input offset 0 / 1.
_PHASE_TAPS = {0: ((0,), (1, 2)), 1: ((0, 1), (2,))}


def _phase_matrix() -> np.ndarray:
    """(9, 16): which 3x3 taps (i, j) sum into tap (a, b) of phase (py, px), columns in (py, px, a, b) order."""
    m = np.zeros((3, 3, 2, 2, 2, 2), np.float32)
    for py in (0, 1):
        for px in (0, 1):
            for a, rows in enumerate(_PHASE_TAPS[py]):
                for b, cols in enumerate(_PHASE_TAPS[px]):
                    for i in rows:
                        for j in cols:
                            m[i, j, py, px, a, b] = 1.0
    return m.reshape(9, 16)


_PHASE_MATRIX = _phase_matrix()


#: Winograd F(2x2, 2x2) for a phase's 2x2 convolution: ``G`` (3, 2) over each axis of the 2x2 kernel, as one (9, 4)
#: matrix over its taps; the input and output transforms (``B^T``, ``A^T``) are the adds in ``upsample_conv3x3``.
_UPSAMPLE_G = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
_UPSAMPLE_K = np.kron(_UPSAMPLE_G, _UPSAMPLE_G).astype(np.float32)


def _phase_weights(w: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """(Cout, 3, 3, Cin) -> per phase (py, px) the Winograd weights ``G g G^T`` of its 2x2 convolution ``g`` (the
    3x3 taps summed per phase): (9, Cin, Cout), transposed views of one sgemm's (9, Cout, Cin) result (the
    factors are 0 and 1: exact)."""
    cout, _, _, cin = w.shape
    summed = (_torch_order(w).reshape(cout * cin, 9) @ _PHASE_MATRIX).reshape(cout * cin, 4, 4)
    return {(py, px): (_UPSAMPLE_K @ summed[:, 2 * py + px].T).reshape(9, cout, cin).transpose(0, 2, 1)
            for py in (0, 1) for px in (0, 1)}


def _padded_band(x: np.ndarray, top: int, bottom: int, into: np.ndarray,
                 activate: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """Rows ``top-1 .. bottom`` of ``x`` (h, w, c) zero-padded by one pixel all round, plus one spare zero row
    (the dropped padding columns of the last output row read into it), flattened to (pixels, c). ``activate``
    (a GroupNorm + SiLU folded into the convolution) runs in place over the copied pixels, not the padding."""
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
    if activate is not None:
        activate(band[dst_top : dst_top + src_bottom - src_top, 1 : w + 1])
    return band.reshape(-1, c)


def _pad_rows(x: np.ndarray, first: int, count: int, width: int, into: np.ndarray,
              activate: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """Rows ``first .. first+count-1`` and columns ``-1 .. width-2`` of ``x`` (h, w, c), zero outside ``x``:
    (count, width, c), in ``into``'s memory; ``activate`` as for ``_padded_band``."""
    h, w, c = x.shape
    band = into[: count * width * c].reshape(count, width, c)
    src_top, src_bottom = max(first, 0), min(first + count, h)
    dst_top = src_top - first
    dst_bottom = dst_top + max(src_bottom - src_top, 0)
    band[:dst_top] = 0.0
    band[dst_bottom:] = 0.0
    band[dst_top:dst_bottom, 0] = 0.0
    band[dst_top:dst_bottom, w + 1 :] = 0.0
    band[dst_top:dst_bottom, 1 : w + 1] = x[src_top:src_bottom]
    if activate is not None and dst_bottom > dst_top:
        activate(band[dst_top:dst_bottom, 1 : w + 1])
    return band


def _taps_view(flat: np.ndarray, offset: int, n: int, width: int, taps: int) -> np.ndarray:
    """(n, taps, taps*c) view of a flattened padded band: row p holds the ``taps`` x ``taps`` window at pixel
    ``p + offset`` (padded row width ``width``); each window row is ``taps*c`` contiguous floats."""
    c = flat.shape[1]
    item = flat.itemsize
    return as_strided(flat[offset:], shape=(n, taps, taps * c), strides=(c * item, width * c * item, item))


@dataclass
class Prenorm:
    """A GroupNorm (and SiLU) to apply to a convolution's input while its bands are read, so the normalised
    activation is never stored whole: per batch item the (channels,) float32 scale and shift."""

    scale: list[np.ndarray]
    shift: list[np.ndarray]
    silu: bool

    def activation(self, item: int, scratch: Scratch) -> Callable[[np.ndarray], None]:
        """In place over a (rows, width, channels) view: ``x * scale + shift``, then SiLU."""
        scale, shift = self.scale[item], self.shift[item]

        def activate(region: np.ndarray) -> None:
            region *= scale
            region += shift
            if self.silu:
                silu_into(region, region, scratch.get(region.shape, 5))

        return activate


def _activation(norm: Prenorm | None, item: int, scratch: Scratch) -> Callable[[np.ndarray], None] | None:
    return None if norm is None else norm.activation(item, scratch)


def _band_rows(h: int, w: int, floats_per_pixel: int) -> int:
    """Rows per band: the band buffer bound shared by the workers in flight, and at least a band per worker."""
    workers = _workers()
    rows = max(1, min(h, BAND_FLOATS // workers // max(1, (w + 2) * floats_per_pixel)))
    return min(rows, -(-h // workers))


def _workers() -> int:
    """How many bands run at once: one per worker when BLAS can run single-threaded in the workers."""
    return worker_count() if blas_in_workers() else 1


def _finish(res: np.ndarray, bias: np.ndarray, dest: np.ndarray, residual: np.ndarray | None) -> None:
    """``dest = res + bias (+ residual)``: the convolution's last pass, with the ResNet skip folded in (added in
    place when ``dest`` is the residual's own memory)."""
    if residual is not None and np.may_share_memory(dest, residual):
        dest += res
        dest += bias
        return
    np.add(res, bias, out=dest)
    if residual is not None:
        dest += residual


def conv3x3_auto(x: mx.array, weight: mx.array, bias: mx.array,
                 residual: mx.array | None = None, norm: Prenorm | None = None,
                 into_residual: bool = False) -> mx.array:
    """The faster formulation for the shape: from ``WINOGRAD_MIN_CIN`` input channels Winograd, or the nine
    shifted sgemms into at most ``SHIFTED_MAX_COUT`` outputs (where Winograd's output transform outweighs its saved
    multiplies); im2col below (the narrowest inputs, where K = 9*Cin keeps sgemm busy).
    ``residual`` (the output's shape) is added to the result, written over the residual's own buffer with
    ``into_residual`` (the caller's promise that nothing else holds it); ``norm`` is applied to ``x`` first."""
    if x.shape[-1] >= WINOGRAD_MIN_CIN:
        if weight.shape[0] <= SHIFTED_MAX_COUT and can_accumulate():
            return shifted_conv3x3(x, weight, bias, residual, norm, into_residual)
        return winograd_conv3x3(x, weight, bias, residual, norm, into_residual)
    return conv3x3(x, weight, bias, residual, norm, into_residual)


def _conv_io(x: mx.array, bias: mx.array, shape: tuple[int, ...], residual: mx.array | None = None,  # noqa: ANN202
             into_residual: bool = False):
    """What every convolution kernel starts from: ``x`` and ``bias`` as numpy, the MLX output of ``shape`` (fresh,
    or ``residual`` itself with ``into_residual`` where its buffer is writable) with its writable view, and
    ``residual`` (which must have that shape) as numpy, or None."""
    if residual is not None and tuple(residual.shape) != shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != output shape {shape}")
    xs, bias_np = _read(x), np.asarray(bias, dtype=np.float32)
    if residual is None:
        return xs, bias_np, *output_buffer(shape), None
    skip = _read(residual)
    view = _writable_view(residual) if into_residual else None
    if view is not None:
        return xs, bias_np, residual, view, view
    return xs, bias_np, *output_buffer(shape), skip


def _row_band_conv(x: mx.array, bias: mx.array, cout: int, rows: int, residual: mx.array | None,
                   norm: Prenorm | None, into_residual: bool,
                   product: Callable[[np.ndarray, int, int, Scratch], np.ndarray]) -> mx.array:
    """The frame the row-band 3x3 kernels share: each band of ``rows`` output rows is padded (and normalised) into
    scratch as flattened (pixels, Cin) rows of pitch ``w + 2``; ``product(flat, n, pitch, scratch)`` returns the
    band's (n, cout) result in that padded order; the last pass adds the bias (and the residual) into the output."""
    b, h, w, cin = x.shape
    xs, bias_np, out, view, skip = _conv_io(x, bias, (b, h, w, cout), residual, into_residual)
    wp = w + 2
    scratch = Scratch()

    def band(job: tuple[int, int]) -> None:
        i, top = job
        bottom = min(h, top + rows)
        flat = _padded_band(xs[i], top, bottom, scratch.get(((rows + 3) * wp * cin,), 0),
                            _activation(norm, i, scratch))
        res = product(flat, (bottom - top) * wp, wp, scratch)
        _finish(res.reshape(-1, wp, cout)[:, :w], bias_np, view[i, top:bottom],
                None if skip is None else skip[i, top:bottom])

    run_all(band, [(i, top) for i in range(b) for top in range(0, h, rows)], uses_blas=True)
    return out


def conv3x3(x: mx.array, weight: mx.array, bias: mx.array, residual: mx.array | None = None,
            norm: Prenorm | None = None, into_residual: bool = False) -> mx.array:
    """3x3 stride-1 'same' convolution of NHWC ``x`` with MLX-layout ``weight`` (Cout, 3, 3, Cin), im2col."""
    wmat = _layout(weight, _direct_weights)
    _, h, w, cin = x.shape
    cout = wmat.shape[1]

    def product(flat: np.ndarray, n: int, wp: int, scratch: Scratch) -> np.ndarray:
        col = scratch.get((n, 9 * cin), 1)
        res = scratch.get((n, cout), 2)
        np.copyto(col.reshape(n, 3, 3 * cin), _taps_view(flat, 0, n, wp, 3))
        return np.matmul(col, wmat, out=res)

    return _row_band_conv(x, bias, cout, _band_rows(h, w, 9 * cin), residual, norm, into_residual, product)


def shifted_conv3x3(x: mx.array, weight: mx.array, bias: mx.array, residual: mx.array | None = None,
                    norm: Prenorm | None = None, into_residual: bool = False) -> mx.array:
    """3x3 stride-1 'same' convolution as nine sgemms per band, one per tap, each reading the padded band shifted
    by that tap (a plain slice, no im2col copy) and accumulating into the band's result (BLAS' beta = 1)."""
    wmat = _layout(weight, _direct_weights)  # (9*Cin, Cout): tap t's weights are rows t*Cin .. (t+1)*Cin
    _, h, w, cin = x.shape
    cout = wmat.shape[1]

    def product(flat: np.ndarray, n: int, wp: int, scratch: Scratch) -> np.ndarray:
        res = scratch.get((n, cout), 2)
        for tap in range(9):
            start = (tap // 3) * wp + tap % 3
            matmul_into(flat[start : start + n], wmat[tap * cin : (tap + 1) * cin], res, accumulate=tap > 0)
        return res

    rows = max(1, min(h, SHIFTED_BAND_PIXELS // (w + 2), -(-h // _workers())))
    return _row_band_conv(x, bias, cout, rows, residual, norm, into_residual, product)


def upsample_conv3x3(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    """``conv3x3(nearest_upsample_x2(x))`` without the upsampled tensor: four 2x2 phase convolutions of ``x``, each
    as Winograd F(2x2, 2x2) (9 products per 2x2 outputs instead of 16; the transforms are adds)."""
    phases = _layout(weight, _phase_weights)
    b, h, w, cin = x.shape
    cout = phases[0, 0].shape[2]
    xs, bias_np, out, view, _ = _conv_io(x, bias, (b, 2 * h, 2 * w, cout))
    tx = (w + 1) // 2
    wp = 2 * tx + 2
    all_rows = (h + 1) // 2
    tile_rows = max(1, min(all_rows, UPSAMPLE_BAND_TILES // tx, -(-all_rows // _workers())))
    scratch = Scratch()

    def band(job: tuple[int, int]) -> None:
        i, top = job  # the band's first input row: output rows 2*top .. of every phase
        ty = min(tile_rows, (h - top + 1) // 2)
        n = ty * tx
        rows = min(2 * ty, h - top)
        # Input rows top-1 .. top+2*ty, zero-padded: phase py's 2x2 window at pixel (r, c) starts at (r+py, c+px).
        padded = _pad_rows(xs[i], top - 1, 2 * ty + 2, wp, scratch.get(((2 * ty + 2) * wp * cin,), 0))
        r0, r2 = scratch.get((ty, wp, cin), 1), scratch.get((ty, wp, cin), 2)
        v = scratch.get((9, n, cin), 3)
        m = scratch.get((9, n, cout), 4)
        grid = view[i].reshape(h, 2, w, 2, cout)
        for py in (0, 1):
            d = [padded[py + j : py + j + 2 * ty : 2] for j in range(3)]  # B^T along the rows: d0-d1, d1, d2-d1
            np.subtract(d[0], d[1], out=r0)
            np.subtract(d[2], d[1], out=r2)
            for px in (0, 1):
                for a, r in enumerate((r0, d[1], r2)):
                    c = [r[:, px + j : px + j + 2 * tx : 2] for j in range(3)]
                    np.subtract(c[0], c[1], out=v[3 * a].reshape(ty, tx, cin))
                    np.copyto(v[3 * a + 1].reshape(ty, tx, cin), c[1])
                    np.subtract(c[2], c[1], out=v[3 * a + 2].reshape(ty, tx, cin))
                np.matmul(v, phases[py, px], out=m)
                mm = [m[k].reshape(ty, tx, cout) for k in range(9)]
                mm[4] += bias_np  # the centre product enters all four outputs of a tile: the bias, once
                for k in range(3):  # A^T along the rows, in place: row 0 <- M0 + M3, row 1 <- M3 + M6
                    mm[k] += mm[3 + k]
                    mm[3 + k] += mm[6 + k]
                dest = grid[top : top + rows, py, :, px]
                whole = rows == 2 * ty and w == 2 * tx
                yb = dest.reshape(ty, 2, tx, 2, cout) if whole else scratch.get((ty, 2, tx, 2, cout), 5)
                for a in range(2):  # A^T along the columns, into the output (or a scratch tile grid at the edges)
                    s0, s1, s2 = mm[3 * a : 3 * a + 3]
                    np.add(s0, s1, out=yb[:, a, :, 0])
                    np.add(s1, s2, out=yb[:, a, :, 1])
                if not whole:
                    np.copyto(dest, yb.reshape(2 * ty, 2 * tx, cout)[:rows, :w])

    run_all(band, [(i, top) for i in range(b) for top in range(0, h, 2 * tile_rows)], uses_blas=True)
    return out


#: Winograd F(4x4, 3x3) (Lavin & Gray; interpolation points 0, +-1, +-2, infinity): 4x4 outputs from a 6x6 input
#: tile with 36 products instead of 144. ``B^T`` (6, 6), ``G`` (6, 3) and ``A^T`` (4, 6) for one axis.
_WINOGRAD_BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
_WINOGRAD_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                        [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)
_WINOGRAD_AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                        np.float64)
#: Both axes' transforms as one matrix each, so each is a single sgemm over a band's tiles (K = 36: ~50 GFLOP/s a
#: core, 3x faster than the same transform as numpy adds over strided views): ``B^T d B`` is (36, 36) over the 36
#: pixels of each tile, ``A^T m A`` (16, 36) over its 36 products; ``G g G^T`` (36, 9) over the 9 taps.
_WINOGRAD_IN = np.kron(_WINOGRAD_BT, _WINOGRAD_BT).astype(np.float32)
_WINOGRAD_OUT = np.kron(_WINOGRAD_AT, _WINOGRAD_AT).astype(np.float32)
_WINOGRAD_K = np.kron(_WINOGRAD_G, _WINOGRAD_G).astype(np.float32)


def _winograd_weights(w: np.ndarray) -> np.ndarray:
    """(Cout, 3, 3, Cin) -> ``G g G^T`` per tile position: (36, Cin, Cout), a transposed view of one sgemm's
    (36, Cout, Cin) result (sums of 9 taps: the 1/6 and 1/24 factors round like any float32 product)."""
    cout, _, _, cin = w.shape
    u = _WINOGRAD_K @ _torch_order(w).reshape(cout * cin, 9).T
    return u.reshape(36, cout, cin).transpose(0, 2, 1)


def winograd_conv3x3(x: mx.array, weight: mx.array, bias: mx.array,
                     residual: mx.array | None = None, norm: Prenorm | None = None,
                     into_residual: bool = False) -> mx.array:
    """3x3 stride-1 'same' convolution as Winograd F(4x4, 3x3): 4x fewer multiply-adds than direct, the 36 products
    per tile being 36 matmuls ``[tiles, Cin] x [Cin, Cout]``, the tile transforms one sgemm each. Relative error
    ~1e-5 at 512 channels in float32 (F(2x2, 3x3)'s is ~5e-7; the decoder's output moves by far less than 1/255)."""
    u = _layout(weight, _winograd_weights)
    b, h, w, cin = x.shape
    cout = u.shape[2]
    xs, bias_np, out, view, skip = _conv_io(x, bias, (b, h, w, cout), residual, into_residual)
    tx = (w + 3) // 4
    wide = max(cin, cout)
    # Two buffers of 36 x tiles x max(Cin, Cout) per band (the gathered tiles, then the products; the transformed
    # tiles, then the outputs), a band per worker in flight.
    workers = _workers()
    all_rows = (h + 3) // 4
    tile_rows = max(1, min(all_rows, WINOGRAD_BAND_FLOATS // workers // (2 * 36 * tx * wide)))
    tile_rows = min(tile_rows, -(-all_rows // workers), max(1, WINOGRAD_BAND_TILES // tx))
    wp = 4 * tx + 2
    scratch = Scratch()

    def band(job: tuple[int, int]) -> None:
        i, top = job
        ty = min(tile_rows, (h - top + 3) // 4)
        n = ty * tx
        padded = _pad_rows(xs[i], top - 1, 4 * ty + 2, wp, scratch.get(((4 * ty + 2) * wp * cin,), 0),
                           _activation(norm, i, scratch))
        first, second = scratch.get((36 * n * wide,), 1), scratch.get((36 * n * wide,), 2)
        item, pitch = padded.itemsize, wp * cin * padded.itemsize
        tiles = first[: 36 * n * cin].reshape(6, 6, ty, tx, cin)  # tile (r, c)'s pixel (y, x) at [y, x, r, c]
        np.copyto(tiles, as_strided(padded, shape=tiles.shape,
                                    strides=(pitch, cin * item, 4 * pitch, 4 * cin * item, item)))
        v = second[: 36 * n * cin].reshape(36, n, cin)
        np.matmul(_WINOGRAD_IN, tiles.reshape(36, n * cin), out=v.reshape(36, n * cin))
        m = first[: 36 * n * cout].reshape(36, n, cout)
        np.matmul(v, u, out=m)
        y = second[: 16 * n * cout].reshape(16, n * cout)
        np.matmul(_WINOGRAD_OUT, m.reshape(36, n * cout), out=y)
        grid = y.reshape(4, 4, ty, tx, cout).transpose(2, 0, 3, 1, 4)  # (tile row, y, tile column, x, Cout)
        rows = min(4 * ty, h - top)
        dest = view[i, top : top + rows]
        near = None if skip is None else skip[i, top : top + rows]
        if rows == 4 * ty and w == 4 * tx:
            _finish(grid, bias_np, dest.reshape(grid.shape), None if near is None else near.reshape(grid.shape))
        else:  # a ragged edge: the tiles' outputs past the image are dropped
            whole = scratch.get(grid.shape, 3)
            np.copyto(whole, grid)
            _finish(whole.reshape(4 * ty, 4 * tx, cout)[:rows, :w], bias_np, dest, near)

    run_all(band, [(i, top) for i in range(b) for top in range(0, h, 4 * tile_rows)], uses_blas=True)
    return out


def conv1x1(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    """A 1x1 convolution (MLX weight (Cout, 1, 1, Cin)) as one matmul over all pixels."""
    b, h, w, cin = x.shape
    cout = weight.shape[0]
    xs = np.ascontiguousarray(_read(x)).reshape(-1, cin)
    wmat = np.asarray(weight, dtype=np.float32).reshape(cout, cin)
    out, view = output_buffer((b, h, w, cout))
    flat = view.reshape(-1, cout)
    np.matmul(xs, wmat.T, out=flat)
    if bias is not None:
        flat += np.asarray(bias, dtype=np.float32)
    return out


def conv1x1_over_input(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array | None:
    """A 1x1 convolution into at most as many channels as ``x`` has, written over ``x``'s own buffer (the caller
    gives ``x`` up): the result is a view of the buffer's first ``pixels * Cout`` floats. None where ``x``'s
    memory cannot be written in place (then nothing was changed).

    This is how a ResNet block's shortcut avoids a third full activation beside its input and the first
    convolution's output (at 1024x1024 a FLUX-shaped decoder's 256 -> 128 block holds 1 + 0.5 + 0.5 GiB otherwise).
    Chunks run in order, each chunk's products taken before it is written back: output floats ``[p0, p1) * Cout``
    lie over input pixels ``[p0, p1) * Cout / Cin``, all read by then."""
    b, h, w, cin = x.shape
    cout = weight.shape[0]
    if cout > cin:
        return None
    mx.eval(x)
    view = _writable_view(x)
    if view is None:
        return None
    pixels = b * h * w
    out = x.reshape(-1)[: pixels * cout].reshape(b, h, w, cout)
    mx.eval(out)
    out_view = _writable_view(out)
    if out_view is None or out_view.ctypes.data != view.ctypes.data:  # MLX copied the slice: not a view of x
        return None
    source = view.reshape(pixels, cin)
    dest = out_view.reshape(pixels, cout)
    wmat = np.asarray(weight, dtype=np.float32).reshape(cout, cin).T
    bias_np = None if bias is None else np.asarray(bias, dtype=np.float32)
    chunk = max(1, IN_PLACE_CHUNK_FLOATS // cin)
    products = np.empty((min(chunk, pixels), cout), np.float32)
    for start in range(0, pixels, chunk):
        stop = min(pixels, start + chunk)
        res = products[: stop - start]

        def rows(span: tuple[int, int], start: int = start, res: np.ndarray = res) -> None:
            np.matmul(source[start + span[0] : start + span[1]], wmat, out=res[span[0] : span[1]])

        run_all(rows, split_work(stop - start, 256), uses_blas=True)
        if bias_np is not None:
            res += bias_np
        dest[start:stop] = res
    return out


def compacted(x: mx.array) -> mx.array:
    """A copy of ``x`` in a buffer of its own size: for a view that keeps a larger buffer alive (the output of
    ``conv1x1_over_input``), before the layer that reads it allocates a large output of its own."""
    out, view = output_buffer(tuple(x.shape))
    np.copyto(view, _read(x))
    return out


def group_norm_silu(
    x: mx.array, weight: mx.array, bias: mx.array, groups: int, eps: float, silu: bool = True
) -> mx.array:
    """GroupNorm over NHWC (PyTorch's channel grouping), optionally followed by SiLU, in two passes over ``x``:
    the statistics (``prenorm``), then ``x * scale + shift`` (and SiLU) per chunk, split over the workers."""
    b, h, w, c = x.shape
    xs = np.ascontiguousarray(_read(x)).reshape(b, h * w, c)
    coefficients = prenorm(x, weight, bias, groups, eps, silu)
    out, view = output_buffer((b, h, w, c))
    flat_out = view.reshape(b, h * w, c)
    rows = max(1, NORM_CHUNK // c)
    scratch = Scratch()
    for i in range(b):
        activate = coefficients.activation(i, scratch)

        def apply(span: tuple[int, int], i: int = i, activate: Callable[[np.ndarray], None] = activate) -> None:
            for start in range(span[0], span[1], rows):
                dst = flat_out[i, start : min(span[1], start + rows)]
                np.copyto(dst, xs[i, start : min(span[1], start + rows)])
                activate(dst)

        run_all(apply, split_work(h * w, rows))
    return out


def prenorm(x: mx.array, weight: mx.array, bias: mx.array, groups: int, eps: float, silu: bool = True) -> Prenorm:
    """GroupNorm's per-channel scale and shift for each batch item of NHWC ``x``, from one pass over it.

    Each chunk's moments are taken in float32 about the chunk's first pixel (so the sums stay small and exact
    enough whatever the activations' mean), and combined across chunks and channels in float64."""
    b, h, w, c = x.shape
    xs = np.ascontiguousarray(_read(x)).reshape(b, h * w, c)
    gamma = np.asarray(weight, dtype=np.float32)
    beta = np.asarray(bias, dtype=np.float32)
    rows = max(1, NORM_CHUNK // c)
    scratch = Scratch()
    scales, shifts = [], []
    for i in range(b):
        moments: list[tuple[int, np.ndarray, np.ndarray]] = []  # (pixels, mean, M2) per chunk and channel

        def statistics(span: tuple[int, int], i: int = i, moments: list = moments) -> None:
            for start in range(span[0], span[1], rows):
                chunk = xs[i, start : min(span[1], start + rows)]
                n = len(chunk)
                centred = np.subtract(chunk, chunk[0], out=scratch.get(chunk.shape))
                first = centred.sum(axis=0, dtype=np.float64)
                second = np.einsum("ij,ij->j", centred, centred).astype(np.float64)
                mean = chunk[0].astype(np.float64) + first / n
                moments.append((n, mean, np.maximum(second - first * first / n, 0.0)))

        run_all(statistics, split_work(h * w, rows))
        counts = np.array([m[0] for m in moments], np.float64)[:, None]
        means = np.stack([m[1] for m in moments])
        channel_mean = (counts * means).sum(axis=0) / counts.sum()
        channel_m2 = (np.stack([m[2] for m in moments]) + counts * (means - channel_mean) ** 2).sum(axis=0)
        per_group = channel_mean.reshape(groups, -1)
        mean = per_group.mean(axis=1)
        m2 = (channel_m2.reshape(groups, -1) + h * w * (per_group - mean[:, None]) ** 2).sum(axis=1)
        inv = 1.0 / np.sqrt(m2 / (h * w * (c // groups)) + eps)
        scales.append((np.repeat(inv, c // groups) * gamma).astype(np.float32))
        shifts.append((beta - np.repeat(mean * inv, c // groups) * gamma).astype(np.float32))
    return Prenorm(scales, shifts, silu)
