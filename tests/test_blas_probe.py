"""The BLAS probe: a library whose kernels this CPU lacks is skipped, not loaded into the process to die later."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")
from imgpack.runtime import backend  # noqa: E402

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to build the fake BLAS")

GOOD = """
void cblas_sgemm(int o, int ta, int tb, int m, int n, int k, float al, const float *a, int lda,
                 const float *b, int ldb, float be, float *c, int ldc) {
    for (int i = 0; i < m; i++) for (int j = 0; j < n; j++) {
        float s = 0; for (int p = 0; p < k; p++) s += a[i * lda + p] * b[p * ldb + j];
        c[i * ldc + j] = al * s + be * c[i * ldc + j];
    }
}
"""
# What an AVX-512 build does on a CPU without AVX-512: the first kernel call raises SIGILL.
ILLEGAL = """
void cblas_sgemm(void) { __builtin_trap(); }
"""


def build(tmp_path: Path, name: str, source: str) -> Path:
    c = tmp_path / f"{name}.c"
    c.write_text(source)
    lib = tmp_path / f"lib{name}.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(lib), str(c)], check=True)
    return lib


@needs_cc
def test_a_library_built_for_another_cpu_is_skipped_and_the_verdict_cached(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    good, bad = build(tmp_path, "good", GOOD), build(tmp_path, "bad", ILLEGAL)
    assert backend.blas_runs_here(good) == (True, "")
    ok, why = backend.blas_runs_here(bad)
    assert not ok and str(bad) in why and "another CPU" in why

    def no_child(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached verdict must not start a probe")

    monkeypatch.setattr(backend.subprocess, "run", no_child)
    assert backend.blas_runs_here(good) == (True, "")
    assert backend.blas_runs_here(bad)[0] is False
    bad.write_text("changed")  # a different file is probed afresh
    with pytest.raises(AssertionError, match="probe"):
        backend.blas_runs_here(bad)


def test_a_missing_library_is_reported_by_path(tmp_path: Path) -> None:
    ok, why = backend.blas_runs_here(tmp_path / "libnothing.so")
    assert not ok and "libnothing.so" in why


def test_the_loaded_blas_runs_here() -> None:
    # Whatever this process loaded must have passed the probe (the process would not be alive otherwise).
    if backend.BLAS.library:
        assert backend.blas_runs_here(Path(backend.BLAS.library))[0]
    a = backend.mx.ones((64, 64))
    assert float((a @ a)[0, 0].item()) == 64.0
