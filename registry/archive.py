"""``imgpack save`` / ``load``: models as one ``.tar.zst`` file, for air-gapped machines and artifact stores.

The archive is an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/…``) in a tar stream,
compressed with zstandard: ``tar --zstd -xf`` gives a layout skopeo and oras read as ``oci:DIR``. ``save`` writes
``oci-layout`` and ``index.json`` first, then every node (manifests, indexes, signatures), then the blobs, so
``load`` knows the whole graph before the first large blob arrives and never writes a member nothing references.
Both directions stream: a blob is read once into the compressor, and written once through the store's verifying
writer. A truncated or tampered archive adds no blob that does not match its digest, and a manifest is indexed
only once everything it points at is in — after its tensor and config blobs passed the same content checks a
pull makes.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import zstandard

from imgpack.registry.copy import Graph, collect_graph
from imgpack.registry.layout import LayoutTarget, check_free_space
from imgpack.registry.model import check_content, describe_artifact, require_model
from imgpack.schemas import spec
from imgpack.schemas.digest import is_digest
from imgpack.schemas.errors import ImgpackError, IntegrityError
from imgpack.schemas.graph import Descriptor, parse_node
from imgpack.schemas.jsondoc import parse_json_object
from imgpack.schemas.reference import Reference
from imgpack.store.atomic import atomic_file
from imgpack.store.store import PINNED_ANNOTATION, Store

CHUNK = 4 * 1024 * 1024
MAX_INDEX = 16 * 1024 * 1024


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


class _Loader:
    """One pass over an archive: members are written as the graph says they are needed."""

    def __init__(self, store: Store, source: Path) -> None:
        self.store = store
        self.source = source
        self.entries: list[dict] | None = None
        self.nodes: dict[str, bytes] = {}
        self.wanted: set[str] = set()
        self.wanted_nodes: set[str] = set()
        self.unknown_written: set[str] = set()  # written before the graph was known; removed if unreferenced
        self._complete = False
        self.result = LoadResult([], 0, 0, 0)

    def graph_complete(self) -> bool:
        """Every node the index reaches has been seen, so ``wanted`` lists every blob the archive must give."""
        if self._complete or self.entries is None:
            return self._complete
        pending = [e["digest"] for e in self.entries]
        seen: set[str] = set()
        while pending:
            digest = pending.pop()
            if digest in seen:
                continue
            seen.add(digest)
            if digest not in self.nodes:
                return False
            node = parse_node(self.nodes[digest], f"{self.source}: {digest}")
            pending.extend(c.digest for c in node.children if c.is_graph_node)
        self._complete = True
        return True

    def want_node(self, digest: str, raw: bytes) -> None:
        node = parse_node(raw, f"{self.source}: manifest {digest}")
        self.nodes[digest] = raw
        for child in node.children:
            self.wanted.add(child.digest)
            if child.is_graph_node:
                self.wanted_nodes.add(child.digest)
        if node.subject is not None:
            self.wanted.add(node.subject.digest)

    def member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name.removeprefix("./")
        if not member.isfile():
            return
        if name == "index.json":
            if member.size > MAX_INDEX:
                raise ImgpackError(f"{self.source}: index.json is {member.size} bytes, over the {MAX_INDEX} limit")
            index = parse_json_object(_read(tar, member), f"{self.source}: index.json")
            entries = index.get("manifests")
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise ImgpackError(f"{self.source}: index.json has no 'manifests' list")
            for i, entry in enumerate(entries):
                if not is_digest(entry.get("digest")):
                    raise ImgpackError(f"{self.source}: index.json manifests[{i}] has no sha256 digest")
                self.wanted.add(entry["digest"])
                self.wanted_nodes.add(entry["digest"])
            self.entries = entries
            return
        if name == "oci-layout":
            return
        if not name.startswith("blobs/sha256/") or not is_digest("sha256:" + name.rsplit("/", 1)[1]):
            raise ImgpackError(f"{self.source}: unexpected archive member {member.name!r}")
        digest = "sha256:" + name.rsplit("/", 1)[1]
        self.result.blobs += 1
        self.result.bytes += member.size
        if self.entries is not None and digest not in self.wanted and self.graph_complete():
            self.result.skipped += 1  # nothing references it: not a byte is written
            return
        if not self.store.has_blob(digest, member.size):
            check_free_space(self.store.ingest_dir, member.size, f"{self.source}: member {member.name}")
            extracted = tar.extractfile(member)
            assert extracted is not None
            with self.store.writer() as w:
                while chunk := extracted.read(CHUNK):
                    w.write(chunk)
                w.commit(digest, member.size)
            self.result.new_blobs += 1
            if digest not in self.wanted:
                self.unknown_written.add(digest)
        maybe_node = digest in self.wanted_nodes or self.entries is None or not self.graph_complete()
        if maybe_node and member.size <= spec.MAX_MANIFEST_BYTES and self.store.has_blob(digest):
            raw = self.store.read_blob(digest)
            try:
                self.want_node(digest, raw)
            except ImgpackError:
                pass  # not a manifest: an ordinary blob

    def finish(self) -> None:
        if self.entries is None:
            raise ImgpackError(f"{self.source}: not an imgpack archive (no index.json)")
        layout = LayoutTarget(self.store, label=str(self.source))
        for i, entry in enumerate(self.entries):
            annotations = entry.get("annotations") if isinstance(entry.get("annotations"), dict) else {}
            name = annotations.get(spec.REF_NAME_ANNOTATION) or annotations.get(PINNED_ANNOTATION)
            if not isinstance(name, str):
                raise ImgpackError(f"{self.source}: index.json manifests[{i}] has no reference name")
            digest = entry["digest"]
            if not self.store.has_blob(digest):
                raise IntegrityError(f"{self.source}: {name}: manifest {digest} is not in the archive")
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
            try:
                self.store.name(Reference.parse(name), stored)
            except ImgpackError:
                raise ImgpackError(f"{self.source}: index.json names a model {name!r}, not a valid reference") from None
            self.result.references.append(name)
        referenced = self.store.referenced_blobs()
        for digest in self.unknown_written - referenced:
            self.store.blob_path(digest).unlink(missing_ok=True)


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    extracted = tar.extractfile(member)
    assert extracted is not None
    return extracted.read()


def load(store: Store, path: str | Path) -> LoadResult:
    """Add every model in the archive at ``path`` to ``store``; blobs are verified as they are written."""
    source = Path(path)
    if not source.is_file():
        raise ImgpackError(f"{source}: no such archive")
    loader = _Loader(store, source)
    try:
        with open(source, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as zst, \
                tarfile.open(fileobj=zst, mode="r|") as tar, store.writing():
            for member in tar:
                loader.member(tar, member)
            loader.finish()
    except (zstandard.ZstdError, tarfile.TarError, EOFError) as e:
        raise IntegrityError(f"{source}: damaged or truncated archive: {e}") from None
    except IntegrityError as e:
        message = str(e)
        raise IntegrityError(message if message.startswith(str(source)) else f"{source}: {message}") from None
    except OSError as e:
        raise ImgpackError(f"{source}: {e.strerror or e}") from None
    return loader.result


__all__ = ["LoadResult", "load", "save"]
