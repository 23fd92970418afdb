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
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from imgpack.packager.source_dir import ModelDir, scan_model_dir
from imgpack.packager.transform import StoragePolicy, Transform, transform_tensor
from imgpack.schemas import spec
from imgpack.schemas.config import model_config
from imgpack.schemas.digest import sha256_bytes
from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.jsondoc import parse_json
from imgpack.schemas.manifest import Layer, build_manifest, check_tree, encode_json, title_for
from imgpack.schemas.names import check_name
from imgpack.schemas.reference import Reference
from imgpack.schemas.safetensors import Entry, Header, encode_header, read_source_file
from imgpack.store.atomic import write_atomic
from imgpack.store.store import Store

SMALL_TENSOR = 16 * 1024 * 1024
CHUNK = 4 * 1024 * 1024
CACHE_VERSION = 2


@dataclass(frozen=True)
class SourceFile:
    """A weights file as planned: where it is, its relative path and its checked header."""

    path: Path
    rel: str
    size: int
    header: Header


@dataclass
class TensorJob:
    name: str
    entry: Entry
    file: SourceFile
    transform: Transform | None = None
    layer: Layer | None = None
    new: bool = False  # this run wrote the blob (so it can be withdrawn if the source changed underneath)

    @property
    def offset(self) -> int:
        """Absolute offset of the tensor's bytes in its file."""
        return self.file.header.data_start + self.entry.begin


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
    quantized: int = 0
    cast: int = 0


ProgressFn = Callable[[int], None]


