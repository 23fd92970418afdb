"""An OCI image layout on disk — the imgpack store or any ``oci:PATH`` layout — as a copy target.

Incoming blobs are written to the store's resumable partial file (``Store.partial_path``) while being hashed;
an interrupted download keeps its bytes and the next attempt asks only for the rest with ``Range``. A blob whose
size or digest does not match is deleted and reported, so nothing unverified ever reaches ``blobs/``. Before a
copy moves a byte, what it must still download is checked against the free disk space (and each blob again as it
starts, for other writers), so a registry that declares a 1 TB blob is refused at once instead of filling the
disk; a disk that fills up anyway is :class:`DiskFull`, saying what partial downloads hold and that ``imgpack
prune`` reclaims it. Nodes are indexed only after all they point at is present (``Store.put_node`` refuses
otherwise), and a model refused for its content (:class:`RefusedContent`) takes out the blobs the copy added.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from imgpack.registry.retry import Cancelled
from imgpack.registry.target import BlobSource, BlobStatus, ProgressFn, Stream, file_stream
from imgpack.schemas import spec
from imgpack.schemas.digest import is_digest
from imgpack.schemas.errors import ImgpackError, IntegrityError, NotFoundError
from imgpack.schemas.graph import Descriptor
from imgpack.schemas.reference import Reference
from imgpack.store.store import Store

HASH_CHUNK = 4 << 20
#: Disk kept free beyond a download's declared size.
DISK_MARGIN = 256 * 1024 * 1024


class DiskFull(ImgpackError):
    """Not enough free disk for what a transfer declares (nothing is written), or the disk filled up during it."""

    exit_code = 5


class RefusedContent(IntegrityError):
    """Blobs that match their digests but are not what their layers say: the copy is refused, and the blobs it
    added are taken out again (:meth:`LayoutTarget.session`), so the store is as it was."""


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def reclaim_hint(store: Store | None) -> str:
    """How to get disk back: what partial downloads hold, and that ``imgpack prune`` deletes them."""
    partial = store.partial_bytes() if store is not None else 0
    if partial:
        return (f"{_size(partial)} are held by partial downloads (kept to resume); 'imgpack prune' deletes them"
                " and every blob no model uses")
    return "free some space, or run 'imgpack prune' to delete blobs no model uses"


def check_free_space(directory: Path, need: int, what: str, store: Store | None = None) -> None:
    """Refuse ``need`` more bytes under ``directory`` when the disk cannot hold them and a margin."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if need + DISK_MARGIN > free:
        spare = f" (and {_size(DISK_MARGIN)} to spare)" if need <= free else ""
        raise DiskFull(f"{what}: needs {_size(need)}{spare} but only {_size(free)} is free on {directory};"
                       f" {reclaim_hint(store)}")


