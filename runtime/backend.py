"""The one place the runtime imports MLX, so a fast BLAS is in the process before MLX is.

mlx-cpu wheels on Linux link a reference BLAS that multiplies float32 matrices at a few GFLOP/s. MLX calls
``cblas_sgemm`` through the dynamic linker, so loading OpenBLAS (the ``cmeel-openblas`` wheel, or the system's
portable build when the wheel's kernels do not run on this CPU) with RTLD_GLOBAL *before* the first
``import mlx`` makes every matmul use it instead — a 20-40x speed-up with no user action. Every runtime module
imports ``mx``/``nn`` from here rather than importing mlx itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from imgpack.runtime.cpu_pool import Scratch, run_all, split_work, worker_count
from imgpack.schemas.errors import ImgpackError

#: Set to 0 to keep MLX's bundled BLAS (for comparisons); anything else, or unset, loads OpenBLAS on Linux.
FAST_BLAS_ENV = "IMGPACK_FAST_BLAS"
INSTALL_HINT = "pip install 'imgpack[runtime]'"


@dataclass
class BlasInfo:
    """What the BLAS loader did: the library it loaded (None when MLX keeps its own) and how."""

    library: str | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.library:
            return self.library
        return "MLX's bundled BLAS" + (f" ({'; '.join(self.notes)})" if self.notes else "")


BLAS = BlasInfo()


def _dist_files(dist: str, pattern: str) -> list[Path]:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return sorted(Path(str(f.locate())) for f in files if Path(str(f)).match(pattern))


def _load_bundled_gfortran(notes: list[str]) -> bool:
    """Satisfy OpenBLAS' ``libgfortran.so.5`` from a copy bundled in another wheel (mlx-cpu, numpy).

    Wheel-bundled libraries carry a hashed soname (``libgfortran-<hash>.so.5.0.0``) that the dynamic linker
    will not match against ``libgfortran.so.5``. We load an in-memory copy (memfd, nothing written to disk)
    whose soname string is rewritten in place to ``libgfortran.so.5``; its own hashed dependencies
    (libquadmath) are preloaded by path first.
    """
    if not hasattr(os, "memfd_create"):
        return False
    site_dirs = {Path(p) for p in sys.path if p.endswith("site-packages")}
    candidates = [Path(p) for d in site_dirs for p in sorted(glob.glob(str(d / "*.libs" / "libgfortran-*.so.5*")))]
    wanted = b"libgfortran.so.5"
    for path in candidates:
        soname = path.name.encode() + b"\0"
        data = bytearray(path.read_bytes())
        at = data.find(b"\0" + soname)
        if at < 0 or data.count(b"\0" + soname) != 1 or len(soname) <= len(wanted):
            continue
        data[at + 1 : at + 1 + len(soname)] = wanted.ljust(len(soname), b"\0")
        try:
            for dep in sorted(path.parent.glob("libquadmath-*.so*")):
                ctypes.CDLL(str(dep), mode=ctypes.RTLD_GLOBAL)
            fd = os.memfd_create("libgfortran.so.5")
            os.write(fd, data)
            ctypes.CDLL(f"/proc/self/fd/{fd}", mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            notes.append(f"could not load {path}: {e}")
            continue
        notes.append(f"libgfortran.so.5 from {path}")
        return True
    return False


#: Where distributions put a portable (DYNAMIC_ARCH) OpenBLAS: Debian/Ubuntu's libopenblas0-pthread, Fedora's.
SYSTEM_OPENBLAS = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

# Loads a BLAS in a child process and multiplies two small matrices with it. PyPI OpenBLAS wheels are often built
# for their build machine's CPU (cmeel-openblas 0.3.31 for x86_64 is a SKYLAKEX build: AVX-512 only), and a
# kernel the CPU lacks kills the process with SIGILL at the first matmul, long after loading succeeded.
_PROBE = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
n = 64
a = (ctypes.c_float * (n * n))(*([1.0] * (n * n)))
c = (ctypes.c_float * (n * n))()
lib.cblas_sgemm(101, 111, 111, n, n, n, ctypes.c_float(1.0), a, n, a, n, ctypes.c_float(0.0), c, n)
sys.exit(0 if c[0] == float(n) else 3)
"""


