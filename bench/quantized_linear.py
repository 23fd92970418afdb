"""Throughput of one linear layer per storage form on the default device (CPU here), at Z-Image's real sizes.

    python bench/quantized_linear.py [--out 3840] [--in 10240] [--tokens 4096] [--repeat 3]

Rows: float32 weight (OpenBLAS), CastLinear on a bf16 weight, QuantizedLinear per type (on CPU: dequantize
this layer to float32 then matmul), and ``mx.quantized_matmul`` itself (timed on fewer tokens: it is slow on
CPU). Prints GFLOP/s (2 * out * in * tokens per call), best of --repeat.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from imgpack.runtime.backend import BLAS, device_name, mx
from imgpack.runtime.common.quantized import CastLinear, QuantizedLinear, quantize
from imgpack.schemas.quantized import QUANT_TYPES


def best(fn: Callable[[], mx.array], repeat: int) -> float:
    mx.eval(fn())
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=int, default=3840)
    ap.add_argument("--in", dest="inp", type=int, default=10240)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--qmm-tokens", type=int, default=128)
    args = ap.parse_args()
    print(f"device {device_name()}, BLAS {BLAS.describe()}; W {args.out}x{args.inp}, x {args.tokens} tokens")
    weight = (mx.random.normal((args.out, args.inp), key=mx.random.key(0)) * 0.02).astype(mx.bfloat16)
    x = mx.random.normal((args.tokens, args.inp), key=mx.random.key(1))
    mx.eval(weight, x)
    flops = 2 * args.out * args.inp * args.tokens

    def row(label: str, seconds: float, work: float = flops) -> None:
        print(f"{label:32s} {seconds * 1000:8.0f} ms {work / seconds / 1e9:8.1f} GFLOP/s", flush=True)

    dense = CastLinear(weight.astype(mx.float32))  # same dtype as x: a plain matmul
    row("float32 matmul", best(lambda: dense(x), args.repeat))
    cast = CastLinear(weight)
    row("CastLinear bf16 -> f32", best(lambda: cast(x), args.repeat))
    x_small = x[: args.qmm_tokens]
    small = 2 * args.out * args.inp * args.qmm_tokens
    for qtype in QUANT_TYPES.values():
        layer = QuantizedLinear(quantize(weight, qtype))
        row(f"QuantizedLinear {qtype.name}", best(lambda layer=layer: layer(x), args.repeat))

        def qmm(layer: QuantizedLinear = layer) -> mx.array:
            q = layer.qtype
            return mx.quantized_matmul(x_small, layer.weight, layer.scales, layer.get("biases"), transpose=True,
                                       group_size=q.group_size, bits=q.bits, mode=q.mode)

        row(f"  mx.quantized_matmul ({args.qmm_tokens} tok)", best(qmm, 1), small)


if __name__ == "__main__":
    main()
