"""Where an artifact under test lives — the store, an OCI layout, an ollama directory, a registry — read through
the same targets the copy engine uses, so conformance sees exactly what a pull would.

Every source answers four questions: the manifest bytes, a blob's real size (None when missing), a byte range of
a blob, and a blob's bytes as a stream. Opening a source that is not there or not readable raises
:class:`LayoutProblem`, which the suite reports as check LAY-001.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from imgpack.registry.layout import LayoutTarget
from imgpack.registry.locations import Clients, open_location
from imgpack.registry.ollama import OllamaTarget
from imgpack.registry.remote import RemoteRepository
from imgpack.registry.target import Target, read_node, read_range
from imgpack.registry.transport import TransportOptions, describe_response
from imgpack.schemas import spec
from imgpack.schemas.digest import is_digest
from imgpack.schemas.errors import ImgpackError, NotFoundError, TransferError, UsageError
from imgpack.schemas.graph import Descriptor
from imgpack.schemas.locations import Location, parse_location
from imgpack.store.store import Store

BLOB = "application/octet-stream"


class LayoutProblem(ImgpackError):
    """The target exists as a request but its layout, index or manifest entry cannot be read."""


@dataclass
class Source:
    """A manifest (or index) and the target holding the blobs it points at."""

    label: str
    target: Target | None
    root: Descriptor | None
    #: The descriptor that pointed at the manifest (an index.json entry or registry headers), if any.
    descriptor: dict[str, Any] | None = None
    kind: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    clients: Clients | None = None

    def _target(self) -> Target:
        if self.target is None or self.root is None:
            raise ImgpackError(f"{self.label}: the target could not be read")
        return self.target

    def manifest_bytes(self) -> bytes:
        """The manifest's bytes, checked against its digest only: a wrong size in the descriptor that named it is
        what MAN-004 reports, not a reason not to read it."""
        target = self._target()
        assert self.root is not None
        try:
            return read_node(target, Descriptor(self.root.media_type, self.root.digest, spec.MAX_MANIFEST_BYTES),
                             exact_size=False)
        except NotFoundError as e:
            raise LayoutProblem(str(e)) from None

    def node_bytes(self, desc: Descriptor) -> bytes:
        return read_node(self._target(), desc)

    def blob_size(self, digest: str) -> int | None:
        target = self._target()
        if not is_digest(digest):
            return None
        if isinstance(target, LayoutTarget):
            path = target.store.blob_path(digest)
        elif isinstance(target, OllamaTarget):
            path = target.blob_path(digest)
        else:
            assert isinstance(target, RemoteRepository)
            resp = target.client.request("HEAD", f"/v2/{target.repository}/blobs/{digest}", scope=target.scope)
            resp.close()
            if resp.status_code == 404:
                return None
            if resp.status_code != 200:
                raise TransferError(f"{self.label}: HEAD blob {digest} answered {describe_response(resp)}")
            length = resp.headers.get("Content-Length", "")
            return int(length) if length.isdigit() else sum(len(c) for c in self.iter_blob(digest))
        try:
            return os.stat(path).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        return read_range(self._target(), Descriptor(BLOB, digest, offset + length), offset, length)

    def iter_blob(self, digest: str) -> Iterator[bytes]:
        with self._target().fetch(Descriptor(BLOB, digest, 0), 0) as (_, chunks):
            yield from chunks

    def read_blob(self, digest: str, limit: int) -> bytes:
        """The whole blob, refusing one larger than ``limit`` bytes."""
        size = self.blob_size(digest)
        if size is None:
            raise ImgpackError(f"blob {digest} is missing")
        if size > limit:
            raise ImgpackError(f"blob {digest} is {size} bytes, over the {limit}-byte limit for this check")
        return self.read_range(digest, 0, size)

    def close(self) -> None:
        if self.clients is not None:
            self.clients.close()


def unreadable(label: str) -> Source:
    """Stands for a target that could not be opened, so the report can still list every check as skipped."""
    return Source(label=label, target=None, root=None, kind="unreadable")


def _store_descriptor(store: Store, name: str | None, digest: str) -> dict[str, Any]:
    for entry in store.index_entries():
        if entry.get("digest") == digest:
            annotations = entry.get("annotations") or {}
            if name is None or name in annotations.values():
                return entry
    return {"digest": digest}


def open_source(text: str, store_path: str | None = None, *, insecure: bool = False, local: bool = False,
                ca_file: str | None = None) -> Source:
    """Interpret TARGET: a stored model, ``oci:PATH[:TAG]``, ``ollama:DIR[:MODEL[:TAG]]``, a layout or ollama
    directory, or ``HOST/REPO:TAG`` (read from the registry, or with ``local`` from the store)."""
    location = parse_location(text)
    if location.kind == "remote" and local:
        location = Location("store", text, reference=location.reference)
    clients = Clients(TransportOptions(insecure=insecure, ca_file=ca_file))
    try:
        store = None
        if location.kind == "store":
            try:
                store = Store.open(store_path, create=False)
            except NotFoundError as e:
                raise LayoutProblem(str(e)) from None
        try:
            endpoint = open_location(location, store=store, clients=clients, write=False)
        except (NotFoundError, UsageError) as e:
            if location.kind == "directory" and location.path is not None and not location.path.is_dir():
                raise LayoutProblem(f"{location.path}: no such directory") from None
            if isinstance(e, UsageError) and location.kind != "directory":
                raise
            raise LayoutProblem(str(e)) from None
        target = endpoint.target
        reference = endpoint.reference
        kind = {"store": "store", "remote": "remote", "layout": "oci-layout", "ollama": "ollama",
                "directory": "oci-layout" if isinstance(target, LayoutTarget) else "ollama"}[location.kind]
        if reference is None or (location.kind == "layout" and location.tag is None):
            reference = _only_reference(target, text)
        try:
            root = target.resolve(reference)
        except ImgpackError as e:
            raise LayoutProblem(str(e)) from None
        if root is None:
            if isinstance(target, OllamaTarget):
                path = target.manifest_path(reference).relative_to(target.root)
                raise LayoutProblem(f"{target.root}: no manifest {path}")
            raise LayoutProblem(f"{target.describe(reference)}: no manifest")
        source = Source(label=text, target=target, root=root, kind=kind, clients=clients)
        if isinstance(target, LayoutTarget):
            name = None if is_digest(reference) else (reference if target.plain_tags else None)
            source.descriptor = _store_descriptor(target.store, name, root.digest)
        elif isinstance(target, RemoteRepository):
            source.descriptor = root.to_json()
        elif isinstance(target, OllamaTarget):
            source.details["manifest"] = str(target.manifest_path(reference).relative_to(target.root))
        return source
    except BaseException:
        clients.close()
        raise


def _only_reference(target: Target, text: str) -> str:
    """A directory named without a tag must hold exactly one model."""
    if isinstance(target, LayoutTarget):
        names = [e.name or e.digest for e in target.store.entries()]
    else:
        assert isinstance(target, OllamaTarget)
        names = target.names()
    if len(names) != 1:
        listed = ", ".join(names[:10]) or "none"
        raise LayoutProblem(f"{text}: holds {len(names)} models ({listed}); name one as :TAG")
    return names[0]