def _cpu_signature() -> str:
    """What a probe's verdict depends on besides the library: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
    except OSError:
        lines = []
    return hashlib.sha256("".join(sorted(set(lines))).encode()).hexdigest()[:16]


def _probe_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgpack" / "blas-probe.json"


def blas_runs_here(lib: Path) -> tuple[bool, str]:
    """Whether ``lib``'s sgemm runs on this CPU, probed once in a child process and cached per library and CPU."""
    try:
        st = lib.stat()
    except OSError as e:
        return False, f"{lib}: {e.strerror}"
    key = f"{lib}|{st.st_size}|{st.st_mtime_ns}|{_cpu_signature()}"
    cache = _probe_cache()
    try:
        known = json.loads(cache.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    if key in known:
        ok, why = known[key]
        return bool(ok), str(why)
    try:
        rc = subprocess.run([sys.executable, "-c", _PROBE, str(lib)], capture_output=True, timeout=60).returncode
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{lib}: probe failed ({e})"
    if rc == 0:
        verdict = (True, "")
    elif rc == -signal.SIGILL:
        verdict = (False, f"{lib} is built for another CPU (illegal instruction); skipped")
    else:
        verdict = (False, f"{lib}: probe exited with {rc}; skipped")
    known[key] = list(verdict)
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache)
    return verdict


def _candidates() -> list[Path]:
    """OpenBLAS libraries to try, best first: the cmeel-openblas wheel, then the system's portable build."""
    wheel = _dist_files("cmeel-openblas", "libopenblas.so.0") or _dist_files("cmeel-openblas", "libopenblas.so*")
    arch = platform.machine()
    system = [Path(p.format(arch=arch)) for p in SYSTEM_OPENBLAS]
    return wheel[:1] + [p for p in system if p.exists()]


def _load_global(lib: Path) -> str | None:
    """dlopen ``lib`` with RTLD_GLOBAL (satisfying libgfortran from a wheel if the system lacks it); the error."""
    try:
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        return None
    except OSError as e:
        if "libgfortran" not in str(e) or not _load_bundled_gfortran(BLAS.notes):
            return f"{lib}: {e}"
    try:
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        return None
    except OSError as e2:
        return f"{lib}: {e2}"


def load_fast_blas() -> BlasInfo:
    """Load an OpenBLAS that runs on this CPU globally (Linux only); never raises, records why not instead."""
    if platform.system() != "Linux" or "mlx.core" in sys.modules:
        if "mlx.core" in sys.modules and platform.system() == "Linux":
            BLAS.notes.append("mlx was imported before imgpack.runtime; OpenBLAS not loaded")
        return BLAS
    if os.environ.get(FAST_BLAS_ENV, "1") == "0":
        BLAS.notes.append(f"disabled by {FAST_BLAS_ENV}=0")
        return BLAS
    candidates = _candidates()
    if not candidates:
        BLAS.notes.append("cmeel-openblas is not installed and no system OpenBLAS was found")
        return BLAS
    for lib in candidates:
        ok, why = blas_runs_here(lib)
        if not ok:
            BLAS.notes.append(why)
            continue
        error = _load_global(lib)
        if error:
            BLAS.notes.append(error)
            continue
        BLAS.library = str(lib)
        return BLAS
    BLAS.notes.append("install a portable OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread)")
    return BLAS


load_fast_blas()

try:
    import mlx.core as mx
    import mlx.nn as nn
except ImportError as e:  # pragma: no cover - exercised only where mlx is absent
    raise ImgpackError(f"the MLX runtime is not installed ({e}); install it with: {INSTALL_HINT}") from None


#: Set to 0 to keep glibc malloc's defaults on CPU.
MALLOC_REUSE_ENV = "IMGPACK_MALLOC_REUSE"
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def reuse_freed_memory() -> bool:
    """Keep freed memory in glibc's heap for the next allocation instead of unmapping it (CPU, Linux only).

    glibc serves each large allocation with a fresh mmap and unmaps it on free, so every MLX op's output at full
    resolution page-faults all its memory in anew: about 120 ms for a 134 MB VAE activation on a 2-core VM
    against 15 ms when the memory is reused (a 512x512 decode 10% faster). One arena for all threads, so what
    the kernels' worker threads free is reused by the others and handed back by ``release_free_memory`` — after
    each VAE block and each image — instead of staying in per-thread arenas."""
    libc = _libc()
    if libc is None or os.environ.get(MALLOC_REUSE_ENV, "1") == "0":
        return False
    results = [libc.mallopt(_M_ARENA_MAX, 1), libc.mallopt(_M_MMAP_MAX, 0),
               libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))]
    return all(r == 1 for r in results)


