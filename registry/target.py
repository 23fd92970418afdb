"""What a copy reads from and writes to: the descriptor-level :class:`Target` and its optional capabilities.

A target holds content-addressed nodes (manifests, indexes) and blobs: a repository on a registry
(:mod:`imgpack.registry.remote`), an OCI image layout on disk — the imgpack store included
(:mod:`imgpack.registry.layout`) — or an ollama models directory (:mod:`imgpack.registry.ollama`). Every target
speaks the same five verbs (resolve, exists, fetch, push, tag), so push, pull, copy, save and import are one
graph walk (:func:`imgpack.registry.copy.copy_graph`).

Capabilities only some targets have are separate protocols, found with ``isinstance``: :class:`Mounter`
(cross-repository blob mount), :class:`ReferrerFinder` (signatures and other referrers of a manifest) and
:class:`TagLister`.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator
from typing import BinaryIO, Protocol, runtime_checkable

from imgpack.schemas import spec
from imgpack.schemas.errors import IntegrityError, TransferError
from imgpack.schemas.graph import Descriptor

CHUNK = 1 << 20

#: Called with a signed byte count as data moves (negative when a failed attempt is rolled back).
ProgressFn = Callable[[int], None]

#: ``fetch`` yields ``(start, chunks)``: ``start`` is where the chunks begin (0 when a range was ignored).
Stream = contextlib.AbstractContextManager[tuple[int, Iterator[bytes]]]


class BlobStatus(enum.StrEnum):
    """What making one blob present at the destination took."""

    EXISTS = "exists"          # already there: nothing moved
    RESUMED = "resumed"        # a verified partial download completed without new bytes
    DOWNLOADED = "downloaded"  # fetched into a local target
    UPLOADED = "uploaded"      # sent to a registry
    MOUNTED = "mounted"        # linked from another repository of the same registry
    COPIED = "copied"          # copied between two local targets

    @property
    def moved_nothing(self) -> bool:
        return self in (BlobStatus.EXISTS, BlobStatus.RESUMED)


class BlobSource(Protocol):
    """Readable blob content that can be reopened at any offset, so a transfer can resume or retry."""

    descriptor: Descriptor

    def open(self, offset: int = 0) -> Stream: ...


class Target(Protocol):
    """One end of a copy."""

    def describe(self, reference: str | None = None) -> str:
        """A human name for the target (and a reference in it), for messages."""
        ...

    def resolve(self, reference: str) -> Descriptor | None:
        """The descriptor of the manifest or index a tag or digest names, or None when there is none."""
        ...

    def exists(self, desc: Descriptor) -> bool:
        """Whether the blob or node is present with the descriptor's size."""
        ...

    def fetch(self, desc: Descriptor, offset: int = 0) -> Stream:
        """Stream a blob or node's bytes from ``offset``."""
        ...

    def push(self, desc: Descriptor, source: BlobSource, progress: ProgressFn) -> BlobStatus:
        """Make a blob present, verified against ``desc``."""
        ...

    def push_node(self, desc: Descriptor, raw: bytes, reference: str | None = None) -> None:
        """Store a manifest or index (its children already present); tag it ``reference`` when given."""
        ...

    def tag(self, desc: Descriptor, reference: str) -> None:
        """Point ``reference`` at a node the target already holds."""
        ...

    def session(self) -> contextlib.AbstractContextManager[None]:
        """Held around a whole copy (the store holds its garbage-collection lock)."""
        ...


@runtime_checkable
class Mounter(Protocol):
    """A registry repository that can link a blob from another repository of the same registry."""

    host: str
    repository: str

    def mount(self, desc: Descriptor, from_repository: str) -> bool:
        """True when the blob was mounted; False when refused (the caller uploads instead)."""
        ...


@runtime_checkable
class ReferrerFinder(Protocol):
    """A target that can list what refers to a manifest: OCI 1.1 referrers and cosign ``.sig`` tags."""

    def referrers(self, desc: Descriptor) -> list[tuple[Descriptor, str | None]]:
        """(referrer descriptor, the tag it lives under or None) for each node whose subject is ``desc``."""
        ...


@runtime_checkable
class TagLister(Protocol):
    def tags(self) -> list[str]: ...


class TargetBlobSource:
    """A blob read from a target, reopenable at an offset."""

    def __init__(self, target: Target, descriptor: Descriptor) -> None:
        self.target = target
        self.descriptor = descriptor

    def open(self, offset: int = 0) -> Stream:
        return self.target.fetch(self.descriptor, offset)


class BytesSource:
    """Blob content held in memory (small generated blobs: signatures, the split form's manifest blob)."""

    def __init__(self, descriptor: Descriptor, content: bytes) -> None:
        self.descriptor = descriptor
        self.content = content

    def open(self, offset: int = 0) -> Stream:
        @contextlib.contextmanager
        def stream() -> Iterator[tuple[int, Iterator[bytes]]]:
            yield offset, iter([self.content[offset:]])

        return stream()


def sibling(target: Target, reference: str | None, tag: str) -> str:
    """The reference naming ``tag`` in the repository ``reference`` lives in: targets that name entries by full
    reference (the store) say so with a ``sibling`` method; registries and layouts use the bare tag."""
    method = getattr(target, "sibling", None)
    return method(reference, tag) if method is not None else tag


def file_stream(opener: Callable[[], BinaryIO], offset: int) -> Stream:
    """A fetch over a local file."""

    @contextlib.contextmanager
    def stream() -> Iterator[tuple[int, Iterator[bytes]]]:
        with opener() as fh:
            fh.seek(offset)

            def chunks() -> Iterator[bytes]:
                while data := fh.read(CHUNK):
                    yield data

            yield offset, chunks()

    return stream()


def read_range(target: Target, desc: Descriptor, offset: int, length: int) -> bytes:
    """``length`` bytes of a blob from ``offset`` (fewer at its end), whichever offset the target's stream starts
    at (a target that cannot seek starts earlier and the head is skipped)."""
    if length <= 0:
        return b""
    out = bytearray()
    with target.fetch(desc, offset) as (start, chunks):
        skip = offset - start
        for chunk in chunks:
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            out += chunk
            if len(out) >= length:
                break
    return bytes(out[:length])


def read_node(target: Target, desc: Descriptor, limit: int = spec.MAX_MANIFEST_BYTES, *,
              exact_size: bool = True) -> bytes:
    """A node's bytes from ``target``, bounded and checked against ``desc`` (its digest always; its size too
    unless ``exact_size`` is False, where ``desc.size`` is only the bound)."""
    from imgpack.schemas.digest import sha256_bytes

    if desc.size > limit:
        raise TransferError(f"{target.describe(desc.digest)}: manifest is {desc.size} bytes, over the {limit} limit")
    out = bytearray()
    with target.fetch(desc) as (_, chunks):
        for chunk in chunks:
            out += chunk
            if len(out) > desc.size:
                raise IntegrityError(f"{target.describe(desc.digest)}: more than the {desc.size} bytes declared")
    raw = bytes(out)
    if exact_size and len(raw) != desc.size:
        raise IntegrityError(f"{target.describe(desc.digest)}: {len(raw)} bytes, its descriptor says {desc.size}")
    if sha256_bytes(raw) != desc.digest:
        raise IntegrityError(f"{target.describe(desc.digest)}: content does not match its digest")
    return raw


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

    def read(self, size: int | None = -1) -> bytes:
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
