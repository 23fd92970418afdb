"""Quantized tensors: which to quantize, MLX's packing, the blob forms ollama wrote, the descriptor annotation.

A quantized logical tensor ``W`` (``[rows, in_features]``) is stored as MLX's ``mx.quantize`` output: the packed
weight (``U32``, ``[rows, in_features * bits / 32]``), one scale per ``group_size`` inputs
(``[rows, in_features / group_size]``) and, for the affine mode only, one bias per group (same shape and dtype
as the scales). Three blob forms exist:

* imgpack's canonical combined blob (what producers write): one safetensors file per logical tensor with the
  keys ``<name>``, ``<name>.bias`` (affine only), ``<name>.scale``, where ``<name>`` is the full layer name
  with its component prefix as ollama keys it; ``__metadata__`` = ``{"group_size": "<N>", "quant_type": "<t>"}``
  (strings); keys sorted, data back to back in key order, header space-padded to a multiple of 8.
* ollama's combined blob (2026-02-10 on): the same keys and metadata, written by MLX's own safetensors writer:
  no padding, data in the writer's hash-map order. Readers follow ``data_offsets`` and accept it.
* ollama's January form (2026-01-12 to 02-09): three layers ``<name>``, ``<name>_scale``, ``<name>_qbias``,
  each an MLX-written blob keyed ``data`` and with no metadata at all, so the type comes from
  ``model_index.json``'s ``quantization`` label (:func:`legacy_quant_type`); see :func:`pair_separate_layers`.

This module needs no store. MLX is imported lazily (through :mod:`imgpack.runtime.backend`, which loads OpenBLAS
first) only by the functions that compute; selection, validation and the annotation are pure Python.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.spec import MAX_TENSOR_BLOB_HEADER
from imgpack.schemas.tensorblob import check_tensor_entry, tensor_nbytes

if TYPE_CHECKING:
    from imgpack.runtime.backend import mx

# -- quantization types -----------------------------------------------------------------------------------

#: The source dtypes a quantized tensor may have (and affine scales take).
FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class QuantType:
    """One quantization scheme: bits per weight, inputs per scale, and the MLX mode that packs it."""

    name: str
    bits: int
    group_size: int
    #: ``mx.quantize`` mode: "affine" (integer levels, float scale and bias per group), "nvfp4", "mxfp8".
    mode: str
    #: Safetensors dtype of the scales; None means the input's float dtype (affine).
    scale_dtype: str | None

    @property
    def has_biases(self) -> bool:
        return self.mode == "affine"

    @property
    def scale_dtypes(self) -> tuple[str, ...]:
        """The scale dtypes a stored tensor of this type may have."""
        return (self.scale_dtype,) if self.scale_dtype else FLOAT_DTYPES

    def packed_columns(self, in_features: int) -> int:
        return in_features * self.bits // 32

    def with_group_size(self, group_size: int) -> QuantType:
        """This type at another group size (a blob's own), refused when MLX's mode does not support it."""
        allowed = GROUP_SIZES[self.mode]
        if group_size not in allowed:
            raise ImgpackError(f"group size {group_size} is not valid for {self.name} ({self.mode} takes"
                               f" {', '.join(map(str, allowed))})")
        return self if group_size == self.group_size else replace(self, group_size=group_size)


#: The group sizes each MLX mode accepts (mx.quantize's table); readers honour a blob's own group size.
GROUP_SIZES: dict[str, tuple[int, ...]] = {"affine": (32, 64, 128), "nvfp4": (16,), "mxfp8": (32,)}

#: The four types imgpack writes, at ollama's February 2026 group sizes. ollama moved int4 to group 64 on
#: 2026-03-06 (e790dc435); imgpack keeps 32 (finer groups, better fidelity) and reads either from the blob.
QUANT_TYPES: dict[str, QuantType] = {
    "int4": QuantType("int4", 4, 32, "affine", None),
    "int8": QuantType("int8", 8, 64, "affine", None),
    "nvfp4": QuantType("nvfp4", 4, 16, "nvfp4", "U8"),
    "mxfp8": QuantType("mxfp8", 8, 32, "mxfp8", "U8"),
}

#: Names accepted on the command line for the types above. Caution: ollama's own January ``--quantize fp8``
#: and ``fp4`` wrote *affine* int8/int4 at group 32 (not float formats), and its later LLM path maps fp8/fp4 to
#: int8/int4; imgpack reads the words literally. Stored January models are decoded with
#: :func:`legacy_quant_type`, never through these aliases.
ALIASES: dict[str, str] = {"q4": "int4", "q8": "int8", "fp8": "mxfp8", "fp4": "nvfp4"}

#: What each ``model_index.json`` ``quantization`` label ollama wrote meant, for blobs that carry no metadata
#: (January's separate layers). INT4 blobs always carry their group size, so 32 here is only a default.
LEGACY_LABELS: dict[str, QuantType] = {
    "FP8": replace(QUANT_TYPES["int8"], group_size=32),  # 2026-01-12 .. 02-01: affine 8-bit, group 32
    "FP4": QUANT_TYPES["int4"],  # 2026-01-19 .. 02-01: affine 4-bit, group 32
    "Q8": QUANT_TYPES["int8"],  # 2026-02-02 .. 02-09
    "Q4": QUANT_TYPES["int4"],
    "INT8": QUANT_TYPES["int8"],
    "INT4": QUANT_TYPES["int4"],
    "NVFP4": QUANT_TYPES["nvfp4"],
    "MXFP8": QUANT_TYPES["mxfp8"],
}


def quant_type(name: str) -> QuantType:
    """The type a ``--quantize`` value names (aliases included, case-insensitive)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in QUANT_TYPES:
        known = ", ".join([*QUANT_TYPES, *ALIASES])
        raise ImgpackError(f"unknown quantization type {name!r} (known: {known})")
    return QUANT_TYPES[key]


def legacy_quant_type(label: str) -> QuantType:
    """The type behind an ollama ``model_index.json`` ``quantization`` label (``"FP8"``, ``"Q4"``, ...)."""
    qtype = LEGACY_LABELS.get(label.strip().upper())
    if qtype is None:
        raise ImgpackError(f"model_index.json quantization {label!r} is not one ollama wrote"
                           f" ({', '.join(LEGACY_LABELS)})")
    return qtype


# -- which tensors -----------------------------------------------------------------------------------------

#: Components whose linear weights are quantized. ollama skipped only the VAE; imgpack also leaves any other
#: component (an image encoder, a second text encoder it does not know) alone.
QUANTIZED_COMPONENTS = ("transformer", "text_encoder")
#: ollama's name rules (ShouldQuantize, 2026-01-16 on): embeddings and norms stay in source precision.
SKIP_SUBSTRINGS = ("embed", "norm", "ln_", "layernorm")


def should_quantize(component: str, key: str, shape: list[int], qtype: QuantType) -> bool:
    """Whether ``component/key`` (``key`` as in the source file) of ``shape`` is stored quantized.

    ollama's rules, except that the shape check uses the type's real group size: ollama's int4 check kept
    requiring only a multiple of 32 after it moved int4 to group 64, and then failed inside MLX.
    """
    if component not in QUANTIZED_COMPONENTS:
        return False
    if any(s in key for s in SKIP_SUBSTRINGS) or not key.endswith(".weight"):
        return False
    return len(shape) >= 2 and shape[-1] > 0 and shape[-1] % qtype.group_size == 0


# -- layouts and the descriptor annotation -----------------------------------------------------------------

#: Annotation on a quantized tensor's manifest descriptor (which keeps the logical name, the original dtype and
#: the logical shape): what a reader must know before fetching the blob.
QUANT_ANNOTATION = "io.imgpack.quantization"
PACKED_DTYPE = "U32"
_ANNOTATION_KEYS = ("type", "bits", "groupSize", "mode", "packedDtype", "packedShape", "scaleDtype")


@dataclass(frozen=True)
class QuantLayout:
    """The stored form of one quantized tensor: its type (at the stored group size), packed shape, scale dtype."""

    qtype: QuantType
    packed_shape: tuple[int, ...]
    scale_dtype: str

    @property
    def shape(self) -> list[int]:
        """The logical shape: ``[*rows, in_features]``."""
        return [*self.packed_shape[:-1], self.packed_shape[-1] * 32 // self.qtype.bits]

    @property
    def scale_shape(self) -> list[int]:
        return [*self.packed_shape[:-1], self.shape[-1] // self.qtype.group_size]

    @property
    def data_nbytes(self) -> int:
        """Bytes of packed weight, scales and biases: the blob is this plus its header."""
        scales = tensor_nbytes(self.scale_dtype, self.scale_shape)
        return tensor_nbytes(PACKED_DTYPE, self.packed_shape) + scales * (2 if self.qtype.has_biases else 1)

    def annotation(self) -> str:
        """The value of :data:`QUANT_ANNOTATION`: compact JSON, keys in a fixed order."""
        q = self.qtype
        value = dict(zip(_ANNOTATION_KEYS, (q.name, q.bits, q.group_size, q.mode, PACKED_DTYPE,
                                            list(self.packed_shape), self.scale_dtype), strict=True))
        return json.dumps(value, separators=(",", ":"))

    @classmethod
    def parse_annotation(cls, value: str, where: str = "descriptor") -> QuantLayout:
        """Parse and check a :data:`QUANT_ANNOTATION` value; raises naming ``where`` (the layer)."""
        try:
            doc = json.loads(value)
        except (TypeError, json.JSONDecodeError) as e:
            raise ImgpackError(f"{where}: {QUANT_ANNOTATION} is not JSON: {e}") from None
        if not isinstance(doc, dict) or set(doc) != set(_ANNOTATION_KEYS):
            raise ImgpackError(f"{where}: {QUANT_ANNOTATION} must be an object with exactly the keys"
                               f" {', '.join(_ANNOTATION_KEYS)}")
        base = QUANT_TYPES.get(doc["type"]) if isinstance(doc["type"], str) else None
        if base is None:
            raise ImgpackError(f"{where}: unknown quantization type {doc['type']!r} (known: {', '.join(QUANT_TYPES)})")
        shape = doc["packedShape"]
        problems = []
        if doc["bits"] != base.bits or doc["mode"] != base.mode:
            problems.append(f"{base.name} is {base.bits}-bit {base.mode}, not {doc['bits']!r}-bit {doc['mode']!r}")
        group = doc["groupSize"]
        if type(group) is not int or group not in GROUP_SIZES[base.mode]:
            problems.append(f"groupSize {group!r} is not valid for {base.mode}")
        if doc["packedDtype"] != PACKED_DTYPE:
            problems.append(f"packedDtype {doc['packedDtype']!r} must be {PACKED_DTYPE}")
        if not (isinstance(shape, list) and len(shape) >= 2 and all(type(d) is int and d > 0 for d in shape)):
            problems.append(f"packedShape {shape!r} must list two or more positive integers")
        elif type(group) is int and group and shape[-1] * 32 // base.bits % group:
            problems.append(f"packedShape {shape!r} holds {shape[-1] * 32 // base.bits} in-features, not a"
                            f" multiple of groupSize {group}")
        if doc["scaleDtype"] not in base.scale_dtypes:
            problems.append(f"scaleDtype {doc['scaleDtype']!r} is not valid for {base.name}")
        if problems:
            raise ImgpackError(f"{where}: {QUANT_ANNOTATION}: " + "; ".join(problems))
        return cls(base.with_group_size(group), tuple(shape), doc["scaleDtype"])

    def descriptor_problems(self, dtype: str, shape: list[int], where: str) -> list[str]:
        """How a descriptor's logical ``dtype``/``shape`` disagree with this layout."""
        problems = []
        if dtype not in FLOAT_DTYPES:
            problems.append(f"{where}: a quantized tensor's dtype {dtype!r} must be its original float dtype")
        if shape[-1:] and shape[-1] % self.qtype.group_size:
            problems.append(f"{where}: group size {self.qtype.group_size} does not divide the logical"
                            f" in-features {shape[-1]}")
        elif list(shape) != self.shape:
            problems.append(f"{where}: packed shape {list(self.packed_shape)} holds a {self.qtype.bits}-bit"
                            f" {self.shape} tensor, the descriptor says {list(shape)}")
        return problems


# -- quantize / dequantize ---------------------------------------------------------------------------------


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
    from imgpack.runtime.backend import mx

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
    from imgpack.runtime.backend import mx

    q = qt.qtype
    dtype = dtype or mx.float32
    scales, biases = qt.scales, qt.biases
    if biases is not None:
        scales, biases = scales.astype(dtype), biases.astype(dtype)
    return mx.dequantize(qt.weight, scales, biases, group_size=q.group_size, bits=q.bits, mode=q.mode, dtype=dtype)


# -- blobs ---------------------------------------------------------------------------------------------------

METADATA_KEY = "__metadata__"
SCALE_SUFFIX = ".scale"
BIAS_SUFFIX = ".bias"
#: January's separate layers: ``<name>_scale`` and ``<name>_qbias`` beside ``<name>``.
LEGACY_SCALE_SUFFIX = "_scale"
LEGACY_BIAS_SUFFIX = "_qbias"

Problem = tuple[str, str]
"""(check id, message naming the tensor). Ids: QNT-001 quant type, QNT-002 group size, QNT-003 keys,
QNT-004 dtypes, QNT-005 packed size, QNT-006 scale/bias shape, QNT-007 group size vs logical in-features,
QNT-008 not imgpack's canonical encoding (tolerated: ollama's MLX-written blobs)."""
#: Problems a reader accepts; producers must not have them.
TOLERATED = frozenset({"QNT-008"})


class QuantizationError(ImgpackError):
    """A quantized blob (or layer set) that cannot be decoded; ``problems`` lists every reason."""

    def __init__(self, tensor: str, problems: list[Problem]) -> None:
        super().__init__(f"{tensor}: " + "; ".join(message for _, message in problems))
        self.tensor = tensor
        self.problems = problems


class _HasDtypeShape(Protocol):
    dtype: str
    shape: list[int]


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors header; ``begin``/``end`` are relative to the first data byte."""

    key: str
    dtype: str
    shape: list[int]
    begin: int
    end: int


def encode_entries(entries: list[tuple[str, str, list[int]]], metadata: dict[str, str] | None = None) -> bytes:
    """Length prefix plus canonical header: compact JSON, keys sorted, data back to back in that order, padded
    with spaces to a multiple of 8.

    Local stand-in, byte for byte, for ``imgpack.schemas.safetensors.encode_entries`` on the main branch (not on
    this branch yet); replace it there when integrating.
    """
    document: dict[str, object] = {}
    if metadata:
        document[METADATA_KEY] = dict(sorted(metadata.items()))
    offset = 0
    for key, dtype, shape in sorted(entries):
        nbytes = tensor_nbytes(dtype, shape)
        document[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=True).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def parse_header(data: bytes | memoryview, where: str) -> tuple[dict[str, Entry], dict[str, str] | None, int]:
    """(entries, metadata, data start) of a safetensors file held in ``data``; any writer's form (padded or
    not, ``__metadata__`` null, absent or an object, data in any order)."""
    if len(data) < 8:
        raise ImgpackError(f"{where}: {len(data)} bytes is too short for a safetensors header")
    (n,) = struct.unpack_from("<Q", data)
    if n > MAX_TENSOR_BLOB_HEADER or 8 + n > len(data):
        raise ImgpackError(f"{where}: header length {n} is impossible for a {len(data)}-byte tensor blob")
    try:
        document = json.loads(bytes(data[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImgpackError(f"{where}: header is not valid JSON: {e}") from None
    if not isinstance(document, dict):
        raise ImgpackError(f"{where}: header must be a JSON object")
    metadata = document.pop(METADATA_KEY, None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ImgpackError(f"{where}: {METADATA_KEY} must map strings to strings")
    entries = {}
    for key, info in document.items():
        dtype, shape, (begin, end) = check_tensor_entry(info, f"{where}: tensor {key!r}")
        if end - begin != tensor_nbytes(dtype, shape) or 8 + n + end > len(data):
            raise ImgpackError(f"{where}: tensor {key!r} data_offsets [{begin}, {end}] do not fit {dtype} {shape}"
                               f" in the {len(data) - 8 - n} data bytes")
        entries[key] = Entry(key, dtype, shape, begin, end)
    return entries, metadata, 8 + n


def _split_keys(entries: Mapping[str, object], name: str | None) -> tuple[str | None, list[str]]:
    """The packed weight's key (the one key that is not ``.scale``/``.bias``) and any keys that do not belong."""
    bases = [k for k in entries if not k.endswith((SCALE_SUFFIX, BIAS_SUFFIX))]
    if name is not None:
        bare = name.split("/", 1)[1] if "/" in name else name
        preferred = [k for k in (name, bare) if k in bases]
        if preferred:
            bases = [preferred[0], *(k for k in bases if k != preferred[0])]
    if not bases:
        return None, [k for k in entries]
    base = bases[0]
    stray = [k for k in entries if k not in (base, base + SCALE_SUFFIX, base + BIAS_SUFFIX)]
    return base, stray


def check_quantized(entries: Mapping[str, _HasDtypeShape], metadata: Mapping[str, str] | None, name: str,
                    logical_shape: list[int] | None = None) -> list[Problem]:
    """Every way a combined quantized header departs from the form; empty when it decodes. ``name`` is the
    layer's name (``component/tensor``); ``logical_shape`` the descriptor's shape, when known."""
    md = metadata or {}
    label = md.get("quant_type")
    qtype = QUANT_TYPES.get(label) if label is not None else None
    if qtype is None:
        why = "no quant_type in __metadata__" if label is None else f"unknown quant type {label!r}"
        return [("QNT-001", f"{name}: {why} (known: {', '.join(QUANT_TYPES)})")]
    problems: list[Problem] = []
    group = md.get("group_size", "")
    if not group.isdigit() or int(group) not in GROUP_SIZES[qtype.mode]:
        problems.append(("QNT-002", f"{name}: group_size {group or None!r} is not valid for {label}"
                                    f" ({', '.join(map(str, GROUP_SIZES[qtype.mode]))})"))
        return problems
    qtype = qtype.with_group_size(int(group))
    base, stray = _split_keys(entries, name)
    if stray:
        problems.append(("QNT-003", f"{name}: unexpected keys {stray}"))
    if base is None:
        return problems + [("QNT-003", f"{name}: no packed weight key")]
    scale = entries.get(base + SCALE_SUFFIX)
    bias = entries.get(base + BIAS_SUFFIX)
    if scale is None:
        problems.append(("QNT-003", f"{name}: missing {base + SCALE_SUFFIX!r}"))
    if qtype.has_biases and bias is None:
        problems.append(("QNT-003", f"{name}: missing {base + BIAS_SUFFIX!r} ({qtype.mode} needs biases)"))
    if not qtype.has_biases and bias is not None:
        problems.append(("QNT-003", f"{name}: {base + BIAS_SUFFIX!r} present, but {qtype.mode} has no biases"))
    weight = entries[base]
    if weight.dtype != PACKED_DTYPE:
        problems.append(("QNT-004", f"{name}: packed weight is {weight.dtype}, not {PACKED_DTYPE}"))
    if scale is not None and scale.dtype not in qtype.scale_dtypes:
        problems.append(("QNT-004", f"{name}: scales are {scale.dtype}, {label} needs"
                                    f" {' or '.join(qtype.scale_dtypes)}"))
    if scale is not None and bias is not None and bias.dtype != scale.dtype:
        problems.append(("QNT-004", f"{name}: biases are {bias.dtype}, scales {scale.dtype}"))
    if len(weight.shape) < 2:
        return problems + [("QNT-005", f"{name}: packed weight shape {weight.shape} needs two or more dims")]
    rows, packed = list(weight.shape[:-1]), weight.shape[-1]
    if logical_shape is None:
        # The packed weight is authoritative; only a disagreement between it and the scales shows.
        in_features = packed * 32 // qtype.bits
        if scale is not None and scale.shape and scale.shape[-1] * qtype.group_size != in_features:
            return problems + [("QNT-005", f"{name}: packed size mismatch: {packed} packed columns hold"
                                           f" {in_features} in-features at {qtype.bits} bits, the"
                                           f" {scale.shape[-1]} scale columns cover"
                                           f" {scale.shape[-1] * qtype.group_size} at group size {qtype.group_size}")]
    else:
        in_features = logical_shape[-1] if logical_shape else 0
        if list(logical_shape[:-1]) != rows:
            problems.append(("QNT-005", f"{name}: packed weight shape {weight.shape} has other rows than the"
                                        f" logical shape {logical_shape}"))
        if in_features % qtype.group_size:
            return problems + [("QNT-007", f"{name}: group size {qtype.group_size} does not divide the logical"
                                           f" in-features {in_features}")]
        if packed != qtype.packed_columns(in_features):
            problems.append(("QNT-005", f"{name}: packed size mismatch: {packed} packed columns, but"
                                        f" {in_features} in-features at {qtype.bits} bits need"
                                        f" {qtype.packed_columns(in_features)}"))
    want_scale = [*rows, in_features // qtype.group_size]
    for what, entry in (("scale", scale), ("bias", bias)):
        if entry is not None and list(entry.shape) != want_scale:
            problems.append(("QNT-006", f"{name}: {what} shape {entry.shape} should be {want_scale}"
                                        f" (rows, in-features {in_features} / group size {qtype.group_size})"))
    return problems


def blob_problems(data: bytes | memoryview, name: str, logical_shape: list[int] | None = None) -> list[Problem]:
    """:func:`check_quantized` over a whole combined blob, plus QNT-008 when it is not imgpack's canonical
    encoding (tolerated on read: ollama wrote with MLX's writer)."""
    entries, metadata, start = parse_header(data, name)
    problems = check_quantized(entries, metadata, name, logical_shape)
    if not problems:
        canonical = encode_entries([(e.key, e.dtype, e.shape) for e in entries.values()], metadata)
        base, _ = _split_keys(entries, name)
        size = start + sum(e.end - e.begin for e in entries.values())
        if base != name or bytes(data[:start]) != canonical or len(data) != size:
            problems.append(("QNT-008", f"{name}: not imgpack's canonical encoding (keyed by the layer name,"
                                        " keys sorted, data in key order, header padded to 8 bytes)"))
    return problems


def is_quantized_blob(entries: Mapping[str, object], metadata: Mapping[str, str] | None) -> bool:
    """Whether a header is a combined quantized blob (metadata names a type, or it holds a ``.scale``)."""
    return bool(metadata and "quant_type" in metadata) or any(k.endswith(SCALE_SUFFIX) for k in entries)


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


def decode_blob(data: bytes | memoryview, name: str, logical_shape: list[int] | None = None) -> QuantizedTensor:
    """Read a combined quantized blob in any form ollama or imgpack wrote; raises :class:`QuantizationError`."""
    entries, metadata, start = parse_header(data, name)
    problems = [p for p in check_quantized(entries, metadata, name, logical_shape) if p[0] not in TOLERATED]
    if problems:
        raise QuantizationError(name, problems)
    assert metadata is not None
    base, _ = _split_keys(entries, name)
    assert base is not None
    qtype = QUANT_TYPES[metadata["quant_type"]].with_group_size(int(metadata["group_size"]))
    arrays = {k: _array(data, start, e) for k, e in entries.items()}
    return QuantizedTensor(qtype, arrays[base], arrays[base + SCALE_SUFFIX], arrays.get(base + BIAS_SUFFIX))


# -- January's separate layers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SeparateLayers:
    """The layer names of one tensor quantized in ollama's January form."""

    name: str
    scale: str
    qbias: str | None


def pair_separate_layers(names: Iterable[str]) -> tuple[dict[str, SeparateLayers], list[str]]:
    """Group ``<name>``, ``<name>_scale``, ``<name>_qbias`` tensor layers; returns (groups by name, the other
    names in order). A ``_scale`` without its ``<name>`` is an ordinary tensor; a ``_qbias`` without both is an
    error."""
    names = list(names)
    present = set(names)
    groups = {}
    for n in names:
        if n + LEGACY_SCALE_SUFFIX in present:
            qbias = n + LEGACY_BIAS_SUFFIX
            groups[n] = SeparateLayers(n, n + LEGACY_SCALE_SUFFIX, qbias if qbias in present else None)
    used = {g.scale for g in groups.values()} | {g.qbias for g in groups.values() if g.qbias}
    orphans = [n for n in names if n.endswith(LEGACY_BIAS_SUFFIX) and n not in used]
    used |= set(groups)
    if orphans:
        raise QuantizationError(orphans[0], [("QNT-003", f"{orphans[0]}: a {LEGACY_BIAS_SUFFIX} layer without its"
                                                         f" weight and {LEGACY_SCALE_SUFFIX} layers")])
    return groups, [n for n in names if n not in used]


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
        found, _, start = parse_header(data, key)
        if len(found) != 1:
            raise QuantizationError(name, [("QNT-003", f"{name}: layer {key!r} holds {len(found)} tensors, not one")])
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
    from imgpack.runtime.backend import mx

    names = {mx.uint8: "U8", mx.uint32: "U32", mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16"}
    if dtype not in names:
        raise ImgpackError(f"MLX dtype {dtype} has no place in a quantized blob")
    return names[dtype]


def _buffer(array: mx.array) -> memoryview:
    from imgpack.runtime.backend import mx

    mx.eval(array)
    view = memoryview(array)
    return view.cast("B") if view.c_contiguous else memoryview(view.tobytes())


def _array(data: bytes | memoryview, start: int, entry: Entry) -> mx.array:
    import numpy as np

    from imgpack.runtime.backend import mx

    if entry.dtype not in _NUMPY:
        raise ImgpackError(f"{entry.key}: dtype {entry.dtype} cannot be read here")
    count = math.prod(entry.shape)
    flat = np.frombuffer(data, dtype=_NUMPY[entry.dtype], count=count, offset=start + entry.begin)
    if not flat.flags.aligned:  # MLX's writer does not align data
        flat = flat.copy()
    array = mx.array(flat.reshape(entry.shape))
    return array.view(mx.bfloat16) if entry.dtype == "BF16" else array
