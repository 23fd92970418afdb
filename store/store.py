"""The local store: an OCI image layout that imgpack and any OCI tool (skopeo, oras) can read.

Layout::

    <root>/oci-layout                    {"imageLayoutVersion": "1.0.0"}
    <root>/index.json                    one entry per name (ref.name = full reference, or a bare tag)
    <root>/blobs/sha256/<hex>            content-addressed blobs (tensors, files, configs, manifests)
    <root>/.imgpack/ingest/              temp files and resumable partial downloads (same filesystem)
    <root>/.imgpack/lock, gc.lock        index writers and garbage collection serialise on these

Blobs are written to a temp file, hashed on the way in and renamed into place, so a blob path always holds
exactly the bytes its name promises. ``index.json`` is replaced atomically under an exclusive lock, and a
manifest or index is only indexed after every blob it points at is present with the right size, whatever kind
of artifact it is (an imgpack model, a signature, an image index): the store never names a missing blob.

Temp files are held under an exclusive ``flock`` by the process writing them (taken before the file gets its
``tmp-`` name); a temp file nobody holds is a leftover of a killed process. That test works across PID namespaces
(containers sharing a volume) and on NFS, where "is this PID alive" does not.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from imgpack.schemas import spec
from imgpack.schemas.digest import check_digest, is_digest, sha256_bytes
from imgpack.schemas.errors import ImgpackError, IntegrityError, NotFoundError
from imgpack.schemas.foreign import describe_artifact, foreign_hint
from imgpack.schemas.graph import Descriptor, Node, parse_node
from imgpack.schemas.jsondoc import parse_json
from imgpack.schemas.manifest import ModelManifest
from imgpack.schemas.reference import Reference
from imgpack.store.atomic import write_atomic

#: Index annotation of a manifest pulled by digest: kept in the index (and so by prune) without a tag.
PINNED_ANNOTATION = "io.imgpack.pinned"
OCI_LAYOUT = {"imageLayoutVersion": "1.0.0"}
CHUNK = 4 * 1024 * 1024
TEMP_PREFIX = "tmp-"


def default_root() -> Path:
    """``$IMGPACK_HOME``, else ``~/.imgpack``."""
    env = os.environ.get("IMGPACK_HOME")
    return Path(env).expanduser() if env else Path.home() / ".imgpack"


@dataclass(frozen=True)
class IndexEntry:
    """One ``index.json`` entry: the name it is known by and the descriptor it points at."""

    name: str
    descriptor: Descriptor
    pinned: bool = False
    #: What a partial pull took (``--component``/``--include``), or None for a complete model.
    partial: str | None = None

    @property
    def digest(self) -> str:
        return self.descriptor.digest


class TempFile:
    """A locked temp file in the ingest directory; the lock marks it live for every other process."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        while True:
            name = secrets.token_hex(8)
            creating = directory / f".creating-{name}"
            try:
                fd = os.open(creating, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            break
        # Locked before it gets the name cleaners look for, so no cleaner ever sees it unlocked.
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = directory / f"{TEMP_PREFIX}{name}"
        os.rename(creating, path)
        self.path = path
        self.file = os.fdopen(fd, "r+b", buffering=0)

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.close()

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()  # releases the lock


class BlobWriter:
    """Streams bytes into a temp file while hashing them; ``commit`` verifies and renames into place."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._temp = TempFile(store.ingest_dir)
        self.path = self._temp.path
        self._hasher = hashlib.sha256()
        self.size = 0
        self.digest: str | None = None

    def write(self, data: bytes | memoryview) -> None:
        self._hasher.update(data)
        self._temp.file.write(data)
        self.size += len(data)

    def current_digest(self) -> str:
        """Digest of the bytes written so far."""
        return "sha256:" + self._hasher.hexdigest()

    def commit(self, expected_digest: str | None = None, expected_size: int | None = None) -> str:
        digest = "sha256:" + self._hasher.hexdigest()
        if expected_size is not None and self.size != expected_size:
            self.abort()
            raise IntegrityError(f"blob {expected_digest or digest}: got {self.size} bytes, expected {expected_size}")
        if expected_digest is not None and digest != expected_digest:
            self.abort()
            raise IntegrityError(f"blob {expected_digest}: content hashes to {digest}")
        self._store.adopt(self.path, digest, self.size)
        self._temp.close()
        self.digest = digest
        return digest

    def abort(self) -> None:
        self._temp.discard()

    def keep_if_new(self) -> bool:
        """Commit what was written unless the store already has that blob (then drop the temp); whether it was
        new — how a producer that computes content locally deduplicates without a second read."""
        digest = self.current_digest()
        if self._store.has_blob(digest, self.size):
            self.abort()
            self.digest = digest
            return False
        self.commit(digest, self.size)
        return True

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.digest is None:
            self.abort()


class Store:
    """An OCI image layout used as imgpack's local model store (or any ``oci:PATH`` layout)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.state_dir = self.root / ".imgpack"
        self.ingest_dir = self.state_dir / "ingest"
        self._local = threading.local()

    # -- opening ---------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path | None = None, create: bool = True) -> Store:
        """Open the store at ``path`` (default: ``$IMGPACK_HOME`` or ``~/.imgpack``), creating it if asked.

        Creation happens under the store's lock, so two processes opening a new store at once both succeed.
        """
        root = Path(path).expanduser() if path else default_root()
        store = cls(root)
        if (root / "oci-layout").exists():
            store._check_layout()
            if create:
                store._ensure_state_dirs()
            return store
        if not create:
            raise NotFoundError(f"{root}: not an OCI image layout (no oci-layout file)")
        if root.exists() and not root.is_dir():
            raise ImgpackError(f"{root}: store path exists and is not a directory")
        try:
            root.mkdir(parents=True, exist_ok=True)
            store.state_dir.mkdir(exist_ok=True)
        except OSError as e:
            raise ImgpackError(f"{root}: cannot create the store: {e.strerror or e}") from None
        with store.locked():
            if not (root / "oci-layout").exists():
                ours = {".imgpack", "blobs", "index.json"}
                if any(p.name not in ours for p in root.iterdir()):
                    raise ImgpackError(f"{root}: directory is not empty and is not an OCI image layout")
                store.blobs_dir.mkdir(parents=True, exist_ok=True)
                if not (root / "index.json").exists():
                    write_atomic(root / "index.json", _encode_index({"schemaVersion": 2, "manifests": []}))
                write_atomic(root / "oci-layout", json.dumps(OCI_LAYOUT).encode())
        store._ensure_state_dirs()
        return store

    def _check_layout(self) -> None:
        try:
            layout = json.loads((self.root / "oci-layout").read_text())
        except (OSError, ValueError) as e:
            raise IntegrityError(f"{self.root / 'oci-layout'}: unreadable: {e}") from None
        if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != "1.0.0":
            raise IntegrityError(f"{self.root / 'oci-layout'}: unsupported imageLayoutVersion")

    def _ensure_state_dirs(self) -> None:
        try:
            self.blobs_dir.mkdir(parents=True, exist_ok=True)
            self.ingest_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ImgpackError(f"{self.root}: cannot write to the store: {e.strerror or e}") from None
        self.clean_stale_temps()

    def clean_stale_temps(self) -> int:
        """Remove temp files no live process holds (their writer died: kill -9, a crashed container)."""
        removed = 0
        for path in self.ingest_dir.glob(TEMP_PREFIX + "*"):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a live writer holds it
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
            finally:
                os.close(fd)
        return removed

    # -- locks -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _flock(self, name: str, kind: int) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, kind)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive lock for read-modify-write of index.json."""
        return self._flock("lock", fcntl.LOCK_EX)

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """Held (shared) by anything that adds blobs before indexing a manifest, so prune never races it."""
        return self._flock("gc.lock", fcntl.LOCK_SH)

    # -- blobs -----------------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / check_digest(digest)

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        try:
            st = os.stat(self.blob_path(digest))
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def blob_size(self, digest: str) -> int:
        try:
            return os.stat(self.blob_path(digest)).st_size
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in the store {self.root}") from None

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in the store {self.root}") from None

    def read_blob(self, digest: str, verify: bool = True) -> bytes:
        with self.open_blob(digest) as f:
            data = f.read()
        if verify and sha256_bytes(data) != digest:
            raise IntegrityError(f"blob {digest} in {self.root} is corrupt (content does not match its digest)")
        return data

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        digest = sha256_bytes(data)
        if not self.has_blob(digest, len(data)):
            with self.writer() as w:
                w.write(data)
                w.commit(digest, len(data))
        return digest, len(data)

    def put_known(self, digest: str, prefix: bytes, src_fd: int | None = None, offset: int = 0,
                  nbytes: int = 0) -> None:
        """Store ``prefix`` followed by ``nbytes`` of ``src_fd`` at ``offset`` as blob ``digest``.

        The caller has just hashed exactly these bytes, so they are not hashed again; the file range is copied
        in the kernel (copy_file_range) where the filesystem allows, else through a bounded buffer.
        """
        temp = TempFile(self.ingest_dir)
        try:
            out = temp.file
            out.write(prefix)
            copied = 0
            while copied < nbytes and src_fd is not None:
                want = nbytes - copied
                try:
                    n = os.copy_file_range(src_fd, out.fileno(), want, offset + copied)
                except OSError:
                    n = 0
                if n == 0:  # not supported here (or EOF): fall back to read/write
                    chunk = os.pread(src_fd, min(CHUNK, want), offset + copied)
                    if not chunk:
                        raise IntegrityError(f"blob {digest}: source ended {want} bytes early")
                    out.write(chunk)
                    n = len(chunk)
                copied += n
            self.adopt(temp.path, digest, len(prefix) + nbytes)
            temp.close()
        except BaseException:
            temp.discard()
            raise

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def partial_path(self, digest: str) -> Path:
        """Where a resumable download of ``digest`` keeps its bytes until verified."""
        return self.ingest_dir / f"sha256-{check_digest(digest)}.partial"

    def adopt(self, path: Path, digest: str, size: int) -> None:
        """Move a file whose content was already verified as ``digest`` into the blob directory."""
        target = self.blob_path(digest)
        if target.exists() and target.stat().st_size == size:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        os.chmod(path, 0o644)
        os.replace(path, target)

    def iter_blobs(self) -> Iterator[str]:
        for path in self.blobs_dir.iterdir():
            if len(path.name) == 64:
                yield "sha256:" + path.name

    # -- index -----------------------------------------------------------------------------------------

    def _read_index(self) -> dict[str, Any]:
        path = self.root / "index.json"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"{path}: missing; {self.root} is not an OCI image layout") from None
        try:
            index = parse_json(raw, str(path))
        except ImgpackError as e:
            raise IntegrityError(str(e)) from None
        if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
            raise IntegrityError(f"{path}: has no 'manifests' list")
        return index

    def _write_index(self, index: dict[str, Any]) -> None:
        write_atomic(self.root / "index.json", _encode_index(index))

    def entries(self) -> list[IndexEntry]:
        """Every well-formed ``index.json`` entry, in file order."""
        out = []
        for i, entry in enumerate(self._read_index()["manifests"]):
            try:
                descriptor = Descriptor.from_json(entry, f"{self.root / 'index.json'}: manifests[{i}]")
            except ImgpackError:
                continue
            annotations = descriptor.annotations
            name = annotations.get(spec.REF_NAME_ANNOTATION)
            pinned = name is None and PINNED_ANNOTATION in annotations
            out.append(IndexEntry(name or annotations.get(PINNED_ANNOTATION) or "", descriptor, pinned,
                                  annotations.get(spec.PARTIAL_ANNOTATION)))
        return out

    def references(self) -> list[tuple[str, str]]:
        """(reference, manifest digest) for every named entry, sorted by reference."""
        return sorted((e.name, e.digest) for e in self.entries() if e.name)

    def find(self, name: str) -> IndexEntry | None:
        """The entry called exactly ``name`` (a full reference, a bare tag, or a pinned digest reference)."""
        return next((e for e in self.entries() if e.name == name), None)

    def resolve(self, ref: str | Reference) -> tuple[Reference, str]:
        """Find the manifest digest a reference names; a digest reference must name an indexed manifest."""
        parsed = ref if isinstance(ref, Reference) else Reference.parse(ref)
        if parsed.tag is not None:
            key = str(parsed.with_tag(parsed.tag))
            # Layouts written by other tools may name an entry without a tag ("copied", not "copied:latest").
            bare = ref.split("@", 1)[0] if isinstance(ref, str) else key
            for name, digest in self.references():
                if name in (key, bare):
                    if parsed.digest and parsed.digest != digest:
                        raise NotFoundError(f"{parsed}: tag {key} points at {digest}, not {parsed.digest}")
                    return parsed, digest
            raise NotFoundError(f"model {key} is not in the store {self.root} (see 'imgpack list')")
        # A bare digest names a model only if the index holds that manifest: never an arbitrary blob.
        if parsed.digest and any(e.digest == parsed.digest for e in self.entries()):
            return parsed, parsed.digest
        # A model pulled by the digest of its index-split form is pinned under that reference, and stored as the
        # manifest the index carries.
        pinned = self.find(str(parsed)) if parsed.digest else None
        if pinned is not None:
            return parsed, pinned.digest
        raise NotFoundError(f"model {parsed} is not in the store {self.root} (see 'imgpack list')")

    def get_manifest(self, ref: str | Reference) -> ModelManifest:
        parsed, digest = self.resolve(ref)
        return self.manifest_by_digest(digest, source=str(parsed))

    def manifest_by_digest(self, digest: str, source: str | None = None) -> ModelManifest:
        raw = self.read_blob(digest)
        try:
            return ModelManifest.from_bytes(raw, source=source or digest)
        except ImgpackError:
            foreign = None
            with contextlib.suppress(ImgpackError):
                foreign = describe_artifact(parse_node(raw, source or digest))
            if foreign is None:
                raise
            # A container image or ModelPack model copied into the store: say what it is, not why the schema
            # refuses it.
            raise ImgpackError(f"{source or digest} is {foreign}, not an imgpack model; {foreign_hint(foreign)}")\
                from None

    def node(self, digest: str, media_type: str | None = None) -> Node:
        """A stored manifest or index, parsed far enough to walk its graph."""
        return parse_node(self.read_blob(digest), digest, media_type)

    def check_children(self, node: Node, where: str, allow_missing: set[str] | frozenset[str] = frozenset()) -> None:
        """Refuse a node unless everything it points at is stored with the right size (a partial pull may leave
        out the blobs in ``allow_missing``; the node is then indexed as partial)."""
        for child in node.children:
            what = child.fields.get("name") or child.media_type
            if child.digest in allow_missing and not self.has_blob(child.digest):
                continue
            if not self.has_blob(child.digest):
                raise IntegrityError(f"{where}: {what!r} blob {child.digest} is missing from the store")
            actual = self.blob_size(child.digest)
            if actual != child.size:
                raise IntegrityError(f"{where}: {what!r} blob {child.digest} is {actual} bytes, its descriptor"
                                     f" says {child.size}")

    def put_node(self, raw: bytes, media_type: str | None = None, where: str = "manifest",
                 allow_missing: set[str] | frozenset[str] = frozenset()) -> Descriptor:
        """Store any manifest or index verbatim once all it points at is present; returns its descriptor."""
        node = parse_node(raw, where, media_type)
        self.check_children(node, where, allow_missing)
        digest, size = self.put_bytes(raw)
        fields: dict[str, Any] = {}
        if node.artifact_type and node.media_type in (spec.OCI_MANIFEST, spec.OCI_INDEX):
            fields["artifactType"] = node.artifact_type
        return Descriptor(node.media_type, digest, size, fields)

    def put_manifest(self, ref: str | Reference | None, raw: bytes) -> str:
        """Store an imgpack model manifest (validated as one) and tag it; refused unless every blob is present."""
        manifest = ModelManifest.from_bytes(raw, source=str(ref) if ref else "manifest")
        descriptor = self.put_node(raw, manifest.media_type, manifest.source)
        if ref is not None:
            self.name(ref if isinstance(ref, Reference) else Reference.parse(ref), descriptor)
        return descriptor.digest

    def name(self, ref: Reference, descriptor: Descriptor, partial: str | None = None) -> None:
        """Index ``descriptor`` under a reference: its tag, or (pulled by digest) pinned under the digest."""
        if ref.tag is None:
            self.set_entry(str(ref), descriptor, pinned=True, partial=partial)
        else:
            self.set_entry(str(ref.with_tag(ref.tag)), descriptor, partial=partial)

    def set_entry(self, name: str, descriptor: Descriptor, pinned: bool = False, partial: str | None = None) -> None:
        """Point the index entry called ``name`` at ``descriptor``, verbatim (layouts written by other tools use
        bare tags such as ``v1``); an earlier entry of that name is replaced. The descriptor must be stored."""
        if not self.has_blob(descriptor.digest, descriptor.size):
            raise IntegrityError(f"{name}: manifest {descriptor.digest} is not stored; it cannot be indexed")
        entry: dict[str, Any] = {"mediaType": descriptor.media_type, "digest": descriptor.digest,
                                 "size": descriptor.size}
        if descriptor.artifact_type:
            entry["artifactType"] = descriptor.artifact_type
        entry["annotations"] = {(PINNED_ANNOTATION if pinned else spec.REF_NAME_ANNOTATION): name}
        if partial:
            entry["annotations"][spec.PARTIAL_ANNOTATION] = partial
        with self.locked():
            index = self._read_index()
            kept = [e for e in index["manifests"] if _entry_name(e) != name]
            kept.append(entry)
            kept.sort(key=_entry_name)
            index["manifests"] = kept
            self._write_index(index)

    def tag(self, src: str, dst: str) -> str:
        parsed_dst = Reference.parse(dst)
        if parsed_dst.digest:
            raise ImgpackError(f"{dst}: a tag target cannot contain a digest")
        _, digest = self.resolve(src)
        entry = next(e for e in self.entries() if e.digest == digest)
        self.name(parsed_dst, entry.descriptor)
        return digest

    def remove(self, ref: str) -> str:
        """Untag a model; its blobs stay until ``prune``."""
        parsed, digest = self.resolve(ref)
        key = str(parsed.with_tag(parsed.tag)) if parsed.tag else str(parsed)
        return self.remove_entry(key) or digest

    def remove_entry(self, name: str) -> str | None:
        """Drop the index entry called ``name``; returns the digest it named, None when there was none."""
        with self.locked():
            index = self._read_index()
            gone = [e for e in index["manifests"] if _entry_name(e) == name]
            if not gone:
                return None
            index["manifests"] = [e for e in index["manifests"] if _entry_name(e) != name]
            self._write_index(index)
        digest = gone[0].get("digest")
        return digest if is_digest(digest) else None

    # -- maintenance ---------------------------------------------------------------------------------------

    def referenced_blobs(self) -> set[str]:
        """Every blob some indexed manifest needs, the manifests themselves included."""
        keep: set[str] = set()
        pending = [entry.get("digest") for entry in self._read_index()["manifests"] if isinstance(entry, dict)]
        while pending:
            digest = pending.pop()
            if not is_digest(digest) or digest in keep:
                continue
            keep.add(digest)
            try:
                raw = self.blob_path(digest).read_bytes()
            except FileNotFoundError:
                continue
            try:
                node = parse_node(raw, digest)
            except ImgpackError as e:
                # Not knowing what a manifest references, prune must not guess: refuse rather than delete.
                raise IntegrityError(f"manifest {digest} is unreadable ({e}); fix or rm it before pruning") from None
            for child in node.children:
                if child.is_graph_node:
                    pending.append(child.digest)
                else:
                    keep.add(child.digest)
            if node.subject is not None:
                keep.add(node.subject.digest)
        return keep

    def prune(self) -> tuple[int, int]:
        """Delete blobs no indexed manifest references, and leftover temp and partial files; returns (count,
        bytes). Writers hold the shared gc lock, so none is running while this holds it exclusively."""
        removed = freed = 0
        with self._flock("gc.lock", fcntl.LOCK_EX), self.locked():
            keep = self.referenced_blobs()
            for digest in list(self.iter_blobs()):
                if digest not in keep:
                    path = self.blob_path(digest)
                    with contextlib.suppress(FileNotFoundError):
                        freed += path.stat().st_size
                        path.unlink()
                        removed += 1
            for path in self.ingest_dir.glob("*"):
                with contextlib.suppress(FileNotFoundError):
                    freed += path.stat().st_size
                    path.unlink()
                    removed += 1
        return removed, freed

    def discard_unreferenced(self, digests: set[str] | frozenset[str]) -> int:
        """Delete those of ``digests`` that no indexed manifest references: what a refused pull or load added.

        Only while no other writer holds the gc lock (one may be about to index a manifest that needs them);
        otherwise they stay for ``prune``. Returns how many were deleted.
        """
        if not digests:
            return 0
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / "gc.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return 0
            removed = 0
            with self.locked():
                keep = self.referenced_blobs()
                for digest in set(digests) - keep:
                    with contextlib.suppress(FileNotFoundError):
                        self.blob_path(digest).unlink()
                        removed += 1
            return removed
        finally:
            os.close(fd)

    def partial_bytes(self) -> int:
        """Bytes held by resumable partial downloads (what ``prune`` would reclaim from the ingest area)."""
        total = 0
        for path in self.ingest_dir.glob("*.partial"):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def index_entries(self) -> list[dict[str, Any]]:
        """The raw ``index.json`` descriptors (for checks that compare them with the manifests they name)."""
        return [e for e in self._read_index()["manifests"] if isinstance(e, dict)]


def _entry_name(entry: dict[str, Any]) -> str:
    """The name an index entry is known by: its ref.name, or the digest reference it was pulled as."""
    annotations = entry.get("annotations") or {}
    if not isinstance(annotations, dict):
        return ""
    return annotations.get(spec.REF_NAME_ANNOTATION) or annotations.get(PINNED_ANNOTATION) or ""


def _encode_index(index: dict[str, Any]) -> bytes:
    return (json.dumps(index, indent=2) + "\n").encode()
