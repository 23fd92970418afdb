"""The VAE's CPU kernels (runtime/common/vae_kernels.py) against MLX's own ops on random inputs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from imgpack.runtime import cpu_pool
from imgpack.runtime.backend import mx
from imgpack.runtime.common import autoencoder, vae_kernels
from imgpack.runtime.common.autoencoder import Conv3x3, GroupNorm, ResnetBlock, Upsample, VAEConfig, VAEDecoder

pytestmark = pytest.mark.skipif(not vae_kernels.fast_conv(mx.zeros((1,))), reason="the kernels are CPU-only")

#: (batch, h, w, cin, cout): odd sizes, Cin != Cout both ways, a single pixel row and column, a 3-channel output.
SHAPES = [(1, 7, 5, 4, 6), (2, 9, 13, 16, 8), (1, 1, 1, 3, 5), (1, 1, 17, 8, 8), (1, 16, 1, 8, 3), (1, 12, 10, 32, 32)]


def rel_err(a: mx.array | np.ndarray, b: mx.array | np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def random(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * np.float32(scale))


def conv_module(cin: int, cout: int, seed: int) -> Conv3x3:
    conv = Conv3x3(cin, cout)
    conv.weight = random((cout, 3, 3, cin), seed, (9 * cin) ** -0.5)
    conv.bias = random((cout,), seed + 1)
    return conv


CONVS = [vae_kernels.conv3x3, vae_kernels.winograd_conv3x3, vae_kernels.shifted_conv3x3, vae_kernels.conv3x3_auto]


@pytest.mark.parametrize("kernel", CONVS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("shape", [*SHAPES, (1, 6, 7, 256, 16)])
def test_conv3x3_matches_mlx(shape: tuple[int, ...], kernel: Callable) -> None:
    b, h, w, cin, cout = shape
    conv = conv_module(cin, cout, 1)
    x = random((b, h, w, cin), 2)
    expected = mx.conv2d(x, conv.weight, padding=1) + conv.bias
    assert rel_err(kernel(x, conv.weight, conv.bias), expected) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_upsample_conv_matches_mlx(shape: tuple[int, ...]) -> None:
    b, h, w, cin, cout = shape
    conv = conv_module(cin, cout, 3)
    x = random((b, h, w, cin), 4)
    up = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, cin)).reshape(b, 2 * h, 2 * w, cin)
    expected = mx.conv2d(up, conv.weight, padding=1) + conv.bias
    assert rel_err(vae_kernels.upsample_conv3x3(x, conv.weight, conv.bias), expected) < 1e-5


@pytest.mark.parametrize("threads", ["", "1"])
@pytest.mark.parametrize("rows", [1, 3, 5, 100])
def test_banded_edges(monkeypatch: pytest.MonkeyPatch, rows: int, threads: str) -> None:
    """Bands of one row (one tile row for Winograd), a few rows with a ragged last band, and a single band all
    give MLX's result, whether the bands run on the worker threads or all in the caller."""
    monkeypatch.setenv(cpu_pool.THREADS_ENV, threads)
    conv = conv_module(8, 12, 5)
    x = random((1, 23, 19, 8), 6)
    expected = mx.conv2d(x, conv.weight, padding=1) + conv.bias
    up = mx.broadcast_to(x[:, :, None, :, None, :], (1, 23, 2, 19, 2, 8)).reshape(1, 46, 38, 8)
    expected_up = mx.conv2d(up, conv.weight, padding=1) + conv.bias
    monkeypatch.setattr(vae_kernels, "BAND_FLOATS", rows * (19 + 2) * 9 * 8)  # (w + 2) x 9 Cin floats a row
    monkeypatch.setattr(vae_kernels, "WINOGRAD_BAND_TILES", rows * 5)  # 5 tiles (4x4 output pixels) a tile row
    monkeypatch.setattr(vae_kernels, "SHIFTED_BAND_PIXELS", rows * (19 + 2))
    monkeypatch.setattr(vae_kernels, "UPSAMPLE_BAND_TILES", rows * 10)  # 10 tiles (2x2 input pixels) a tile row
    assert rel_err(vae_kernels.conv3x3(x, conv.weight, conv.bias), expected) < 1e-5
    assert rel_err(vae_kernels.winograd_conv3x3(x, conv.weight, conv.bias), expected) < 1e-5
    assert rel_err(vae_kernels.shifted_conv3x3(x, conv.weight, conv.bias), expected) < 1e-5
    assert rel_err(vae_kernels.upsample_conv3x3(x, conv.weight, conv.bias), expected_up) < 1e-5


