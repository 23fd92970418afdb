"""Worker threads for the numpy CPU kernels, BLAS running single-threaded in each.

numpy's ufuncs and sgemm release the GIL, so a kernel that splits its work into independent pieces (attention
heads x query blocks, bands of an image) keeps every core busy where one numpy call at a time leaves all but one
idle between sgemms. While such work runs, numpy's BLAS must be single-threaded, or each worker's sgemm would
spread over all cores again and the workers would fight for them. OpenBLAS' thread count is process-wide
(``openblas_set_num_threads_local`` sets the same global in OpenBLAS 0.3.31), so a run that uses BLAS sets it
to 1 for its duration and restores it after, one such run at a time. Where numpy's BLAS is not an OpenBLAS whose
thread count can be set, work that uses BLAS runs in the caller, with BLAS' own threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

#: Set to 1 to run every kernel in the calling thread (for comparisons).
THREADS_ENV = "IMGPACK_CPU_THREADS"
#: OpenBLAS' (get, set) thread-count calls, plain and as numpy's scipy-openblas wheels prefix them.
_THREAD_CALLS = (
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)

T = TypeVar("T")

_lock = threading.Lock()
_blas_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_blas_threads: tuple[Callable[[], int], Callable[[int], None]] | None = None
_blas_looked_up = False
_in_worker = threading.local()


def worker_count() -> int:
    """Threads the kernels may use: the CPUs this process may run on, or ``IMGPACK_CPU_THREADS``."""
    configured = os.environ.get(THREADS_ENV, "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _numpy_blas_libraries() -> list[ctypes.CDLL]:
    """The OpenBLAS libraries numpy itself loaded (found in this process' maps)."""
    import numpy as np

    package = Path(np.__file__).resolve().parent
    roots = tuple(str(package.parent / name) for name in ("numpy", "numpy.libs", "scipy_openblas64",
                                                           "scipy_openblas32"))
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    fields = (line.split(maxsplit=5) for line in maps.splitlines())
    paths = sorted({f[5] for f in fields if len(f) == 6 and "openblas" in Path(f[5]).name.lower()})
    libraries = []
    for path in paths:
        if path.startswith(roots):
            with contextlib.suppress(OSError):
                libraries.append(ctypes.CDLL(path))
    return libraries


def _numpy_blas_calls() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """The thread-count calls of numpy's OpenBLAS, if any."""
    for lib in _numpy_blas_libraries():
        for get_name, set_name in _THREAD_CALLS:
            getter, setter = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if getter is not None and setter is not None:
                getter.argtypes, getter.restype = [], ctypes.c_int
                setter.argtypes, setter.restype = [ctypes.c_int], None
                return getter, setter
    return None


def numpy_blas_core() -> str | None:
    """The kernel set numpy's OpenBLAS chose on this CPU (``Haswell``, ``SkylakeX``, ...), if it is an OpenBLAS."""
    for lib in _numpy_blas_libraries():
        for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename"):
            function = getattr(lib, name, None)
            if function is not None:
                function.argtypes, function.restype = [], ctypes.c_char_p
                core = function()
                return core.decode(errors="replace") if core else None
    return None


#: numpy's OpenBLAS ``cblas_sgemm`` as its wheels name it, with the integer width of its arguments.
_SGEMM_NAMES = (("scipy_cblas_sgemm64_", ctypes.c_int64), ("scipy_cblas_sgemm", ctypes.c_int),
                ("cblas_sgemm64_", ctypes.c_int64), ("cblas_sgemm", ctypes.c_int))
_sgemm: Any = None
_sgemm_looked_up = False


def _numpy_sgemm() -> Any:
    global _sgemm, _sgemm_looked_up
    if not _sgemm_looked_up:
        with _lock:
            if not _sgemm_looked_up:
                for lib in _numpy_blas_libraries():
                    for name, integer in _SGEMM_NAMES:
                        function = getattr(lib, name, None)
                        if function is not None:
                            n, f, p = integer, ctypes.c_float, ctypes.c_void_p
                            function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, n, n, n, f, p, n, p, n,
                                                 f, p, n]
                            function.restype = None
                            _sgemm = function
                            break
                    if _sgemm is not None:
                        break
                _sgemm_looked_up = True
    return _sgemm


def can_accumulate() -> bool:
    """Whether ``matmul_into`` may accumulate (numpy's BLAS is an OpenBLAS whose sgemm is reachable)."""
    return _numpy_sgemm() is not None


def _blas_layout(a: Any, what: str) -> tuple[int, int]:
    """(CblasNoTrans or CblasTrans, leading dimension) for a float32 2-D array with one unit-stride axis."""
    item = a.itemsize
    if a.strides[1] == item and a.strides[0] % item == 0 and a.strides[0] >= item * max(1, a.shape[1]):
        return 111, a.strides[0] // item
    if a.strides[0] == item and a.strides[1] % item == 0 and a.strides[1] >= item * max(1, a.shape[0]):
        return 112, a.strides[1] // item
    raise ValueError(f"{what}: strides {a.strides} are not a BLAS layout")


