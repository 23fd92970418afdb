"""An OCI image layout on disk (the imgpack store, or any ``oci:PATH`` layout) as a copy target.

Incoming blobs are written to the store's resumable partial file (``Store.partial_path``) while
being hashed; an interrupted download keeps its bytes and the next attempt asks only for the rest
with ``Range``.  A blob whose size or digest does not match is deleted and reported, so nothing
unverified ever reaches ``blobs/``.  The manifest is indexed only after all its blobs are present
(``Store.put_manifest`` refuses otherwise).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path

from imgpack.registry.target import FileBlobSource, ManifestInfo, ProgressFn
from imgpack.registry.transport import Cancelled
from imgpack.schemas.digest import is_digest
from imgpack.schemas.errors import IntegrityError, NotFoundError
from imgpack.schemas.manifest import Layer, ModelManifest
from imgpack.schemas.reference import Reference
from imgpack.store.store import Store

HASH_CHUNK = 4 << 20


class LocalLayout:
    """A Store (OCI image layout) as a copy target.

    ``plain_tags`` selects how references map to ``index.json``: the imgpack store names entries
    by full reference (``host/repo:tag``); an ``oci:PATH:TAG`` layout uses the bare tag as its
    ``org.opencontainers.image.ref.name``, as skopeo and oras do.
    """

    def __init__(self, store: Store, label: str | None = None, cancel=None, plain_tags: bool = False) -> None:
        self.store = store
        self.label = label
        self.cancel = cancel
        self.plain_tags = plain_tags

    def describe(self, reference: str | None = None) -> str:
        where = self.label or f"store {self.store.root}"
        return f"{where} {reference}" if reference else where

    def session(self) -> contextlib.AbstractContextManager[None]:
        # Shared garbage-collection lock: `imgpack prune` cannot delete blobs we just wrote
        # before the manifest that references them is indexed.
        return self.store.writing()

    def _plain_lookup(self, tag: str) -> str | None:
        for name, digest in self.store.list():
            if name == tag:
                return digest
        return None

    def resolve(self, reference: str) -> str | None:
        if self.plain_tags and not is_digest(reference):
            return self._plain_lookup(reference)
        try:
            if is_digest(reference):
                return reference if self.store.has_blob(reference) else None
            return self.store.resolve(Reference.parse(reference))[1]
        except NotFoundError:
            return None

    def fetch_manifest(self, reference: str) -> ManifestInfo:
        if is_digest(reference):
            digest = reference
        elif self.plain_tags:
            found = self._plain_lookup(reference)
            if found is None:
                raise NotFoundError(f"{self.describe(reference)}: no manifest tagged {reference!r}")
            digest = found
        else:
            digest = self.store.resolve(Reference.parse(reference))[1]
        raw = self.store.read_blob(digest)
        manifest = ModelManifest.from_bytes(raw, source=self.describe(reference))
        return ManifestInfo(raw=raw, media_type=manifest.media_type, digest=digest)

    def push_manifest(self, reference: str | None, manifest: ManifestInfo) -> None:
        if not self.plain_tags:
            self.store.put_manifest(Reference.parse(reference) if reference else None, manifest.raw)
            return
        self.store.put_manifest(None, manifest.raw)
        if reference:
            _set_plain_tag(self.store, reference, manifest)

    def has_blob(self, layer: Layer) -> bool:
        return self.store.has_blob(layer.digest, layer.size)

    def blob_source(self, layer: Layer) -> FileBlobSource:
        return FileBlobSource(lambda: self.store.open_blob(layer.digest), layer.digest, layer.size)

    def push_blob(self, layer: Layer, source, progress: ProgressFn, mount_from: list[str]) -> str:
        """Fetch a blob into the partial file (resuming), verify it, then move it into ``blobs/``."""
        path = self.store.partial_path(layer.digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked_partial(path) as fh:
            if self.store.has_blob(layer.digest, layer.size):
                if os.fstat(fh.fileno()).st_size == 0:
                    path.unlink(missing_ok=True)  # we created it just now; leave nothing behind
                return "exists"
            hasher = hashlib.sha256()
            have = _hash_prefix(fh, hasher, layer.size)
            if have == layer.size and "sha256:" + hasher.hexdigest() == layer.digest:
                self.store.adopt(path, layer.digest, layer.size)
                return "resumed"
            if have >= layer.size:  # complete but wrong: start over
                fh.truncate(0)
                hasher, have = hashlib.sha256(), 0
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
                        if received > layer.size:
                            fh.truncate(0)
                            raise IntegrityError(
                                f"layer {layer.name or 'config'!r}: blob {layer.digest} is larger than"
                                f" the {layer.size} bytes the manifest declares"
                            )
                        fh.write(chunk)
                        hasher.update(chunk)
                        moved += len(chunk)
                        progress(len(chunk))
            except BaseException:
                # Keep what arrived (unless it was proven wrong): a rerun resumes with a Range request.
                fh.flush()
                progress(-moved)
                raise
            fh.flush()
            digest = "sha256:" + hasher.hexdigest()
            if received != layer.size:
                progress(-moved)
                raise ShortBlob(f"layer {layer.name or 'config'!r}: got {received} of {layer.size} bytes")
            if digest != layer.digest:
                progress(-moved)
                fh.truncate(0)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                raise IntegrityError(
                    f"layer {layer.name or 'config'!r}: downloaded content hashes to {digest},"
                    f" expected {layer.digest}; discarded"
                )
            self.store.adopt(path, layer.digest, layer.size)
            return "downloaded"


@contextlib.contextmanager
def _locked_partial(path: Path):
    """Open and exclusively lock the partial file at ``path``.

    Two pulls of the same blob (two processes, or two models sharing it) take turns. The lock is on an inode,
    so after waiting we make sure ``path`` still names the inode we hold: the previous holder may have
    verified and moved it into ``blobs/``, or deleted it as corrupt, in which case we start again.
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
    with fh:
        yield fh


class ShortBlob(IntegrityError):
    """The stream ended early; the partial file is kept and the next attempt resumes it."""


def _hash_prefix(fh, hasher, limit: int) -> int:
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


def _set_plain_tag(store: Store, tag: str, manifest: ManifestInfo) -> None:
    """Point ``ref.name == tag`` in the layout's index.json at the manifest (OCI image-layout rules)."""
    store.set_ref_name(tag, manifest.digest, manifest.media_type, len(manifest.raw))
