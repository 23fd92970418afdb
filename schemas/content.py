"""Is a blob's content what its layer says it is? One set of checks for pull, load, verify and conformance.

A digest proves a blob is the one the manifest names, not that it is well-formed: a producer can name a tensor
blob whose header is garbage. These checks read the part of a blob that matters — a tensor blob's header, a
JSON file, a safetensors header layer, the config blob — and return problems under their conformance check ids,
so a pull can refuse the model before its manifest is indexed and ``verify`` can report the same words.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from typing import Any

from imgpack.schemas import spec
from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.jsondoc import parse_json
from imgpack.schemas.quantized import blob_quantization, quantized_blob_problems
from imgpack.schemas.safetensors import (
    Header,
    HeaderError,
    Problem,
    parse_header,
    read_header,
    tensor_blob_problems,
)
from imgpack.schemas.validate import schema_errors

#: Largest JSON/config layer read into memory (tokenizer.json files run to ~10 MB).
MAX_FILE_LAYER = 64 * 1024 * 1024
MAX_CONFIG_BLOB = 16 * 1024 * 1024

#: ``read(offset, length) -> bytes`` over one blob.
Reader = Callable[[int, int], bytes]


def read_tensor_header(read: Reader, size: int, where: str) -> Header:
    """A tensor blob's header, reading only its first bytes."""
    head = read(0, min(size, 8 + spec.MAX_TENSOR_BLOB_HEADER))
    return read_header(io.BytesIO(head), size, where, spec.MAX_TENSOR_BLOB_HEADER)


def tensor_problems(layer: dict[str, Any], read: Reader, size: int, where: str) -> tuple[Header | None, list[Problem]]:
    """(header, problems) of a tensor layer's blob, the descriptor's dtype/shape compared with the header's."""
    try:
        header = read_tensor_header(read, size, where)
    except HeaderError as e:
        return None, [(e.check, str(e).removeprefix(f"{where}: "))]
    annotations = layer.get("annotations")
    quantization = annotations.get(spec.QUANTIZATION_ANNOTATION) if isinstance(annotations, dict) else None
    if quantization is not None or blob_quantization(header) is not None:
        return header, quantized_blob_problems(header, size, layer, quantization)
    problems = tensor_blob_problems(header, size)
    if len(header.entries) == 1:
        (entry,) = header.entries.values()
        dtype, shape = layer.get("dtype"), layer.get("shape")
        if isinstance(dtype, str) and dtype != entry.dtype or isinstance(shape, list) and shape != entry.shape:
            problems.append(("TNS-008", f"descriptor says {dtype} {shape}, blob header says {entry.dtype}"
                                        f" {entry.shape}"))
    return header, problems


def json_problems(raw: bytes, where: str) -> tuple[Any, list[Problem]]:
    try:
        return parse_json(raw, where), []
    except ImgpackError as e:
        return None, [("FIL-001", "is " + str(e).removeprefix(f"{where}: "))]


def header_layer_problems(raw: bytes) -> tuple[Header | None, list[Problem]]:
    """A safetensors header layer: the length field and exactly that many bytes of header."""
    if len(raw) < 8:
        return None, [("FIL-004", f"a {len(raw)}-byte header layer is too short for the length field")]
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n != len(raw):
        return None, [("FIL-004", f"a {len(raw)}-byte header layer must be the 8-byte length plus exactly that"
                                  f" many header bytes (length field: {n})")]
    try:
        return parse_header(raw[8:], 1 << 62, "header"), []
    except HeaderError as e:
        return None, [("FIL-004", str(e).removeprefix("header: "))]


def config_problems(raw: bytes, flavour: str) -> tuple[Any, list[Problem]]:
    """The config blob: JSON, and (OCI flavour) valid against config.schema.json."""
    try:
        document = parse_json(raw, "config")
    except ImgpackError as e:
        return None, [("CFG-001", str(e).removeprefix("config: "))]
    if flavour == "ollama":
        return document, []
    return document, [("CFG-001", error) for error in schema_errors("config", document)]


def layer_problems(layer: dict[str, Any], read: Reader, size: int, where: str) -> list[Problem]:
    """Every problem of one layer's content, by media type (blobs of unknown kinds are not inspected)."""
    media_type = layer.get("mediaType")
    if media_type == spec.TENSOR_MEDIA_TYPE:
        return tensor_problems(layer, read, size, where)[1]
    if media_type in spec.JSON_LAYER_TYPES:
        if size > MAX_FILE_LAYER:
            return [("FIL-001", f"{size} bytes, over the {MAX_FILE_LAYER}-byte limit for JSON layers")]
        return json_problems(read(0, size), where)[1]
    if media_type == spec.SAFETENSORS_HEADER_MEDIA_TYPE:
        if size > spec.MAX_SAFETENSORS_HEADER + 8:
            return [("FIL-004", f"{size} bytes, over the safetensors header limit")]
        return header_layer_problems(read(0, size))[1]
    return []
