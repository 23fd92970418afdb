"""Read a model straight from where it is stored — a manifest in a store, or a directory of title-named layer files —
and load each network's weights blob by blob, in the form they should stay resident in.

Each tensor layer's ``name`` (``transformer/layers.0.attention.to_q.weight``) is split into a component and a
key; its blob is any single-tensor safetensors file (imgpack's ``data`` key, ollama's own-name key), a combined
quantized blob (spec §2.6, imgpack's or ollama's MLX-written form) or one of ollama's January separate quantized
layers (``name``, ``name_scale``, ``name_qbias``). Every tensor a network needs is matched to a layer, and checked
(present, right logical shape) before a byte is read, so a broken model fails fast with the tensor named.

Resident forms (:class:`ResidentForm`): on CPU a component is expanded to float32 at load when that fits (the
fastest plan: BLAS multiplies float32), else kept as stored — quantized layers packed, bf16/f16 linear weights in
half precision — with each layer expanded just for its own call (:mod:`imgpack.runtime.common.quantized`). On
Metal/CUDA weights are kept in the compute dtype and quantized layers use MLX's quantized kernels.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgpack.runtime.backend import is_cpu, mx, nn
from imgpack.runtime.cpu_pool import run_all
from imgpack.schemas import spec
from imgpack.schemas.content import read_tensor_header
from imgpack.schemas.errors import ImgpackError, IntegrityError, NotFoundError
from imgpack.schemas.jsondoc import parse_json_object
from imgpack.schemas.manifest import Layer, ModelManifest
from imgpack.schemas.quantized import (
    LEGACY_BIAS_SUFFIX,
    LEGACY_SCALE_SUFFIX,
    QuantizationError,
    QuantLayout,
    _split_keys,
    check_quantized,
    legacy_quant_type,
    pair_separate_layers,
)
from imgpack.schemas.safetensors import DTYPE_SIZES, HeaderError
from imgpack.store.store import Store

#: Maps a manifest tensor key to the model's parameter path, or None for a tensor the runtime ignores.
KeyMapper = Callable[[str], "str | None"]

GB = 1024**3
HALF_DTYPES = ("BF16", "F16")
_MX = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}


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


class InsufficientMemory(ImgpackError):
    """The model (or this image size) needs more memory than the machine has free."""


def check_memory(need: int, have: int, what: str) -> None:
    if have and need > have and os.environ.get("IMGPACK_MEMORY_CHECK", "1") != "0":
        raise InsufficientMemory(
            f"{what} needs about {need / GB:.1f} GB of memory but only {have / GB:.1f} GB is available;"
            " free memory, choose a smaller --size, or run on a machine with more memory"
        )


# -- where the bytes are --------------------------------------------------------------------------------


@dataclass
class TensorInfo:
    """What a tensor layer holds: its logical dtype and shape, and its quantized layout if it has one."""

    dtype: str
    shape: list[int]
    quant: QuantLayout | None = None


class ModelSource:
    """A model seen as named files and per-component tensor layers, wherever its blobs are."""

    def __init__(self, manifest: ModelManifest, where: str, blob_path: Callable[[Layer], Path],
                 partial: str | None = None) -> None:
        self.manifest = manifest
        self.where = where
        self._blob_path = blob_path
        self.partial = partial
        self._info: dict[str, TensorInfo] = {}
        self._index: dict[str, Any] | None = None

    @classmethod
    def open(cls, store: Store, ref: str) -> ModelSource:
        manifest = store.get_manifest(ref)
        entry = next((e for e in store.entries() if e.digest == manifest.digest and e.partial), None)

        def path(layer: Layer) -> Path:
            if not store.has_blob(layer.digest, layer.size):
                raise NotFoundError(f"{manifest.source}: blob {layer.digest} of {layer.name!r} is missing or has the"
                                    " wrong size" + (" (a partial pull left it out; pull the model again in full)"
                                                     if entry else ""))
            return store.blob_path(layer.digest)

        return cls(manifest, manifest.source, path, entry.partial if entry else None)

    @classmethod
    def from_directory(cls, root: Path) -> ModelSource:
        """A directory of files named by their layer titles: what ``oras pull`` writes and what a Kubernetes image
        volume mounts. Each ``*.safetensors``-less file under a component is a tensor blob; headers are skipped."""
        root = Path(root)
        if not (root / "model_index.json").is_file():
            raise ImgpackError(f"{root}: no model_index.json; not a model directory (an oras pull or image volume"
                               " of an imgpack model has one)")
        layers: list[dict[str, Any]] = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            name = path.relative_to(root).as_posix()
            if any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            size = path.stat().st_size
            fake = "sha256:" + "0" * 64
            if name.endswith(spec.HEADER_TITLE_SUFFIX) or name.endswith(".safetensors"):
                continue  # header layers (export's business) and whole weight files are not read here
            if name.endswith(".json"):
                layers.append({"mediaType": spec.JSON_MEDIA_TYPE, "digest": fake, "size": size, "name": name})
            elif "/" in name and _looks_like_tensor(path, size):
                layers.append({"mediaType": spec.TENSOR_MEDIA_TYPE, "digest": fake, "size": size, "name": name})
            else:
                layers.append({"mediaType": spec.FILE_MEDIA_TYPE, "digest": fake, "size": size, "name": name})
        document = {"schemaVersion": 2, "mediaType": spec.DOCKER_MANIFEST,
                    "config": {"mediaType": spec.OLLAMA_CONFIG_MEDIA_TYPE, "digest": "sha256:" + "0" * 64, "size": 2},
                    "layers": layers}
        manifest = ModelManifest.from_bytes(json.dumps(document).encode(), source=str(root))
        return cls(manifest, str(root), lambda layer: root / (layer.name or ""))

    # -- files ---------------------------------------------------------------------------------------

    def has_file(self, name: str) -> bool:
        layer = self.manifest.find(name)
        return layer is not None and not layer.is_tensor and not layer.is_header

    def read_file(self, name: str) -> bytes:
        layer = self.manifest.find(name)
        if layer is None or layer.is_tensor or layer.is_header:
            raise ImgpackError(f"{self.where}: the model has no file {name!r}, which the runtime needs")
        try:
            return self._blob_path(layer).read_bytes()
        except OSError as e:
            raise NotFoundError(f"{self.where}: file {name!r} is unreadable: {e.strerror or e}") from None

    def read_json(self, name: str) -> dict[str, Any]:
        return parse_json_object(self.read_file(name), f"{self.where}: {name}")

    @property
    def model_index(self) -> dict[str, Any]:
        if self._index is None:
            self._index = self.read_json("model_index.json")
        return self._index

    # -- tensors -------------------------------------------------------------------------------------

    def blob_path(self, layer: Layer) -> Path:
        return self._blob_path(layer)

    def tensors(self, component: str) -> dict[str, Layer]:
        """Tensor layers of one component, keyed by the name after ``component/``."""
        prefix = component + "/"
        return {t.name[len(prefix):]: t for t in self.manifest.tensors if t.name and t.name.startswith(prefix)}

    def info(self, layer: Layer) -> TensorInfo:
        """A tensor's logical dtype, shape and quantized layout: from its descriptor, or (ollama's layers carry no
        dtype/shape, and no annotation) from its blob header."""
        name = layer.name or ""
        if name in self._info:
            return self._info[name]
        quant = QuantLayout.parse_annotation(layer.quantization, name) if layer.quantization else None
        if layer.dtype is not None and layer.shape is not None and (
                quant is not None or not self._maybe_quantized(layer)):
            found = TensorInfo(layer.dtype, list(layer.shape), quant)
        else:
            found = self._info_from_blob(layer)
        self._info[name] = found
        return found

    def _maybe_quantized(self, layer: Layer) -> bool:
        """A descriptor too small for its dtype and shape holds a packed tensor (ollama-made, no annotation)."""
        if layer.dtype not in DTYPE_SIZES or layer.shape is None:
            return True
        return layer.size < math.prod(layer.shape) * DTYPE_SIZES[layer.dtype]

    def _info_from_blob(self, layer: Layer) -> TensorInfo:
        name = layer.name or ""
        path = self._blob_path(layer)
        size = path.stat().st_size

        def read(offset: int, length: int) -> bytes:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read(length)

        try:
            header = read_tensor_header(read, size, f"{self.where}: tensor {name!r}")
        except HeaderError as e:
            raise IntegrityError(str(e)) from None
        if header.metadata and "quant_type" in header.metadata:
            problems = check_quantized(header.entries, header.metadata, name, layer.shape)
            if problems:
                raise QuantizationError(name, problems)
            base, _ = _split_keys(header.entries, name)
            assert base is not None
            from imgpack.schemas.quantized import QUANT_TYPES

            qtype = QUANT_TYPES[header.metadata["quant_type"]].with_group_size(int(header.metadata["group_size"]))
            weight = header.entries[base]
            scale = header.entries[base + ".scale"]
            quant = QuantLayout(qtype, tuple(weight.shape), scale.dtype)
            return TensorInfo(layer.dtype or (scale.dtype if qtype.has_biases else "BF16"), quant.shape, quant)
        if len(header.entries) != 1:
            raise IntegrityError(f"{self.where}: tensor {name!r}: blob holds {len(header.entries)} tensors, not one")
        (entry,) = header.entries.values()
        return TensorInfo(entry.dtype, list(entry.shape))

    def legacy_quantization(self) -> str | None:
        """The ``quantization`` label of ollama's rewritten model_index.json (its January blobs carry none)."""
        label = self.model_index.get("quantization")
        return label if isinstance(label, str) else None


