"""The CPU worker pool and the rotary attention kernel against MLX's own ops."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from imgpack.runtime import backend, cpu_pool
from imgpack.runtime.backend import mx, nn
from imgpack.runtime.common.attention import apply_rope, rope_attention

pytestmark = pytest.mark.skipif(not backend.numpy_kernels(), reason="the numpy kernels are CPU-only")


def random(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * np.float32(scale))


def reference(q, k, v, cos, sin, scale, mask, q_norm, k_norm) -> np.ndarray:  # noqa: ANN001
    """The same attention from MLX's ops alone."""
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = mx.fast.scaled_dot_product_attention(*(a.transpose(0, 2, 1, 3) for a in (q, k, v)), scale=scale,
                                               mask=mask)
    b, s = q.shape[:2]
    return np.array(out.transpose(0, 2, 1, 3).reshape(b, s, -1))


@pytest.mark.parametrize("threads", ["", "1"])
@pytest.mark.parametrize(("batch", "tokens", "heads", "dim", "normed", "masked"), [
    (1, 70, 3, 16, True, False),  # ragged blocks of query rows and token bands
    (2, 33, 2, 8, False, True),   # a key mask that differs per batch item, no norm
    (1, 1, 1, 4, True, False),    # a single token
])
def test_rope_attention_matches_mlx(monkeypatch: pytest.MonkeyPatch, threads: str, batch: int, tokens: int,
                                    heads: int, dim: int, normed: bool, masked: bool) -> None:
    monkeypatch.setenv(cpu_pool.THREADS_ENV, threads)
    monkeypatch.setattr(backend, "ATTENTION_BLOCK_FLOATS", 16 * tokens)  # several row blocks per head
    monkeypatch.setattr("imgpack.runtime.common.attention.ROPE_BAND_TOKENS", 16)
    q, k, v = (random((batch, tokens, heads, dim), seed) for seed in (1, 2, 3))
    angles = random((1, tokens, 1, dim // 2), 4, 3.0)
    cos, sin = mx.cos(angles), mx.sin(angles)
    norms: tuple[nn.RMSNorm | None, nn.RMSNorm | None] = (None, None)
    if normed:
        norms = (nn.RMSNorm(dim, eps=1e-5), nn.RMSNorm(dim, eps=1e-5))
        norms[0].weight, norms[1].weight = random((dim,), 5) + 1.0, random((dim,), 6) + 1.0
    mask = None
    if masked:
        mask = mx.array(np.arange(tokens)[None, None, None, :] < np.array([tokens, tokens - 9])[:, None, None, None])
    got = rope_attention(q, k, v, cos, sin, dim**-0.5, mask, *norms)
    assert got.shape == (batch, tokens, heads * dim)
    want = reference(q, k, v, cos, sin, dim**-0.5, mask, *norms)
    np.testing.assert_allclose(np.array(got), want, atol=2e-5, rtol=1e-5)


def test_rope_attention_without_numpy_kernels_is_the_mlx_path(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = (random((1, 9, 2, 8), seed) for seed in (7, 8, 9))
    angles = random((1, 9, 1, 4), 10)
    fast = rope_attention(q, k, v, mx.cos(angles), mx.sin(angles), 0.3)
    monkeypatch.setenv(backend.NUMPY_KERNELS_ENV, "0")
    slow = rope_attention(q, k, v, mx.cos(angles), mx.sin(angles), 0.3)
    np.testing.assert_allclose(np.array(fast), np.array(slow), atol=2e-6)


def test_half_precision_inputs_and_norms_are_widened() -> None:
    """A quantized model keeps small tensors (norms) as stored, bf16: the kernel widens them, as MLX would."""
    q, k, v = (random((1, 12, 2, 8), seed) for seed in (11, 12, 13))
    angles = random((1, 12, 1, 4), 14)
    norm = nn.RMSNorm(8)
    norm.weight = (random((8,), 15) + 1.0).astype(mx.bfloat16)
    got = rope_attention(q.astype(mx.bfloat16), k, v, mx.cos(angles), mx.sin(angles), 0.35, None, norm, norm)
    assert got.dtype == mx.float32
    want = reference(q.astype(mx.bfloat16).astype(mx.float32), k, v, mx.cos(angles), mx.sin(angles), 0.35, None,
                     norm, norm)
    np.testing.assert_allclose(np.array(got), want, atol=2e-2)


def softmax_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
                      bias: np.ndarray | None = None) -> np.ndarray:
    """Attention in float64 with the row maximum subtracted."""
    scores = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k.astype(np.float64)) * scale
    if bias is not None:
        scores = scores + bias
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", weights, v.astype(np.float64))


@pytest.mark.parametrize("threads", ["", "1"])
@pytest.mark.parametrize("magnitude", [0.2, 1.0, 40.0])
def test_attention_softmax_is_exact_whether_or_not_the_row_maximum_is_skipped(
        monkeypatch: pytest.MonkeyPatch, threads: str, magnitude: float) -> None:
    """Small scores skip the max subtraction (bounded by the rows' norms); at 40x the scores reach the
    thousands, where exp would overflow without it: both must give the same softmax."""
    monkeypatch.setenv(cpu_pool.THREADS_ENV, threads)
    rng = np.random.default_rng(21)
    q, k, v = (rng.standard_normal((2, 3, 45, 16), dtype=np.float32) * np.float32(magnitude) for _ in range(3))
    got = np.array(backend.attention_arrays(q, k, v, 0.3))
    want = softmax_reference(q, k, v, 0.3)
    assert np.isfinite(got).all()
    # float32 scores carry an absolute error of about |score| * 2**-23, which the softmax turns into that relative
    # error in the weights: bound the output's error by it (a wrong softmax is off by about |v| itself).
    scores = np.abs(np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k.astype(np.float64))).max() * 0.3
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7 * max(scores, 1.0) * np.abs(v).max())


