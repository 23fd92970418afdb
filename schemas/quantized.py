"""Quantized tensor blobs (spec v1 §2.7): what a reader needs to know and what it must check.

One blob holds one logical tensor in MLX's packing, in ollama's combined form: the packed weight under the
layer's own name (``U32``, last dimension ``in * bits / 32``), ``<name>.scale`` and, for affine types,
``<name>.bias`` (shape ``[..., in / group_size]``), with ``__metadata__`` ``{"group_size", "quant_type"}``. The
manifest descriptor keeps the logical name, the original dtype and the logical shape, and says what a reader
needs before fetching in the annotation ``io.imgpack.quantization`` (compact JSON). ollama wrote the same blobs
without that annotation (its layers carry no dtype or shape), so a reader also recognises the form from the
blob's own metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.safetensors import Entry, Header, Problem


@dataclass(frozen=True)
class QuantType:
    name: str
    bits: int
    group_size: int
    #: MLX's ``mx.quantize`` mode.
    mode: str

    @property
    def affine(self) -> bool:
        return self.mode == "affine"


QUANT_TYPES: dict[str, QuantType] = {
    "int4": QuantType("int4", 4, 32, "affine"),
    "int8": QuantType("int8", 8, 64, "affine"),
    "nvfp4": QuantType("nvfp4", 4, 16, "nvfp4"),
    "mxfp8": QuantType("mxfp8", 8, 32, "mxfp8"),
}
#: Names users type, as ollama's and other tools' spellings: q4/q8 for the integer types, fp4/fp8 for the float
#: ones (ollama's January ``fp8``/``fp4`` wrote affine int8/int4; imgpack gives the names their meaning).
ALIASES = {"q4": "int4", "q8": "int8", "fp4": "nvfp4", "fp8": "mxfp8"}
FLOAT_SCALE_DTYPES = frozenset({"F32", "F16", "BF16"})


def quant_type(name: str) -> QuantType:
    key = ALIASES.get(name.lower(), name.lower())
    found = QUANT_TYPES.get(key)
    if found is None:
        known = ", ".join([*QUANT_TYPES, *ALIASES])
        raise ImgpackError(f"unknown quantization {name!r} (known: {known})")
    return found


@dataclass(frozen=True)
class QuantInfo:
    """The annotation's content: enough to plan memory and build modules before fetching the blob."""

    type: str
    bits: int
    group_size: int
    mode: str
    packed_dtype: str
    packed_shape: list[int]
    scale_dtype: str

    def to_annotation(self) -> str:
        return json.dumps({"type": self.type, "bits": self.bits, "groupSize": self.group_size, "mode": self.mode,
                           "packedDtype": self.packed_dtype, "packedShape": self.packed_shape,
                           "scaleDtype": self.scale_dtype}, separators=(",", ":"))

    @classmethod
    def from_annotation(cls, text: str, where: str) -> QuantInfo:
        try:
            d = json.loads(text)
            info = cls(str(d["type"]), int(d["bits"]), int(d["groupSize"]), str(d["mode"]), str(d["packedDtype"]),
                       [int(x) for x in d["packedShape"]], str(d["scaleDtype"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ImgpackError(f"{where}: quantization annotation is malformed: {e}") from None
        if info.type not in QUANT_TYPES:
            raise ImgpackError(f"{where}: unknown quant type {info.type!r}")
        return info

    def resident_bytes(self, logical_shape: list[int]) -> int:
        """Bytes the packed weight plus scales (and biases) take in memory."""
        rows = math.prod(logical_shape[:-1]) if logical_shape else 1
        groups = (logical_shape[-1] // self.group_size) if logical_shape else 0
        scale_size = 1 if self.scale_dtype in ("U8", "F8_E4M3", "F8_E8M0") else (4 if self.scale_dtype == "F32" else 2)
        packed = math.prod(self.packed_shape) * 4
        return packed + rows * groups * scale_size * (2 if self.mode == "affine" else 1)


@dataclass(frozen=True)
class QuantizedParts:
    """The entries of a quantized blob, found by their roles."""

    weight: Entry
    scale: Entry
    bias: Entry | None
    quant: QuantType
    group_size: int


def blob_quantization(header: Header) -> str | None:
    """The quant type a blob's own metadata declares, if any."""
    if header.metadata and isinstance(header.metadata.get("quant_type"), str):
        return header.metadata["quant_type"]
    return None


def quantized_parts(header: Header, where: str) -> QuantizedParts:
    """Identify weight, scale and bias of a combined quantized blob; raise naming what is wrong."""
    problems = _parts_problems(header)
    if isinstance(problems, list):
        raise ImgpackError(f"{where}: " + "; ".join(m for _, m in problems))
    return problems


def _parts_problems(header: Header) -> QuantizedParts | list[Problem]:
    qname = blob_quantization(header)
    if qname is None:
        return [("TNS-010", "quantized blob has no __metadata__ quant_type")]
    found = QUANT_TYPES.get(qname)
    if found is None:
        return [("TNS-010", f"unknown quant type {qname!r} (known: {', '.join(QUANT_TYPES)})")]
    try:
        group = int(header.metadata.get("group_size", ""))  # type: ignore[union-attr]
    except ValueError:
        return [("TNS-010", f"__metadata__ group_size {header.metadata.get('group_size')!r} is not an integer")]  # type: ignore[union-attr]
    scales = [k for k in header.entries if k.endswith(".scale")]
    if len(scales) != 1:
        return [("TNS-010", f"quantized blob needs exactly one '.scale' tensor, found {len(scales)}"
                            f" ({', '.join(map(repr, header.entries))})")]
    base = scales[0].removesuffix(".scale")
    if base not in header.entries:
        return [("TNS-010", f"quantized blob has {scales[0]!r} but no packed weight {base!r}")]
    bias = header.entries.get(base + ".bias")
    extra = set(header.entries) - {base, base + ".scale", base + ".bias"}
    if extra:
        return [("TNS-010", f"quantized blob holds unexpected tensors {sorted(extra)}")]
    return QuantizedParts(header.entries[base], header.entries[scales[0]], bias, found, group)


def quantized_blob_problems(header: Header, size: int, layer: dict[str, Any],
                            annotation: str | None) -> list[Problem]:
    """Every way a quantized blob is inconsistent with itself or with its descriptor (check TNS-010)."""
    parts = _parts_problems(header)
    if isinstance(parts, list):
        return parts
    problems: list[Problem] = []
    w, s, b, q, group = parts.weight, parts.scale, parts.bias, parts.quant, parts.group_size
    if w.dtype != "U32":
        problems.append(("TNS-010", f"packed weight {w.key!r} is {w.dtype}, not U32"))
    if not w.shape:
        return problems + [("TNS-010", f"packed weight {w.key!r} is a scalar")]
    logical = layer.get("shape")
    if not isinstance(logical, list) or not logical:
        logical = [*w.shape[:-1], w.shape[-1] * 32 // q.bits]
    in_features = logical[-1]
    if group <= 0 or in_features % group:
        problems.append(("TNS-010", f"group_size {group} does not divide the {in_features} input features"))
        return problems
    if list(w.shape) != [*logical[:-1], in_features * q.bits // 32]:
        problems.append(("TNS-010", f"packed weight {w.key!r} has shape {w.shape}; {q.name} of logical shape"
                                    f" {logical} packs to {[*logical[:-1], in_features * q.bits // 32]}"))
    expected_scale = [*logical[:-1], in_features // group]
    if list(s.shape) != expected_scale:
        problems.append(("TNS-010", f"scale {s.key!r} has shape {s.shape}, expected {expected_scale}"))
    if q.affine:
        if s.dtype not in FLOAT_SCALE_DTYPES:
            problems.append(("TNS-010", f"scale {s.key!r} is {s.dtype}; affine scales are F32, F16 or BF16"))
        if b is None:
            problems.append(("TNS-010", f"affine {q.name} needs a bias tensor {w.key + '.bias'!r}"))
        elif list(b.shape) != list(s.shape) or b.dtype != s.dtype:
            problems.append(("TNS-010", f"bias {b.key!r} is {b.dtype} {b.shape}, expected {s.dtype} {s.shape}"))
    else:
        if s.dtype != "U8":
            problems.append(("TNS-010", f"scale {s.key!r} is {s.dtype}; {q.name} scales are U8"))
        if b is not None:
            problems.append(("TNS-010", f"{q.name} has no bias, but the blob holds {b.key!r}"))
    end = max(e.end for e in header.entries.values())
    if header.data_start + end != size:
        problems.append(("TNS-007", f"the tensors end at byte {header.data_start + end} of a {size}-byte blob"))
    if annotation is not None:
        try:
            info = QuantInfo.from_annotation(annotation, "annotation")
        except ImgpackError as e:
            return problems + [("TNS-010", str(e))]
        if (info.type, info.group_size, info.packed_dtype, info.packed_shape, info.scale_dtype) != \
                (q.name, group, w.dtype, list(w.shape), s.dtype):
            problems.append(("TNS-010", f"descriptor annotation says {info.type} g{info.group_size}"
                                        f" {info.packed_dtype}{info.packed_shape} scales {info.scale_dtype}; the blob"
                                        f" holds {q.name} g{group} {w.dtype}{w.shape} scales {s.dtype}"))
    return problems
