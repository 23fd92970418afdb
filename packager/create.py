"""``imgpack create``: split a diffusers model directory into per-tensor blobs and index a manifest.

The work is planned first (every header parsed and checked, every name validated) so a bad file is refused
before a byte is written; then tensors are streamed into blobs on a small thread pool (hashlib and file I/O
release the GIL, so both cores work). A per-store cache keyed by path, size, mtime and inode remembers the
digests of files already packed, so re-creating an unchanged directory re-reads nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path

from imgpack.packager.safetensors_file import SafetensorsFile, SourceTensor, read_safetensors_header
from imgpack.schemas import spec
from imgpack.schemas.digest import sha256_bytes
from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.manifest import Layer, build_manifest, check_tree, encode_json, title_for
from imgpack.schemas.names import check_name
from imgpack.schemas.reference import Reference
from imgpack.schemas.tensorblob import encode_header
from imgpack.schemas.validate import validate
from imgpack.store.store import Store, write_atomic

#: Weight formats imgpack does not pack: pickles can run code, and diffusers ships safetensors beside them.
LEGACY_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5", ".onnx", ".gguf")
SMALL_TENSOR = 16 * 1024 * 1024
CHUNK = 4 * 1024 * 1024
CACHE_VERSION = 1


def imgpack_version() -> str:
    try:
        return importlib_metadata.version("imgpack")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass
class TensorJob:
    name: str
    source: SourceTensor
    file: SafetensorsFile
    layer: Layer | None = None
    new: bool = False  # this run wrote the blob (so it can be withdrawn if the source changed underneath)


@dataclass
class CreateResult:
    reference: str
    digest: str
    layers: int
    tensors: int
    total_bytes: int
    new_blobs: int
    new_bytes: int
    reused_blobs: int
    cached_files: int
    skipped: list[str] = field(default_factory=list)


ProgressFn = Callable[[int], None]


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def scan_model_dir(directory: Path) -> tuple[dict, list[Path], list[Path], list[str]]:
    """Check that ``directory`` is a diffusers model; returns (model_index, safetensors, other files, skipped)."""
    if not directory.is_dir():
        raise ImgpackError(f"{directory}: not a directory")
    index_path = directory / "model_index.json"
    if not index_path.is_file():
        raise ImgpackError(f"{directory}: not a diffusers model directory (no model_index.json)")
    try:
        model_index = json.loads(index_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImgpackError(f"{index_path}: not valid JSON: {e}") from None
    if not isinstance(model_index, dict) or not isinstance(model_index.get("_class_name"), str):
        raise ImgpackError(f"{index_path}: must be a JSON object with a string '_class_name'")
    for key, value in model_index.items():
        if key.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        if not (directory / key).is_dir():
            raise ImgpackError(f"{index_path}: component {key!r} ({value[0]}.{value[1]}) has no folder {key}/")
    safetensors: list[Path] = []
    others: list[Path] = []
    skipped: list[str] = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for fname in sorted(files):
            path = Path(root) / fname
            rel = path.relative_to(directory)
            if _is_hidden(rel):
                continue
            if not path.is_file():
                raise ImgpackError(f"{path}: not a regular file (broken symlink?)")
            if fname.endswith(".safetensors"):
                safetensors.append(path)
            elif fname.endswith(LEGACY_WEIGHT_SUFFIXES):
                skipped.append(rel.as_posix())
            else:
                others.append(path)
    for key, value in model_index.items():
        if key.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        has_weights_elsewhere = any(s.startswith(key + "/") for s in skipped)
        has_safetensors = any(p.relative_to(directory).parts[0] == key for p in safetensors)
        if has_weights_elsewhere and not has_safetensors:
            raise ImgpackError(
                f"{directory / key}: component {key!r} has only legacy weight files"
                f" ({', '.join(s for s in skipped if s.startswith(key + '/'))}); convert them to .safetensors"
            )
    return model_index, safetensors, others, skipped


class _Cache:
    """Digests of already-packed files, keyed by (path, size, mtime_ns, inode); one JSON file per store."""

    def __init__(self, store: Store) -> None:
        self.path = store.state_dir / "create-cache.json"
        self.entries: dict[str, dict] = {}
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self.path.read_bytes())
            if data.get("version") == CACHE_VERSION:
                self.entries = data["files"]
        self.lock = threading.Lock()

    @staticmethod
    def key(path: Path) -> str:
        st = os.stat(path)
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"

    def get(self, path: Path) -> dict | None:
        return self.entries.get(self.key(path))

    def put(self, path: Path, value: dict) -> None:
        with self.lock:
            self.entries[self.key(path)] = value

    def save(self) -> None:
        if len(self.entries) > 20000:  # keep the newest entries only
            self.entries = dict(list(self.entries.items())[-20000:])
        write_atomic(self.path, json.dumps({"version": CACHE_VERSION, "files": self.entries}).encode())


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.new_blobs = 0
        self.new_bytes = 0
        self.reused = 0

    def add(self, new: bool, size: int) -> None:
        with self.lock:
            if new:
                self.new_blobs += 1
                self.new_bytes += size
            else:
                self.reused += 1


def _pack_tensor(store: Store, job: TensorJob, counters: _Counters, progress: ProgressFn | None) -> Layer:
    """Write one tensor blob (header + raw bytes) unless the store already has it."""
    try:
        return _pack_tensor_unchecked(store, job, counters, progress)
    except OSError as e:
        raise ImgpackError(f"{job.file.path}: tensor {job.source.key!r}: {e.strerror or e}") from None


def _pack_tensor_unchecked(store: Store, job: TensorJob, counters: _Counters, progress: ProgressFn | None) -> Layer:
    """Hash the tensor's bytes, then copy them into a blob only if the store lacks that digest.

    Small tensors are read once into memory; large ones are hashed in chunks and then copied file-to-file
    in the kernel (copy_file_range), so their bytes never pass through Python twice.
    """
    t = job.source
    header = encode_header(t.dtype, t.shape)
    size = len(header) + t.nbytes
    hasher = hashlib.sha256(header)
    with open(job.file.path, "rb", buffering=0) as f:
        f.seek(t.offset)
        data: bytes | None = None
        if t.nbytes <= SMALL_TENSOR:
            data = f.read(t.nbytes)
            if len(data) != t.nbytes:
                raise ImgpackError(f"{job.file.path}: tensor {t.key!r}: file shrank while reading")
            hasher.update(data)
        else:
            remaining = t.nbytes
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while remaining:
                n = f.readinto(view[: min(CHUNK, remaining)])
                if not n:
                    raise ImgpackError(f"{job.file.path}: tensor {t.key!r}: file shrank while reading")
                hasher.update(view[:n])
                remaining -= n
        digest = "sha256:" + hasher.hexdigest()
        job.new = not store.has_blob(digest, size)
        if job.new:
            if data is not None:
                store.put_known(digest, header + data)
            else:
                store.put_known(digest, header, f.fileno(), t.offset, t.nbytes)
    if progress:
        progress(t.nbytes)
    counters.add(job.new, size)
    return _tensor_layer(job.name, digest, size, t.dtype, t.shape)


def _tensor_layer(name: str, digest: str, size: int, dtype: str, shape: list[int]) -> Layer:
    return Layer(
        spec.TENSOR_MEDIA_TYPE, digest, size, name, dtype, list(shape),
        {spec.TITLE_ANNOTATION: title_for(name, spec.TENSOR_MEDIA_TYPE)},
    )


def _pack_file(store: Store, path: Path, name: str, media_type: str, counters: _Counters) -> Layer:
    try:
        return _pack_file_unchecked(store, path, name, media_type, counters)
    except OSError as e:
        raise ImgpackError(f"{path}: cannot read: {e.strerror or e}") from None


def _pack_file_unchecked(store: Store, path: Path, name: str, media_type: str, counters: _Counters) -> Layer:
    with store.writer() as w, open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            w.write(view[:n])
        digest = w.current_digest()
        new = not store.has_blob(digest, w.size)
        if new:
            w.commit(digest, w.size)
        else:
            w.abort()
        counters.add(new, w.size)
        size = w.size
    return Layer(media_type, digest, size, name, annotations={spec.TITLE_ANNOTATION: title_for(name, media_type)})


def _file_media_type(path: Path, name: str) -> str:
    if path.suffix == ".json":
        try:
            json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ImgpackError(f"{path}: config file is not valid JSON: {e}") from None
        return spec.JSON_MEDIA_TYPE
    return spec.FILE_MEDIA_TYPE


def model_config(model_index: dict, tensors: list[Layer], created: str | None) -> dict:
    """The config blob: a reproducible summary (no timestamp unless asked for)."""
    components: dict[str, dict] = {}
    for key, value in sorted(model_index.items()):
        if not key.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None:
            components[key] = {"library": value[0], "class": value[1], "tensors": 0, "parameters": 0,
                               "tensorBytes": 0, "dtypes": []}
    for layer in tensors:
        comp = components.setdefault(layer.component or ".", {"library": None, "class": None, "tensors": 0,
                                                              "parameters": 0, "tensorBytes": 0, "dtypes": []})
        comp["tensors"] += 1
        comp["parameters"] += math.prod(layer.shape or [])
        comp["tensorBytes"] += layer.size
        if layer.dtype not in comp["dtypes"]:
            comp["dtypes"].append(layer.dtype)
    for comp in components.values():
        comp["dtypes"].sort()
    config = {
        "specVersion": spec.SPEC_VERSION,
        "imgpackVersion": imgpack_version(),
        "format": "diffusers",
        "architecture": model_index["_class_name"],
        "components": components,
        "parameterCount": sum(c["parameters"] for c in components.values()),
        "tensorBytes": sum(c["tensorBytes"] for c in components.values()),
        "dtypes": sorted({layer.dtype for layer in tensors if layer.dtype}),
    }
    if created:
        config["created"] = created
    validate("config", config, "config blob")
    return config


def create_model(
    store: Store,
    ref: str,
    directory: str | Path,
    fmt: str = "oci",
    *,
    exclude: list[str] | None = None,
    timestamp: bool = False,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    plan_done: Callable[[int], None] | None = None,
) -> CreateResult:
    """Pack ``directory`` into ``store`` under ``ref``; returns what was written and what was reused."""
    if fmt not in ("oci", "ollama"):
        raise ImgpackError(f"unknown format {fmt!r} (use 'oci' or 'ollama')")
    reference = Reference.parse(ref)
    if reference.digest:
        raise ImgpackError(f"{ref}: a model name cannot contain a digest; use NAME[:TAG]")
    directory = Path(directory)
    model_index, st_paths, other_paths, skipped = scan_model_dir(directory)
    excluded = [p for p in exclude or []]

    def wanted(rel: str) -> bool:
        return not any(Path(rel).match(pattern) for pattern in excluded)

    # Plan: parse and check every header, validate every name, before writing anything.
    files: list[tuple[SafetensorsFile, str]] = []
    owner: dict[str, str] = {}
    jobs: list[TensorJob] = []
    for path in st_paths:
        rel = path.relative_to(directory).as_posix()
        if not wanted(rel):
            skipped.append(rel)
            continue
        st_file = read_safetensors_header(path, label=str(path))
        prefix = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
        check_name(rel, str(path))
        files.append((st_file, rel))
        for t in st_file.tensors:
            name = prefix + t.key
            check_name(name, f"{path}: tensor {t.key!r}")
            if name in owner:
                raise ImgpackError(
                    f"{path}: duplicate tensor name {t.key!r} (also in {owner[name]});"
                    " exclude one of the files with --exclude"
                )
            owner[name] = rel
            jobs.append(TensorJob(name, t, st_file))
    plain: list[tuple[Path, str, str]] = []
    for path in other_paths:
        rel = path.relative_to(directory).as_posix()
        if not wanted(rel):
            skipped.append(rel)
            continue
        check_name(rel, str(path))
        if rel in owner:
            raise ImgpackError(f"{path}: file name {rel!r} collides with a tensor name from {owner[rel]}")
        plain.append((path, rel, _file_media_type(path, rel)))
    if not jobs:
        raise ImgpackError(f"{directory}: no .safetensors weights found")
    check_tree([job.name for job in jobs] + [rel for _, rel, _ in plain], str(directory))
    stats_before = {str(f.path): os.stat(f.path) for f, _ in files}
    total = sum(j.source.nbytes for j in jobs)
    if plan_done:
        plan_done(total)

    cache = _Cache(store)
    counters = _Counters()
    cached_files = 0
    with store.writing():
        # Files whose (path, size, mtime, inode) match the cache and whose blobs are all present are not re-read.
        pending: list[TensorJob] = []
        by_file: dict[str, list[TensorJob]] = {}
        for job in jobs:
            by_file.setdefault(str(job.file.path), []).append(job)
        for st_file, _ in files:
            file_jobs = by_file.get(str(st_file.path), [])
            hit = cache.get(st_file.path)
            if hit and _cache_hit_usable(store, hit, file_jobs):
                for job in file_jobs:
                    digest, size = hit["tensors"][job.source.key]
                    job.layer = _tensor_layer(job.name, digest, size, job.source.dtype, job.source.shape)
                    counters.add(False, size)
                cached_files += 1
                if progress:
                    progress(sum(j.source.nbytes for j in file_jobs))
            else:
                pending.extend(file_jobs)
        pending.sort(key=lambda j: -j.source.nbytes)  # big first: better load balance
        n_workers = workers or max(2, min(4, (os.cpu_count() or 2) + 1))
        pool = ThreadPoolExecutor(max_workers=n_workers)
        try:
            futures = {id(job): pool.submit(_pack_tensor, store, job, counters, progress) for job in pending}
            for job in pending:
                job.layer = futures[id(job)].result()
        except BaseException:
            # Ctrl-C or a failed tensor: drop the queued work instead of packing the rest of the model first.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown()
        for st_file, _rel in files:
            now = os.stat(st_file.path)
            before = stats_before[str(st_file.path)]
            if (now.st_size, now.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                for job in by_file.get(str(st_file.path), []):
                    if job.new and job.layer:
                        store.blob_path(job.layer.digest).unlink(missing_ok=True)
                raise ImgpackError(f"{st_file.path}: file changed while it was being packed; run create again")
            cache.put(st_file.path, {
                "tensors": {j.source.key: [j.layer.digest, j.layer.size] for j in by_file.get(str(st_file.path), [])}
            })
        header_layers = []
        for st_file, rel in files:
            new = not store.has_blob(sha256_bytes(st_file.header_bytes), len(st_file.header_bytes))
            digest, size = store.put_bytes(st_file.header_bytes)
            counters.add(new, size)
            header_layers.append(Layer(
                spec.SAFETENSORS_HEADER_MEDIA_TYPE, digest, size, rel,
                annotations={spec.TITLE_ANNOTATION: title_for(rel, spec.SAFETENSORS_HEADER_MEDIA_TYPE)},
            ))
        file_layers = [_pack_file(store, path, rel, media_type, counters) for path, rel, media_type in plain]
        tensor_layers = sorted((job.layer for job in jobs if job.layer), key=lambda layer: layer.name or "")
        created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if timestamp else None
        config = model_config(model_index, tensor_layers, created)
        config_raw = encode_json(config)
        config_digest, config_size = store.put_bytes(config_raw)
        config_type = spec.CONFIG_MEDIA_TYPE if fmt == "oci" else spec.OLLAMA_CONFIG_MEDIA_TYPE
        layers = sorted(file_layers, key=lambda x: x.name or "") + header_layers + tensor_layers
        annotations = {spec.CREATED_ANNOTATION: created} if created else None
        raw = build_manifest(Layer(config_type, config_digest, config_size), layers, fmt, annotations)
        digest = store.put_manifest(reference, raw)
    with contextlib.suppress(OSError):
        cache.save()
    return CreateResult(
        reference=str(reference),
        digest=digest,
        layers=len(layers),
        tensors=len(tensor_layers),
        total_bytes=sum(layer.size for layer in layers) + config_size,
        new_blobs=counters.new_blobs,
        new_bytes=counters.new_bytes,
        reused_blobs=counters.reused,
        cached_files=cached_files,
        skipped=sorted(skipped),
    )


def _cache_hit_usable(store: Store, hit: dict, jobs: list[TensorJob]) -> bool:
    tensors = hit.get("tensors") or {}
    if len(tensors) != len(jobs):
        return False
    for job in jobs:
        entry = tensors.get(job.source.key)
        if not entry or not store.has_blob(entry[0], entry[1]):
            return False
    return True
