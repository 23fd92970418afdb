"""Quantized tensors in MLX: quantize and expand with MLX's own packing, blobs to arrays and back, and linear
layers whose weights stay resident in their stored form (quantized, or bf16/f16) and expand per call.

On Metal/CUDA MLX has fast kernels for both: ``mx.quantized_matmul`` and half-precision matmuls. On CPU it does
not: ``mx.quantized_matmul`` runs at ~2-3 GFLOP/s, while expanding one layer's weight to float32 and handing it to
OpenBLAS runs at ~100-200 GFLOP/s (see ``bench/quantized_linear.py``). So on CPU each call expands just this
layer's weight, multiplies, and evaluates at once, so the expanded copy is freed before the next layer expands
its own: memory is the stored weights plus one float32 layer. The formats themselves are
:mod:`imgpack.schemas.quantized`'s.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass

from imgpack.runtime.backend import is_cpu, mx, nn
from imgpack.schemas import spec
from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.quantized import (
    BIAS_SUFFIX,
    QUANT_TYPES,
    SCALE_SUFFIX,
    QuantizationError,
    QuantLayout,
    QuantType,
    _split_keys,
    check_quantized,
)
from imgpack.schemas.safetensors import Entry, encode_entries, read_header


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """MLX's quantized form of one tensor, resident as stored."""

    qtype: QuantType
    weight: mx.array  # uint32, [*rows, in_features * bits / 32]
    scales: mx.array  # [*rows, in_features / group_size]; uint8 for nvfp4/mxfp8, else the source float dtype
    biases: mx.array | None  # affine only: same shape and dtype as the scales

    @property
    def layout(self) -> QuantLayout:
        return QuantLayout(self.qtype, tuple(self.weight.shape), _st_dtype(self.scales.dtype))

    @property
    def shape(self) -> list[int]:
        return self.layout.shape


def quantize(array: mx.array, qtype: QuantType) -> QuantizedTensor:
    """Quantize with MLX's own packing (``mx.quantize``), evaluated. Affine scales take the input's float dtype;
    a non-float input is cast to bfloat16 first, as ollama did."""
    if array.ndim < 2 or array.shape[-1] % qtype.group_size:
        raise ImgpackError(f"cannot quantize a {list(array.shape)} tensor to {qtype.name}: it needs two or more"
                           f" dimensions and a last dimension divisible by {qtype.group_size}")
    if not mx.issubdtype(array.dtype, mx.floating):
        array = array.astype(mx.bfloat16)
    out = mx.quantize(array, group_size=qtype.group_size, bits=qtype.bits, mode=qtype.mode)
    mx.eval(*out)
    return QuantizedTensor(qtype, out[0], out[1], out[2] if qtype.has_biases else None)


def dequantize(qt: QuantizedTensor, dtype: mx.Dtype | None = None) -> mx.array:
    """Expand to ``dtype`` (float32 by default), lazily; MLX's own ``mx.dequantize``.

    Affine scales and biases are cast to ``dtype`` first (they are small): on CPU, MLX then computes in that
    dtype directly, which is exact for bf16 scales, ~40 % faster, and peaks at 2x the expanded weight instead
    of 3.5x (measured on mlx 0.32.4).
    """
    q = qt.qtype
    dtype = dtype or mx.float32
    scales, biases = qt.scales, qt.biases
    if biases is not None:
        scales, biases = scales.astype(dtype), biases.astype(dtype)
    return mx.dequantize(qt.weight, scales, biases, group_size=q.group_size, bits=q.bits, mode=q.mode, dtype=dtype)



# -- blobs -------------------------------------------------------------------------------------------------


def blob_parts(name: str, qt: QuantizedTensor) -> list[bytes | memoryview]:
    """imgpack's canonical combined blob for ``qt`` as buffers to write (or hash) in order, without joining."""
    keyed = {name: qt.weight, name + SCALE_SUFFIX: qt.scales}
    if qt.biases is not None:
        keyed[name + BIAS_SUFFIX] = qt.biases
    metadata = {"group_size": str(qt.qtype.group_size), "quant_type": qt.qtype.name}
    header = encode_entries([(k, _st_dtype(a.dtype), list(a.shape)) for k, a in keyed.items()], metadata)
    return [header, *(_buffer(keyed[k]) for k in sorted(keyed))]


def encode_blob(name: str, qt: QuantizedTensor) -> bytes:
    return b"".join(blob_parts(name, qt))


def blob_header(data: bytes | memoryview, where: str) -> tuple[dict[str, Entry], dict[str, str] | None, int]:
    """(entries, metadata, data start) of a blob in memory, any writer's form."""
    header = read_header(io.BytesIO(data[: 8 + spec.MAX_TENSOR_BLOB_HEADER]), len(data), where)
    return header.entries, header.metadata, header.data_start