@pytest.mark.parametrize("kernel", CONVS, ids=lambda k: k.__name__)
def test_residual_is_added_to_the_output(kernel: Callable) -> None:
    """The ResNet skip folded into the convolution's last pass: exactly conv + bias, then + residual."""
    conv = conv_module(8, 6, 21)
    x, skip = random((2, 7, 5, 8), 22), random((2, 7, 5, 6), 23)
    plain = kernel(x, conv.weight, conv.bias)
    assert np.array_equal(np.array(kernel(x, conv.weight, conv.bias, skip)), np.array(plain + skip))
    with pytest.raises(ValueError, match=r"residual shape \(2, 7, 5, 8\) != output shape \(2, 7, 5, 6\)"):
        kernel(x, conv.weight, conv.bias, x)


@pytest.mark.parametrize("kernel", CONVS, ids=lambda k: k.__name__)
def test_sum_written_over_an_owned_residual(kernel: Callable) -> None:
    """``into_residual``: the same sum as a fresh output, in the residual's own buffer (no new activation)."""
    conv = conv_module(8, 6, 24)
    x = random((2, 9, 5, 8), 25)
    skip_values = np.random.default_rng(26).standard_normal((2, 9, 5, 6), dtype=np.float32)
    fresh = np.array(kernel(x, conv.weight, conv.bias, mx.array(skip_values)))
    skip = mx.array(skip_values) * 1.0  # a computed array, as a shortcut conv's output is
    mx.eval(skip)
    out = kernel(x, conv.weight, conv.bias, skip, None, True)
    assert out is skip
    np.testing.assert_allclose(np.array(out), fresh, rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.array(skip), skip_values)  # the residual's buffer now holds the sum


def test_resnet_with_a_shortcut_matches_mlx(monkeypatch: pytest.MonkeyPatch) -> None:
    """The block whose shortcut output is overwritten by the sum: the same result as MLX's own ops."""
    block = ResnetBlock(8, 4, 2)
    for name in ("norm1", "norm2"):
        getattr(block, name).weight = random((8 if name == "norm1" else 4,), 27) + 1.0
    block.conv1.weight, block.conv2.weight = random((4, 3, 3, 8), 28, 0.2), random((4, 3, 3, 4), 29, 0.2)
    block.conv_shortcut.weight = random((4, 1, 1, 8), 30)
    x = random((1, 6, 7, 8), 31)
    fast = np.array(block(x))
    monkeypatch.setenv(vae_kernels.FAST_CONV_ENV, "0")
    slow = np.array(block(x))
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("cin", "cout", "expected"), [
    (16, 512, "conv3x3"), (64, 64, "winograd_conv3x3"), (128, 3, "shifted_conv3x3"), (128, 16, "shifted_conv3x3"),
    (128, 32, "winograd_conv3x3"), (256, 128, "winograd_conv3x3"), (512, 512, "winograd_conv3x3"),
])
def test_auto_picks_the_measured_formulation(monkeypatch: pytest.MonkeyPatch, cin: int, cout: int,
                                              expected: str) -> None:
    called = []
    for name in ("conv3x3", "shifted_conv3x3", "winograd_conv3x3"):
        monkeypatch.setattr(vae_kernels, name, lambda *a, name=name: called.append(name))
    vae_kernels.conv3x3_auto(mx.zeros((1, 4, 4, cin)), mx.zeros((cout, 3, 3, cin)), mx.zeros((cout,)))
    assert called == [expected]
    monkeypatch.setattr(vae_kernels, "can_accumulate", lambda: False)  # no reachable sgemm: Winograd instead
    called.clear()
    vae_kernels.conv3x3_auto(mx.zeros((1, 4, 4, cin)), mx.zeros((cout, 3, 3, cin)), mx.zeros((cout,)))
    assert called == [expected.replace("shifted", "winograd")]