def test_attention_with_an_additive_mask_always_subtracts_the_maximum() -> None:
    """An additive mask can raise scores past any bound the norms give: +200 on one key per row must not
    overflow exp."""
    rng = np.random.default_rng(22)
    q, k, v = (rng.standard_normal((1, 2, 20, 8), dtype=np.float32) for _ in range(3))
    bias = np.zeros((1, 1, 20, 20), np.float32)
    bias[..., 3] = 200.0
    got = np.array(backend.attention_arrays(q, k, v, 0.3, bias))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, softmax_reference(q, k, v, 0.3, bias), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("n_q", "n_k"), [(1056, 1056), (4128, 4128), (7, 7), (640, 10), (20000, 16416)])
def test_attention_rows_split_queries_evenly_within_the_memory_cap(n_q: int, n_k: int) -> None:
    rows = backend._attention_rows(n_q, n_k)
    blocks = -(-n_q // rows)
    assert rows * n_k <= max(8 * n_k, backend.ATTENTION_BLOCK_FLOATS)
    assert rows == n_q or rows % 8 == 0
    assert blocks * rows - n_q < 8 * blocks  # no ragged last block beyond rounding to 8 rows
    assert rows <= max(backend.ATTENTION_ROWS, n_q // blocks + 8)


@pytest.mark.parametrize("threads", ["", "1"])
@pytest.mark.parametrize("shape", [(1, 70, 48), (2, 9, 40), (300, 24)])
def test_rms_norm_matches_mlx(monkeypatch: pytest.MonkeyPatch, threads: str, shape: tuple[int, ...]) -> None:
    monkeypatch.setenv(cpu_pool.THREADS_ENV, threads)
    monkeypatch.setattr(backend, "RMS_NORM_MIN_SIZE", 0)
    monkeypatch.setattr(backend, "split_work", lambda total, minimum: cpu_pool.spans(total, 4))  # ragged bands
    x = random(shape, 31, 3.0) + 0.5
    norm = backend.RMSNorm(shape[-1], eps=1e-5)
    norm.weight = random((shape[-1],), 32)
    got = norm(x)
    assert got.shape == x.shape and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), np.array(mx.fast.rms_norm(x, norm.weight, 1e-5)), rtol=1e-5,
                               atol=1e-5)
    assert np.array(x).mean() == pytest.approx(np.array(random(shape, 31, 3.0) + 0.5).mean())  # input untouched


@pytest.mark.parametrize("threads", ["", "1"])
def test_modulated_layer_norm_matches_mlx(monkeypatch: pytest.MonkeyPatch, threads: str) -> None:
    monkeypatch.setenv(cpu_pool.THREADS_ENV, threads)
    monkeypatch.setattr(backend, "RMS_NORM_MIN_SIZE", 0)
    monkeypatch.setattr(backend, "split_work", lambda total, minimum: cpu_pool.spans(total, 3))
    x = random((2, 67, 40), 41, 5.0) + 2.0  # a large mean: the two-pass variance must not lose it
    scale, shift = random((2, 1, 40), 42), random((2, 1, 40), 43)
    got = backend.modulated_layer_norm(x, 1e-6, scale, shift)
    want = mx.fast.layer_norm(x, None, None, 1e-6) * (1 + scale) + shift
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=2e-5)
    monkeypatch.setenv(backend.NUMPY_KERNELS_ENV, "0")
    np.testing.assert_allclose(np.array(backend.modulated_layer_norm(x, 1e-6, scale, shift)), np.array(want),
                               atol=1e-6)


