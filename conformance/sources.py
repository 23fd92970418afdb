"""Where an artifact under test lives: an OCI layout, the local store, an ollama models directory or a registry.

Every source answers the same four questions — the manifest bytes, a blob's size, a byte range of a blob,
and a blob's bytes as a stream — so the checks never care where the bytes come from. Opening a source that
is not there or not readable raises :class:`LayoutProblem`, which the suite reports as check LAY-001.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgpack.schemas import spec
from imgpack.schemas.digest import check_digest, is_digest
from imgpack.schemas.errors import ImgpackError, UsageError
from imgpack.schemas.reference import Reference

CHUNK = 4 * 1024 * 1024
OLLAMA_DEFAULT_HOST = "registry.ollama.ai"
OLLAMA_DEFAULT_NAMESPACE = "library"


class LayoutProblem(ImgpackError):
    """The target exists as a request but its layout, index or manifest entry cannot be read."""


@dataclass
class Source(ABC):
    """Base class: a manifest plus the blobs it points at."""

    label: str
    #: The descriptor that pointed at the manifest (an index.json entry or registry headers), if any.
    descriptor: dict[str, Any] | None = None
    #: What kind of source this is, for the report (``oci-layout``, ``store``, ``ollama``, ``remote``).
    kind: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @abstractmethod
    def manifest_bytes(self) -> bytes:
        """Each kind of source reads its own storage."""

    @abstractmethod
    def blob_size(self, digest: str) -> int | None:
        """Size of the stored blob, or None when it is missing."""

    @abstractmethod
    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        """Each kind of source reads its own storage."""

    @abstractmethod
    def iter_blob(self, digest: str) -> Iterator[bytes]:
        """Each kind of source reads its own storage."""

    def read_blob(self, digest: str, limit: int) -> bytes:
        """The whole blob, refusing one larger than ``limit`` bytes."""
        size = self.blob_size(digest)
        if size is None:
            raise ImgpackError(f"blob {digest} is missing")
        if size > limit:
            raise ImgpackError(f"blob {digest} is {size} bytes, over the {limit}-byte limit for this check")
        return self.read_range(digest, 0, size)

    def close(self) -> None:  # noqa: B027 - optional hook: local sources hold no connections
        """Release connections; local sources hold none."""


@dataclass
class UnreadableSource(Source):
    """Stands for a target that could not be opened, so the report can still list every check as skipped."""

    def _refuse(self) -> ImgpackError:
        return ImgpackError(f"{self.label}: the target could not be read")

    def manifest_bytes(self) -> bytes:
        raise self._refuse()

    def blob_size(self, digest: str) -> int | None:
        raise self._refuse()

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        raise self._refuse()

    def iter_blob(self, digest: str) -> Iterator[bytes]:
        raise self._refuse()


class _FileBlobs(Source):
    """Blobs stored one file per digest under a directory."""

    @abstractmethod
    def blob_file(self, digest: str) -> Path:
        """Each kind of source reads its own storage."""

    def blob_size(self, digest: str) -> int | None:
        if not is_digest(digest):
            return None
        try:
            return os.stat(self.blob_file(digest)).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        with open(self.blob_file(digest), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def iter_blob(self, digest: str) -> Iterator[bytes]:
        with open(self.blob_file(digest), "rb", buffering=0) as f:
            while chunk := f.read(CHUNK):
                yield chunk


class LayoutSource(_FileBlobs):
    """An OCI image layout directory (``oci:PATH``) or the imgpack store, which is one."""

    def __init__(self, label: str, root: Path, entry: dict[str, Any], kind: str) -> None:
        super().__init__(label=label, descriptor=entry, kind=kind)
        self.root = root
        self.digest = entry["digest"]

    def blob_file(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / check_digest(digest)

    def manifest_bytes(self) -> bytes:
        try:
            return self.blob_file(self.digest).read_bytes()
        except FileNotFoundError:
            raise LayoutProblem(f"{self.root}: index.json names manifest {self.digest}, which has no blob") from None


class OllamaSource(_FileBlobs):
    """An ollama models directory: ``blobs/sha256-<hex>`` and ``manifests/<host>/<ns>/<name>/<tag>``."""

    def __init__(self, label: str, root: Path, manifest_path: Path) -> None:
        super().__init__(label=label, descriptor=None, kind="ollama")
        self.root = root
        self.manifest_path = manifest_path
        self.details["manifest"] = str(manifest_path.relative_to(root))

    def blob_file(self, digest: str) -> Path:
        return self.root / "blobs" / ("sha256-" + check_digest(digest))

    def manifest_bytes(self) -> bytes:
        return self.manifest_path.read_bytes()


# -- target parsing --------------------------------------------------------------------------------------


def _read_index(root: Path) -> list[dict[str, Any]]:
    layout = root / "oci-layout"
    try:
        version = json.loads(layout.read_bytes()).get("imageLayoutVersion")
    except FileNotFoundError:
        raise LayoutProblem(f"{root}: not an OCI image layout (no oci-layout file)") from None
    except (ValueError, AttributeError) as e:
        raise LayoutProblem(f"{layout}: not a JSON object: {e}") from None
    if version != "1.0.0":
        raise LayoutProblem(f"{layout}: imageLayoutVersion is {version!r}, expected '1.0.0'")
    index_path = root / "index.json"
    try:
        index = json.loads(index_path.read_bytes())
    except FileNotFoundError:
        raise LayoutProblem(f"{index_path}: missing") from None
    except ValueError as e:
        raise LayoutProblem(f"{index_path}: not valid JSON: {e}") from None
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise LayoutProblem(f"{index_path}: has no 'manifests' list of descriptors")
    for i, entry in enumerate(entries):
        if not is_digest(entry.get("digest")):
            raise LayoutProblem(f"{index_path}: manifests[{i}].digest {entry.get('digest')!r} is not a sha256 digest")
    return entries


def _ref_name(entry: dict[str, Any]) -> str | None:
    annotations = entry.get("annotations")
    return annotations.get(spec.REF_NAME_ANNOTATION) if isinstance(annotations, dict) else None


def open_layout(root: Path, tag: str | None, label: str, kind: str = "oci-layout") -> LayoutSource:
    """Pick the manifest ``tag`` names in the layout at ``root`` (the only one when ``tag`` is None)."""
    if not root.is_dir():
        raise LayoutProblem(f"{root}: no such directory")
    entries = _read_index(root)
    if tag is None:
        if len(entries) != 1:
            names = ", ".join(sorted(filter(None, map(_ref_name, entries)))) or "none tagged"
            raise LayoutProblem(f"{root}/index.json: holds {len(entries)} manifests ({names}); name one with :TAG")
        return LayoutSource(label, root, entries[0], kind)
    matches = [e for e in entries if _ref_name(e) == tag]
    if not matches:  # the store writes full references; plain OCI layouts often only the tag
        matches = [e for e in entries if (_ref_name(e) or "").rsplit(":", 1)[-1] == tag and ":" not in tag]
    if not matches and is_digest(tag):
        matches = [e for e in entries if e.get("digest") == tag]
    if len(matches) != 1:
        what = "no manifest" if not matches else f"{len(matches)} manifests"
        raise LayoutProblem(f"{root}/index.json: {what} tagged {tag!r}")
    return LayoutSource(label, root, matches[0], kind)


def _split_path_tag(text: str) -> tuple[Path, str | None]:
    """``PATH[:REST]``: the path is the shortest colon-delimited prefix that is an existing directory."""
    if not text:
        raise UsageError("expected a path after the 'oci:' or 'ollama:' prefix")
    start = 0
    while (colon := text.find(":", start)) != -1:
        if Path(text[:colon]).expanduser().is_dir():
            return Path(text[:colon]).expanduser(), text[colon + 1 :] or None
        start = colon + 1
    return Path(text).expanduser(), None


def is_ollama_dir(path: Path) -> bool:
    return (path / "manifests").is_dir() and (path / "blobs").is_dir()


def open_ollama(root: Path, name: str | None, label: str) -> OllamaSource:
    """``name`` is ``[host/][namespace/]model[:tag]``; without it the directory must hold one manifest."""
    if not is_ollama_dir(root):
        raise LayoutProblem(f"{root}: not an ollama models directory (needs blobs/ and manifests/)")
    manifests = root / "manifests"
    if name is None:
        found = sorted(p for p in manifests.rglob("*") if p.is_file())
        if len(found) != 1:
            listed = ", ".join(str(p.relative_to(manifests)) for p in found[:10]) or "none"
            raise LayoutProblem(f"{manifests}: holds {len(found)} manifests ({listed}); name one as :MODEL:TAG")
        return OllamaSource(label, root, found[0])
    model, _, tag = name.partition(":")
    parts = model.split("/")
    if not model or len(parts) > 3 or any(p in ("", ".", "..") for p in parts) or "/" in tag:
        raise UsageError(f"{label}: {name!r} is not an ollama model name ([host/][namespace/]model[:tag])")
    if len(parts) == 1:
        parts = [OLLAMA_DEFAULT_HOST, OLLAMA_DEFAULT_NAMESPACE, *parts]
    elif len(parts) == 2:
        parts = [OLLAMA_DEFAULT_HOST, *parts]
    path = manifests.joinpath(*parts, tag or "latest")
    if not path.is_file():
        raise LayoutProblem(f"{root}: no manifest {path.relative_to(root)}")
    return OllamaSource(label, root, path)


def open_target(target: str, store_path: str | None = None, *, insecure: bool = False,
                local: bool = False) -> Source:
    """Interpret TARGET: ``oci:PATH[:TAG]``, ``ollama:PATH[:MODEL:TAG]``, a directory, or a reference."""
    if target.startswith("oci:"):
        path, tag = _split_path_tag(target[4:])
        return open_layout(path, tag, target)
    if target.startswith("ollama:"):
        path, name = _split_path_tag(target[7:])
        return open_ollama(path, name, target)
    path = Path(target).expanduser()
    if path.is_dir():
        if (path / "oci-layout").exists():
            return open_layout(path, None, target)
        if is_ollama_dir(path):
            return open_ollama(path, None, target)
        raise LayoutProblem(f"{path}: neither an OCI image layout (oci-layout) nor an ollama models directory")
    if os.sep in target and not target.startswith(("localhost", ".")) and target.startswith(("/", "~")):
        raise LayoutProblem(f"{target}: no such directory")
    ref = Reference.parse(target)
    if ref.is_remote and not local:
        from imgpack.conformance.remote import RemoteSource

        return RemoteSource.open(ref, insecure=insecure)
    from imgpack.store.store import Store, default_root

    root = Path(store_path).expanduser() if store_path else default_root()
    store = Store.open(root, create=False)
    parsed, digest = store.resolve(ref)
    entry = next((e for e in _read_index(root) if e.get("digest") == digest
                  and _ref_name(e) == str(parsed.with_tag(parsed.tag))), None)
    if entry is None:
        entry = {"digest": digest}
    return LayoutSource(str(parsed), root, entry, "store")