def release_free_memory() -> None:
    """Return the heap's free memory to the system (after an image; see ``reuse_freed_memory``)."""
    libc = _libc()
    if libc is not None and MALLOC_REUSE:
        libc.malloc_trim(0)


def is_cpu() -> bool:
    return mx.default_device() == mx.cpu


MALLOC_REUSE = is_cpu() and reuse_freed_memory()


def compute_dtype(trained_dtype: str | None) -> mx.Dtype:
    """float32 on CPU (no fast low-precision kernels there); the training dtype on Metal/CUDA when it is bf16."""
    if is_cpu():
        return mx.float32
    if trained_dtype in ("BF16", "bfloat16"):
        return mx.bfloat16
    if trained_dtype in ("F16", "float16"):
        return mx.float16
    return mx.float32


def device_name() -> str:
    device = mx.default_device()
    if device == mx.cpu:
        return f"cpu ({os.cpu_count()} cores, {platform.machine()})"
    try:
        info = mx.device_info()
        return f"gpu ({info.get('device_name', info.get('architecture', 'gpu'))})"
    except Exception:
        return "gpu"


def accelerators() -> str:
    """Which GPU backends this MLX build has and whether a device is present: tells a CPU-only wheel
    (``mlx[cpu]``) from a CUDA build that found no GPU."""
    found = []
    for backend_name in ("metal", "cuda"):
        module = getattr(mx, backend_name, None)
        if module is None or not hasattr(module, "is_available"):
            continue
        try:
            present = bool(module.is_available())
        except Exception:  # a broken driver install must not break doctor
            present = False
        found.append(f"{backend_name} {'available' if present else 'not available'}")
    return ", ".join(found) or "none in this MLX build"


def available_memory() -> int:
    """Bytes the model may use: MemAvailable on Linux, the unified memory size on Apple, GPU memory on CUDA."""
    if not is_cpu():
        try:
            info = mx.device_info()
            size = int(info.get("max_recommended_working_set_size") or info.get("memory_size") or 0)
            if size:
                return size
        except Exception:
            pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def measure_matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """float32 n×n matmul throughput on the default device — tells a fast BLAS from the reference one."""
    a = mx.random.normal((n, n), key=mx.random.key(0))
    b = mx.random.normal((n, n), key=mx.random.key(1))
    mx.eval(a, b, a @ b)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    elapsed = (time.perf_counter() - start) / repeats
    return 2 * n**3 / elapsed / 1e9


# -- CPU kernels for transcendental-heavy ops ------------------------------------------------------------
#
# MLX's CPU backend evaluates exp/sigmoid one element at a time (12-25 ns each, measured), numpy's float32 exp
# takes ~0.5 ns on AVX-512 and ~2.5 ns on AVX2 CPUs. Attention softmax over S x S scores and SiLU over FFN/VAE
# activations are dominated by exp, so on CPU those run in numpy over the evaluated MLX buffers (zero-copy views),
# split over the worker threads of ``cpu_pool``; the model's matmuls stay in MLX/BLAS. Set IMGPACK_NUMPY_KERNELS=0
# to use plain MLX ops everywhere.

NUMPY_KERNELS_ENV = "IMGPACK_NUMPY_KERNELS"
#: Query rows per attention job, about: its two sgemms (K = 128, N = 128) run faster the more rows they get
#: (measured on 2 cores, 4128 keys: 64 rows 125 GFLOP/s, 256 rows 176, 512 rows 189, 768 rows 198; 1056 keys:
#: 256 rows 143, 384 to 1024 rows 156-166). The query rows are split into equal blocks near this size.
ATTENTION_ROWS = 640
#: At most this many floats of scores per job (query rows x keys), so memory stays bounded at any resolution.
ATTENTION_BLOCK_FLOATS = 8 * 1024 * 1024
#: Below this bound on |score| the softmax skips subtracting each row's maximum (a pass over the scores): scores
#: are kept in base 2 (``log2(e)`` folded into the query scale, so the exponential is numpy's exp2, ~1.5x faster
#: than exp), 2 ** +-64 is a normal float32 and a row of up to 2**30 such terms sums without overflow, so the
#: result is the same softmax to rounding. The bound comes from the rows' norms (Cauchy-Schwarz), so it holds for
#: every score.
EXP_SAFE_SCORE = 64.0


