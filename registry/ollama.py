"""An ollama models directory (``~/.ollama/models``) as a copy target, read and written as ollama's code does.

Layout: ``blobs/sha256-<hex>`` and ``manifests/<host>/<namespace>/<name>/<tag>`` (a manifest file per tag;
``registry.ollama.ai/library`` when a name gives no host or namespace, ``latest`` when it gives no tag). A name
is ``[host/][namespace/]name[:tag]`` as ollama prints it (``z-image``, ``library/z-image:latest``). Writes go
through a temp file renamed into place, so ollama never sees a half-written blob or manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from imgpack.registry.target import BlobSource, BlobStatus, ProgressFn, Stream, file_stream
from imgpack.schemas.digest import check_digest, is_digest, sha256_bytes
from imgpack.schemas.errors import ImgpackError, IntegrityError, NotFoundError, UsageError
from imgpack.schemas.graph import Descriptor, parse_node
from imgpack.store.atomic import atomic_file

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"


def default_models_dir() -> Path:
    """``$OLLAMA_MODELS``, else ``~/.ollama/models`` (ollama's own rule)."""
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"


def is_ollama_dir(path: Path) -> bool:
    return (path / "manifests").is_dir() and (path / "blobs").is_dir()


def manifest_parts(name: str, where: str) -> tuple[str, str, str, str]:
    """``[host/][namespace/]model[:tag]`` -> (host, namespace, model, tag)."""
    model, _, tag = name.partition(":")
    parts = model.split("/")
    if not model or len(parts) > 3 or any(p in ("", ".", "..") or "\\" in p for p in parts) or "/" in tag \
            or tag in (".", ".."):
        raise UsageError(f"{where}: {name!r} is not an ollama model name ([host/][namespace/]model[:tag])")
    if len(parts) == 1:
        parts = [DEFAULT_HOST, DEFAULT_NAMESPACE, *parts]
    elif len(parts) == 2:
        parts = [DEFAULT_HOST, *parts]
    return parts[0], parts[1], parts[2], tag or DEFAULT_TAG


class OllamaTarget:
    """Blobs and tagged manifests in an ollama models directory."""

    def __init__(self, root: Path, label: str | None = None, create: bool = False) -> None:
        self.root = Path(root)
        self.label = label or f"ollama:{root}"
        if create:
            (self.root / "blobs").mkdir(parents=True, exist_ok=True)
            (self.root / "manifests").mkdir(parents=True, exist_ok=True)
        elif not is_ollama_dir(self.root):
            raise NotFoundError(f"{self.root}: not an ollama models directory (needs blobs/ and manifests/)")

    def describe(self, reference: str | None = None) -> str:
        return f"{self.label}:{reference}" if reference else self.label

    def session(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / ("sha256-" + check_digest(digest))

    def manifest_path(self, name: str) -> Path:
        host, namespace, model, tag = manifest_parts(name, self.label)
        return self.root / "manifests" / host / namespace / model / tag

    def names(self) -> list[str]:
        """Every model as ``host/namespace/model:tag``."""
        out = []
        base = self.root / "manifests"
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            parts = path.relative_to(base).parts
            if len(parts) == 4:
                out.append(f"{parts[0]}/{parts[1]}/{parts[2]}:{parts[3]}")
        return out

    def resolve(self, reference: str) -> Descriptor | None:
        if is_digest(reference):
            path = self.blob_path(reference)
            if not path.is_file():
                return None
            raw = path.read_bytes()
        else:
            path = self.manifest_path(reference)
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                return None
        node = parse_node(raw, self.describe(reference))
        return Descriptor(node.media_type, sha256_bytes(raw), len(raw))

    def _manifest_bytes(self, desc: Descriptor) -> bytes | None:
        """A manifest's bytes: a blob (imgpack writes them too) or the file of the tag that holds it."""
        path = self.blob_path(desc.digest)
        if path.is_file():
            return path.read_bytes()
        for name in self.names():
            raw = self.manifest_path(name).read_bytes()
            if sha256_bytes(raw) == desc.digest:
                return raw
        return None

    def exists(self, desc: Descriptor) -> bool:
        try:
            return os.stat(self.blob_path(desc.digest)).st_size == desc.size
        except FileNotFoundError:
            return desc.is_graph_node and self._manifest_bytes(desc) is not None

    def fetch(self, desc: Descriptor, offset: int = 0) -> Stream:
        path = self.blob_path(desc.digest)
        if not path.is_file() and desc.is_graph_node:
            raw = self._manifest_bytes(desc)
            if raw is None:
                raise NotFoundError(f"{self.describe(desc.digest)}: manifest not found")

            @contextlib.contextmanager
            def stream():  # noqa: ANN202
                yield offset, iter([raw[offset:]])

            return stream()
        if not path.is_file():
            raise NotFoundError(f"{self.describe()}: blob {desc.digest} not found")
        return file_stream(lambda: open(path, "rb"), offset)

    def push(self, desc: Descriptor, source: BlobSource, progress: ProgressFn) -> BlobStatus:
        target = self.blob_path(desc.digest)
        if self.exists(desc):
            return BlobStatus.EXISTS
        hasher = hashlib.sha256()
        size = 0
        with atomic_file(target) as out:
            with source.open(0) as (start, chunks):
                if start != 0:
                    raise IntegrityError(f"{desc.digest}: source started at byte {start}")
                for chunk in chunks:
                    hasher.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                    progress(len(chunk))
            if size != desc.size or "sha256:" + hasher.hexdigest() != desc.digest:
                progress(-size)
                raise IntegrityError(f"{self.describe()}: blob {desc.digest} arrived as {size} bytes hashing to"
                                     f" sha256:{hasher.hexdigest()}")
        return BlobStatus.COPIED

    def push_node(self, desc: Descriptor, raw: bytes, reference: str | None = None) -> None:
        node = parse_node(raw, self.describe(reference or desc.digest), desc.media_type)
        for child in node.children:
            if not self.exists(child):
                raise IntegrityError(f"{self.describe(reference)}: {child.digest} is missing; manifest not written")
        if reference is None or is_digest(reference):
            with atomic_file(self.blob_path(desc.digest)) as out:
                out.write(raw)
            return
        path = self.manifest_path(reference)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as out:
            out.write(raw)

    def tag(self, desc: Descriptor, reference: str) -> None:
        raw = self._manifest_bytes(desc)
        if raw is None:
            raise ImgpackError(f"{self.describe()}: {desc.digest} is not here to tag")
        self.push_node(desc, raw, reference)