@pytest.mark.parametrize("blas", [True, False])
@pytest.mark.parametrize("accumulate", [False, True])
def test_matmul_into_reads_every_blas_layout(monkeypatch: pytest.MonkeyPatch, accumulate: bool, blas: bool) -> None:
    """Row- and column-major operands of any pitch (the shifted band rows, a weight's transposed slice), through
    numpy's sgemm or, where it cannot be reached, numpy's matmul."""
    if not blas:
        monkeypatch.setattr(cpu_pool, "_numpy_sgemm", lambda: None)
    rng = np.random.default_rng(51)
    big = rng.standard_normal((30, 50), dtype=np.float32)
    a_rows = big[3:20, 5:16]             # (17, 11), pitch 50
    b_cols = rng.standard_normal((17, 40), dtype=np.float32)[:, 7:18].T  # (11, 17), columns unit-stride
    start = rng.standard_normal((17, 17), dtype=np.float32)
    out = start.copy()
    cpu_pool.matmul_into(a_rows, b_cols, out, accumulate)
    want = a_rows.astype(np.float64) @ b_cols.astype(np.float64) + (start if accumulate else 0.0)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="matmul_into"):
        cpu_pool.matmul_into(a_rows, b_cols[:5], out, accumulate)


def test_numpy_blas_threads_restored_after_a_parallel_run() -> None:
    """Bands run with single-threaded BLAS in the workers; the caller's BLAS threads come back afterwards."""
    calls = cpu_pool._blas_calls()
    if calls is None or cpu_pool.worker_count() < 2:
        pytest.skip("numpy's BLAS thread count cannot be set here, or one CPU")
    before = calls[0]()
    conv = conv_module(8, 8, 24)
    vae_kernels.conv3x3(random((1, 40, 9, 8), 25), conv.weight, conv.bias)
    assert calls[0]() == before


def test_replaced_weights_are_used() -> None:
    """Weight layouts are built per call from the module's current weight (a load, an update)."""
    conv = conv_module(4, 4, 7)
    x = random((1, 5, 5, 4), 8)
    for kernel in (*CONVS, vae_kernels.upsample_conv3x3):
        kernel(x, conv.weight, conv.bias)
    conv.weight = random((4, 3, 3, 4), 9)
    expected = mx.conv2d(x, conv.weight, padding=1) + conv.bias
    for kernel in CONVS:
        assert rel_err(kernel(x, conv.weight, conv.bias), expected) < 1e-5


def test_outputs_are_fresh_buffers() -> None:
    """Results are written into MLX buffers of their own: a second call never aliases the first's."""
    conv = conv_module(4, 4, 10)
    a = vae_kernels.conv3x3(random((1, 6, 6, 4), 11), conv.weight, conv.bias)
    before = np.array(a)
    vae_kernels.conv3x3(random((1, 6, 6, 4), 12), conv.weight, conv.bias)
    assert np.array_equal(np.array(a), before)


def test_conv1x1_matches_mlx() -> None:
    x = random((2, 7, 9, 12), 13)
    weight, bias = random((5, 1, 1, 12), 14), random((5,), 15)
    assert rel_err(vae_kernels.conv1x1(x, weight, bias), mx.conv2d(x, weight) + bias) < 1e-5


@pytest.mark.parametrize(("shape", "groups"), [((1, 9, 7, 32), 8), ((2, 16, 16, 64), 32), ((1, 1, 3, 6), 3)])
@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_group_norm_silu_fused_matches_unfused(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], groups: int, offset: float
) -> None:
    """Fused (numpy) against MLX's GroupNorm then SiLU, also with a large mean (the statistics' cancellation)."""
    norm = GroupNorm(shape[-1], groups)
    norm.weight, norm.bias = random((shape[-1],), 16) + 1.0, random((shape[-1],), 17)
    x = random(shape, 18, 3.0) + offset
    monkeypatch.setenv(vae_kernels.FAST_CONV_ENV, "0")
    normed = norm(x)
    expected = normed * mx.sigmoid(normed)
    monkeypatch.setattr(vae_kernels, "NORM_CHUNK", 37)  # many ragged chunks
    fused = vae_kernels.group_norm_silu(x, norm.weight, norm.bias, groups, norm.eps)
    plain = vae_kernels.group_norm_silu(x, norm.weight, norm.bias, groups, norm.eps, silu=False)
    assert rel_err(fused, expected) < 1e-5
    assert rel_err(plain, normed) < 1e-5


