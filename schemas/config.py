"""The config blob (spec v1 §2.3): a reproducible summary of the model a manifest describes."""

from __future__ import annotations

import math
from importlib import metadata as importlib_metadata
from typing import Any

from imgpack.schemas import spec
from imgpack.schemas.manifest import Layer
from imgpack.schemas.validate import validate


def imgpack_version() -> str:
    try:
        return importlib_metadata.version("imgpack")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


def components_of(model_index: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The pipeline components ``model_index.json`` lists: name -> (library, class)."""
    out = {}
    for key, value in model_index.items():
        if key.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        if isinstance(value[0], str) and isinstance(value[1], str):
            out[key] = (value[0], value[1])
    return out


def architecture_of(model_index: dict[str, Any]) -> str | None:
    """The pipeline class: diffusers' ``_class_name``, or the ``architecture`` field ollama's rewrite uses."""
    for key in ("_class_name", "architecture"):
        value = model_index.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def model_config(model_index: dict[str, Any], tensors: list[Layer], created: str | None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config blob for these tensor layers; no timestamp unless ``created`` is given."""
    components: dict[str, dict[str, Any]] = {}
    for key, (library, cls) in sorted(components_of(model_index).items()):
        components[key] = {"library": library, "class": cls, "tensors": 0, "parameters": 0, "tensorBytes": 0,
                           "dtypes": []}
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
    config: dict[str, Any] = {
        "specVersion": spec.SPEC_VERSION,
        "imgpackVersion": imgpack_version(),
        "format": "diffusers",
        "architecture": architecture_of(model_index) or "unknown",
        "components": components,
        "parameterCount": sum(c["parameters"] for c in components.values()),
        "tensorBytes": sum(c["tensorBytes"] for c in components.values()),
        "dtypes": sorted({layer.dtype for layer in tensors if layer.dtype}),
    }
    if extra:
        config.update(extra)
    if created:
        config["created"] = created
    validate("config", config, "config blob")
    return config
