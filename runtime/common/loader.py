"""Read a model straight from a stored manifest: config layers by name, tensors blob by blob.

Nothing here touches a model directory. Each tensor layer's ``name`` (``transformer/layers.0.attention.to_q.weight``)
is split into a component and a key; its blob is any single-tensor safetensors file (imgpack's ``data`` key or
ollama's own-name key). Every tensor a component needs is checked against the manifest (present, right shape)
before a byte is read, so a broken manifest fails fast with the tensor named.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from imgpack.runtime.backend import mx, nn
from imgpack.schemas.errors import ImgpackError, IntegrityError, NotFoundError
from imgpack.schemas.manifest import Layer, ModelManifest
from imgpack.schemas.safetensors import DTYPE_SIZES
from imgpack.store.store import Store

#: Maps a manifest tensor key to the model's parameter path, or None for a tensor the runtime ignores.
KeyMapper = Callable[[str], "str | None"]

GB = 1024**3


def flatten_params(tree: Any, prefix: str = "") -> dict[str, mx.array]:
    """Flatten an MLX parameter tree to ``{"a.0.b": array}``."""
    out: dict[str, mx.array] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten_params(v, f"{prefix}{k}."))
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            out.update(flatten_params(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = tree
    return out


def to_mlx_shape(shape: list[int]) -> tuple[int, ...]:
    """PyTorch conv weights are (out, in, kh, kw); MLX wants (out, kh, kw, in)."""
    if len(shape) == 4:
        return (shape[0], shape[2], shape[3], shape[1])
    return tuple(shape)


class ModelSource:
    """A manifest in a store, seen as named config files and per-component tensor layers."""

    def __init__(self, store: Store, manifest: ModelManifest) -> None:
        self.store = store
        self.manifest = manifest
        self.where = manifest.source

    @classmethod
    def open(cls, store: Store, ref: str) -> ModelSource:
        return cls(store, store.get_manifest(ref))

    # -- files ---------------------------------------------------------------------------------------

    def has_file(self, name: str) -> bool:
        layer = self.manifest.find(name)
        return layer is not None and not layer.is_tensor and not layer.is_header

    def read_file(self, name: str) -> bytes:
        layer = self.manifest.find(name)
        if layer is None or layer.is_tensor or layer.is_header:
            raise ImgpackError(f"{self.where}: the manifest has no file layer {name!r}, which the runtime needs")
        if not self.store.has_blob(layer.digest):
            raise NotFoundError(f"{self.where}: blob {layer.digest} of layer {name!r} is not in the store")
        return self.store.read_blob(layer.digest)

    def read_json(self, name: str) -> dict[str, Any]:
        try:
            doc = json.loads(self.read_file(name))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ImgpackError(f"{self.where}: layer {name!r} is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ImgpackError(f"{self.where}: layer {name!r} must hold a JSON object")
        return doc

    # -- tensors -------------------------------------------------------------------------------------

    def tensors(self, component: str) -> dict[str, Layer]:
        """Tensor layers of one component, keyed by the name after ``component/``."""
        prefix = component + "/"
        return {t.name[len(prefix) :]: t for t in self.manifest.tensors if t.name and t.name.startswith(prefix)}

    def plan(self, component: str, model: nn.Module, mapper: KeyMapper) -> dict[str, Layer]:
        """Match every model parameter to a tensor layer, checking presence and shape; returns param -> layer."""
        params = flatten_params(model.parameters())
        layers = self.tensors(component)
        if not layers:
            raise ImgpackError(f"{self.where}: the manifest has no tensor layers for component {component!r}")
        plan: dict[str, Layer] = {}
        for key, layer in layers.items():
            param = mapper(key)
            if param is None:
                continue
            if param not in params:
                raise ImgpackError(
                    f"{self.where}: tensor {layer.name!r} does not belong to the {component} built from"
                    f" {component}/config.json (unexpected tensor; config and weights disagree)"
                )
            if param in plan:
                raise ImgpackError(f"{self.where}: tensors {plan[param].name!r} and {layer.name!r} both map to {param}")
            expected = tuple(params[param].shape)
            got = to_mlx_shape(layer.shape or []) if len(expected) == 4 else tuple(layer.shape or [])
            if got != expected:
                want = [expected[0], expected[3], expected[1], expected[2]] if len(expected) == 4 else list(expected)
                raise ImgpackError(
                    f"{self.where}: tensor {layer.name!r} has shape {layer.shape}, but the {component} config"
                    f" needs {want}"
                )
            if layer.dtype not in DTYPE_SIZES or layer.dtype.startswith(("F8", "C")):
                raise ImgpackError(f"{self.where}: tensor {layer.name!r} has unsupported dtype {layer.dtype}")
            plan[param] = layer
        missing = sorted(set(params) - set(plan))
        if missing:
            to_key = getattr(model, "checkpoint_key", lambda p: p)
            unprefixed = not any(k.startswith("model.") for k in layers)
            keys = [to_key(p) for p in missing[:5]]
            if unprefixed:  # name them as this manifest spells its keys
                keys = [k.removeprefix("model.") for k in keys]
            names = ", ".join(repr(f"{component}/{k}") for k in keys)
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ImgpackError(f"{self.where}: the manifest lacks tensor {names}{more}, needed by the {component}")
        return plan

    def load(self, component: str, model: nn.Module, mapper: KeyMapper, dtype: mx.Dtype) -> None:
        """Load a component's weights blob by blob, converting each to ``dtype`` and evaluating it at once so
        peak memory is the model plus one tensor."""
        plan = self.plan(component, model, mapper)
        weights: list[tuple[str, mx.array]] = []
        for param, layer in plan.items():
            array = self.load_tensor(layer)
            if array.ndim == 4:
                array = array.transpose(0, 2, 3, 1)
            array = array.astype(dtype)
            mx.eval(array)
            weights.append((param, array))
        model.load_weights(weights, strict=True)
        model.eval()

    def load_tensor(self, layer: Layer) -> mx.array:
        path = self.store.blob_path(layer.digest)
        if not self.store.has_blob(layer.digest, layer.size):
            raise NotFoundError(
                f"{self.where}: blob {layer.digest} of tensor {layer.name!r} is missing or has the wrong size"
            )
        try:
            loaded = mx.load(str(path), format="safetensors")
        except Exception as e:
            raise IntegrityError(
                f"{self.where}: tensor {layer.name!r}: blob {layer.digest} is unreadable: {e}"
            ) from None
        if len(loaded) != 1:
            raise IntegrityError(
                f"{self.where}: tensor {layer.name!r}: blob {layer.digest} holds {len(loaded)} tensors, not one"
            )
        (array,) = loaded.values()
        if list(array.shape) != list(layer.shape or []):
            raise IntegrityError(
                f"{self.where}: tensor {layer.name!r}: blob holds shape {list(array.shape)},"
                f" manifest says {layer.shape}"
            )
        return array

    def weight_bytes(self, component: str, mapper: KeyMapper, itemsize: int) -> int:
        """Bytes a component's used tensors take at the compute dtype, from the manifest alone."""
        total = 0
        for key, layer in self.tensors(component).items():
            if mapper(key) is not None:
                total += math.prod(layer.shape or []) * itemsize
        return total


class InsufficientMemory(ImgpackError):
    """The model (or this image size) needs more memory than the machine has free."""


def check_memory(need: int, have: int, what: str) -> None:
    if have and need > have:
        raise InsufficientMemory(
            f"{what} needs about {need / GB:.1f} GB of memory but only {have / GB:.1f} GB is available;"
            " free memory, choose a smaller --size, or run on a machine with more memory"
        )