@pytest.mark.parametrize("cin", [12, 8])
@pytest.mark.parametrize("chunk", [5 * 12, 10**6])
def test_conv1x1_written_over_its_input(monkeypatch: pytest.MonkeyPatch, cin: int, chunk: int) -> None:
    """The shortcut written over its own input: the same values as a fresh output, in the input's buffer; chunks
    of 5 pixels (many, ragged) or one."""
    monkeypatch.setattr(vae_kernels, "IN_PLACE_CHUNK_FLOATS", chunk)
    x_values = np.random.default_rng(40).standard_normal((2, 7, 9, cin), dtype=np.float32)
    weight, bias = random((8, 1, 1, cin), 41), random((8,), 42)
    expected = np.array(vae_kernels.conv1x1(mx.array(x_values), weight, bias))
    x = mx.array(x_values) * 1.0  # a computed array, as an activation is
    mx.eval(x)
    buffer = np.array(x, copy=False)
    out = vae_kernels.conv1x1_over_input(x, weight, bias)
    assert out is not None and out.shape == (2, 7, 9, 8)
    result = np.array(out, copy=False)
    assert np.shares_memory(result, buffer)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.array(vae_kernels.compacted(out)), result)


def test_conv1x1_over_input_refuses_more_outputs_than_inputs() -> None:
    x = random((1, 3, 3, 4), 43) * 1.0
    before = np.array(x)
    assert vae_kernels.conv1x1_over_input(x, random((6, 1, 1, 4), 44), None) is None
    assert np.array_equal(np.array(x), before)