def read_weights_header(path: Path, rel: str) -> SourceFile:
    """Parse and check a weights file's header before anything is written."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = read_source_file(f, size, str(path))
    except OSError as e:
        raise ImgpackError(f"{path}: cannot read: {e.strerror or e}") from None
    return SourceFile(path, rel, size, header)


class _Cache:
    """Digests of already-packed files, keyed by (path, size, mtime_ns, inode); one JSON file per store."""

    def __init__(self, store: Store, policy: StoragePolicy) -> None:
        self.path = store.state_dir / "create-cache.json"
        #: Digests depend on how tensors are stored: entries are kept per storage policy.
        self.variant = f"|q={policy.quant.name if policy.quant else ''}|d={policy.dtype or ''}"
        self.entries: dict[str, dict] = {}
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self.path.read_bytes())
            if data.get("version") == CACHE_VERSION:
                self.entries = data["files"]
        self.lock = threading.Lock()

    def key(self, path: Path) -> str:
        st = os.stat(path)
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}{self.variant}"

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
        raise ImgpackError(f"{job.file.path}: tensor {job.entry.key!r}: {e.strerror or e}") from None


def _pack_transformed(store: Store, job: TensorJob, counters: _Counters, progress: ProgressFn | None) -> Layer:
    """Quantize or cast one tensor (bounded: one tensor in memory per worker) and store its new blob."""
    t = job.entry
    assert job.transform is not None
    with open(job.file.path, "rb", buffering=0) as f:
        f.seek(job.offset)
        data = f.read(t.nbytes)
    if len(data) != t.nbytes:
        raise ImgpackError(f"{job.file.path}: tensor {t.key!r}: file shrank while reading")
    parts, dtype, shape, annotations = transform_tensor(job.name, data, t.dtype, t.shape, job.transform)
    del data
    with store.writer() as w:
        for part in parts:
            w.write(part)
        job.new = w.keep_if_new()
        digest, size = w.current_digest(), w.size
    if progress:
        progress(t.nbytes)
    counters.add(job.new, size)
    return tensor_layer(job.name, digest, size, dtype, shape, annotations)


def _pack_tensor_unchecked(store: Store, job: TensorJob, counters: _Counters, progress: ProgressFn | None) -> Layer:
    """Hash the tensor's bytes, then copy them into a blob only if the store lacks that digest.

    Small tensors are read once into memory; large ones are hashed in chunks and then copied file-to-file
    in the kernel (copy_file_range), so their bytes never pass through Python twice.
    """
    if job.transform is not None:
        return _pack_transformed(store, job, counters, progress)
    t = job.entry
    header = encode_header(t.dtype, t.shape)
    size = len(header) + t.nbytes
    hasher = hashlib.sha256(header)
    with open(job.file.path, "rb", buffering=0) as f:
        f.seek(job.offset)
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
                store.put_known(digest, header, f.fileno(), job.offset, t.nbytes)
    if progress:
        progress(t.nbytes)
    counters.add(job.new, size)
    return tensor_layer(job.name, digest, size, t.dtype, t.shape)


def tensor_layer(name: str, digest: str, size: int, dtype: str, shape: list[int],
                 annotations: dict[str, str] | None = None) -> Layer:
    """The manifest descriptor of a tensor blob, titled by its name."""
    return Layer(
        spec.TENSOR_MEDIA_TYPE, digest, size, name, dtype, list(shape),
        {spec.TITLE_ANNOTATION: title_for(name, spec.TENSOR_MEDIA_TYPE), **(annotations or {})},
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
        new = w.keep_if_new()
        counters.add(new, w.size)
        digest, size = w.current_digest(), w.size
    return file_layer(name, digest, size, media_type)


def file_layer(name: str, digest: str, size: int, media_type: str) -> Layer:
    """The manifest descriptor of a model file (config, tokenizer file, safetensors header)."""
    return Layer(media_type, digest, size, name, annotations={spec.TITLE_ANNOTATION: title_for(name, media_type)})


def _file_media_type(path: Path) -> str:
    if path.suffix == ".json":
        parse_json(path.read_bytes(), f"{path}: config file")
        return spec.JSON_MEDIA_TYPE
    return spec.FILE_MEDIA_TYPE


@dataclass
class _Plan:
    files: list[SourceFile]
    jobs: list[TensorJob]
    plain: list[tuple[Path, str, str]]
    skipped: list[str]
    #: Components whose tensors are quantized or cast: their source header layers are not carried.
    changed: set[str]


def _plan(scan: ModelDir, exclude: list[str], policy: StoragePolicy) -> _Plan:
    """Parse and check every header, validate every name, before writing anything."""

    def wanted(rel: str) -> bool:
        return not any(Path(rel).match(pattern) for pattern in exclude)

    skipped = list(scan.skipped)
    files: list[SourceFile] = []
    owner: dict[str, str] = {}
    jobs: list[TensorJob] = []
    for rel, path in sorted(scan.safetensors.items()):
        if not wanted(rel):
            skipped.append(rel)
            continue
        check_name(rel, str(path))
        source = read_weights_header(path, rel)
        prefix = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
        files.append(source)
        for entry in source.header.by_offset():
            name = prefix + entry.key
            check_name(name, f"{path}: tensor {entry.key!r}")
            if name in owner:
                raise ImgpackError(
                    f"{path}: duplicate tensor name {entry.key!r} (also in {owner[name]});"
                    " exclude one of the files with --exclude"
                )
            owner[name] = rel
            component, _, key = name.partition("/")
            transform = policy.for_tensor(component, key, entry.dtype, entry.shape) if key else None
            jobs.append(TensorJob(name, entry, source, transform))
    # A component whose tensors change no longer matches its source files' headers or shard indexes: export
    # writes it as one standard file instead, so those layers are not carried.
    changed = {job.name.split("/", 1)[0] for job in jobs if job.transform is not None}
    plain: list[tuple[Path, str, str]] = []
    for rel, path in sorted(scan.others.items()):
        if not wanted(rel):
            skipped.append(rel)
            continue
        if rel.endswith(".safetensors.index.json") and rel.split("/", 1)[0] in changed:
            skipped.append(rel)
            continue
        check_name(rel, str(path))
        if rel in owner:
            raise ImgpackError(f"{path}: file name {rel!r} collides with a tensor name from {owner[rel]}")
        plain.append((path, rel, _file_media_type(path)))
    if not jobs:
        raise ImgpackError(f"{scan.root}: no .safetensors weights found")
    check_tree([job.name for job in jobs] + [rel for _, rel, _ in plain], str(scan.root))
    return _Plan(files, jobs, plain, skipped, changed)


def create_model(
    store: Store,
    ref: str,
    directory: str | Path,
    fmt: str = "oci",
    *,
    exclude: list[str] | None = None,
    timestamp: bool = False,
    follow_external_links: bool = False,
    quantize: str | None = None,
    dtype: str | None = None,
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
    policy = StoragePolicy.parse(quantize, dtype)
    scan = scan_model_dir(Path(directory), follow_external_links=follow_external_links)
    plan = _plan(scan, list(exclude or []), policy)
    jobs = plan.jobs
    stats_before = {f.rel: os.stat(f.path) for f in plan.files}
    if plan_done:
        plan_done(sum(j.entry.nbytes for j in jobs))

    cache = _Cache(store, policy)
    counters = _Counters()
    cached_files = 0
    with store.writing():
        # Files whose (path, size, mtime, inode) match the cache and whose blobs are all present are not re-read.
        pending: list[TensorJob] = []
        by_file: dict[str, list[TensorJob]] = {}
        for job in jobs:
            by_file.setdefault(job.file.rel, []).append(job)
        for source in plan.files:
            file_jobs = by_file.get(source.rel, [])
            hit = cache.get(source.path)
            if hit and _cache_hit_usable(store, hit, file_jobs):
                for job in file_jobs:
                    digest, size, dtype, shape, annotations = hit["tensors"][job.entry.key]
                    job.layer = tensor_layer(job.name, digest, size, dtype, shape, annotations)
                    counters.add(False, size)
                cached_files += 1
                if progress:
                    progress(sum(j.entry.nbytes for j in file_jobs))
            else:
                pending.extend(file_jobs)
        pending.sort(key=lambda j: -j.entry.nbytes)  # big first: better load balance
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
        for source in plan.files:
            now = os.stat(source.path)
            before = stats_before[source.rel]
            if (now.st_size, now.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                for job in by_file.get(source.rel, []):
                    if job.new and job.layer:
                        store.blob_path(job.layer.digest).unlink(missing_ok=True)
                raise ImgpackError(f"{source.path}: file changed while it was being packed; run create again")
            cache.put(source.path, {
                "tensors": {j.entry.key: [j.layer.digest, j.layer.size, j.layer.dtype, j.layer.shape,
                                          {k: v for k, v in j.layer.annotations.items() if k != spec.TITLE_ANNOTATION}]
                            for j in by_file.get(source.rel, []) if j.layer}
            })
        header_layers = []
        for source in plan.files:
            if source.rel.split("/", 1)[0] in plan.changed:
                continue
            prefix = source.header.prefix
            new = not store.has_blob(sha256_bytes(prefix), len(prefix))
            digest, size = store.put_bytes(prefix)
            counters.add(new, size)
            header_layers.append(file_layer(source.rel, digest, size, spec.SAFETENSORS_HEADER_MEDIA_TYPE))
        file_layers = [_pack_file(store, path, rel, media_type, counters) for path, rel, media_type in plan.plain]
        tensor_layers = sorted((job.layer for job in jobs if job.layer), key=lambda layer: layer.name or "")
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if timestamp else None
        quantized = sum(1 for job in jobs if job.transform is not None and job.transform.quant is not None)
        cast = sum(1 for job in jobs if job.transform is not None and job.transform.dtype is not None)
        config = model_config(scan.model_index, tensor_layers, created, policy.config_record(quantized, cast))
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
        skipped=sorted(plan.skipped),
        quantized=quantized,
        cast=cast,
    )


def _cache_hit_usable(store: Store, hit: dict, jobs: list[TensorJob]) -> bool:
    tensors = hit.get("tensors") or {}
    if len(tensors) != len(jobs):
        return False
    for job in jobs:
        entry = tensors.get(job.entry.key)
        if not entry or len(entry) != 5 or not store.has_blob(entry[0], entry[1]):
            return False
    return True
