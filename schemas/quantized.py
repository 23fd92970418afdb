"""Quantized tensor blobs (spec v1 §2.6): the types, which tensors get quantized, the descriptor annotation, and
the one validator every reader uses.

A quantized logical tensor ``W`` (``[rows, in_features]``) is stored as MLX's ``mx.quantize`` output: the packed
weight (``U32``, ``[rows, in_features * bits / 32]``), one scale per ``group_size`` inputs
(``[rows, in_features / group_size]``) and, for the affine mode only, one bias per group (same shape and dtype
as the scales). Three blob forms exist, all read, only the first written:

* imgpack's canonical combined blob: one safetensors file per logical tensor with the keys ``<name>``,
  ``<name>.bias`` (affine only), ``<name>.scale``, where ``<name>`` is the full layer name with its component
  prefix, as ollama keys it; ``__metadata__`` = ``{"group_size": "<N>", "quant_type": "<t>"}`` (strings); keys
  sorted, data back to back in key order, header space-padded to a multiple of 8.
* ollama's combined blob (2026-02-10 on): the same keys and metadata, written by MLX's own safetensors writer
  (no padding, data in any order); readers follow ``data_offsets``.
* ollama's January form (2026-01-12 to 02-09): three layers ``<name>``, ``<name>_scale``, ``<name>_qbias``,
  each a ``data``-keyed blob with no metadata, the type coming from ``model_index.json``'s ``quantization``
  label (:func:`legacy_quant_type`); see :func:`pair_separate_layers`.

The manifest descriptor keeps the logical name, the original dtype and the logical shape, and carries the
annotation ``io.imgpack.quantization`` (:class:`QuantLayout`); ollama's layers carry none, so readers also
recognise the form from the blob's own metadata. Every problem is reported under check TNS-010.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from imgpack.schemas import spec
from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.safetensors import Header, Problem, tensor_nbytes

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
QUANT_ANNOTATION = spec.QUANTIZATION_ANNOTATION
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
        except RecursionError:
            raise ImgpackError(f"{where}: {QUANT_ANNOTATION} is JSON nested too deeply to parse") from None
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



# -- validation ---------------------------------------------------------------------------------------------

METADATA_KEY = "__metadata__"
SCALE_SUFFIX = ".scale"
BIAS_SUFFIX = ".bias"
#: January's separate layers: ``<name>_scale`` and ``<name>_qbias`` beside ``<name>``.
LEGACY_SCALE_SUFFIX = "_scale"
LEGACY_BIAS_SUFFIX = "_qbias"



class QuantizationError(ImgpackError):
    """A quantized blob (or layer set) that cannot be decoded; ``problems`` lists every reason."""

    def __init__(self, tensor: str, problems: list[Problem]) -> None:
        super().__init__(f"{tensor}: " + "; ".join(message for _, message in problems))
        self.tensor = tensor
        self.problems = problems


class _HasDtypeShape(Protocol):
    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> list[int]: ...


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
        return [("TNS-010", f"{name}: {why} (known: {', '.join(QUANT_TYPES)})")]
    problems: list[Problem] = []
    group = md.get("group_size", "")
    if not group.isdigit() or int(group) not in GROUP_SIZES[qtype.mode]:
        problems.append(("TNS-010", f"{name}: group_size {group or None!r} is not valid for {label}"
                                    f" ({', '.join(map(str, GROUP_SIZES[qtype.mode]))})"))
        return problems
    qtype = qtype.with_group_size(int(group))
    base, stray = _split_keys(entries, name)
    if stray:
        problems.append(("TNS-010", f"{name}: unexpected keys {stray}"))
    if base is None:
        return problems + [("TNS-010", f"{name}: no packed weight key")]
    scale = entries.get(base + SCALE_SUFFIX)
    bias = entries.get(base + BIAS_SUFFIX)
    if scale is None:
        problems.append(("TNS-010", f"{name}: missing {base + SCALE_SUFFIX!r}"))
    if qtype.has_biases and bias is None:
        problems.append(("TNS-010", f"{name}: missing {base + BIAS_SUFFIX!r} ({qtype.mode} needs biases)"))
    if not qtype.has_biases and bias is not None:
        problems.append(("TNS-010", f"{name}: {base + BIAS_SUFFIX!r} present, but {qtype.mode} has no biases"))
    weight = entries[base]
    if weight.dtype != PACKED_DTYPE:
        problems.append(("TNS-010", f"{name}: packed weight is {weight.dtype}, not {PACKED_DTYPE}"))
    if scale is not None and scale.dtype not in qtype.scale_dtypes:
        problems.append(("TNS-010", f"{name}: scales are {scale.dtype}, {label} needs"
                                    f" {' or '.join(qtype.scale_dtypes)}"))
    if scale is not None and bias is not None and bias.dtype != scale.dtype:
        problems.append(("TNS-010", f"{name}: biases are {bias.dtype}, scales {scale.dtype}"))
    if len(weight.shape) < 2:
        return problems + [("TNS-010", f"{name}: packed weight shape {weight.shape} needs two or more dims")]
    rows, packed = list(weight.shape[:-1]), weight.shape[-1]
    if logical_shape is None:
        # The packed weight is authoritative; only a disagreement between it and the scales shows.
        in_features = packed * 32 // qtype.bits
        if scale is not None and scale.shape and scale.shape[-1] * qtype.group_size != in_features:
            return problems + [("TNS-010", f"{name}: packed size mismatch: {packed} packed columns hold"
                                           f" {in_features} in-features at {qtype.bits} bits, the"
                                           f" {scale.shape[-1]} scale columns cover"
                                           f" {scale.shape[-1] * qtype.group_size} at group size {qtype.group_size}")]
    else:
        in_features = logical_shape[-1] if logical_shape else 0
        if list(logical_shape[:-1]) != rows:
            problems.append(("TNS-010", f"{name}: packed weight shape {weight.shape} has other rows than the"
                                        f" logical shape {logical_shape}"))
        if in_features % qtype.group_size:
            return problems + [("TNS-010", f"{name}: group size {qtype.group_size} does not divide the logical"
                                           f" in-features {in_features}")]
        if packed != qtype.packed_columns(in_features):
            problems.append(("TNS-010", f"{name}: packed size mismatch: {packed} packed columns, but"
                                        f" {in_features} in-features at {qtype.bits} bits need"
                                        f" {qtype.packed_columns(in_features)}"))
    want_scale = [*rows, in_features // qtype.group_size]
    for what, entry in (("scale", scale), ("bias", bias)):
        if entry is not None and list(entry.shape) != want_scale:
            problems.append(("TNS-010", f"{name}: {what} shape {entry.shape} should be {want_scale}"
                                        f" (rows, in-features {in_features} / group size {qtype.group_size})"))
    return problems



def blob_quantization(header: Header) -> str | None:
    """The quant type a blob's own metadata declares, if any."""
    if header.metadata and isinstance(header.metadata.get("quant_type"), str):
        return header.metadata["quant_type"]
    return None