def test_conv1x1_over_input_refuses_a_copied_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should MLX ever copy the slice that is to be the result, nothing is written and None tells the caller."""
    real = vae_kernels._writable_view
    seen: list[int] = []

    def second_is_a_copy(array: mx.array):  # noqa: ANN202 - numpy array
        view = real(array)
        seen.append(1)
        return view if len(seen) == 1 or view is None else view.copy()

    monkeypatch.setattr(vae_kernels, "_writable_view", second_is_a_copy)
    x = random((1, 3, 3, 8), 49) * 1.0
    before = np.array(x)
    assert vae_kernels.conv1x1_over_input(x, random((4, 1, 1, 8), 50), None) is None
    assert np.array_equal(np.array(x), before)


@pytest.mark.parametrize(("cin", "cout"), [(8, 4), (4, 4), (4, 8)])
def test_resnet_written_over_a_donated_input(cin: int, cout: int) -> None:
    """A block given its input writes over it, with the same result as with a fresh output."""
    block = ResnetBlock(cin, cout, 2)
    block.conv1.weight, block.conv2.weight = random((cout, 3, 3, cin), 45, 0.2), random((cout, 3, 3, cout), 46, 0.2)
    if block.has_shortcut:
        block.conv_shortcut.weight = random((cout, 1, 1, cin), 47)
    x_values = np.random.default_rng(48).standard_normal((1, 6, 7, cin), dtype=np.float32)
    kept = np.array(block(mx.array(x_values)))
    x = mx.array(x_values) * 1.0
    mx.eval(x)
    buffer = np.array(x, copy=False)
    donated = block(x, donate=True)
    np.testing.assert_allclose(np.array(donated), kept, rtol=1e-5, atol=1e-5)
    assert np.shares_memory(np.array(donated, copy=False), buffer) == (cout <= cin)


@pytest.mark.parametrize(("channels", "per_block", "batch"), [
    ([16, 32, 32], 1, 1), ([16, 16, 32], 1, 1), ([8, 16, 16, 32], 2, 2),
], ids=["shrinks-last", "shrinks-then-upsamples", "four-blocks-batch-2"])
def test_decoder_fast_path_matches_mlx_path(monkeypatch: pytest.MonkeyPatch, channels: list[int], per_block: int,
                                            batch: int) -> None:
    """A whole small decoder (upsamples, shortcuts, attention, post_quant_conv) either way; blocks whose shortcut
    shrinks the channels written over their input, then copied out before an upsample."""
    cfg = VAEConfig.from_dict({"block_out_channels": channels, "latent_channels": 4, "layers_per_block": per_block,
                               "norm_num_groups": 8, "scaling_factor": 0.3, "shift_factor": 0.1})
    mx.random.seed(0)
    decoder = VAEDecoder(cfg)
    latents = random((batch, 4, 7, 9), 19)
    fast = decoder(latents)
    monkeypatch.setenv(vae_kernels.FAST_CONV_ENV, "0")
    assert not vae_kernels.fast_conv(latents)
    slow = decoder(latents)
    scale = cfg.scale_factor
    assert fast.shape == slow.shape == (batch, 7 * scale, 9 * scale, 3)
    assert rel_err(fast, slow) < 1e-5


def test_upsample_module_uses_fused_path_only_on_cpu_float32() -> None:
    up = Upsample(4)
    x = random((1, 3, 3, 4), 20).astype(mx.bfloat16)
    up.conv.weight = up.conv.weight.astype(mx.bfloat16)
    assert not vae_kernels.fast_conv(x, up.conv.weight)
    assert up(x).shape == (1, 6, 6, 4)
    norm = GroupNorm(4, 2)
    conv = Conv3x3(4, 4)
    conv.weight, conv.bias = conv.weight.astype(mx.bfloat16), conv.bias.astype(mx.bfloat16)
    assert not vae_kernels.fast_conv(x, conv.weight)
    assert rel_err(conv(x, norm=norm), conv(autoencoder.silu(norm(x)))) == 0.0


@pytest.mark.parametrize("kernel", CONVS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("threads", ["", "1"])
def test_norm_folded_into_the_convolution(monkeypatch: pytest.MonkeyPatch, kernel: Callable, threads: str) -> None:
    """GroupNorm + SiLU applied band by band as the convolution reads its input (padding stays zero) equals the
    convolution of the stored normalised activation, across ragged bands and a batch of two."""
    monkeypatch.setenv(cpu_pool.THREADS_ENV, threads)
    monkeypatch.setattr(vae_kernels, "BAND_FLOATS", 3 * (9 + 2) * 9 * 32)
    monkeypatch.setattr(vae_kernels, "WINOGRAD_BAND_FLOATS", 2 * 2 * 36 * 3 * 32)  # 2 buffers x 36 x tiles x Cin
    monkeypatch.setattr(vae_kernels, "SHIFTED_BAND_PIXELS", 2 * (9 + 2))
    norm = GroupNorm(32, 8)
    norm.weight, norm.bias = random((32,), 26) + 1.0, random((32,), 27)
    conv = conv_module(32, 16, 28)
    x = random((2, 13, 9, 32), 29, 2.0) + 5.0
    stored = vae_kernels.group_norm_silu(x, norm.weight, norm.bias, norm.groups, norm.eps)
    expected = kernel(stored, conv.weight, conv.bias)
    pre = vae_kernels.prenorm(x, norm.weight, norm.bias, norm.groups, norm.eps)
    assert rel_err(kernel(x, conv.weight, conv.bias, None, pre), expected) < 1e-5
    assert rel_err(conv(x, norm=norm), expected) < 1e-5


def test_decode_bound_follows_the_kernels_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory plan's decode bound: about two full-resolution activations of the second block's width with the
    CPU kernels (a 2048x2048 FLUX-VAE decode plans under 10 GB), six with MLX's (over 25 GB)."""
    cfg = VAEConfig.from_dict({"block_out_channels": [128, 256, 512, 512], "latent_channels": 16,
                               "layers_per_block": 2, "norm_num_groups": 32, "scaling_factor": 0.3})
    fast = autoencoder.decode_bytes(cfg, 2048, 2048)
    assert 2 * 2048 * 2048 * 256 * 4 < fast < 10 * 10**9
    monkeypatch.setenv(vae_kernels.FAST_CONV_ENV, "0")
    assert autoencoder.decode_bytes(cfg, 2048, 2048) > 25 * 10**9
