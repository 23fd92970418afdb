"""Linear layers whose weights stay resident in their stored form (quantized, or bf16/f16) and expand per call.

On Metal/CUDA MLX has fast kernels for both: ``mx.quantized_matmul`` and half-precision matmuls. On CPU it
does not: ``mx.quantized_matmul`` runs at ~2-3 GFLOP/s, while expanding one layer's weight to float32 and
handing it to OpenBLAS runs at ~100-200 GFLOP/s (see ``bench/quantized_linear.py``). So on CPU each call
expands just this layer's weight, multiplies, and evaluates at once, so the expanded copy is freed before the
next layer expands its own: memory is the stored weights plus one float32 layer.
"""

from __future__ import annotations

from collections.abc import Mapping

from imgpack.packager.quantize import QuantizedTensor, QuantLayout, dequantize
from imgpack.runtime.backend import is_cpu, mx, nn
from imgpack.schemas.errors import ImgpackError


def _linear(x: mx.array, weight: mx.array, bias: mx.array | None, expanded: bool) -> mx.array:
    y = x @ weight.T
    if bias is not None:
        y = y + bias.astype(y.dtype)
    if expanded and is_cpu():
        mx.eval(y)  # frees the expanded weight now, not when the whole forward is evaluated
    return y


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as MLX's packed weight, scales and (affine) biases.

    Parameters keep MLX's names (``weight``, ``scales``, ``biases``, ``bias``), so a loader fills a placeholder
    from a combined blob's ``<name>``, ``<name>.scale``, ``<name>.bias`` with ``load_weights``.
    """

    def __init__(self, qt: QuantizedTensor, bias: mx.array | None = None) -> None:
        super().__init__()
        self.qtype = qt.qtype
        self.weight = qt.weight
        self.scales = qt.scales
        if qt.biases is not None:
            self.biases = qt.biases
        if bias is not None:
            self.bias = bias
        self.freeze()

    @classmethod
    def placeholder(cls, layout: QuantLayout, bias: mx.array | None = None) -> QuantizedLinear:
        """Unevaluated zeros of the stored shapes and dtypes (no memory until evaluated), to be loaded into."""
        q = layout.qtype
        scale_dtype = _MX_DTYPES[layout.scale_dtype]
        scales = mx.zeros(layout.scale_shape, dtype=scale_dtype)
        biases = mx.zeros(layout.scale_shape, dtype=scale_dtype) if q.has_biases else None
        return cls(QuantizedTensor(q, mx.zeros(layout.packed_shape, dtype=mx.uint32), scales, biases), bias)

    @property
    def tensor(self) -> QuantizedTensor:
        """The stored arrays as they are now (after loading, the loaded ones)."""
        return QuantizedTensor(self.qtype, self.weight, self.scales, self.get("biases"))

    def __call__(self, x: mx.array) -> mx.array:
        if is_cpu():
            return _linear(x, dequantize(self.tensor, x.dtype), self.get("bias"), expanded=True)
        q = self.qtype
        y = mx.quantized_matmul(x, self.weight, self.scales, self.get("biases"), transpose=True,
                                group_size=q.group_size, bits=q.bits, mode=q.mode)
        bias = self.get("bias")
        return y if bias is None else y + bias.astype(y.dtype)


class CastLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held in bf16/f16 and cast to the activations' dtype per call (on CPU,
    float32; the cast copy is freed after the call)."""

    def __init__(self, weight: mx.array, bias: mx.array | None = None) -> None:
        super().__init__()
        self.weight = weight
        if bias is not None:
            self.bias = bias
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        weight = self.weight
        cast = weight.dtype != x.dtype
        return _linear(x, weight.astype(x.dtype) if cast else weight, self.get("bias"), expanded=cast)


_MX_DTYPES = {"U8": mx.uint8, "U32": mx.uint32, "F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}


def swap_linears(model: nn.Module, quantized: Mapping[str, QuantLayout] | None = None,
                 cast: Mapping[str, mx.Dtype] | None = None) -> list[str]:
    """Replace the ``nn.Linear`` owning each listed weight parameter (``"layers.0.attention.to_q.weight"``) by a
    :class:`QuantizedLinear` placeholder of that layout, or a :class:`CastLinear` placeholder of that dtype, so
    ``model.load_weights`` then loads the stored arrays as they are. Each layer keeps its ``bias``. Returns the
    module paths swapped; raises when a name is not an ``nn.Linear`` weight or its shape disagrees."""
    quantized, cast = dict(quantized or {}), dict(cast or {})
    both = sorted(set(quantized) & set(cast))
    if both:
        raise ImgpackError(f"{both[0]}: listed as both quantized and cast")
    modules = dict(model.named_modules())
    swapped = []
    for param in sorted({*quantized, *cast}):
        path = param.removesuffix(".weight")
        linear = modules.get(path)
        if not param.endswith(".weight") or not isinstance(linear, nn.Linear):
            raise ImgpackError(f"{param}: not the weight of a linear layer of this model")
        want = list(linear.weight.shape)
        bias = linear.get("bias")
        if param in quantized:
            layout = quantized[param]
            if layout.shape != want:
                raise ImgpackError(f"{param}: stored as a {layout.shape} tensor, the model's layer is {want}")
            replacement: nn.Module = QuantizedLinear.placeholder(layout, bias)
        else:
            replacement = CastLinear(mx.zeros(want, dtype=cast[param]), bias)
        _set_module(model, path, replacement)
        swapped.append(path)
    return swapped


def max_expanded_bytes(model: nn.Module, itemsize: int = 4) -> int:
    """The largest weight any stored-form layer of ``model`` expands per call: what the CPU plan adds to the
    resident weights (one layer at a time)."""
    sizes = [m.weight.shape[0] * _in_features(m) * itemsize
             for _, m in model.named_modules() if isinstance(m, QuantizedLinear | CastLinear)]
    return max(sizes, default=0)


def _in_features(m: nn.Module) -> int:
    return m.weight.shape[-1] * 32 // m.qtype.bits if isinstance(m, QuantizedLinear) else m.weight.shape[-1]


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent: object = model
    *parents, last = path.split(".")
    for part in parents:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]  # type: ignore[index]
    if isinstance(parent, list):
        parent[int(last)] = module
    else:
        parent[last] = module  # type: ignore[index]