def quantized_blob_problems(header: Header, size: int, layer: Mapping[str, Any], annotation: str | None,
                            ) -> list[Problem]:
    """Every way a quantized blob is inconsistent with itself, its descriptor or its annotation (TNS-010), or
    does not fill its blob (TNS-007)."""
    name = layer.get("name") if isinstance(layer.get("name"), str) else "tensor"
    shape = layer.get("shape") if isinstance(layer.get("shape"), list) else None
    problems = check_quantized(header.entries, header.metadata, str(name), shape)
    if header.entries:
        end = max(e.end for e in header.entries.values())
        if header.data_start + end != size:
            problems.append(("TNS-007", f"{name}: the tensors end at byte {header.data_start + end} of a"
                                        f" {size}-byte blob"))
    if annotation is not None and not problems:
        try:
            declared = QuantLayout.parse_annotation(annotation, str(name))
        except ImgpackError as e:
            return [("TNS-010", str(e))]
        base, _ = _split_keys(header.entries, str(name))
        weight = header.entries[base] if base else None
        scale = header.entries.get(f"{base}{SCALE_SUFFIX}") if base else None
        stored = (declared.qtype.name, declared.qtype.group_size, list(declared.packed_shape), declared.scale_dtype)
        actual = (header.metadata.get("quant_type") if header.metadata else None,
                  int((header.metadata or {}).get("group_size", "0") or 0),
                  list(weight.shape) if weight else None, scale.dtype if scale else None)
        if stored != actual:
            problems.append(("TNS-010", f"{name}: the descriptor's annotation says {stored}, the blob holds"
                                        f" {actual}"))
        if isinstance(layer.get("dtype"), str) and shape is not None:
            problems.extend(("TNS-010", p) for p in declared.descriptor_problems(layer["dtype"], shape, str(name)))
    return problems


def is_quantized_blob(entries: Mapping[str, object], metadata: Mapping[str, str] | None) -> bool:
    """Whether a header is a combined quantized blob (metadata names a type, or it holds a ``.scale``)."""
    return bool(metadata and "quant_type" in metadata) or any(k.endswith(SCALE_SUFFIX) for k in entries)


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
        raise QuantizationError(orphans[0], [("TNS-010", f"{orphans[0]}: a {LEGACY_BIAS_SUFFIX} layer without its"
                                                         f" weight and {LEGACY_SCALE_SUFFIX} layers")])
    return groups, [n for n in names if n not in used]