def matmul_into(a: Any, b: Any, out: Any, accumulate: bool) -> None:
    """``out = a @ b``, or ``out += a @ b`` with ``accumulate`` (sgemm's beta = 1, no temporary), for float32 2-D
    numpy arrays in any BLAS layout (rows or columns unit-stride, any pitch); ``out``'s rows must be unit-stride.
    Without ``can_accumulate`` it falls back to numpy with a temporary."""
    import numpy as np

    (m, k), (k2, n) = a.shape, b.shape
    if k != k2 or out.shape != (m, n) or not a.dtype == b.dtype == out.dtype == np.float32:
        raise ValueError(f"matmul_into: {a.shape} {a.dtype} @ {b.shape} {b.dtype} into {out.shape} {out.dtype}")
    sgemm = _numpy_sgemm()
    if sgemm is None:
        if accumulate:
            out += a @ b
        else:
            np.matmul(a, b, out=out)
        return
    trans_a, lda = _blas_layout(a, "a")
    trans_b, ldb = _blas_layout(b, "b")
    order_c, ldc = _blas_layout(out, "out")
    if order_c != 111:
        raise ValueError("matmul_into: out's rows must be unit-stride")
    sgemm(101, trans_a, trans_b, m, n, k, 1.0, a.ctypes.data, lda, b.ctypes.data, ldb,
          1.0 if accumulate else 0.0, out.ctypes.data, ldc)


def _blas_calls() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    global _blas_threads, _blas_looked_up
    if not _blas_looked_up:
        with _lock:
            if not _blas_looked_up:
                _blas_threads = _numpy_blas_calls()
                _blas_looked_up = True
    return _blas_threads


def blas_in_workers() -> bool:
    """Whether numpy's BLAS can be made single-threaded while workers run (so BLAS work may be split)."""
    return _blas_calls() is not None


def _start_worker() -> None:
    _in_worker.active = True


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(worker_count(), thread_name_prefix="imgpack-cpu",
                                           initializer=_start_worker)
    return _pool


def run_all(work: Callable[[T], object], items: Iterable[T], uses_blas: bool = False) -> None:
    """``work(item)`` for every item, spread over the workers; the first exception is re-raised.

    Runs in the calling thread when there is one worker or one item, when called from a worker (no nesting), or
    when ``uses_blas`` and BLAS cannot be made single-threaded in the workers.
    """
    jobs = list(items)
    inline = (len(jobs) <= 1 or worker_count() <= 1 or getattr(_in_worker, "active", False)
              or (uses_blas and not blas_in_workers()))
    if inline:
        for job in jobs:
            work(job)
        return
    if uses_blas:
        calls = _blas_calls()
        assert calls is not None
        get_threads, set_threads = calls
        with _blas_lock:
            previous = get_threads()
            set_threads(1)
            try:
                _run_in_workers(work, jobs)
            finally:
                set_threads(previous)
        return
    _run_in_workers(work, jobs)


def _run_in_workers(work: Callable[[T], object], jobs: list[T]) -> None:
    futures = [_executor().submit(work, job) for job in jobs]
    error: BaseException | None = None
    for future in futures:
        try:
            future.result()
        except BaseException as e:  # wait for every job before raising: they write into shared buffers
            error = error or e
    if error is not None:
        raise error


def spans(total: int, parts: int, multiple: int = 1) -> list[tuple[int, int]]:
    """``total`` split into at most ``parts`` contiguous (start, stop) spans, each a multiple of ``multiple``."""
    if total <= 0:
        return []
    size = -(-total // max(1, parts))
    size = -(-size // multiple) * multiple
    return [(start, min(total, start + size)) for start in range(0, total, size)]


def split_work(total: int, minimum: int) -> list[tuple[int, int]]:
    """Spans of ``total`` rows for the workers, none smaller than ``minimum`` rows (tiny work stays whole)."""
    return spans(total, max(1, min(worker_count(), total // max(1, minimum))))


class Scratch:
    """Float32 buffers for one kernel call, one set per thread: each worker reuses its own across the call's jobs
    (a fresh large buffer per job would page-fault anew), and all are freed with the object."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, int], Any] = {}

    def get(self, shape: Sequence[int], slot: int = 0):  # noqa: ANN201 - numpy array
        """A buffer of ``shape`` for this thread; ``slot`` tells apart the buffers one job needs at once."""
        import numpy as np

        size = 1
        for n in shape:
            size *= int(n)
        key = (threading.get_ident(), slot)
        buf = self._buffers.get(key)
        if buf is None or buf.size < size:
            buf = self._buffers[key] = np.empty(size, np.float32)
        return buf[:size].reshape(tuple(int(n) for n in shape))
