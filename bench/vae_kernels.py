"""Micro-benchmark: the VAE decoder's 3x3 convolution shapes, MLX's banded conv2d against the CPU kernels.

    OPENBLAS_NUM_THREADS=2 .venv/bin/python bench/vae_kernels.py [--sizes 512,1024] [--repeats 3] [--mlx-repeats 1]

Shapes are those of a FLUX-shaped decoder (block_out_channels 128/256/512/512) producing an image of each size;
achieved GFLOP/s counts the direct convolution's 2*9*H*W*Cin*Cout (Winograd and the folded upsample do fewer
multiply-adds, so theirs can exceed the machine's sgemm rate). Median of the repeats.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from imgpack.runtime.backend import mx
from imgpack.runtime.common import vae_kernels
from imgpack.runtime.common.autoencoder import Conv3x3, Upsample


def shapes(size: int) -> list[tuple[str, int, int, int]]:
    """(kind, output side, Cin, Cout) for each distinct conv in a decode to ``size`` pixels."""
    s = size // 8
    return [
        ("conv", s, 512, 512), ("up", 2 * s, 512, 512), ("conv", 2 * s, 512, 512), ("up", 4 * s, 512, 512),
        ("conv", 4 * s, 512, 256), ("conv", 4 * s, 256, 256), ("up", 8 * s, 256, 256),
        ("conv", 8 * s, 256, 128), ("conv", 8 * s, 128, 128),
    ]


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls (NaN for none: ``--mlx-repeats 0`` skips MLX's slow column)."""
    if repeats < 1:
        return float("nan")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mlx-repeats", type=int, default=1)
    args = parser.parse_args()
    print(f"{'size':>5} {'kind':<5}{'HxW':>10} {'Cin':>4}->{'Cout':<4} {'GFLOP':>7}  "
          f"{'MLX':>12} {'im2col':>12} {'winograd':>12} {'shifted':>12}  (s, direct-equivalent GFLOP/s)", flush=True)
    for size in (int(s) for s in args.sizes.split(",")):
        for kind, side, cin, cout in shapes(size):
            rng = np.random.default_rng(0)
            in_side = side // 2 if kind == "up" else side
            x = mx.array(rng.standard_normal((1, in_side, in_side, cin), dtype=np.float32))
            module = Upsample(cin) if kind == "up" else Conv3x3(cin, cout)
            conv = module.conv if kind == "up" else module
            mx.eval(x, conv.parameters())
            gflop = 2 * 9 * side * side * cin * cout / 1e9
            os.environ[vae_kernels.FAST_CONV_ENV] = "0"
            cells = {"MLX": median_time(partial(module, x), args.mlx_repeats)}
            os.environ[vae_kernels.FAST_CONV_ENV] = "1"
            kernels = [vae_kernels.upsample_conv3x3] if kind == "up" else [
                vae_kernels.conv3x3, vae_kernels.winograd_conv3x3, vae_kernels.shifted_conv3x3]
            for name, kernel in zip(("im2col", "winograd", "shifted"), kernels, strict=False):
                cells[name] = median_time(partial(kernel, x, conv.weight, conv.bias), args.repeats)
            row = " ".join(f"{f'{t:.2f}/{gflop / t:.0f}':>12}" for t in cells.values())
            print(f"{size:>5} {kind:<5}{f'{side}x{side}':>10} {cin:>4}->{cout:<4} {gflop:>7.1f}  {row}", flush=True)


if __name__ == "__main__":
    main()