class LayoutTarget:
    """A Store (OCI image layout) as a copy target.

    ``plain_tags`` selects how references map to ``index.json``: the imgpack store names entries by full
    reference (``host/repo:tag``); an ``oci:PATH:TAG`` layout uses the bare tag as its
    ``org.opencontainers.image.ref.name``, as skopeo and oras do.
    """

    def __init__(self, store: Store, label: str | None = None, cancel=None, plain_tags: bool = False) -> None:
        self.store = store
        self.label = label
        self.cancel = cancel
        self.plain_tags = plain_tags
        #: Digests a partial pull left out on purpose: a node may be indexed without them, marked ``partial``.
        self.allow_missing: set[str] = set()
        self.partial: str | None = None
        #: Blobs this target downloaded (not those it found): what a refused copy takes out again.
        self.added: set[str] = set()
        self._added_lock = threading.Lock()

    def describe(self, reference: str | None = None) -> str:
        where = self.label or f"store {self.store.root}"
        return f"{where} {reference}" if reference else where

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Hold the shared garbage-collection lock (``imgpack prune`` cannot delete blobs we just wrote before the
        manifest that references them is indexed); a copy refused for its content leaves no blob behind."""
        try:
            with self.store.writing():
                yield
        except RefusedContent:
            self.store.discard_unreferenced(self.added)
            raise

    def check_space(self, blobs: list[Descriptor]) -> None:
        """Refuse a copy before any blob moves when what it still has to download cannot fit on the disk."""
        missing = [d for d in blobs if not self.store.has_blob(d.digest, d.size)]
        if not missing:
            return
        need = 0
        for desc in missing:
            try:
                have = min(desc.size, self.store.partial_path(desc.digest).stat().st_size)
            except FileNotFoundError:
                have = 0
            need += desc.size - have
        largest = max(missing, key=lambda d: d.size)
        name = largest.fields.get("name") or largest.digest
        what = (f"{self.describe()}: {len(missing)} blobs to download (the largest, {name!r}, declares"
                f" {_size(largest.size)})")
        check_free_space(self.store.ingest_dir, need, what, self.store)

    def _entry_name(self, reference: str) -> str:
        if self.plain_tags or is_digest(reference):
            return reference
        ref = Reference.parse(reference)
        return str(ref.with_tag(ref.tag)) if ref.tag else str(ref)

    def sibling(self, reference: str | None, tag: str) -> str:
        """In the store entries are named by full reference: ``host/repo:<tag>`` beside ``host/repo:v1``."""
        if self.plain_tags or not reference or is_digest(reference):
            return tag
        return f"{Reference.parse(reference).name}:{tag}"

    def resolve(self, reference: str) -> Descriptor | None:
        if is_digest(reference):
            entry = next((e for e in self.store.entries() if e.digest == reference), None)
            if entry is not None:
                return entry.descriptor
            if not self.store.has_blob(reference):
                return None
            node = self.store.node(reference)
            return Descriptor(node.media_type, reference, self.store.blob_size(reference))
        if self.plain_tags:
            entry = self.store.find(reference)
            return entry.descriptor if entry else None
        try:
            _, digest = self.store.resolve(Reference.parse(reference))
        except NotFoundError:
            return None
        return next(e.descriptor for e in self.store.entries() if e.digest == digest)

    def exists(self, desc: Descriptor) -> bool:
        return self.store.has_blob(desc.digest, desc.size)

    def fetch(self, desc: Descriptor, offset: int = 0) -> Stream:
        return file_stream(lambda: self.store.open_blob(desc.digest), offset)

    def read_range(self, desc: Descriptor, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of a stored blob from ``offset``, in one ``pread``: the content checks read a
        header of a few hundred bytes from each of a thousand blobs, where a stream would read a MiB of each."""
        with self.store.open_blob(desc.digest) as fh:
            out = os.pread(fh.fileno(), length, offset)
            while len(out) < length:
                more = os.pread(fh.fileno(), length - len(out), offset + len(out))
                if not more:
                    break
                out += more
        return out

    def push_node(self, desc: Descriptor, raw: bytes, reference: str | None = None) -> None:
        node_desc = self.store.put_node(raw, desc.media_type, self.describe(reference or desc.digest),
                                        allow_missing=self.allow_missing)
        if reference:
            self.tag(node_desc, reference)

    def tag(self, desc: Descriptor, reference: str) -> None:
        stored = Descriptor(desc.media_type, desc.digest, desc.size,
                            {"artifactType": desc.artifact_type} if desc.artifact_type else {})
        if self.plain_tags or is_digest(reference):
            self.store.set_entry(reference, stored, partial=self.partial)
            return
        self.store.name(Reference.parse(reference), stored, partial=self.partial)

    def referrers(self, desc: Descriptor) -> list[tuple[Descriptor, str | None]]:
        """Stored nodes naming ``desc`` as subject, and a cosign ``.sig`` entry of its repository."""
        found: dict[str, tuple[Descriptor, str | None]] = {}
        hex_digest = desc.digest.split(":", 1)[1]
        for entry in self.store.entries():
            name = entry.name
            tail = name.rsplit(":", 1)[-1] if not self.plain_tags else name
            if tail == f"sha256-{hex_digest}.sig":
                found[entry.digest] = (entry.descriptor, f"sha256-{hex_digest}.sig")
            elif tail == f"sha256-{hex_digest}" and entry.descriptor.is_index:
                for child in self.store.node(entry.digest, spec.OCI_INDEX).manifests:
                    if self.store.has_blob(child.digest, child.size):
                        found.setdefault(child.digest, (child, None))
        return list(found.values())

    def push(self, desc: Descriptor, source: BlobSource, progress: ProgressFn) -> BlobStatus:
        """Fetch a blob into the partial file (resuming), verify it, then move it into ``blobs/``."""
        path = self.store.partial_path(desc.digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        label = desc.fields.get("name") or ("config" if desc.media_type in spec.CONFIG_MEDIA_TYPES else desc.digest)
        with _locked_partial(path) as fh:
            created = os.fstat(fh.fileno()).st_size == 0
            try:
                status = self._download(desc, source, progress, path, fh, str(label))
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise DiskFull(f"layer {label!r}: the disk holding {self.store.root} filled up ({e.strerror});"
                               f" {reclaim_hint(self.store)}") from None
            finally:
                # A partial we created and never wrote to is not worth keeping (nothing to resume).
                if created and path.exists() and os.fstat(fh.fileno()).st_size == 0:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            if status in (BlobStatus.DOWNLOADED, BlobStatus.RESUMED):
                with self._added_lock:
                    self.added.add(desc.digest)
            return status

    def _download(self, desc: Descriptor, source: BlobSource, progress: ProgressFn, path: Path, fh: BinaryIO,
                  label: str) -> BlobStatus:
        if self.store.has_blob(desc.digest, desc.size):
            return BlobStatus.EXISTS
        hasher = hashlib.sha256()
        have = _hash_prefix(fh, hasher, desc.size)
        if have == desc.size and "sha256:" + hasher.hexdigest() == desc.digest:
            self.store.adopt(path, desc.digest, desc.size)
            return BlobStatus.RESUMED
        if have >= desc.size:  # complete but wrong: start over
            fh.truncate(0)
            hasher, have = hashlib.sha256(), 0
        check_free_space(self.store.ingest_dir, desc.size - have, f"layer {label!r} ({desc.digest})", self.store)
        fh.seek(have)
        received, moved = have, 0
        try:
            with source.open(have) as (start, chunks):
                if start != have:  # the source ignored our Range request and starts over
                    fh.truncate(0)
                    fh.seek(0)
                    hasher, received = hashlib.sha256(), 0
                for chunk in chunks:
                    if self.cancel is not None and self.cancel.is_set():
                        raise Cancelled("interrupted")
                    received += len(chunk)
                    if received > desc.size:
                        fh.truncate(0)
                        raise IntegrityError(f"layer {label!r}: blob {desc.digest} is larger than the {desc.size}"
                                             " bytes the manifest declares")
                    fh.write(chunk)
                    hasher.update(chunk)
                    moved += len(chunk)
                    progress(len(chunk))
        except BaseException:
            # Keep what arrived (unless it was proven wrong): a rerun resumes with a Range request.
            with contextlib.suppress(OSError):  # a full disk may refuse the rest; the resume re-hashes what is there
                fh.flush()
            progress(-moved)
            raise
        fh.flush()
        digest = "sha256:" + hasher.hexdigest()
        if received != desc.size:
            progress(-moved)
            raise ShortBlob(f"layer {label!r}: got {received} of {desc.size} bytes")
        if digest != desc.digest:
            progress(-moved)
            fh.truncate(0)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise IntegrityError(f"layer {label!r}: downloaded content hashes to {digest}, expected {desc.digest};"
                                 " discarded")
        self.store.adopt(path, desc.digest, desc.size)
        return BlobStatus.DOWNLOADED


@contextlib.contextmanager
def _locked_partial(path: Path) -> Iterator[BinaryIO]:
    """Open and exclusively lock the partial file at ``path``.

    Two pulls of the same blob (two processes, or two models sharing it) take turns. The lock is on an inode,
    so after waiting we make sure ``path`` still names the inode we hold: the previous holder may have verified
    and moved it into ``blobs/``, or deleted it as corrupt, in which case we start again.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fh = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            fh.close()
            raise
        if same:
            break
        fh.close()
    try:
        yield fh
    finally:
        # On a full disk the final flush fails too; the descriptor is closed regardless, and what did not reach
        # the partial file is fetched again on resume.
        with contextlib.suppress(OSError):
            fh.close()


class ShortBlob(IntegrityError):
    """The stream ended early; the partial file is kept and the next attempt resumes it."""


def _hash_prefix(fh: BinaryIO, hasher: hashlib._Hash, limit: int) -> int:
    """Hash what a partial file already holds (at most ``limit`` + 1 bytes); returns its length."""
    fh.seek(0)
    total = 0
    while True:
        data = fh.read(HASH_CHUNK)
        if not data:
            break
        total += len(data)
        if total > limit:
            return total
        hasher.update(data)
    return total
