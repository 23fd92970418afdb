"""Safetensors headers: the one reader for source files, tensor blobs and header layers.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON mapping tensor keys to
``{dtype, shape, data_offsets}`` (plus an optional ``__metadata__`` of strings), then the tensor data, each
tensor at ``8 + N + begin``. :func:`read_header` parses and checks that much for any file; what a file must
satisfy beyond it depends on its role, so each role has its own check over the parsed :class:`Header`:

* :func:`check_source_file` — a model's weights file as ``create`` packs it (strict: contiguous, no gaps,
  no trailing bytes);
* :func:`tensor_blob_problems` — a tensor blob in a store (one logical tensor; the spec v1 form, or the
  departures other writers make, each reported under its conformance check id).

Every problem carries the id of the conformance check it breaks, so ``create``, ``verify``, ``pull``,
``export``, the runtime loader and ``imgpack conformance`` agree on what is wrong and say it the same way.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.spec import MAX_SAFETENSORS_HEADER, MAX_TENSOR_BLOB_HEADER

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
#: The key of the single tensor in a spec v1 tensor blob.
TENSOR_KEY = "data"
METADATA_KEY = "__metadata__"
ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})

Problem = tuple[str, str]
"""(conformance check id, message)."""


class HeaderError(ImgpackError):
    """A header that cannot be read at all; ``check`` is the conformance check it breaks."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.check = check


def tensor_nbytes(dtype: str, shape: Iterable[int], where: str = "tensor") -> int:
    size = DTYPE_SIZES.get(dtype)
    if size is None:
        raise ImgpackError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPE_SIZES)})")
    return math.prod(shape) * size


@dataclass(frozen=True)
class Entry:
    """One tensor of a header; ``begin``/``end`` are relative to the first data byte."""

    key: str
    dtype: str
    shape: list[int]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class Header:
    """A parsed header: entries in the file's JSON order, metadata, and the departures noticed on the way."""

    length: int
    json_bytes: bytes
    entries: dict[str, Entry]
    metadata: dict[str, str] | None
    #: Deviations from the canonical form that still leave the file readable (padding, length not a multiple
    #: of 8); roles decide whether they matter.
    deviations: list[Problem] = field(default_factory=list)

    @property
    def data_start(self) -> int:
        return 8 + self.length

    @property
    def prefix(self) -> bytes:
        """The length field plus the JSON header, verbatim."""
        return struct.pack("<Q", self.length) + self.json_bytes

    def by_offset(self) -> list[Entry]:
        return sorted(self.entries.values(), key=lambda e: (e.begin, e.end))