#: Rows per band of ``silu_mul`` (its scratch stays in cache between the chained numpy passes).
SILU_BAND_ROWS = 64
#: Smaller RMSNorm inputs stay with MLX (a thread hand-off costs more than the work).
RMS_NORM_MIN_SIZE = 64 * 1024


def numpy_kernels() -> bool:
    return is_cpu() and os.environ.get(NUMPY_KERNELS_ENV, "1") != "0"


def _writable_view(array: mx.array):  # noqa: ANN202 - numpy array
    """A numpy view of an evaluated, freshly computed MLX array (the caller holds its only reference)."""
    import numpy as np

    try:
        view = np.array(array, copy=False)
    except (ValueError, TypeError):
        return None
    if not (view.flags.writeable and view.flags.c_contiguous and view.dtype == np.float32):
        return None
    return view


def output_buffer(shape: tuple[int, ...]):  # noqa: ANN201 - (mx.array, numpy array)
    """A fresh MLX float32 array of ``shape`` and a writable numpy view of it: CPU kernels write their results
    straight into MLX memory."""
    out = mx.zeros(shape, dtype=mx.float32)
    mx.eval(out)
    view = _writable_view(out)
    if view is None:  # pragma: no cover - MLX always materialises zeros on CPU
        raise RuntimeError("could not map an MLX buffer into numpy")
    return out, view


#: log2(e): the CPU kernels take exp(x) as exp2(x * LOG2E), numpy's exp2 being ~1.5x faster than its exp.
LOG2E = 1.4426950408889634


def silu_into(x, out, scratch) -> None:  # noqa: ANN001 - numpy arrays
    """``out = x * sigmoid(x)`` over numpy arrays of one shape (``out`` may be ``x``), ``scratch`` a float32 buffer
    of that shape: the one SiLU every CPU kernel uses. ``exp(-x)`` is taken as ``exp2(-x log2 e)``: numpy's exp2 is
    ~1.5x faster than its exp (the whole SiLU ~1.3x)."""
    import numpy as np

    np.multiply(x, -LOG2E, out=scratch)
    np.exp2(scratch, out=scratch)
    scratch += 1.0
    np.divide(x, scratch, out=out)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x); on CPU computed by numpy in place over ``x``'s buffer (``x`` must not be used again)."""
    if not numpy_kernels() or x.dtype != mx.float32:
        return nn.silu(x)
    mx.eval(x)
    view = _writable_view(x)
    if view is None:
        return nn.silu(x)
    import numpy as np

    def rows(span: tuple[int, int]) -> None:
        part = flat[span[0] : span[1]]
        silu_into(part, part, np.empty_like(part))

    flat = view.reshape(-1)
    run_all(rows, split_work(flat.size, 64 * 1024))
    return x