@pytest.mark.parametrize("threads", ["", "1"])
@pytest.mark.parametrize("fused", [False, True])
def test_silu_mul_matches_mlx(monkeypatch: pytest.MonkeyPatch, threads: str, fused: bool) -> None:
    """SwiGLU's product from two projections, or from the two halves of one fused projection (strided slices),
    across ragged bands; the inputs stay as they were."""
    monkeypatch.setenv(cpu_pool.THREADS_ENV, threads)
    monkeypatch.setattr(backend, "SILU_BAND_ROWS", 7)
    if fused:
        y = random((2, 45, 2 * 24), 61, 4.0)
        gate, up = mx.split(y, 2, axis=-1)
    else:
        gate, up = random((2, 45, 24), 62, 4.0), random((2, 45, 24), 63)
    before = np.array(gate), np.array(up)
    want = np.array(nn.silu(gate) * up)
    got = backend.silu_mul(gate, up)
    assert got.shape == gate.shape
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.array(gate), before[0]) and np.array_equal(np.array(up), before[1])
    monkeypatch.setenv(backend.NUMPY_KERNELS_ENV, "0")
    np.testing.assert_allclose(np.array(backend.silu_mul(gate, up)), want, rtol=1e-6, atol=1e-6)


def test_run_all_spreads_jobs_and_reraises() -> None:
    if cpu_pool.worker_count() < 2:
        pytest.skip("one CPU: every job runs in the caller")
    seen: list[str] = []
    cpu_pool.run_all(lambda job: seen.append(threading.current_thread().name), range(8))
    assert len(seen) == 8 and all(name.startswith("imgpack-cpu") for name in seen)

    done: list[int] = []

    def fail_on_three(job: int) -> None:
        if job == 3:
            raise ValueError("job 3 failed")
        done.append(job)

    with pytest.raises(ValueError, match="job 3 failed"):
        cpu_pool.run_all(fail_on_three, range(6))
    assert sorted(done) == [0, 1, 2, 4, 5]  # every other job still ran to the end before the raise


def test_nested_run_all_runs_inline() -> None:
    """A job that splits its own work runs it in its own thread (a pool waiting on itself would deadlock)."""
    inner_threads: list[str] = []

    def outer(job: int) -> None:
        cpu_pool.run_all(lambda _: inner_threads.append(threading.current_thread().name), range(3))

    cpu_pool.run_all(outer, range(2))
    assert len(inner_threads) == 6


def test_one_thread_runs_in_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_pool.THREADS_ENV, "1")
    names: list[str] = []
    cpu_pool.run_all(lambda _: names.append(threading.current_thread().name), range(4))
    assert names == [threading.current_thread().name] * 4


def test_spans_cover_the_range_exactly() -> None:
    for total, parts, multiple in ((10, 3, 1), (7, 8, 1), (64, 2, 8), (1, 4, 1), (0, 2, 1)):
        got = cpu_pool.spans(total, parts, multiple)
        assert [i for a, b in got for i in range(a, b)] == list(range(total))
        assert len(got) <= max(parts, 0) or total == 0
        assert all((b - a) % multiple == 0 for a, b in got[:-1])


class FakeLibc:
    """Records the malloc tuning calls instead of making them."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, option: int, value: object) -> int:
        self.calls.append(("mallopt", option, getattr(value, "value", value)))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_freed_memory_is_kept_for_reuse_unless_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = FakeLibc()
    monkeypatch.setattr(backend, "_libc", lambda: libc)
    assert backend.reuse_freed_memory()
    # one arena for every thread; no mmap per block; never trim on free (release_free_memory does)
    assert libc.calls == [("mallopt", -8, 1), ("mallopt", -4, 0), ("mallopt", -1, 2**31 - 1)]
    monkeypatch.setenv(backend.MALLOC_REUSE_ENV, "0")
    libc.calls.clear()
    assert not backend.reuse_freed_memory() and libc.calls == []


def test_free_memory_goes_back_after_each_image_and_on_cancel(monkeypatch: pytest.MonkeyPatch,
                                                             runtime_store) -> None:  # noqa: ANN001
    from imgpack.runtime.common import pipeline as pipeline_module
    from imgpack.runtime.zimage.pipeline import GenerationRequest, Image, ZImageModel

    released: list[int] = []
    monkeypatch.setattr(pipeline_module, "release_free_memory", lambda: released.append(1))
    model = ZImageModel.open(runtime_store, "zimage-tiny:latest")
    events = list(model.generate(GenerationRequest("a fox", 64, 64, steps=1, seed=1)))
    assert isinstance(events[-1], Image) and released == [1]
    partial = model.generate(GenerationRequest("a fox", 64, 64, steps=2, seed=1))
    next(partial)
    partial.close()  # a client that went away mid-generation
    assert released == [1, 1]
