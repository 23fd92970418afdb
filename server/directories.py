"""Models the server runs straight from a directory of title-named layer files (``serve --model-dir``).

An ``oras pull`` of an imgpack model, and a Kubernetes image volume of one, is a directory holding one file per
layer, named by its ``org.opencontainers.image.title``: ``model_index.json``, each component's configs, and one
single-tensor safetensors file per tensor (``transformer/layers.0.attention.to_q.weight``). The server maps such a
directory in place — no store, no copy — under a name of its own: ``--model-dir NAME=DIR``, or the directory's
basename. Each directory is checked when the server starts (configs and required tensors present), so a volume
that is not a model is refused with the file it lacks instead of failing the first request.

A directory model's ``digest`` is the SHA-256 of the manifest the directory is read as (layer names and sizes): it
names what this server serves, for ``ps`` and ``stop``, and is not a registry manifest digest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from imgpack.schemas.errors import ImgpackError, UsageError
from imgpack.schemas.reference import Reference


@dataclass(frozen=True)
class DirectoryModel:
    """One ``--model-dir``: the name requests use, the directory, and what it was found to hold."""

    name: str  # canonical reference form, e.g. ``zimage-turbo:latest``
    path: Path
    digest: str
    size: int
    tensors: int
    architecture: str

    def matches(self, given: str) -> bool:
        """Whether a request's ``model`` names this directory (``zimage-turbo`` or ``zimage-turbo:latest``)."""
        if given == self.name:
            return True
        try:
            return str(Reference.parse(given)) == self.name
        except UsageError:
            return False


def parse_model_dir(value: str) -> tuple[str | None, Path]:
    """``NAME=DIR`` or ``DIR`` (a path that contains ``=`` needs the ``NAME=`` form)."""
    name, sep, rest = value.partition("=")
    if sep and name and "/" not in name and rest:
        return name, Path(rest).expanduser()
    return None, Path(value).expanduser()


def _canonical(name: str, path: Path) -> str:
    try:
        return str(Reference.parse(name))
    except UsageError as e:
        raise UsageError(f"--model-dir {path}: {name!r} is not a model name ({e}); name it with --model-dir"
                         f" NAME={path}") from None


def open_model_dir(value: str) -> DirectoryModel:
    """Check that ``value`` (``[NAME=]DIR``) is a model directory and describe it; raise saying what is missing."""
    from imgpack import architectures
    from imgpack.architectures.base import canonical_name
    from imgpack.runtime.common.loader import ModelSource
    from imgpack.schemas.config import architecture_of

    given, path = parse_model_dir(value)
    if not path.is_dir():
        raise ImgpackError(f"--model-dir {path}: not a directory")
    path = path.resolve()
    name = _canonical(given or path.name.lower(), path)
    where = f"--model-dir {path}"
    if not (path / "model_index.json").is_file():
        raise ImgpackError(f"{where}: not a model directory: {path / 'model_index.json'} is missing (an oras pull"
                           " or image volume of an imgpack model has one)")
    source = ModelSource.from_directory(path)
    class_name = architecture_of(source.model_index)
    arch = architectures.find(class_name)
    if arch is None:
        raise ImgpackError(f"{where}: model_index.json names {class_name!r}; imgpack runs"
                           f" {', '.join(architectures.known_names())}")
    missing = [f for f in arch.config_files if not source.has_file(f)]
    if missing:
        raise ImgpackError(f"{where}: not a complete model directory: {path / missing[0]} is missing (a"
                           f" {arch.name} model needs {', '.join(arch.config_files)})")
    configs = {f: source.read_json(f) for f in arch.config_files}
    try:
        expectation = arch.expected_tensors(configs)
    except ImgpackError as e:
        raise ImgpackError(f"{where}: {e}") from None
    present = {canonical_name(t.name or "", expectation) for t in source.manifest.tensors}
    absent = sorted(set(expectation.required) - present)
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise ImgpackError(f"{where}: not a complete model directory: tensor file {path / absent[0]} is missing"
                           f"{more}")
    digest = "sha256:" + hashlib.sha256(json.dumps(
        [(layer.name, layer.size) for layer in source.manifest.layers]).encode()).hexdigest()
    size = sum(layer.size for layer in source.manifest.layers)  # the files the runtime reads (not the headers)
    return DirectoryModel(name, path, digest, size, len(source.manifest.tensors), arch.name)


def open_model_dirs(values: list[str], taken: set[str]) -> list[DirectoryModel]:
    """Every ``--model-dir``, checked; two with one name, or one named like a stored model (``taken``), is refused."""
    found: list[DirectoryModel] = []
    for value in values:
        model = open_model_dir(value)
        clash = next((m for m in found if m.name == model.name), None)
        if clash is not None:
            raise UsageError(f"--model-dir: {clash.path} and {model.path} are both named {model.name!r}; name one"
                             f" with --model-dir NAME={model.path}")
        if model.name in taken:
            raise UsageError(f"--model-dir {model.path}: the store already has a model named {model.name!r}; name"
                             f" the directory with --model-dir NAME={model.path}")
        found.append(model)
    return found


__all__ = ["DirectoryModel", "open_model_dir", "open_model_dirs", "parse_model_dir"]
