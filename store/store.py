"""The local store: an OCI image layout that imgpack and any OCI tool (skopeo, oras) can read.

Layout::

    <root>/oci-layout                    {"imageLayoutVersion": "1.0.0"}
    <root>/index.json                    one entry per tagged model, ref.name = full reference
    <root>/blobs/sha256/<hex>            content-addressed blobs (tensors, files, configs, manifests)
    <root>/.imgpack/ingest/              temp files and resumable partial downloads (same filesystem)
    <root>/.imgpack/lock, gc.lock        index writers and garbage collection serialise on these

Blobs are written to a temp file, hashed on the way in and renamed into place, so a blob path always holds
exactly the bytes its name promises. ``index.json`` is replaced atomically under an exclusive lock, and a
manifest is only indexed after every blob it references is present with the right size.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from imgpack.schemas import spec
from imgpack.schemas.digest import check_digest, sha256_bytes
from imgpack.schemas.errors import ImgpackError, IntegrityError, NotFoundError
from imgpack.schemas.manifest import ModelManifest
from imgpack.schemas.reference import Reference

if TYPE_CHECKING:
    from imgpack.conformance.verify import VerifyReport

#: Index annotation of a manifest pulled by digest: kept in the index (and so by prune) without a tag.
PINNED_ANNOTATION = "io.imgpack.pinned"
OCI_LAYOUT = {"imageLayoutVersion": "1.0.0"}
CHUNK = 4 * 1024 * 1024


def default_root() -> Path:
    """``$IMGPACK_HOME``, else ``~/.imgpack``."""
    env = os.environ.get("IMGPACK_HOME")
    return Path(env).expanduser() if env else Path.home() / ".imgpack"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new content, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class BlobWriter:
    """Streams bytes into a temp file while hashing them; ``commit`` verifies and renames into place."""

    def __init__(self, store: Store) -> None:
        self._store = store
        fd, path = tempfile.mkstemp(prefix=f"tmp-{os.getpid()}-", dir=store.ingest_dir)
        self.path = Path(path)
        self._file = os.fdopen(fd, "wb")
        self._hasher = hashlib.sha256()
        self.size = 0
        self.digest: str | None = None

    def write(self, data: bytes | memoryview) -> None:
        self._hasher.update(data)
        self._file.write(data)
        self.size += len(data)

    def current_digest(self) -> str:
        """Digest of the bytes written so far."""
        return "sha256:" + self._hasher.hexdigest()

    def commit(self, expected_digest: str | None = None, expected_size: int | None = None) -> str:
        self._file.close()
        digest = "sha256:" + self._hasher.hexdigest()
        if expected_size is not None and self.size != expected_size:
            self.abort()
            raise IntegrityError(f"blob {expected_digest or digest}: got {self.size} bytes, expected {expected_size}")
        if expected_digest is not None and digest != expected_digest:
            self.abort()
            raise IntegrityError(f"blob {expected_digest}: content hashes to {digest}")
        self._store.adopt(self.path, digest, self.size)
        self.digest = digest
        return digest

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

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
        """Open the store at ``path`` (default: ``$IMGPACK_HOME`` or ``~/.imgpack``), creating it if asked."""
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
        if root.exists() and any(p.name not in (".imgpack",) for p in root.iterdir()):
            raise ImgpackError(f"{root}: directory is not empty and is not an OCI image layout")
        root.mkdir(parents=True, exist_ok=True)
        store._ensure_state_dirs()
        with store.locked():
            if not (root / "index.json").exists():
                write_atomic(root / "index.json", _encode_index({"schemaVersion": 2, "manifests": []}))
            if not (root / "oci-layout").exists():
                write_atomic(root / "oci-layout", json.dumps(OCI_LAYOUT).encode())
        return store

    def _check_layout(self) -> None:
        try:
            layout = json.loads((self.root / "oci-layout").read_text())
        except (OSError, ValueError) as e:
            raise IntegrityError(f"{self.root / 'oci-layout'}: unreadable: {e}") from None
        if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != "1.0.0":
            raise IntegrityError(f"{self.root / 'oci-layout'}: unsupported imageLayoutVersion")

    def _ensure_state_dirs(self) -> None:
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.ingest_dir.mkdir(parents=True, exist_ok=True)
        self._clean_stale_temps()

    def _clean_stale_temps(self) -> None:
        """Remove temp files left by processes that died (kill -9); partial downloads are kept for resume."""
        for path in self.ingest_dir.glob("tmp-*"):
            try:
                pid = int(path.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

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
        self.ingest_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"tmp-{os.getpid()}-", dir=self.ingest_dir)
        try:
            with os.fdopen(fd, "wb", buffering=0) as out:
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
            self.adopt(Path(tmp), digest, len(prefix) + nbytes)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def writer(self) -> BlobWriter:
        self.ingest_dir.mkdir(parents=True, exist_ok=True)
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

    def _read_index(self) -> dict:
        path = self.root / "index.json"
        try:
            index = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise NotFoundError(f"{path}: missing; {self.root} is not an OCI image layout") from None
        except ValueError as e:
            raise IntegrityError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
            raise IntegrityError(f"{path}: has no 'manifests' list")
        return index

    def _write_index(self, index: dict) -> None:
        write_atomic(self.root / "index.json", _encode_index(index))

    def list(self) -> list[tuple[str, str]]:
        """(reference, manifest digest) for every tagged model, sorted by reference."""
        out = []
        for entry in self._read_index()["manifests"]:
            ref = _entry_name(entry)
            if ref:
                out.append((ref, entry["digest"]))
        return sorted(out)

    def resolve(self, ref: str | Reference) -> tuple[Reference, str]:
        """Find the manifest digest a reference names; a digest reference must name a stored manifest."""
        parsed = ref if isinstance(ref, Reference) else Reference.parse(ref)
        if parsed.tag is not None:
            key = str(parsed.with_tag(parsed.tag))
            # Layouts written by other tools may name an entry without a tag ("copied", not "copied:latest").
            bare = ref.split("@", 1)[0] if isinstance(ref, str) else key
            for name, digest in self.list():
                if name in (key, bare):
                    if parsed.digest and parsed.digest != digest:
                        raise NotFoundError(f"{parsed}: tag {key} points at {digest}, not {parsed.digest}")
                    return parsed, digest
            raise NotFoundError(f"model {key} is not in the store {self.root} (see 'imgpack list')")
        # A bare digest names a model only if the index holds that manifest: never an arbitrary blob.
        if parsed.digest and any(e.get("digest") == parsed.digest for e in self._read_index()["manifests"]):
            return parsed, parsed.digest
        raise NotFoundError(f"model {parsed} is not in the store {self.root} (see 'imgpack list')")

    def get_manifest(self, ref: str | Reference) -> ModelManifest:
        parsed, digest = self.resolve(ref)
        return self.manifest_by_digest(digest, source=str(parsed))

    def manifest_by_digest(self, digest: str, source: str | None = None) -> ModelManifest:
        raw = self.read_blob(digest)
        return ModelManifest.from_bytes(raw, source=source or digest)

    def put_manifest(self, ref: str | Reference | None, raw: bytes) -> str:
        """Store manifest bytes verbatim and tag them; refused unless every referenced blob is present."""
        manifest = ModelManifest.from_bytes(raw, source=str(ref) if ref else "manifest")
        for blob in manifest.blobs:
            if not self.has_blob(blob.digest):
                what = f"layer {blob.name!r}" if blob.name else "config"
                raise IntegrityError(f"{manifest.source}: {what} blob {blob.digest} is missing from the store")
            actual = self.blob_size(blob.digest)
            if actual != blob.size:
                what = f"layer {blob.name!r}" if blob.name else "config"
                raise IntegrityError(
                    f"{manifest.source}: {what} blob {blob.digest} is {actual} bytes, manifest says {blob.size}"
                )
        digest, _ = self.put_bytes(raw)
        if ref is not None:
            parsed = ref if isinstance(ref, Reference) else Reference.parse(ref)
            self._set_ref(parsed, digest, manifest)
        return digest

    def _set_ref(self, ref: Reference, digest: str, manifest: ModelManifest) -> None:
        if ref.tag is None:
            # Pulled by digest: indexed (so prune keeps it) under a pin annotation, not as a tag.
            self.set_ref_name(str(ref), digest, manifest.media_type, len(manifest.raw), PINNED_ANNOTATION)
        else:
            self.set_ref_name(str(ref.with_tag(ref.tag)), digest, manifest.media_type, len(manifest.raw))

    def set_ref_name(self, name: str, digest: str, media_type: str, size: int,
                     annotation: str = spec.REF_NAME_ANNOTATION) -> None:
        """Point the index entry called ``name`` at a manifest, verbatim (OCI layouts written by other tools
        use bare tags such as ``v1``); any earlier entry of that name is replaced."""
        entry: dict = {"mediaType": media_type, "digest": digest, "size": size}
        if media_type == spec.OCI_MANIFEST:
            entry["artifactType"] = spec.ARTIFACT_TYPE
        entry["annotations"] = {annotation: name}
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
        manifest = self.manifest_by_digest(digest, source=src)
        self._set_ref(parsed_dst, digest, manifest)
        return digest

    def remove(self, ref: str) -> str:
        """Untag a model; its blobs stay until ``prune``."""
        parsed, digest = self.resolve(ref)
        key = str(parsed.with_tag(parsed.tag)) if parsed.tag else str(parsed)
        with self.locked():
            index = self._read_index()
            kept = [e for e in index["manifests"] if _entry_name(e) != key]
            if len(kept) == len(index["manifests"]):
                raise NotFoundError(f"model {key} is not tagged in the store {self.root}")
            index["manifests"] = kept
            self._write_index(index)
        return digest

    # -- maintenance ---------------------------------------------------------------------------------------

    def referenced_blobs(self) -> set[str]:
        """Every blob some indexed manifest needs, the manifests themselves included."""
        keep: set[str] = set()
        pending = [entry.get("digest") for entry in self._read_index()["manifests"]]
        while pending:
            digest = pending.pop()
            if not isinstance(digest, str) or digest in keep:
                continue
            keep.add(digest)
            try:
                document = json.loads(self.blob_path(digest).read_bytes())
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:
                # Not knowing what a manifest references, prune must not guess: refuse rather than delete.
                raise IntegrityError(f"manifest {digest} is unreadable ({e}); fix or rm it before pruning") from None
            # Any OCI manifest or index, not only imgpack's: other tools' images in the layout keep their blobs.
            if not isinstance(document, dict):
                raise IntegrityError(f"manifest {digest} is not a JSON object; fix or rm it before pruning")
            for key in ("config", "subject"):
                if isinstance(document.get(key), dict):
                    keep.add(document[key].get("digest"))
            for layer in document.get("layers") or []:
                if isinstance(layer, dict):
                    keep.add(layer.get("digest"))
            pending.extend(m.get("digest") for m in document.get("manifests") or [] if isinstance(m, dict))
        return {d for d in keep if isinstance(d, str)}

    def prune(self) -> tuple[int, int]:
        """Delete blobs no indexed manifest references, and stale partial downloads; returns (count, bytes)."""
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

    def verify(self, ref: str | None = None, workers: int | None = None) -> VerifyReport:
        """Re-hash every blob of one model (or all) and check each manifest's structure; see packager.verify."""
        from imgpack.conformance.verify import verify_store

        return verify_store(self, ref, workers)

    def index_entries(self) -> list[dict]:
        """The raw ``index.json`` descriptors (for checks that compare them with the manifests they name)."""
        return list(self._read_index()["manifests"])


def _entry_name(entry: dict) -> str:
    """The name an index entry is known by: its ref.name, or the digest reference it was pulled as."""
    annotations = entry.get("annotations") or {}
    return annotations.get(spec.REF_NAME_ANNOTATION) or annotations.get(PINNED_ANNOTATION) or ""


def _encode_index(index: dict) -> bytes:
    return (json.dumps(index, indent=2) + "\n").encode()

