"""``imgpack save`` / ``load``: models as one ``.tar.zst`` file, for air-gapped machines and artifact stores.

The archive is an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/…``) in a tar stream,
compressed with zstandard: ``tar --zstd -xf`` gives a layout skopeo and oras read as ``oci:DIR``. ``save`` writes
``oci-layout`` and ``index.json`` first, then every node (manifests, indexes, signatures), then the blobs, so
``load`` knows the whole graph before the first large blob arrives; in any order, ``load`` never writes a member
nothing references (a 2 MB archive may decompress to terabytes of one unreferenced member). Both directions
stream: a blob is read once into the compressor, and written once through the store's verifying writer. A
manifest is indexed only once everything it points at is in — after its tensor and config blobs passed the same
content checks a pull makes — and a load that fails takes out what it added.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from imgpack.registry.copy import Graph, collect_graph
from imgpack.registry.layout import LayoutTarget, check_free_space
from imgpack.registry.model import check_content, describe_artifact, require_model
from imgpack.schemas import spec
from imgpack.schemas.digest import is_digest, sha256_bytes
from imgpack.schemas.errors import ImgpackError, IntegrityError, UsageError
from imgpack.schemas.graph import Descriptor, parse_node
from imgpack.schemas.jsondoc import parse_json_object
from imgpack.schemas.reference import Reference
from imgpack.store.atomic import atomic_file
from imgpack.store.store import PINNED_ANNOTATION, Store

CHUNK = 4 * 1024 * 1024
MAX_INDEX = 16 * 1024 * 1024
#: Manifests and indexes an archive may hold in memory while its graph is read.
MAX_NODES_IN_MEMORY = 64 * 1024 * 1024


@dataclass
class LoadResult:
    references: list[str]
    blobs: int
    new_blobs: int
    bytes: int
    skipped: int = 0


@dataclass
class _Root:
    name: str
    pinned: bool
    graph: Graph


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _roots(store: Store, refs: list[str]) -> list[_Root]:
    """Each model with its graph, plus the signatures stored for it (they travel with the model)."""
    layout = LayoutTarget(store)
    roots: list[_Root] = []
    for ref in refs:
        parsed, digest = store.resolve(ref)
        entry = next(e for e in store.entries() if e.digest == digest)
        raw = store.read_blob(digest)
        name = str(parsed.with_tag(parsed.tag)) if parsed.tag else str(parsed)
        roots.append(_Root(name, parsed.tag is None, collect_graph(layout, entry.descriptor, raw, None)))
        for referrer, tag in layout.referrers(entry.descriptor):
            ref_name = f"{parsed.name}:{tag}" if tag else f"{parsed.name}@{referrer.digest}"
            roots.append(_Root(ref_name, tag is None, collect_graph(layout, referrer, store.read_blob(referrer.digest),
                                                                    None)))
    return roots


def save(store: Store, refs: list[str], path: str | Path, level: int = 3) -> int:
    """Write the models ``refs`` (with every blob they need, once, and their signatures) to ``path``."""
    roots = _roots(store, refs)
    entries = []
    for root in roots:
        annotation = PINNED_ANNOTATION if root.pinned else spec.REF_NAME_ANNOTATION
        entries.append({**Descriptor(root.graph.root.media_type, root.graph.root.digest, root.graph.root.size,
                                     {}).to_json(), "annotations": {annotation: root.name}})
    nodes: dict[str, int] = {}
    blobs: dict[str, int] = {}
    for root in roots:
        for digest in root.graph.order:
            nodes.setdefault(digest, root.graph.nodes[digest][0].size)
        for digest, desc in root.graph.blobs.items():
            blobs.setdefault(digest, desc.size)
    target = Path(path)
    try:
        with atomic_file(target) as raw:
            compressor = zstandard.ZstdCompressor(level=level, threads=-1)
            with compressor.stream_writer(raw, closefd=False) as zst, \
                    tarfile.open(fileobj=zst, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                _add_bytes(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
                _add_bytes(tar, "index.json",
                           json.dumps({"schemaVersion": 2, "manifests": entries}, indent=2).encode())
                for digest, size in [*nodes.items(), *((d, s) for d, s in sorted(blobs.items()) if d not in nodes)]:
                    info = tarfile.TarInfo("blobs/sha256/" + digest.split(":", 1)[1])
                    info.size = store.blob_size(digest)
                    info.mode = 0o644
                    if info.size != size:
                        raise IntegrityError(f"blob {digest} is {info.size} bytes, its descriptor says {size}")
                    with store.open_blob(digest) as f:
                        tar.addfile(info, f)
    except OSError as e:
        raise ImgpackError(f"{target}: cannot write the archive: {e.strerror or e}") from None
    return target.stat().st_size


def _entry_name(entry: dict[str, Any]) -> str | None:
    """The reference an index.json entry gives its manifest (a tag's, or a pinned digest's), if any."""
    annotations = entry.get("annotations")
    annotations = annotations if isinstance(annotations, dict) else {}
    name = annotations.get(spec.REF_NAME_ANNOTATION) or annotations.get(PINNED_ANNOTATION)
    return name if isinstance(name, str) else None


class _Loader:
    """Reads an archive; a member is written only once the graph says it is needed.

    Manifests and indexes (small JSON, at most ``spec.MAX_MANIFEST_BYTES``) are kept in memory as they pass; any
    other member is written when some node seen so far references it, and passed over otherwise. ``save`` writes
    the graph first, so one pass does; an archive in another order (a tar of a layout) gets a second pass for the
    members that turned out to be needed. A member nothing references is never written, however large.
    """

    def __init__(self, store: Store, source: Path) -> None:
        self.store = store
        self.source = source
        self.entries: list[dict] | None = None
        self.nodes: dict[str, bytes] = {}
        self.node_bytes = 0
        self.deferred: set[str] = set()  # passed over: nothing seen so far needed them
        self.written: set[str] = set()  # blobs this load added: taken out again if it fails
        self.sizes: dict[str, int] = {}  # declared sizes of what the graph needs
        self._needed: tuple[set[str], list[str]] | None = None  # cached until a node or the index arrives
        self.result = LoadResult([], 0, 0, 0)

    def needed(self) -> tuple[set[str], list[str]]:
        """Every digest the nodes seen so far reach from index.json, and the nodes among them not seen yet."""
        if self._needed is not None:
            return self._needed
        found: set[str] = set()
        visited: set[str] = set()
        unseen: list[str] = []
        pending = [(e["digest"], True) for e in self.entries or []]
        while pending:
            digest, required = pending.pop()
            raw = self.nodes.get(digest)
            if digest in visited or raw is None and not required:
                continue
            visited.add(digest)
            found.add(digest)
            if raw is None:
                unseen.append(digest)
                continue
            node = parse_node(raw, f"{self.source}: manifest {digest}")
            for child in node.children:
                self.sizes.setdefault(child.digest, child.size)
                if child.is_graph_node:
                    pending.append((child.digest, True))
                else:
                    found.add(child.digest)
            if node.subject is not None:  # a signature's model: walked when the archive holds it
                pending.append((node.subject.digest, False))
        self._needed = found, unseen
        return self._needed

    def index(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        if member.size > MAX_INDEX:
            raise ImgpackError(f"{self.source}: index.json is {member.size} bytes, over the {MAX_INDEX} limit")
        index = parse_json_object(_read(tar, member), f"{self.source}: index.json")
        entries = index.get("manifests")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ImgpackError(f"{self.source}: index.json has no 'manifests' list")
        for i, entry in enumerate(entries):
            if not is_digest(entry.get("digest")):
                raise ImgpackError(f"{self.source}: index.json manifests[{i}] has no sha256 digest")
            name = _entry_name(entry)
            if name is None:
                raise ImgpackError(f"{self.source}: index.json manifests[{i}] has no reference name")
            try:
                Reference.parse(name)
            except ImgpackError:
                raise ImgpackError(f"{self.source}: index.json names a model {name!r}, not a valid reference") from None
        self.entries = entries
        self._needed = None

    def member(self, tar: tarfile.TarFile, member: tarfile.TarInfo, only: set[str] | None = None) -> None:
        """Take one member; on a second pass (``only``), just the blobs named there."""
        name = member.name.removeprefix("./")
        if not member.isfile():
            return
        if name in ("index.json", "oci-layout"):
            if name == "index.json" and only is None:
                self.index(tar, member)
            return
        if not name.startswith("blobs/sha256/") or not is_digest("sha256:" + name.rsplit("/", 1)[1]):
            raise ImgpackError(f"{self.source}: unexpected archive member {member.name!r}")
        digest = "sha256:" + name.rsplit("/", 1)[1]
        if only is not None:
            if digest in only:
                self.write(tar, member, digest)
            return
        self.result.blobs += 1
        self.result.bytes += member.size
        if member.size <= spec.MAX_MANIFEST_BYTES:
            raw = _read(tar, member)
            if raw.lstrip()[:1] == b"{" and self.remember_node(digest, raw):
                return
            if digest in self.needed()[0]:
                self.write_bytes(digest, raw)
            else:
                self.deferred.add(digest)
            return
        if digest in self.needed()[0]:
            self.write(tar, member, digest)
        else:
            self.deferred.add(digest)  # not a byte is written unless a manifest turns out to need it

    def remember_node(self, digest: str, raw: bytes) -> bool:
        """Keep ``raw`` in memory if it is a manifest or an index (checked against its digest); False if not."""
        try:
            parse_node(raw, f"{self.source}: manifest {digest}")
        except ImgpackError:
            return False
        if sha256_bytes(raw) != digest:
            raise IntegrityError(f"{self.source}: member {digest} does not match its digest")
        self.node_bytes += len(raw)
        if self.node_bytes > MAX_NODES_IN_MEMORY:
            raise ImgpackError(f"{self.source}: holds more than {MAX_NODES_IN_MEMORY} bytes of manifests")
        self.nodes[digest] = raw
        self._needed = None
        return True

    def write_bytes(self, digest: str, raw: bytes) -> None:
        if self.store.has_blob(digest, len(raw)):
            return
        with self.store.writer() as w:
            w.write(raw)
            w.commit(digest, len(raw))
        self.written.add(digest)
        self.result.new_blobs += 1

    def write(self, tar: tarfile.TarFile, member: tarfile.TarInfo, digest: str) -> None:
        if self.store.has_blob(digest, member.size):
            return
        declared = self.sizes.get(digest)
        if declared is not None and declared != member.size:
            raise IntegrityError(f"{self.source}: member {member.name} is {member.size} bytes, its descriptor"
                                 f" says {declared}")
        check_free_space(self.store.ingest_dir, member.size, f"{self.source}: member {member.name}", self.store)
        extracted = tar.extractfile(member)
        assert extracted is not None
        with self.store.writer() as w:
            while chunk := extracted.read(CHUNK):
                w.write(chunk)
            w.commit(digest, member.size)
        self.written.add(digest)
        self.result.new_blobs += 1

    def missing(self) -> set[str]:
        """After the first pass: the members a second pass must write (refused if the graph is incomplete)."""
        if self.entries is None:
            raise ImgpackError(f"{self.source}: not an imgpack archive (no index.json)")
        needed, unseen = self.needed()
        if unseen:
            raise IntegrityError(f"{self.source}: manifest {unseen[0]} is not in the archive")
        for digest, raw in self.nodes.items():
            if digest in needed:
                self.write_bytes(digest, raw)
        todo = {d for d in needed if d in self.deferred and not self.store.has_blob(d)}
        self.result.skipped = len(self.deferred - needed)
        need = sum(self.sizes.get(d, 0) for d in todo)
        if need:
            check_free_space(self.store.ingest_dir, need, f"{self.source}: {len(todo)} blobs", self.store)
        return todo

    def finish(self) -> None:
        assert self.entries is not None
        layout = LayoutTarget(self.store, label=str(self.source))
        for entry in self.entries:
            name = _entry_name(entry)
            digest = entry["digest"]
            if name is None:  # the entries were checked when read; this keeps that promise explicit
                raise ImgpackError(f"{self.source}: index.json entry {digest} names no model")
            raw = self.store.read_blob(digest)
            root = Descriptor(parse_node(raw, f"{self.source}: {name}").media_type, digest, len(raw))
            graph = collect_graph(layout, root, raw, None)
            node = graph.root_node()
            if describe_artifact(node) is None:  # an imgpack model: checked as a pull checks it
                manifest = require_model(raw, node, f"{self.source}: {name}")
                check_content(layout, graph, manifest.flavour, f"{self.source}: {name}")
            for digest_ in graph.order:
                desc, content, _ = graph.nodes[digest_]
                self.store.put_node(content, desc.media_type, f"{self.source}: {name}")
            stored = self.store.put_node(raw, root.media_type, f"{self.source}: {name}")
            self.store.name(Reference.parse(name), stored)
            self.result.references.append(name)


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    extracted = tar.extractfile(member)
    assert extracted is not None
    return extracted.read()


@contextlib.contextmanager
def _members(source: Path) -> Iterator[tuple[tarfile.TarFile, Iterator[tarfile.TarInfo]]]:
    with open(source, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as zst, \
            tarfile.open(fileobj=zst, mode="r|") as tar:
        yield tar, iter(tar)


def load(store: Store, path: str | Path) -> LoadResult:
    """Add every model in the archive at ``path`` to ``store``; blobs are verified as they are written.

    All or nothing: a load that fails takes out the blobs it added (unless another writer is busy in the store,
    when ``prune`` does), and every error names the archive.
    """
    source = Path(path)
    if not source.is_file():
        raise ImgpackError(f"{source}: no such archive" if not source.exists() else f"{source}: not a file")
    loader = _Loader(store, source)
    try:
        with store.writing():
            with _members(source) as (tar, members):
                for member in members:
                    loader.member(tar, member)
            todo = loader.missing()
            if todo:  # an archive not in save's order: fetch what the graph turned out to need
                with _members(source) as (tar, members):
                    for member in members:
                        loader.member(tar, member, only=todo)
            loader.finish()
    except BaseException as e:
        store.discard_unreferenced(loader.written)
        if isinstance(e, (zstandard.ZstdError, tarfile.TarError, EOFError)):
            raise IntegrityError(f"{source}: damaged or truncated archive: {e}") from None
        if isinstance(e, UsageError):  # a bad archive is bad input, never a usage mistake (exit 2)
            raise ImgpackError(f"{source}: {e}") from None
        if isinstance(e, ImgpackError):
            if not e.message.startswith(str(source)):
                e.message = f"{source}: {e.message}"
            raise e from None
        if isinstance(e, OSError):
            raise ImgpackError(f"{source}: {e.strerror or e}") from None
        raise
    return loader.result


__all__ = ["LoadResult", "load", "save"]