def _looks_like_tensor(path: Path, size: int) -> bool:
    if size < 16:
        return False
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and int.from_bytes(head[:8], "little") < size and head[8:9] == b"{"


# -- resident forms and components ----------------------------------------------------------------------


class ResidentForm:
    """How a component's weights stay in memory: ``float32`` (expanded at load), ``stored`` (as in the blobs,
    expanded per call) or ``device`` (Metal/CUDA: the compute dtype, quantized layers packed)."""

    FLOAT32, STORED, DEVICE = "float32", "stored", "device"

    @staticmethod
    def choose(components: dict[str, Component], fits_expanded: bool) -> dict[str, str]:
        env = os.environ.get("IMGPACK_RESIDENT", "auto")
        out = {}
        for name, component in components.items():
            if not is_cpu():
                out[name] = ResidentForm.DEVICE
            elif component.upcast:
                out[name] = ResidentForm.FLOAT32
            elif env == "stored" or component.quantized or (env == "auto" and not fits_expanded):
                out[name] = ResidentForm.STORED
            else:
                out[name] = ResidentForm.FLOAT32
        return out


@dataclass
class TensorPlan:
    """One network parameter and where its bytes come from."""

    param: str
    layer: Layer
    info: TensorInfo
    #: ollama's January form: the ``_scale`` and ``_qbias`` layers of a quantized weight.
    scale_layer: Layer | None = None
    bias_layer: Layer | None = None

    @property
    def quantized(self) -> bool:
        return self.info.quant is not None


