"""Reading a source ``.safetensors`` file's header without trusting it.

Only the header is read here; tensor bytes are streamed later straight from the file. Every check the
safetensors library makes on load is made up front, so a broken file is refused before anything is written.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.spec import MAX_SAFETENSORS_HEADER
from imgpack.schemas.tensorblob import check_tensor_entry, tensor_nbytes


@dataclass(frozen=True)
class SourceTensor:
    key: str  # the name inside the file
    dtype: str
    shape: list[int]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class SafetensorsFile:
    path: Path
    size: int
    header_bytes: bytes  # the 8-byte length plus the JSON header, verbatim
    metadata: dict[str, str] | None
    tensors: list[SourceTensor]  # in file order


def read_safetensors_header(path: Path, label: str | None = None) -> SafetensorsFile:
    label = label or str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ImgpackError(f"{label}: truncated safetensors file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_SAFETENSORS_HEADER:
                raise ImgpackError(
                    f"{label}: header length {n} is over the {MAX_SAFETENSORS_HEADER}-byte limit"
                    " (corrupt or not a safetensors file)"
                )
            if 8 + n > size:
                raise ImgpackError(
                    f"{label}: header length {n} runs past the end of the file ({size} bytes): truncated or corrupt"
                )
            raw = f.read(n)
    except OSError as e:
        raise ImgpackError(f"{label}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw, object_pairs_hook=_refuse_duplicates(label))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImgpackError(f"{label}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ImgpackError(f"{label}: header must be a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise ImgpackError(f"{label}: __metadata__ must map strings to strings")
    data_start = 8 + n
    data_len = size - data_start
    tensors: list[SourceTensor] = []
    for key, info in header.items():
        where = f"{label}: tensor {key!r}"
        dtype, shape, (begin, end) = check_tensor_entry(info, where)
        nbytes = tensor_nbytes(dtype, shape, where)
        if end - begin != nbytes:
            raise ImgpackError(
                f"{where}: shape {shape} of {dtype} needs {nbytes} bytes but data_offsets [{begin}, {end}]"
                f" hold {end - begin}"
            )
        if end > data_len:
            raise ImgpackError(
                f"{where}: data_offsets [{begin}, {end}] run past the end of the data"
                f" ({data_len} bytes): file truncated or offsets out of range"
            )
        tensors.append(SourceTensor(key, dtype, shape, data_start + begin, nbytes))
    ordered = sorted(tensors, key=lambda t: (t.offset, t.nbytes))
    cursor = data_start
    for t in ordered:
        if t.offset < cursor:
            raise ImgpackError(
                f"{label}: tensor {t.key!r} overlaps the tensor before it (offset {t.offset - data_start})"
            )
        if t.offset > cursor:
            raise ImgpackError(f"{label}: gap of {t.offset - cursor} bytes before tensor {t.key!r}")
        cursor = t.offset + t.nbytes
    if cursor != size:
        raise ImgpackError(f"{label}: {size - cursor} trailing bytes after the last tensor")
    return SafetensorsFile(Path(path), size, prefix + raw, metadata, ordered)


def _refuse_duplicates(label: str):
    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in pairs:
            if key in out:
                raise ImgpackError(f"{label}: duplicate tensor name {key!r} in the header")
            out[key] = value
        return out

    return hook
