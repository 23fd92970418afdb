"""What a copy reads from and writes to: the :class:`Target` interface and blob sources.

A target holds manifests and blobs: a repository on a registry (:mod:`imgpack.registry.remote`)
or an OCI image layout on disk, the imgpack store included (:mod:`imgpack.registry.local`).
Because both sides speak the same interface, push, pull and registry-to-registry copy are one
code path (:func:`imgpack.registry.copy.copy_model`).

Blob bytes travel as a :class:`BlobSource`: something that can (re)open a blob's content from
an offset, so a transfer can resume or retry without buffering whole blobs in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from imgpack.schemas.manifest import Layer

CHUNK = 1 << 20

#: Called with a signed byte count as data moves (negative when a failed attempt is rolled back).
ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class ManifestInfo:
    """A manifest as a target holds it: exact bytes, media type and digest."""

    raw: bytes
    media_type: str
    digest: str


class BlobSource(Protocol):
    """Readable blob content that can be reopened at any offset."""

    digest: str
    size: int

    def open(self, offset: int = 0) -> contextlib.AbstractContextManager[tuple[int, Iterator[bytes]]]:
        """Yield ``(start, chunks)``; ``start`` is where the chunks begin (0 if the range was ignored)."""
        ...


class Target(Protocol):
    """One end of a copy."""

    def describe(self, reference: str | None = None) -> str: ...

    def resolve(self, reference: str) -> str | None:
        """Digest of the manifest ``reference`` names, or None when there is none."""
        ...

    def fetch_manifest(self, reference: str) -> ManifestInfo: ...

    def has_blob(self, layer: Layer) -> bool: ...

    def blob_source(self, layer: Layer) -> BlobSource: ...

    def push_blob(self, layer: Layer, source: BlobSource, progress: ProgressFn, mount_from: list[str]) -> str:
        """Make the blob present; returns "uploaded", "downloaded", "copied" or "mounted"."""
        ...

    def push_manifest(self, reference: str | None, manifest: ManifestInfo) -> None: ...

    def session(self) -> contextlib.AbstractContextManager[None]:
        """Held around the whole blob phase (the store holds its garbage-collection lock)."""
        ...


class FileBlobSource:
    """A blob in a local file."""

    def __init__(self, opener: Callable[[], BinaryIO], digest: str, size: int) -> None:
        self._opener = opener
        self.digest = digest
        self.size = size

    @contextlib.contextmanager
    def open(self, offset: int = 0) -> Iterator[tuple[int, Iterator[bytes]]]:
        with self._opener() as fh:
            fh.seek(offset)

            def chunks() -> Iterator[bytes]:
                while True:
                    data = fh.read(CHUNK)
                    if not data:
                        return
                    yield data

            yield offset, chunks()


class ChunkReader:
    """A file-like view of a chunk iterator with a known length.

    requests sends a body with ``__len__`` and ``read`` as a stream with a Content-Length header
    (no chunked transfer encoding, which some registries refuse), reading it in 1 MiB blocks.
    """

    def __init__(self, chunks: Iterator[bytes], length: int, progress: ProgressFn | None = None) -> None:
        self._chunks = chunks
        self._length = length
        self._buffer = b""
        self._progress = progress
        self.sent = 0

    def __len__(self) -> int:
        return self._length - self.sent

    def read(self, size: int = -1) -> bytes:
        remaining = self._length - self.sent
        if remaining <= 0:
            return b""
        want = remaining if size is None or size < 0 else min(size, remaining)
        while len(self._buffer) < want:
            try:
                self._buffer += next(self._chunks)
            except StopIteration:
                break
        data, self._buffer = self._buffer[:want], self._buffer[want:]
        self.sent += len(data)
        if self._progress and data:
            self._progress(len(data))
        return data