@dataclass
class Component:
    """One network of a pipeline: how to build it, which layers feed which parameters, how it loads."""

    source: ModelSource
    name: str
    factory: Callable[[], nn.Module]
    compute_dtype: mx.Dtype
    #: Compute in float32 whatever the weights are (diffusers' force_upcast VAE).
    upcast: bool = False
    blueprint: nn.Module = field(init=False)
    plan: dict[str, TensorPlan] = field(init=False)

    def __post_init__(self) -> None:
        self.blueprint = self.factory()
        self.plan = plan_component(self.source, self.name, self.blueprint)

    @property
    def quantized(self) -> bool:
        return any(p.quantized for p in self.plan.values())

    def expanded_bytes(self) -> int:
        """Every used tensor as float32 (the compute dtype on CPU)."""
        return sum(math.prod(p.info.shape) * 4 for p in self.plan.values())

    def resident_bytes(self, form: str) -> int:
        if self.upcast:
            form = ResidentForm.FLOAT32  # computed in float32 whatever it is stored as
        total = 0
        for p in self.plan.values():
            count = math.prod(p.info.shape)
            if p.info.quant is not None and form != ResidentForm.FLOAT32:
                total += p.info.quant.data_nbytes
            elif form == ResidentForm.STORED and self._half_linear(p):
                total += count * 2
            elif form == ResidentForm.DEVICE:
                total += count * _itemsize(self.compute_dtype)
            else:
                total += count * 4
        return total

    def _half_linear(self, p: TensorPlan) -> bool:
        return p.info.dtype in HALF_DTYPES and _is_linear_weight(self.blueprint, p.param)

    def largest_expansion(self, form: str) -> int:
        """The biggest float32 copy one stored-form layer makes per call (0 when nothing expands)."""
        if form != ResidentForm.STORED:
            return 0
        sizes = [math.prod(p.info.shape) * 4 for p in self.plan.values()
                 if p.quantized or self._half_linear(p)]
        # Dequantizing peaks near twice the expanded weight (the affine formula's temporaries).
        return max(sizes, default=0) * 2

    def load(self, form: str) -> nn.Module:
        """A fresh network with every weight loaded, evaluated tensor by tensor: peak memory is the network
        plus one tensor per worker.

        On CPU the tensors load on ``cpu_pool``'s workers (MLX evaluates from several threads since 0.31.2): a
        load is mostly the kernel filling fresh pages, at costs that vary 10x on a VM, and two cores fill them
        about twice as fast (the medium bench model's transformer, three runs each: 0.63-2.20 s one tensor at a
        time, 0.42-0.69 s on two workers)."""
        from imgpack.runtime.common.quantized import swap_linears

        model = self.factory()
        quantized = {p.param: p.info.quant for p in self.plan.values() if p.info.quant is not None}
        cast: dict[str, mx.Dtype] = {}
        if form == ResidentForm.STORED:
            cast = {p.param: _MX[p.info.dtype] for p in self.plan.values()
                    if p.info.quant is None and p.info.dtype in HALF_DTYPES and _is_linear_weight(model, p.param)}
        if form == ResidentForm.FLOAT32:
            quantized = {}
        swap_linears(model, quantized, cast)
        plans = list(self.plan.values())
        loaded: list[list[tuple[str, mx.array]]] = [[] for _ in plans]

        def load_one(i: int) -> None:
            p = plans[i]
            loaded[i] = self._arrays(p, form, p.param in quantized, cast.get(p.param))

        if is_cpu() and _threaded_eval():
            run_all(load_one, range(len(plans)))
        else:  # MLX's GPU streams (and an MLX before 0.31.2) are not to be fed from several threads
            for i in range(len(plans)):
                load_one(i)
        model.load_weights([weight for part in loaded for weight in part], strict=True)
        model.eval()
        return model

    def _arrays(self, p: TensorPlan, form: str, keep_packed: bool, keep_dtype: mx.Dtype | None
                ) -> list[tuple[str, mx.array]]:
        dtype = mx.float32 if form in (ResidentForm.FLOAT32, ResidentForm.STORED) or self.upcast else self.compute_dtype
        if p.info.quant is not None:
            weight, scales, biases = load_quantized(self.source, p)
            if keep_packed:
                out = [(p.param, weight), (p.param[: -len("weight")] + "scales", scales)]
                if biases is not None:
                    out.append((p.param[: -len("weight")] + "biases", biases))
                mx.eval(*[a for _, a in out])
                return out
            q = p.info.quant.qtype
            expanded = mx.dequantize(weight, scales.astype(dtype) if biases is not None else scales,
                                     biases.astype(dtype) if biases is not None else None, group_size=q.group_size,
                                     bits=q.bits, mode=q.mode, dtype=dtype)
            mx.eval(expanded)
            return [(p.param, expanded)]
        array = load_tensor(self.source, p.layer, p.info)
        if array.ndim == 4:
            array = array.transpose(0, 2, 3, 1)
        array = array.astype(keep_dtype if keep_dtype is not None else dtype)
        mx.eval(array)
        return [(p.param, array)]