def blob_problems(data: bytes | memoryview, name: str, logical_shape: list[int] | None = None
                  ) -> list[tuple[str, str]]:
    """:func:`~imgpack.schemas.quantized.check_quantized` over a whole combined blob, plus TNS-009 when it is not
    imgpack's canonical encoding (readers accept that: ollama wrote with MLX's writer; producers must not)."""
    entries, metadata, start = blob_header(data, name)
    problems = check_quantized(entries, metadata, name, logical_shape)
    if not problems:
        canonical = encode_entries([(e.key, e.dtype, e.shape) for e in entries.values()], metadata)
        base, _ = _split_keys(entries, name)
        size = start + sum(e.end - e.begin for e in entries.values())
        if base != name or bytes(data[:start]) != canonical or len(data) != size:
            problems.append(("TNS-009", f"{name}: not imgpack's canonical encoding (keyed by the layer name,"
                                        " keys sorted, data in key order, header padded to 8 bytes)"))
    return problems


def decode_blob(data: bytes | memoryview, name: str, logical_shape: list[int] | None = None) -> QuantizedTensor:
    """Read a combined quantized blob in any form ollama or imgpack wrote; raises :class:`QuantizationError`."""
    entries, metadata, start = blob_header(data, name)
    problems = check_quantized(entries, metadata, name, logical_shape)
    if problems:
        raise QuantizationError(name, problems)
    assert metadata is not None
    base, _ = _split_keys(entries, name)
    assert base is not None
    qtype = QUANT_TYPES[metadata["quant_type"]].with_group_size(int(metadata["group_size"]))
    arrays = {k: _array(data, start, e) for k, e in entries.items()}
    return QuantizedTensor(qtype, arrays[base], arrays[base + SCALE_SUFFIX], arrays.get(base + BIAS_SUFFIX))


def decode_separate(name: str, weight: bytes | memoryview, scale: bytes | memoryview,
                    qbias: bytes | memoryview | None, qtype: QuantType,
                    logical_shape: list[int] | None = None) -> QuantizedTensor:
    """Read January's three one-tensor blobs (any key, normally ``data``) as one tensor of ``qtype``."""
    parts = {name: weight, name + SCALE_SUFFIX: scale}
    if qbias is not None:
        parts[name + BIAS_SUFFIX] = qbias
    entries: dict[str, Entry] = {}
    arrays = {}
    for key, data in parts.items():
        found, _, start = blob_header(data, key)
        if len(found) != 1:
            raise QuantizationError(name, [("TNS-010", f"{name}: layer {key!r} holds {len(found)} tensors, not one")])
        (entry,) = found.values()
        entries[key] = entry
        arrays[key] = (data, start, entry)
    metadata = {"group_size": str(qtype.group_size), "quant_type": qtype.name}
    problems = check_quantized(entries, metadata, name, logical_shape)
    if problems:
        raise QuantizationError(name, problems)
    out = {k: _array(*v) for k, v in arrays.items()}
    return QuantizedTensor(qtype, out[name], out[name + SCALE_SUFFIX], out.get(name + BIAS_SUFFIX))


# -- MLX <-> bytes ---------------------------------------------------------------------------------------

_NUMPY = {"U8": "uint8", "U32": "uint32", "F32": "float32", "F16": "float16", "BF16": "uint16"}


def _st_dtype(dtype: mx.Dtype) -> str:
    names = {mx.uint8: "U8", mx.uint32: "U32", mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16"}
    if dtype not in names:
        raise ImgpackError(f"MLX dtype {dtype} has no place in a quantized blob")
    return names[dtype]


def _buffer(array: mx.array) -> memoryview:
    mx.eval(array)
    view = memoryview(array)  # type: ignore[arg-type]  # mx.array has the buffer protocol
    return view.cast("B") if view.c_contiguous else memoryview(view.tobytes())


def _array(data: bytes | memoryview, start: int, entry: Entry) -> mx.array:
    import numpy as np
    if entry.dtype not in _NUMPY:
        raise ImgpackError(f"{entry.key}: dtype {entry.dtype} cannot be read here")
    count = math.prod(entry.shape)
    flat = np.frombuffer(data, dtype=_NUMPY[entry.dtype], count=count, offset=start + entry.begin)
    if not flat.flags.aligned:  # MLX's writer does not align data
        flat = flat.copy()
    array = mx.array(flat.reshape(entry.shape))
    return array.view(mx.bfloat16) if entry.dtype == "BF16" else array


# -- layers ------------------------------------------------------------------------------------------------


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