def read_header(f: BinaryIO, size: int, where: str = "tensor blob", limit: int = MAX_TENSOR_BLOB_HEADER) -> Header:
    """Parse the header at the start of ``f`` (a file of ``size`` bytes); raise :class:`HeaderError` when it
    cannot be read or an entry is malformed."""
    prefix = f.read(8)
    if len(prefix) < 8:
        raise HeaderError("TNS-001", f"{where}: {size} bytes is too short for the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix)
    if n > limit:
        raise HeaderError("TNS-001", f"{where}: header length {n} is over the {limit}-byte limit"
                                     " (corrupt, or not a safetensors file)")
    if 8 + n > size:
        raise HeaderError("TNS-001", f"{where}: header length {n} runs past the end of the {size}-byte file")
    raw = f.read(n)
    if len(raw) < n:
        raise HeaderError("TNS-001", f"{where}: truncated inside its {n}-byte header")
    return parse_header(raw, size, where)


def parse_header(raw: bytes, size: int, where: str) -> Header:
    """Parse ``raw`` (the N header bytes) of a file of ``size`` bytes."""
    n = len(raw)
    try:
        document = json.loads(raw, object_pairs_hook=_refuse_duplicates(where))
    except RecursionError:
        raise HeaderError("TNS-002", f"{where}: header is nested too deeply to be a safetensors header") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError("TNS-002", f"{where}: header is not valid JSON: {e}") from None
    if not isinstance(document, dict):
        raise HeaderError("TNS-002", f"{where}: header is a JSON {type(document).__name__}, not an object")
    metadata = document.pop(METADATA_KEY, None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise HeaderError("TNS-005", f"{where}: {METADATA_KEY} must map strings to strings")
    data_len = size - 8 - n
    entries: dict[str, Entry] = {}
    for key, info in document.items():
        entries[key] = _entry(key, info, data_len, f"{where}: tensor {key!r}")
    deviations: list[Problem] = []
    if n % 8:
        deviations.append(("TNS-003", f"header length {n} is not a multiple of 8"))
    stripped = raw.rstrip(b" ")
    if stripped != stripped.rstrip() or raw.lstrip() != raw:
        deviations.append(("TNS-003", f"header padding is not spaces ({raw[len(raw.rstrip()):]!r})"))
    return Header(n, bytes(raw), entries, metadata, deviations)


def _entry(key: str, info: object, data_len: int, where: str) -> Entry:
    if not isinstance(info, dict):
        raise HeaderError("TNS-005", f"{where}: entry is a JSON {type(info).__name__}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    problems = []
    extra = set(info) - ENTRY_KEYS
    if extra:
        problems.append(f"unexpected keys {sorted(extra)}")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        problems.append(f"unknown dtype {dtype!r} (known: {', '.join(DTYPE_SIZES)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        problems.append(f"shape {shape!r} must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        problems.append(f"data_offsets {offsets!r} must be [begin, end] with 0 <= begin <= end")
    if problems:
        raise HeaderError("TNS-005", f"{where}: " + "; ".join(problems))
    assert isinstance(dtype, str) and isinstance(shape, list) and isinstance(offsets, list)
    begin, end = offsets
    nbytes = tensor_nbytes(dtype, shape, where)
    if end - begin != nbytes:
        raise HeaderError("TNS-006", f"{where}: shape {shape} of {dtype} needs {nbytes} bytes but data_offsets"
                                     f" [{begin}, {end}] hold {end - begin}")
    if end > data_len:
        raise HeaderError("TNS-007", f"{where}: data_offsets [{begin}, {end}] run past the end of the data"
                                     f" ({data_len} bytes): truncated, or offsets out of range")
    return Entry(key, dtype, list(shape), begin, end)


def _refuse_duplicates(where: str):  # noqa: ANN202 - a json object_pairs_hook
    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in pairs:
            if key in out:
                raise HeaderError("TNS-002", f"{where}: duplicate tensor name {key!r} in the header")
            out[key] = value
        return out

    return hook


# -- roles ------------------------------------------------------------------------------------------------


def check_source_file(header: Header, size: int, where: str) -> None:
    """A model's weights file must be exactly its tensors, back to back: what ``create`` and ``export`` rely on
    to rebuild it byte for byte."""
    cursor = 0
    for entry in header.by_offset():
        if entry.begin < cursor:
            raise ImgpackError(f"{where}: tensor {entry.key!r} overlaps the tensor before it (offset {entry.begin})")
        if entry.begin > cursor:
            raise ImgpackError(f"{where}: gap of {entry.begin - cursor} bytes before tensor {entry.key!r}")
        cursor = entry.end
    trailing = size - header.data_start - cursor
    if trailing:
        raise ImgpackError(f"{where}: {trailing} trailing bytes after the last tensor")


def read_source_file(f: BinaryIO, size: int, where: str) -> Header:
    """Header of a model's weights file, checked as :func:`check_source_file` requires."""
    header = read_header(f, size, where, MAX_SAFETENSORS_HEADER)
    check_source_file(header, size, where)
    return header


def encode_header(dtype: str, shape: list[int] | tuple[int, ...]) -> bytes:
    """The length prefix plus the canonical header of a spec v1 tensor blob holding one tensor of ``shape``."""
    return encode_entries([(TENSOR_KEY, dtype, list(shape))], sort=False)


def encode_entries(entries: list[tuple[str, str, list[int]]], metadata: dict[str, str] | None = None,
                   *, sort: bool = True) -> bytes:
    """A canonical header: compact JSON, keys sorted (unless ``sort`` is False), data back to back in that
    order, padded with spaces to a multiple of 8 so the data starts 8-byte aligned."""
    ordered = sorted(entries) if sort else list(entries)
    document: dict[str, object] = {}
    if metadata:
        document[METADATA_KEY] = dict(sorted(metadata.items()))
    offset = 0
    for key, dtype, shape in ordered:
        nbytes = tensor_nbytes(dtype, shape)
        document[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=True).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def tensor_blob_problems(header: Header, size: int) -> list[Problem]:
    """How a single-tensor blob departs from spec v1: hard problems and tolerated departures alike, each under
    its check id (the caller decides, by flavour, which are fatal)."""
    problems: list[Problem] = list(header.deviations)
    if len(header.entries) != 1:
        keys = ", ".join(map(repr, list(header.entries)[:5]))
        return problems + [("TNS-002", f"header holds {len(header.entries)} tensors ({keys}); a tensor blob"
                                       " holds one")]
    (entry,) = header.entries.values()
    if entry.key != TENSOR_KEY:
        problems.append(("TNS-004", f"tensor is keyed {entry.key!r}, not {TENSOR_KEY!r}"))
    if header.metadata is not None:
        problems.append(("TNS-004", f"header carries {METADATA_KEY}"))
    if entry.begin != 0:
        problems.append(("TNS-006", f"data_offsets [{entry.begin}, {entry.end}] should be [0, {entry.nbytes}]"
                                    f" for {entry.dtype} {entry.shape}"))
    if header.data_start + entry.end != size:
        problems.append(("TNS-007", f"{entry.dtype} {entry.shape} needs {entry.nbytes} data bytes after the"
                                    f" header, the blob has {size - header.data_start}"))
    if entry.key == TENSOR_KEY and header.prefix != encode_header(entry.dtype, entry.shape):
        problems.append(("TNS-009", f"header is not the canonical encoding"
                                    f" {encode_header(entry.dtype, entry.shape)[8:]!r}"))
    return problems


#: Departures of a tensor blob that readers accept: what ollama and MLX's writer produce.
TOLERATED = frozenset({"TNS-003", "TNS-004", "TNS-009"})