def silu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` (SwiGLU's product) into a new array; on CPU one numpy pass per band of rows over the
    cores, reading ``gate`` and ``up`` where they lie (slices of one fused projection included), where MLX would
    copy the slice, run SiLU, then multiply on one core."""
    if not numpy_kernels() or gate.dtype != mx.float32 or up.dtype != mx.float32 or gate.shape != up.shape:
        return nn.silu(gate) * up
    import numpy as np

    mx.eval(gate, up)
    width = gate.shape[-1]
    g, u = np.asarray(gate).reshape(-1, width), np.asarray(up).reshape(-1, width)
    out, view = output_buffer(tuple(gate.shape))
    dst = view.reshape(-1, width)
    scratch = Scratch()

    def rows(start: int) -> None:
        span = slice(start, min(g.shape[0], start + SILU_BAND_ROWS))
        silu_into(g[span], dst[span], scratch.get(dst[span].shape))
        dst[span] *= u[span]

    run_all(rows, range(0, g.shape[0], SILU_BAND_ROWS))
    return out


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """``x / sqrt(mean(x**2, axis=-1) + eps) * weight``; on CPU one numpy pass per band of rows over the cores
    (measured for 1056 x 1536 on 2 cores: 1.3 ms, MLX's CPU ``rms_norm`` 2.2 ms; 4128 x 1536: 5.4 against 16)."""
    if not numpy_kernels() or x.dtype != mx.float32 or x.size < RMS_NORM_MIN_SIZE:
        return mx.fast.rms_norm(x, weight, eps)
    import numpy as np

    w = weight.astype(mx.float32)
    mx.eval(x, w)
    dim = x.shape[-1]
    src = np.asarray(x).reshape(-1, dim)
    w_np = np.asarray(w)
    out, view = output_buffer(tuple(x.shape))
    dst = view.reshape(-1, dim)
    inv_dim, eps32 = np.float32(1.0 / dim), np.float32(eps)

    def rows(span: tuple[int, int]) -> None:
        part = src[span[0] : span[1]]
        scale = np.einsum("rd,rd->r", part, part)
        scale *= inv_dim
        scale += eps32
        np.sqrt(scale, out=scale)
        np.divide(part, scale[:, None], out=dst[span[0] : span[1]])
        dst[span[0] : span[1]] *= w_np

    run_all(rows, split_work(src.shape[0], 64))
    return out


def modulated_layer_norm(x: mx.array, eps: float, scale: mx.array, shift: mx.array) -> mx.array:
    """``layer_norm(x) * (1 + scale) + shift`` without affine parameters, for (batch, tokens, dim) ``x`` and
    ``scale``/``shift`` broadcastable to (batch, 1, dim); on CPU one numpy pass per band of rows (measured for
    2 x 4128 x 3072 on 2 cores: 49 ms, against 133 for MLX's CPU ``layer_norm`` and the modulation's two passes)."""
    if not numpy_kernels() or x.dtype != mx.float32 or x.ndim != 3 or x.size < RMS_NORM_MIN_SIZE:
        return mx.fast.layer_norm(x, None, None, eps) * (1 + scale) + shift
    import numpy as np

    b, s, dim = x.shape
    gain = mx.broadcast_to((1 + scale).astype(mx.float32), (b, 1, dim))
    offset = mx.broadcast_to(shift.astype(mx.float32), (b, 1, dim))
    mx.eval(x, gain, offset)
    src, gain_np, offset_np = np.asarray(x), np.asarray(gain), np.asarray(offset)
    out, dst = output_buffer(tuple(x.shape))
    inv_dim, eps32 = np.float32(1.0 / dim), np.float32(eps)

    def rows(job: tuple[int, int, int]) -> None:
        bi, t0, t1 = job
        part, target = src[bi, t0:t1], dst[bi, t0:t1]
        mean = part.sum(axis=1, keepdims=True)
        mean *= inv_dim
        np.subtract(part, mean, out=target)
        spread = np.einsum("rd,rd->r", target, target)[:, None]
        spread *= inv_dim
        spread += eps32
        np.sqrt(spread, out=spread)
        target /= spread
        target *= gain_np[bi]
        target += offset_np[bi]

    run_all(rows, [(bi, t0, t1) for bi in range(b) for t0, t1 in split_work(s, 64)])
    return out


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` computed by ``rms_norm`` (the same parameters, so checkpoints load alike)."""

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.weight, self.eps)


def attention_bytes(batch: int, heads: int, n_q: int, n_k: int) -> int:
    """Working memory of one ``attention`` call beyond its inputs and output: the score blocks in flight (numpy
    kernel), all batch x heads x n_q x n_k scores (MLX's CPU fallback), or a generous bound for MLX's fused GPU
    kernel, which never holds them all."""
    scores = batch * heads * n_q * n_k * 4
    if numpy_kernels():
        return worker_count() * 2 * _attention_rows(n_q, n_k) * n_k * 4
    return scores if is_cpu() else min(scores, 256 * 1024 * 1024)


def _attention_rows(n_q: int, n_k: int) -> int:
    """Rows per attention job: ``n_q`` split into equal blocks near ``ATTENTION_ROWS`` (a multiple of 8), no block
    over ``ATTENTION_BLOCK_FLOATS`` scores."""
    cap = max(8, ATTENTION_BLOCK_FLOATS // max(1, n_k) // 8 * 8)
    target = min(ATTENTION_ROWS, cap)
    blocks = max(1, -(-n_q // target))
    rows = -(-n_q // blocks)
    rows = -(-rows // 8) * 8
    return max(1, min(n_q, rows, cap))


def _scores_bounded(queries, key_norm: float) -> bool:  # noqa: ANN001 - numpy array
    """Whether every score of these (scaled) query rows against keys no longer than ``key_norm`` is within
    ``EXP_SAFE_SCORE`` (Cauchy-Schwarz; False for NaN or inf)."""
    import numpy as np

    return float(np.sqrt(np.einsum("rd,rd->r", queries, queries).max())) * key_norm <= EXP_SAFE_SCORE


def _unit_stride(view):  # noqa: ANN001, ANN202 - numpy array
    """``view`` itself when its last axis is unit-stride and nothing is broadcast (what sgemm reads without a
    copy), else a contiguous float32 copy."""
    import numpy as np

    if view.dtype != np.float32 or view.strides[-1] != view.itemsize or 0 in view.strides[:-1]:
        return np.ascontiguousarray(view, dtype=np.float32)
    return view


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    """softmax(q k^T * scale) v over (batch, heads, tokens, head_dim), ``mask`` True where keys may be seen.

    On CPU this is ``attention_arrays`` over views of the evaluated inputs (the usual transposed views of
    (batch, tokens, heads, head_dim) cost no copy); elsewhere MLX's fused kernel.
    """
    if not numpy_kernels() or not q.dtype == k.dtype == v.dtype == mx.float32 or k.shape[1] != q.shape[1]:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    import numpy as np

    mx.eval(q, k, v)
    if mask is not None:
        mx.eval(mask)
    return attention_arrays(np.asarray(q), np.asarray(k), np.asarray(v), scale,
                            None if mask is None else np.asarray(mask))


def attention_arrays(q, k, v, scale: float, mask=None) -> mx.array:  # noqa: ANN001 - numpy arrays
    """The CPU attention kernel over numpy (batch, heads, tokens, head_dim) arrays of any strides: one job per
    head and block of query rows, spread over the cores, each an sgemm into a cache-sized score block, the softmax
    there, and an sgemm straight into the output. ``mask`` is boolean (True: may be seen) or additive, broadcastable
    to (batch, heads, queries, keys). The result is an MLX (batch, heads, tokens, head_dim) transposed view of a
    (batch, tokens, heads, head_dim) buffer, so merging the heads back is free."""
    import numpy as np

    b, h, n_q, _ = q.shape
    n_k, d_v = k.shape[2], v.shape[3]
    qs, ks, vs = (_unit_stride(a) for a in (q, k, v))
    out, ov = output_buffer((b, n_q, h, d_v))
    bias = None
    bounded = True  # no mask, or one that only hides keys: |score| is bounded by the rows' norms
    if mask is not None:
        if mask.dtype == np.bool_:
            bias = np.where(mask, np.float32(0.0), np.float32(-np.inf))
        else:
            bias = np.multiply(mask, np.float32(LOG2E), dtype=np.float32)  # base 2, as the scores
            bounded = False
        bias = np.broadcast_to(bias, (b, h, n_q, n_k))
    rows = _attention_rows(n_q, n_k)
    scale32 = np.float32(scale * LOG2E)  # scores in base 2: softmax(x) = 2**(x log2 e) / sum(...)
    ones = np.ones(n_k, np.float32)
    key_norms = np.sqrt(np.einsum("bhkd,bhkd->bhk", ks, ks).max(axis=2)) if bounded and n_k else None
    scratch = Scratch()

    def block(job: tuple[int, int, int, int]) -> None:
        bi, hi, r0, r1 = job
        scores = scratch.get((r1 - r0, n_k))
        queries = np.multiply(qs[bi, hi, r0:r1], scale32, out=scratch.get((r1 - r0, qs.shape[-1]), slot=1))
        np.matmul(queries, ks[bi, hi].T, out=scores)
        if bias is not None:
            scores += bias[bi, hi, r0:r1]
        if key_norms is None or not _scores_bounded(queries, float(key_norms[bi, hi])):
            scores -= scores.max(axis=1, keepdims=True)
        np.exp2(scores, out=scores)
        total = np.matmul(scores, ones, out=scratch.get((r1 - r0,), slot=2))  # an sgemv: faster than sum()
        dest = ov[bi, r0:r1, hi]
        np.matmul(scores, vs[bi, hi], out=dest)
        dest /= total[:, None]

    jobs = [(bi, hi, r0, min(n_q, r0 + rows)) for bi in range(b) for hi in range(h) for r0 in range(0, n_q, rows)]
    run_all(block, jobs, uses_blas=True)
    return out.transpose(0, 2, 1, 3)


__all__ = ["BLAS", "BlasInfo", "RMSNorm", "attention", "attention_arrays", "attention_bytes", "available_memory",
           "compute_dtype", "measure_matmul_gflops", "modulated_layer_norm", "mx", "nn", "numpy_kernels",
           "output_buffer", "release_free_memory", "rms_norm", "silu", "silu_into", "silu_mul"]