def _threaded_eval() -> bool:
    """Whether this MLX evaluates safely from several threads (0.31.2 and later)."""
    try:
        version = tuple(int(part) for part in getattr(mx, "__version__", "").split(".")[:3])
    except ValueError:
        return False
    return version >= (0, 31, 2)


def _itemsize(dtype: mx.Dtype) -> int:
    return 2 if dtype in (mx.bfloat16, mx.float16) else 4


def _is_linear_weight(model: nn.Module, param: str) -> bool:
    if not param.endswith(".weight"):
        return False
    modules = getattr(model, "_linear_paths", None)
    if modules is None:
        modules = {path for path, m in model.named_modules() if isinstance(m, nn.Linear)}
        model._linear_paths = modules  # noqa: SLF001 - a cache on our own module
    return param[: -len(".weight")] in modules


def plan_component(source: ModelSource, component: str, model: nn.Module) -> dict[str, TensorPlan]:
    """Match every parameter of ``model`` to a tensor layer, checking presence and logical shape."""
    mapper: KeyMapper = model.param_name  # type: ignore[attr-defined]
    params = flatten_params(model.parameters())
    layers = source.tensors(component)
    if not layers:
        raise ImgpackError(f"{source.where}: the manifest has no tensor layers for component {component!r}")
    separate, _ = pair_separate_layers(list(layers))
    label = source.legacy_quantization() if separate else None
    skip = {g.scale for g in separate.values()} | {g.qbias for g in separate.values() if g.qbias}
    plan: dict[str, TensorPlan] = {}
    for key, layer in layers.items():
        if key in skip:
            continue
        param = mapper(key)
        if param is None:
            continue
        if param not in params:
            raise ImgpackError(
                f"{source.where}: tensor {layer.name!r} does not belong to the {component} built from"
                f" {component}/config.json (unexpected tensor; config and weights disagree)"
            )
        if param in plan:
            raise ImgpackError(f"{source.where}: tensors {plan[param].layer.name!r} and {layer.name!r} both map to"
                               f" {param}")
        info = source.info(layer)
        scale_layer = bias_layer = None
        if key in separate:
            group = separate[key]
            if label is None:
                raise ImgpackError(f"{source.where}: {layer.name!r} is quantized in ollama's January form, but"
                                   " model_index.json has no 'quantization' label saying how")
            qtype = legacy_quant_type(label)
            scale_layer = layers[group.scale]
            bias_layer = layers[group.qbias] if group.qbias else None
            packed = source.info(layer)
            in_features = packed.shape[-1] * 32 // qtype.bits
            scale_info = source.info(scale_layer)
            if scale_info.shape and in_features // max(scale_info.shape[-1], 1) != qtype.group_size:
                qtype = qtype.with_group_size(in_features // scale_info.shape[-1])
            info = TensorInfo(scale_info.dtype, [*packed.shape[:-1], in_features],
                              QuantLayout(qtype, tuple(packed.shape), scale_info.dtype))
        expected = tuple(params[param].shape)
        got = to_mlx_shape(info.shape) if len(expected) == 4 else tuple(info.shape)
        if got != expected:
            want = [expected[0], expected[3], expected[1], expected[2]] if len(expected) == 4 else list(expected)
            raise ImgpackError(
                f"{source.where}: tensor {layer.name!r} has shape {info.shape}, but the {component} config"
                f" needs {want}"
            )
        if info.quant is None and (info.dtype not in DTYPE_SIZES or info.dtype.startswith(("F8", "C"))):
            raise ImgpackError(f"{source.where}: tensor {layer.name!r} has unsupported dtype {info.dtype}")
        if info.quant is not None and not _is_linear_weight(model, param):
            raise ImgpackError(f"{source.where}: tensor {layer.name!r} is quantized, but {param} is not the weight"
                               " of a linear layer")
        plan[param] = TensorPlan(param, layer, info, scale_layer, bias_layer)
    missing = sorted(set(params) - set(plan))
    if missing:
        to_key = getattr(model, "checkpoint_key", lambda p: p)
        unprefixed = not any(k.startswith("model.") for k in layers)
        keys = [to_key(p) for p in missing[:5]]
        if unprefixed:  # name them as this manifest spells its keys
            keys = [k.removeprefix("model.") for k in keys]
        names = ", ".join(repr(f"{component}/{k}") for k in keys)
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        hint = f" (pulled in part: {source.partial}; pull it in full)" if source.partial else ""
        raise ImgpackError(f"{source.where}: the manifest lacks tensor {names}{more}, needed by the {component}{hint}")
    return plan


def _load(source: ModelSource, layer: Layer) -> dict[str, mx.array]:
    path = source.blob_path(layer)
    try:
        loaded = mx.load(str(path), format="safetensors")
    except Exception as e:  # noqa: BLE001 - MLX raises RuntimeError/ValueError for unreadable files
        raise IntegrityError(f"{source.where}: tensor {layer.name!r}: blob {layer.digest} is unreadable: {e}") from None
    assert isinstance(loaded, dict)  # a safetensors file always loads as a name -> array mapping
    return loaded


def load_tensor(source: ModelSource, layer: Layer, info: TensorInfo | None = None) -> mx.array:
    loaded = _load(source, layer)
    if len(loaded) != 1:
        raise IntegrityError(
            f"{source.where}: tensor {layer.name!r}: blob {layer.digest} holds {len(loaded)} tensors, not one"
        )
    (array,) = loaded.values()
    want = info.shape if info is not None else list(layer.shape or [])
    if list(array.shape) != list(want):
        raise IntegrityError(
            f"{source.where}: tensor {layer.name!r}: blob holds shape {list(array.shape)}, manifest says {want}"
        )
    return array


def load_quantized(source: ModelSource, p: TensorPlan) -> tuple[mx.array, mx.array, mx.array | None]:
    """(packed weight, scales, biases) of a quantized tensor, from a combined blob or January's three layers."""
    if p.scale_layer is not None:
        weight = next(iter(_load(source, p.layer).values()))
        scales = next(iter(_load(source, p.scale_layer).values()))
        biases = next(iter(_load(source, p.bias_layer).values())) if p.bias_layer is not None else None
    else:
        loaded = _load(source, p.layer)
        base, stray = _split_keys(loaded, p.layer.name)
        if base is None or stray:
            raise IntegrityError(f"{source.where}: tensor {p.layer.name!r}: not a quantized blob"
                                 f" ({', '.join(loaded)})")
        weight, scales, biases = loaded[base], loaded[base + ".scale"], loaded.get(base + ".bias")
    quant = p.info.quant
    assert quant is not None
    if list(weight.shape) != list(quant.packed_shape):
        raise IntegrityError(f"{source.where}: tensor {p.layer.name!r}: packed weight is {list(weight.shape)},"
                             f" expected {list(quant.packed_shape)}")
    return weight, scales, biases


__all__ = [
    "GB",
    "Component",
    "InsufficientMemory",
    "ModelSource",
    "ResidentForm",
    "TensorInfo",
    "TensorPlan",
    "check_memory",
    "flatten_params",
    "load_tensor",
    "plan_component",
    "LEGACY_BIAS_SUFFIX",
    "LEGACY_SCALE_SUFFIX",
]
