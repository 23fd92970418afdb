"""Reading a diffusers model directory without trusting it: what ``create`` may pack, and what it must refuse.

Symbolic links are followed only while they stay inside the model folder — or, for a Hugging Face cache
snapshot (``models--org--name/snapshots/<rev>/``, whose files are links into ``../../blobs``), inside that
cache repository. A link that leaves it (``tokenizer/x -> /etc/passwd``) is refused, naming the link and
its target, unless the caller opts in. File names must be UTF-8, so a manifest never carries undecodable
names.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgpack.schemas.config import components_of
from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.jsondoc import parse_json_object

#: Weight formats imgpack does not pack: pickles can run code, and diffusers ships safetensors beside them.
LEGACY_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5", ".onnx", ".gguf")


@dataclass
class ModelDir:
    """What a scan found: the parsed ``model_index.json`` and the files to pack, by relative POSIX path."""

    root: Path
    model_index: dict[str, Any]
    safetensors: dict[str, Path] = field(default_factory=dict)
    others: dict[str, Path] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _allowed_roots(directory: Path) -> list[Path]:
    real = directory.resolve()
    roots = [real]
    # A Hugging Face cache snapshot: <cache>/models--org--name/snapshots/<revision>/ links into ../../blobs.
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        roots.append(real.parent.parent)
    return roots


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _utf8_name(name: str, where: Path) -> str:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(name).decode("utf-8", "backslashreplace")
        raise ImgpackError(f"{where.parent / shown}: file name is not valid UTF-8; rename it") from None
    return name


def scan_model_dir(directory: Path, *, follow_external_links: bool = False) -> ModelDir:
    """Check that ``directory`` is a diffusers model and list its files; nothing is read but the index."""
    if not directory.is_dir():
        raise ImgpackError(f"{directory}: not a directory")
    index_path = directory / "model_index.json"
    if not index_path.is_file():
        raise ImgpackError(f"{directory}: not a diffusers model directory (no model_index.json)")
    model_index = parse_json_object(index_path.read_bytes(), str(index_path))
    if not isinstance(model_index.get("_class_name"), str):
        raise ImgpackError(f"{index_path}: must be a JSON object with a string '_class_name'")
    for key, (library, cls) in components_of(model_index).items():
        if not (directory / key).is_dir():
            raise ImgpackError(f"{index_path}: component {key!r} ({library}.{cls}) has no folder {key}/")
    found = ModelDir(directory, model_index)
    roots = _allowed_roots(directory)
    _walk(directory, "", found, roots, follow_external_links, {directory.resolve()})
    for key in components_of(model_index):
        legacy = [s for s in found.skipped if s.startswith(key + "/")]
        if legacy and not any(rel.startswith(key + "/") for rel in found.safetensors):
            raise ImgpackError(f"{directory / key}: component {key!r} has only legacy weight files"
                               f" ({', '.join(legacy)}); convert them to .safetensors")
    return found


def _walk(folder: Path, prefix: str, found: ModelDir, roots: list[Path], follow_external: bool,
          visited: set[Path]) -> None:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise ImgpackError(f"{folder}: cannot list: {e.strerror or e}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        rel = prefix + _utf8_name(entry.name, path)
        if entry.is_symlink():
            target = path.resolve()
            if not target.exists():
                raise ImgpackError(f"{path}: broken symbolic link (to {os.readlink(path)})")
            if not follow_external and not _inside(target, roots):
                raise ImgpackError(
                    f"{path}: symbolic link to {target} leaves the model folder; refusing to pack it"
                    " (pass --follow-external-links to pack what it points to)"
                )
        try:
            st = os.stat(path)
        except OSError as e:
            raise ImgpackError(f"{path}: cannot read: {e.strerror or e}") from None
        if stat.S_ISDIR(st.st_mode):
            real = path.resolve()
            if real in visited:
                raise ImgpackError(f"{path}: directory link loop (to {real})")
            _walk(path, rel + "/", found, roots, follow_external, visited | {real})
        elif not stat.S_ISREG(st.st_mode):
            raise ImgpackError(f"{path}: not a regular file")
        elif entry.name.endswith(".safetensors"):
            found.safetensors[rel] = path
        elif entry.name.endswith(LEGACY_WEIGHT_SUFFIXES):
            found.skipped.append(rel)
        else:
            found.others[rel] = path
