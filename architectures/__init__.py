"""imgpack.architectures: what each supported pipeline family is, as data and pure functions (no MLX).

The registry maps ``model_index.json``'s class name (or ollama's ``architecture`` field) to an
:class:`~imgpack.architectures.base.Architecture`: its tensor rules (used by conformance, ``verify`` and the
runtime loader), its generation defaults and the runtime module that runs it. Adding an architecture is a module
here with a ``SPEC`` and a runtime subpackage; nothing else names architectures.
"""

from __future__ import annotations

from typing import Any

from imgpack.architectures import flux2, zimage
from imgpack.architectures.base import Architecture

ARCHITECTURES: tuple[Architecture, ...] = (zimage.SPEC, flux2.SPEC)


def find(class_name: str | None) -> Architecture | None:
    """The architecture a pipeline class name (``ZImagePipeline``) belongs to, or None when imgpack has none."""
    for arch in ARCHITECTURES:
        if class_name in arch.class_names:
            return arch
    return None


def from_model_index(model_index: dict[str, Any]) -> Architecture | None:
    from imgpack.schemas.config import architecture_of

    return find(architecture_of(model_index))


def known_names() -> list[str]:
    return [name for arch in ARCHITECTURES for name in arch.class_names]
