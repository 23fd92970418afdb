"""``imgpack save`` / ``load``: a model as one ``.tar.zst`` file, for air-gapped machines and artifact stores.

The archive is an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/…``) in a tar stream,
compressed with zstandard. Everything streams: saving reads each blob once into the compressor, loading writes
each blob through the store's verifying writer, so a truncated or tampered archive can add no blob that does not
match its digest, and a manifest is only indexed once all its blobs are in. ``tar --zstd -xf`` (or
``zstd -d | tar x``) unpacks it into a layout that skopeo and oras read as ``oci:DIR``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zstandard

from imgpack.schemas import spec
from imgpack.schemas.digest import is_digest
from imgpack.schemas.errors import ImgpackError, IntegrityError
from imgpack.schemas.manifest import ModelManifest
from imgpack.schemas.reference import Reference
from imgpack.store.store import PINNED_ANNOTATION, Store

CHUNK = 4 * 1024 * 1024


@dataclass
class LoadResult:
    references: list[str]
    blobs: int
    new_blobs: int
    bytes: int


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def save(store: Store, refs: list[str], path: str | Path, level: int = 3) -> int:
    """Write the models ``refs`` (with every blob they need, once) to ``path``; returns the archive size."""
    entries = []
    blobs: dict[str, int] = {}
    for ref in refs:
        parsed, digest = store.resolve(ref)
        manifest = store.manifest_by_digest(digest, source=str(parsed))
        # A digest reference travels pinned, as it is stored: it must not become someone's :latest.
        annotation = spec.REF_NAME_ANNOTATION if parsed.tag else PINNED_ANNOTATION
        name = str(parsed.with_tag(parsed.tag)) if parsed.tag else str(parsed)
        entries.append({"mediaType": manifest.media_type, "digest": digest, "size": len(manifest.raw),
                        "annotations": {annotation: name}})
        blobs[digest] = len(manifest.raw)
        for blob in manifest.blobs:
            blobs[blob.digest] = blob.size
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    try:
        compressor = zstandard.ZstdCompressor(level=level, threads=-1)
        with os.fdopen(fd, "wb") as raw, compressor.stream_writer(raw) as zst, \
                tarfile.open(fileobj=zst, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
            _add_bytes(tar, "index.json", json.dumps({"schemaVersion": 2, "manifests": entries}, indent=2).encode())
            for digest in sorted(blobs):
                info = tarfile.TarInfo("blobs/sha256/" + digest.split(":", 1)[1])
                info.size = store.blob_size(digest)
                info.mode = 0o644
                if info.size != blobs[digest]:
                    raise IntegrityError(f"blob {digest} is {info.size} bytes, its manifest says {blobs[digest]}")
                with store.open_blob(digest) as f:
                    tar.addfile(info, f)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target.stat().st_size


def load(store: Store, path: str | Path) -> LoadResult:
    """Add every model in the archive at ``path`` to ``store``; blobs are verified as they are written."""
    source = Path(path)
    if not source.is_file():
        raise ImgpackError(f"{source}: no such archive")
    index: dict | None = None
    seen = new = total = 0
    try:
        with open(source, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as zst, \
                tarfile.open(fileobj=zst, mode="r|") as tar, store.writing():
            for member in tar:
                name = member.name.removeprefix("./")
                if not member.isfile():
                    continue
                if name == "index.json":
                    index = json.loads(_read_member(tar, member, source, 16 * 1024 * 1024))
                elif name.startswith("blobs/sha256/"):
                    digest = "sha256:" + name.rsplit("/", 1)[1]
                    if not is_digest(digest):
                        raise ImgpackError(f"{source}: unexpected archive member {member.name!r}")
                    seen += 1
                    total += member.size
                    if store.has_blob(digest, member.size):
                        continue
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    with store.writer() as w:
                        while chunk := extracted.read(CHUNK):
                            w.write(chunk)
                        w.commit(digest, member.size)
                    new += 1
                elif name != "oci-layout":
                    raise ImgpackError(f"{source}: unexpected archive member {member.name!r}")
            if index is None:
                raise ImgpackError(f"{source}: not an imgpack archive (no index.json)")
            references = []
            entries = index.get("manifests") if isinstance(index, dict) else None
            if not isinstance(entries, list):
                raise ImgpackError(f"{source}: index.json has no 'manifests' list")
            for i, entry in enumerate(entries):
                annotations = entry.get("annotations") if isinstance(entry, dict) else None
                annotations = annotations if isinstance(annotations, dict) else {}
                ref = annotations.get(spec.REF_NAME_ANNOTATION) or annotations.get(PINNED_ANNOTATION)
                digest = entry.get("digest", "") if isinstance(entry, dict) else ""
                if not isinstance(ref, str) or not is_digest(digest):
                    raise ImgpackError(f"{source}: index.json manifests[{i}] lacks a reference name or digest")
                raw_manifest = store.read_blob(digest)
                ModelManifest.from_bytes(raw_manifest, source=f"{source}: {ref}")
                store.put_manifest(Reference.parse(ref), raw_manifest)
                references.append(ref)
    except (zstandard.ZstdError, tarfile.TarError, EOFError) as e:
        raise IntegrityError(f"{source}: damaged or truncated archive: {e}") from None
    except json.JSONDecodeError as e:
        raise ImgpackError(f"{source}: index.json is not valid JSON: {e}") from None
    return LoadResult(references, seen, new, total)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, source: Path, limit: int) -> bytes:
    if member.size > limit:
        raise ImgpackError(f"{source}: {member.name} is {member.size} bytes, over the {limit}-byte limit")
    extracted = tar.extractfile(member)
    assert extracted is not None
    return extracted.read()
