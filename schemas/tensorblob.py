"""The tensor blob: a minimal safetensors file that holds exactly one tensor.

Layout: 8-byte little-endian header length N, N bytes of JSON ``{"data":{"dtype":..,"shape":..,
"data_offsets":[0,nbytes]}}`` padded with spaces so N is a multiple of 8, then the raw tensor bytes. The
compact key order (dtype, shape, data_offsets) matches the blobs ollama writes, so identical tensors get
identical digests in both tools.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.spec import MAX_TENSOR_BLOB_HEADER

#: Bytes per element of every byte-addressable safetensors dtype.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
TENSOR_KEY = "data"


def tensor_nbytes(dtype: str, shape: list[int] | tuple[int, ...], where: str = "tensor") -> int:
    size = DTYPE_SIZES.get(dtype)
    if size is None:
        raise ImgpackError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPE_SIZES)})")
    return math.prod(shape) * size


def encode_header(dtype: str, shape: list[int] | tuple[int, ...]) -> bytes:
    """The 8-byte length prefix plus the padded JSON header of a tensor blob."""
    nbytes = tensor_nbytes(dtype, shape)
    text = json.dumps(
        {TENSOR_KEY: {"dtype": dtype, "shape": list(shape), "data_offsets": [0, nbytes]}},
        separators=(",", ":"),
    ).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


@dataclass
class TensorHeader:
    key: str
    dtype: str
    shape: list[int]
    data_start: int  # absolute offset of the first data byte in the blob
    nbytes: int
    #: Ways this blob departs from the strict imgpack form while still being a readable single-tensor file.
    deviations: list[str] = field(default_factory=list)


def read_header(f: BinaryIO, size: int, where: str = "tensor blob") -> TensorHeader:
    """Parse and check a tensor blob's header; ``size`` is the blob's total length in bytes.

    Any single tensor key is accepted (ollama's later blobs use the tensor's own name); departures from the
    strict spec v1 form are listed in ``deviations`` rather than refused.
    """
    prefix = f.read(8)
    if len(prefix) < 8:
        raise ImgpackError(f"{where}: truncated: {size} bytes is too short for a safetensors header")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_TENSOR_BLOB_HEADER:
        raise ImgpackError(f"{where}: header length {n} exceeds the {MAX_TENSOR_BLOB_HEADER}-byte limit")
    if 8 + n > size:
        raise ImgpackError(f"{where}: header length {n} runs past the end of the {size}-byte blob")
    raw = f.read(n)
    if len(raw) < n:
        raise ImgpackError(f"{where}: truncated inside its {n}-byte header")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImgpackError(f"{where}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ImgpackError(f"{where}: header must be a JSON object")
    deviations: list[str] = []
    if "__metadata__" in header:
        deviations.append("header has __metadata__")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(tensors) != 1:
        raise ImgpackError(f"{where}: header holds {len(tensors)} tensors; a tensor blob holds exactly one")
    ((key, info),) = tensors.items()
    if key != TENSOR_KEY:
        deviations.append(f"tensor is keyed {key!r}, not 'data'")
    if n % 8:
        deviations.append(f"header length {n} is not a multiple of 8")
    if raw.rstrip() != raw.rstrip(b" "):
        deviations.append("header padding is not spaces")
    dtype, shape, offsets = check_tensor_entry(info, f"{where}: tensor {key!r}")
    nbytes = tensor_nbytes(dtype, shape, f"{where}: tensor {key!r}")
    if offsets != [0, nbytes]:
        raise ImgpackError(
            f"{where}: tensor {key!r} data_offsets {offsets} should be [0, {nbytes}]"
            f" for dtype {dtype} and shape {shape}"
        )
    if 8 + n + nbytes != size:
        raise ImgpackError(
            f"{where}: tensor {key!r} needs {nbytes} data bytes after its header but the blob has"
            f" {size - 8 - n}"
        )
    return TensorHeader(key, dtype, shape, 8 + n, nbytes, deviations)


def check_tensor_entry(info: object, where: str) -> tuple[str, list[int], list[int]]:
    """Validate one safetensors header entry; returns (dtype, shape, data_offsets)."""
    if not isinstance(info, dict):
        raise ImgpackError(f"{where}: entry must be an object with dtype, shape and data_offsets")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise ImgpackError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPE_SIZES)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ImgpackError(f"{where}: shape {shape!r} must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise ImgpackError(f"{where}: data_offsets {offsets!r} must be [begin, end] with 0 <= begin <= end")
    return dtype, shape, offsets
