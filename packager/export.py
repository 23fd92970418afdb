"""``imgpack export``: rebuild a diffusers directory from the store, bit-exact.

Safetensors files are rebuilt from their header layer (the original header bytes, verbatim) followed by each
tensor's raw bytes in file order, so the output is byte-identical to the source. Manifests without header
layers (made by other tools) get one standard safetensors file per component. Everything is written into a
sibling temp directory and renamed into place at the end: an interrupted export leaves nothing half-written.
Every blob is re-hashed as it is copied, so a corrupt store cannot produce a silently wrong model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

from imgpack.schemas.errors import ImgpackError, IntegrityError
from imgpack.schemas.manifest import Layer, ModelManifest
from imgpack.schemas.tensorblob import TensorHeader, read_header
from imgpack.store.store import Store

CHUNK = 4 * 1024 * 1024


class _VerifiedBlob:
    """Copies a blob's bytes out while hashing the whole blob; ``close`` checks the digest."""

    def __init__(self, store: Store, layer: Layer) -> None:
        self.layer = layer
        self.file = store.open_blob(layer.digest)
        self.hasher = hashlib.sha256()
        self.read = 0

    def skip_to(self, offset: int) -> None:
        self.copy_to(None, offset - self.read)

    def copy_to(self, out, count: int) -> None:
        while count > 0:
            chunk = self.file.read(min(CHUNK, count))
            if not chunk:
                raise IntegrityError(f"layer {self.layer.name!r}: blob {self.layer.digest} is truncated")
            self.hasher.update(chunk)
            if out is not None:
                out.write(chunk)
            count -= len(chunk)
            self.read += len(chunk)

    def close(self) -> None:
        rest = self.file.read()
        self.hasher.update(rest)
        self.file.close()
        if self.read + len(rest) != self.layer.size or "sha256:" + self.hasher.hexdigest() != self.layer.digest:
            raise IntegrityError(
                f"layer {self.layer.name!r}: blob {self.layer.digest} is corrupt; run 'imgpack verify'"
            )


def _tensor_header(store: Store, layer: Layer) -> TensorHeader:
    """The blob's own header; checked against the descriptor's dtype/shape where the manifest has them."""
    with store.open_blob(layer.digest) as f:
        header = read_header(f, layer.size, f"layer {layer.name!r}")
    if layer.dtype is not None and (header.dtype != layer.dtype or header.shape != layer.shape):
        raise IntegrityError(
            f"layer {layer.name!r}: blob holds {header.dtype} {header.shape}, manifest says {layer.dtype} {layer.shape}"
        )
    return header


def _copy_tensor(store: Store, layer: Layer, out, header: TensorHeader | None = None) -> None:
    start = (header or _tensor_header(store, layer)).data_start
    blob = _VerifiedBlob(store, layer)
    try:
        blob.skip_to(start)
        blob.copy_to(out, layer.size - start)
    finally:
        blob.close()


def _write_from_header(store: Store, manifest: ModelManifest, header_layer: Layer, target: Path,
                       tensors: dict[str, Layer], used: set[str]) -> None:
    raw = store.read_blob(header_layer.digest)
    (n,) = struct.unpack("<Q", raw[:8])
    entries = json.loads(raw[8 : 8 + n])
    entries.pop("__metadata__", None)
    name = header_layer.name or ""
    prefix = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
    order = sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0])
    with open(target, "wb") as out:
        out.write(raw)
        for key, info in order:
            layer = tensors.get(prefix + key)
            if layer is None:
                raise ImgpackError(f"{manifest.source}: {name} needs tensor {prefix + key!r}, which has no layer")
            header = _tensor_header(store, layer)
            if header.dtype != info["dtype"] or header.shape != info["shape"]:
                raise ImgpackError(
                    f"{manifest.source}: layer {layer.name!r} is {header.dtype} {header.shape} but {name}'s header"
                    f" says {info['dtype']} {info['shape']}"
                )
            _copy_tensor(store, layer, out, header)
            used.add(layer.name or "")


def _standard_weights_name(manifest_files: dict[str, bytes], component: str) -> str:
    """transformers components use model.safetensors; diffusers ones diffusion_pytorch_model.safetensors."""
    index = manifest_files.get("model_index.json")
    if index:
        with contextlib.suppress(ValueError, TypeError):
            entry = json.loads(index).get(component)
            if isinstance(entry, list) and entry and entry[0] == "transformers":
                return "model.safetensors"
    return "diffusion_pytorch_model.safetensors"


def _write_synthesised(store: Store, target: Path, layers: list[Layer], prefix: str) -> None:
    ordered = sorted(layers, key=lambda x: x.name or "")
    headers = [_tensor_header(store, layer) for layer in ordered]
    entries: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for layer, header in zip(ordered, headers, strict=True):
        entries[(layer.name or "")[len(prefix):]] = {"dtype": header.dtype, "shape": header.shape,
                                                     "data_offsets": [offset, offset + header.nbytes]}
        offset += header.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(target, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for layer, header in zip(ordered, headers, strict=True):
            _copy_tensor(store, layer, out, header)


def export_model(store: Store, ref: str, directory: str | Path) -> ModelManifest:
    """Write the model ``ref`` as a diffusers directory at ``directory`` (which must not exist or be empty)."""
    manifest = store.get_manifest(ref)
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ImgpackError(f"{target}: already exists and is not an empty directory; refusing to overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        tensors = {layer.name or "": layer for layer in manifest.tensors}
        used: set[str] = set()
        file_bytes: dict[str, bytes] = {}
        for layer in manifest.files:
            path = work / (layer.name or "")
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as out:
                blob = _VerifiedBlob(store, layer)
                try:
                    blob.copy_to(out, layer.size)
                finally:
                    blob.close()
            if layer.name == "model_index.json":
                file_bytes[layer.name] = path.read_bytes()
        for layer in manifest.headers:
            path = work / (layer.name or "")
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_from_header(store, manifest, layer, path, tensors, used)
        rest: dict[str, list[Layer]] = {}
        for name, layer in tensors.items():
            if name not in used:
                rest.setdefault(name.rsplit("/", 1)[0] if "/" in name else "", []).append(layer)
        for folder, layers in sorted(rest.items()):
            weights = _standard_weights_name(file_bytes, folder)
            path = work / folder / weights
            if path.exists():
                raise ImgpackError(f"{manifest.source}: cannot place tensors of {folder}/: {weights} already written")
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_synthesised(store, path, layers, folder + "/" if folder else "")
        if target.exists():
            target.rmdir()
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest
