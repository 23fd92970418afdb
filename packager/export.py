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
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from imgpack.schemas.content import header_layer_problems, tensor_problems
from imgpack.schemas.errors import ImgpackError, IntegrityError
from imgpack.schemas.jsondoc import parse_json
from imgpack.schemas.manifest import Layer, ModelManifest
from imgpack.schemas.safetensors import TOLERATED, Entry, encode_entries
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


def _tensor_entries(store: Store, layer: Layer) -> list[tuple[int, Entry]]:
    """(absolute offset, entry) of every tensor a blob holds, in offset order; refused when malformed."""

    def read(offset: int, length: int) -> bytes:
        with store.open_blob(layer.digest) as f:
            f.seek(offset)
            return f.read(length)

    where = f"layer {layer.name!r}"
    header, problems = tensor_problems(layer.to_json(), read, layer.size, where)
    fatal = [m for c, m in problems if c not in TOLERATED]
    if header is None or fatal:
        raise IntegrityError(f"{where}: blob {layer.digest} is not a valid tensor blob: {'; '.join(fatal)}")
    return [(header.data_start + e.begin, e) for e in header.by_offset()]


def _copy_range(store: Store, layer: Layer, out, start: int, count: int) -> None:
    """Copy ``count`` bytes of the blob from ``start``, hashing the whole blob on the way."""
    blob = _VerifiedBlob(store, layer)
    try:
        blob.skip_to(start)
        blob.copy_to(out, count)
    finally:
        blob.close()


def _write_from_header(store: Store, manifest: ModelManifest, header_layer: Layer, target: Path,
                       tensors: dict[str, Layer], used: set[str]) -> None:
    raw = store.read_blob(header_layer.digest)
    name = header_layer.name or ""
    parsed, problems = header_layer_problems(raw)
    if parsed is None:
        raise IntegrityError(f"{manifest.source}: header layer {name!r} is malformed: {problems[0][1]}")
    prefix = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
    with open(target, "wb") as out:
        out.write(raw)
        for entry in parsed.by_offset():
            layer = tensors.get(prefix + entry.key)
            if layer is None:
                raise ImgpackError(f"{manifest.source}: {name} needs tensor {prefix + entry.key!r}, which has no layer")
            entries = _tensor_entries(store, layer)
            if len(entries) != 1:
                raise ImgpackError(f"{manifest.source}: layer {layer.name!r} is a quantized tensor; {name}'s"
                                   " original bytes are not in this model")
            start, blob_entry = entries[0]
            if (blob_entry.dtype, blob_entry.shape) != (entry.dtype, entry.shape):
                raise ImgpackError(
                    f"{manifest.source}: layer {layer.name!r} is {blob_entry.dtype} {blob_entry.shape} but {name}'s"
                    f" header says {entry.dtype} {entry.shape}"
                )
            _copy_range(store, layer, out, start, blob_entry.nbytes)
            used.add(layer.name or "")


def _standard_weights_name(manifest_files: dict[str, bytes], component: str) -> str:
    """transformers components use model.safetensors; diffusers ones diffusion_pytorch_model.safetensors."""
    index = manifest_files.get("model_index.json")
    if index:
        with contextlib.suppress(ImgpackError):
            entry = parse_json(index, "model_index.json")
            entry = entry.get(component) if isinstance(entry, dict) else None
            if isinstance(entry, list) and entry and entry[0] == "transformers":
                return "model.safetensors"
    return "diffusion_pytorch_model.safetensors"


def _write_synthesised(store: Store, target: Path, layers: list[Layer], prefix: str) -> None:
    """One standard safetensors file for tensors that came without a header layer (made by other tools, or
    quantized): every tensor a blob holds, keyed as in the blob without the component prefix."""
    ordered = sorted(layers, key=lambda x: x.name or "")
    parts: list[tuple[Layer, int, Entry, str]] = []
    for layer in ordered:
        entries = _tensor_entries(store, layer)
        base = (layer.name or "")[len(prefix):]
        for start, entry in entries:
            key = base if len(entries) == 1 else entry.key.removeprefix(prefix)
            parts.append((layer, start, entry, key))
    header = encode_entries([(key, entry.dtype, entry.shape) for _, _, entry, key in parts], {"format": "pt"})
    by_key = {key: (layer, start, entry) for layer, start, entry, key in parts}
    if len(by_key) != len(parts):
        raise ImgpackError(f"{target}: two tensors would share one key")
    with open(target, "wb") as out:
        out.write(header)
        for key in sorted(by_key):
            layer, start, entry = by_key[key]
            _copy_range(store, layer, out, start, entry.nbytes)


@contextlib.contextmanager
def _staged_directory(target: Path) -> Iterator[Path]:
    """A temp directory beside ``target`` that becomes it when the block succeeds and is removed when it fails, so
    an export never leaves a half-written directory. ``target`` must not exist or be empty."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ImgpackError(f"{target}: already exists and is not an empty directory; refusing to overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        yield work
        if target.exists():
            target.rmdir()
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def export_model(store: Store, ref: str, directory: str | Path) -> ModelManifest:
    """Write the model ``ref`` as a diffusers directory at ``directory`` (which must not exist or be empty)."""
    manifest = store.get_manifest(ref)
    with _staged_directory(Path(directory)) as work:
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
    return manifest


def _tensor_file(path: Path, where: str) -> tuple[int, Entry]:
    """(offset of the data, entry) of a one-tensor file as ``oras pull`` writes a tensor layer."""
    from imgpack.schemas.safetensors import read_header

    size = path.stat().st_size
    with open(path, "rb") as f:
        header = read_header(f, size, where)
    if len(header.entries) != 1:
        raise ImgpackError(f"{where}: holds {len(header.entries)} tensors, not one (a quantized tensor?);"
                           " its source file cannot be rebuilt")
    (entry,) = header.entries.values()
    if header.data_start + entry.end != size:
        raise IntegrityError(f"{where}: {size} bytes, but its header says {header.data_start + entry.end}")
    return header.data_start + entry.begin, entry


def export_directory(source: str | Path, directory: str | Path) -> int:
    """Rebuild the diffusers directory from a directory of title-named layer files (``oras pull``, a Kubernetes
    image volume): each ``X.safetensors.header`` file plus the tensor files it names become ``X.safetensors``,
    byte for byte; other files are copied. Shapes, dtypes and sizes are checked; digests cannot be, since the
    directory holds no manifest. Returns the number of files written."""
    from imgpack.schemas import spec

    root, target = Path(source), Path(directory)
    if not (root / "model_index.json").is_file():
        raise ImgpackError(f"{root}: no model_index.json; not a directory of an imgpack model's layer files")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    headers = [name for name in files if name.endswith(".safetensors" + spec.HEADER_TITLE_SUFFIX)]
    with _staged_directory(target) as work:
        used: set[str] = set()
        for name in headers:
            raw = (root / name).read_bytes()
            parsed, problems = header_layer_problems(raw)
            if parsed is None:
                raise IntegrityError(f"{root / name}: malformed safetensors header: {problems[0][1]}")
            prefix = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
            out_path = work / name[: -len(spec.HEADER_TITLE_SUFFIX)]
            out_path.parent.mkdir(parents=True, exist_ok=True)
            with open(out_path, "wb") as out:
                out.write(raw)
                for entry in parsed.by_offset():
                    tensor = prefix + entry.key
                    path = root / tensor
                    if not path.is_file():
                        raise ImgpackError(f"{root / name} names tensor {entry.key!r}, but {path} is missing")
                    start, found = _tensor_file(path, str(path))
                    if (found.dtype, found.shape) != (entry.dtype, entry.shape):
                        raise ImgpackError(f"{path} is {found.dtype} {found.shape}, but {name} says"
                                           f" {entry.dtype} {entry.shape}")
                    with open(path, "rb") as f:
                        f.seek(start)
                        shutil.copyfileobj(_Limited(f, found.nbytes), out, CHUNK)
                    used.add(tensor)
        for name in files:
            if name in used or name in headers:
                continue
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / name, work / name)
    return len(headers) + len([n for n in files if n not in used and n not in headers])


class _Limited:
    """At most ``count`` bytes of ``f``; short reads are an integrity failure, not a short file."""

    def __init__(self, f, count: int) -> None:  # noqa: ANN001
        self.f, self.left = f, count

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        data = self.f.read(self.left if n < 0 else min(n, self.left))
        if not data:
            raise IntegrityError(f"{getattr(self.f, 'name', 'tensor file')}: truncated")
        self.left -= len(data)
        return data
