"""``imgpack verify``: is every stored model intact and well-formed?

Integrity first — every blob re-hashed and sized against its descriptor, on a small thread pool — then the
structure a consumer relies on: the index entry matches the manifest, the config blob validates, JSON layers
parse, ``model_index.json`` is there and each component it lists has layers, safetensors header layers agree
with the tensor layers, and OCI-flavour tensor blobs are in the strict spec v1 form. Architecture rules (which
tensors a Z-Image transformer needs) belong to ``imgpack conformance`` and the runtime loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from imgpack.schemas import spec
from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.manifest import Layer, ModelManifest
from imgpack.schemas.tensorblob import read_header
from imgpack.schemas.validate import schema_errors
from imgpack.store.store import Store

CHUNK = 4 * 1024 * 1024


@dataclass
class VerifyReport:
    manifests: int = 0
    blobs: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class _BlobUse:
    model: str
    layer: Layer
    strict: bool  # OCI flavour: tensor blobs must be in the strict spec v1 form

    @property
    def label(self) -> str:
        return f"{self.model}: layer {self.layer.name!r}" if self.layer.name else f"{self.model}: config"


def verify_store(store: Store, ref: str | None = None, workers: int | None = None) -> VerifyReport:
    report = VerifyReport()
    if ref is not None:
        parsed, digest = store.resolve(ref)
        targets = [(str(parsed), digest)]
    else:
        targets = store.list()
    sizes = {e.get("digest"): e.get("size") for e in store.index_entries()}
    uses: dict[str, _BlobUse] = {}
    manifests: list[ModelManifest] = []
    for name, digest in targets:
        report.manifests += 1
        try:
            manifest = store.manifest_by_digest(digest, source=name)
        except ImgpackError as e:
            report.problems.append(str(e))
            continue
        if digest in sizes and sizes[digest] != len(manifest.raw):
            report.problems.append(
                f"{name}: index.json says the manifest is {sizes[digest]} bytes, it is {len(manifest.raw)}"
            )
        manifests.append(manifest)
        for blob in manifest.blobs:
            uses.setdefault(blob.digest, _BlobUse(name, blob, manifest.flavour == "oci"))

    with ThreadPoolExecutor(max_workers=workers or min(4, (os.cpu_count() or 2))) as pool:
        intact: dict[str, bool] = {}
        for digest, problem in zip(sorted(uses), pool.map(lambda d: _check_blob(store, d, uses[d]), sorted(uses)),
                                   strict=True):
            intact[digest] = problem is None
            if problem:
                report.problems.append(problem)
    for manifest in manifests:
        report.problems.extend(_structure_problems(store, manifest, intact))
    report.blobs = len(uses)
    report.bytes = sum(use.layer.size for use in uses.values())
    return report


def _check_blob(store: Store, digest: str, use: _BlobUse) -> str | None:
    blob, label = use.layer, use.label
    path = store.blob_path(digest)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{label}: blob {digest} is missing"
    if size != blob.size:
        return f"{label}: blob {digest} is {size} bytes, manifest says {blob.size}"
    hasher = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            hasher.update(view[:n])
    if "sha256:" + hasher.hexdigest() != digest:
        return f"{label}: blob {digest} is corrupt (content hashes to sha256:{hasher.hexdigest()})"
    if blob.media_type == spec.TENSOR_MEDIA_TYPE:
        try:
            with open(path, "rb") as f:
                header = read_header(f, size, label)
        except ImgpackError as e:
            return str(e)
        if blob.dtype is not None and (header.dtype != blob.dtype or header.shape != blob.shape):
            return f"{label}: blob header says {header.dtype} {header.shape}, manifest says {blob.dtype} {blob.shape}"
        if use.strict and header.deviations:
            return f"{label}: tensor blob is not in the spec v1 form: {'; '.join(header.deviations)}"
    return None


def _structure_problems(store: Store, manifest: ModelManifest, intact: dict[str, bool]) -> list[str]:
    name = manifest.source
    problems: list[str] = []

    def readable(layer: Layer) -> bytes | None:
        return store.read_blob(layer.digest, verify=False) if intact.get(layer.digest) else None

    config_raw = readable(manifest.config)
    if config_raw is not None and manifest.flavour == "oci":
        try:
            errors = schema_errors("config", json.loads(config_raw))
        except ValueError as e:
            errors = [f"not JSON: {e}"]
        problems.extend(f"{name}: config blob: {error}" for error in errors[:3])
    for layer in manifest.files:
        raw = readable(layer)
        if raw is not None and layer.is_json:
            try:
                json.loads(raw)
            except ValueError as e:
                problems.append(f"{name}: layer {layer.name!r} is not valid JSON: {e}")
    index_layer = manifest.find("model_index.json")
    if index_layer is None:
        problems.append(f"{name}: no model_index.json layer; this is not a diffusers model")
    elif (raw := readable(index_layer)) is not None:
        try:
            model_index = json.loads(raw)
        except ValueError:
            model_index = None  # reported above
        if isinstance(model_index, dict):
            if not isinstance(model_index.get("_class_name"), str):
                problems.append(f"{name}: model_index.json has no string '_class_name'")
            folders = {layer.component for layer in manifest.layers}
            for key, value in model_index.items():
                if not key.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None:
                    if key not in folders:
                        problems.append(f"{name}: component {key!r} in model_index.json has no layers under {key}/")
    tensors = {layer.name: layer for layer in manifest.tensors}
    for layer in manifest.headers:
        raw = readable(layer)
        if raw is not None:
            problems.extend(_header_layer_problems(name, layer, raw, tensors))
    return problems


def _header_layer_problems(model: str, layer: Layer, raw: bytes, tensors: dict[str | None, Layer]) -> list[str]:
    where = f"{model}: header layer {layer.name!r}"
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        if 8 + n != len(raw):
            return [f"{where}: length prefix {n} does not match its {len(raw) - 8} header bytes"]
        entries = json.loads(raw[8:])
        entries.pop("__metadata__", None)
    except (struct.error, ValueError, AttributeError) as e:
        return [f"{where}: not a safetensors header: {e}"]
    prefix = (layer.name or "").rsplit("/", 1)[0] + "/" if "/" in (layer.name or "") else ""
    problems = []
    for key, info in entries.items():
        tensor = tensors.get(prefix + key)
        if tensor is None:
            problems.append(f"{where}: lists tensor {prefix + key!r}, which has no layer")
        elif isinstance(info, dict) and tensor.dtype is not None and (
            info.get("dtype") != tensor.dtype or info.get("shape") != tensor.shape
        ):
            problems.append(f"{where}: tensor {prefix + key!r} is {info.get('dtype')} {info.get('shape')} there,"
                            f" {tensor.dtype} {tensor.shape} in its layer")
    return problems


__all__ = ["VerifyReport", "verify_store"]
