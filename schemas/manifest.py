"""Model manifests: build them reproducibly, parse and check them before trusting a byte they point at."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from imgpack.schemas import spec
from imgpack.schemas.digest import sha256_bytes
from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.names import check_name, check_unique
from imgpack.schemas.safetensors import tensor_nbytes
from imgpack.schemas.validate import validate


@dataclass
class Layer:
    """One descriptor of a manifest: the config blob, a tensor, a model file or a safetensors header."""

    media_type: str
    digest: str
    size: int
    name: str | None = None
    dtype: str | None = None
    shape: list[int] | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def is_tensor(self) -> bool:
        return self.media_type == spec.TENSOR_MEDIA_TYPE

    @property
    def is_header(self) -> bool:
        return self.media_type == spec.SAFETENSORS_HEADER_MEDIA_TYPE

    @property
    def is_json(self) -> bool:
        return self.media_type in spec.JSON_LAYER_TYPES

    @property
    def quantization(self) -> str | None:
        """The ``io.imgpack.quantization`` annotation of a quantized tensor layer (spec §2.6)."""
        return self.annotations.get(spec.QUANTIZATION_ANNOTATION)

    @property
    def component(self) -> str:
        """First path segment of the name (``transformer``), or '' for top-level files."""
        name = self.name or ""
        return name.split("/", 1)[0] if "/" in name else ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.name is not None:
            out["name"] = self.name
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.shape is not None:
            out["shape"] = list(self.shape)
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Layer:
        return cls(
            media_type=d["mediaType"],
            digest=d["digest"],
            size=d["size"],
            name=d.get("name"),
            dtype=d.get("dtype"),
            shape=list(d["shape"]) if d.get("shape") is not None else None,
            annotations=dict(d.get("annotations") or {}),
        )


def title_for(layer_name: str, media_type: str) -> str:
    """The org.opencontainers.image.title a layer carries, so generic OCI tools lay files out by name."""
    if media_type == spec.SAFETENSORS_HEADER_MEDIA_TYPE:
        return layer_name + spec.HEADER_TITLE_SUFFIX
    return layer_name


def encode_json(document: Any) -> bytes:
    """The canonical bytes imgpack writes for JSON documents: compact, key order as given, ASCII-only."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=True).encode()


def build_manifest(
    config: Layer, layers: list[Layer], flavour: str = "oci", annotations: dict[str, str] | None = None
) -> bytes:
    """Serialise a manifest; the same inputs always give the same bytes, hence the same digest."""
    if flavour == "oci":
        document: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": spec.OCI_MANIFEST,
            "artifactType": spec.ARTIFACT_TYPE,
            "config": config.to_json(),
            "layers": [layer.to_json() for layer in layers],
        }
        if annotations:
            document["annotations"] = dict(sorted(annotations.items()))
    elif flavour == "ollama":
        document = {
            "schemaVersion": 2,
            "mediaType": spec.DOCKER_MANIFEST,
            "config": config.to_json(),
            "layers": [layer.to_json() for layer in layers],
        }
    else:
        raise ImgpackError(f"unknown manifest format {flavour!r} (use 'oci' or 'ollama')")
    raw = encode_json(document)
    ModelManifest.from_bytes(raw, source="new manifest")  # never write what we would refuse to read
    return raw


def check_tree(names: list[str], source: str) -> None:
    """Names must lay out as a file tree: no name may also be a folder of another name."""
    names_set = set(names)
    for name in sorted(names_set):
        parts = name.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder in names_set:
                raise ImgpackError(f"{source}: layer {folder!r} is also the folder of layer {name!r}")


#: Digests of manifests that already passed schema validation in this process: checking the same bytes
#: twice (build, then store) would only cost time on a 1,000-layer manifest.
_SCHEMA_VALID: set[str] = set()


@dataclass
class ModelManifest:
    raw: bytes
    document: dict[str, Any]
    config: Layer
    layers: list[Layer]
    source: str = "manifest"

    @property
    def digest(self) -> str:
        return sha256_bytes(self.raw)

    @property
    def media_type(self) -> str:
        return self.document["mediaType"]

    @property
    def flavour(self) -> str:
        return "ollama" if self.media_type == spec.DOCKER_MANIFEST else "oci"

    @property
    def tensors(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.is_tensor]

    @property
    def files(self) -> list[Layer]:
        """Model files (configs, tokenizer files): everything a runtime reads that is not a tensor."""
        return [layer for layer in self.layers if layer.media_type in spec.FILE_LAYER_TYPES]

    @property
    def headers(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.is_header]

    @property
    def blobs(self) -> list[Layer]:
        """The config descriptor and every layer: all blobs this manifest needs."""
        return [self.config, *self.layers]

    @property
    def components(self) -> list[str]:
        return sorted({layer.component for layer in self.layers if layer.component})

    @property
    def total_size(self) -> int:
        return sum(b.size for b in self.blobs) + len(self.raw)

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ImgpackError(f"{self.source}: no layer named {name!r}")

    def find(self, name: str) -> Layer | None:
        for layer in self.layers:
            if layer.name == name:
                return layer
        return None

    @classmethod
    def from_bytes(cls, raw: bytes, source: str = "manifest") -> ModelManifest:
        """Parse and fully check a manifest: schema, names, uniqueness and tensor sizes."""
        if len(raw) > spec.MAX_MANIFEST_BYTES:
            raise ImgpackError(f"{source}: manifest is {len(raw)} bytes, over the {spec.MAX_MANIFEST_BYTES} limit")
        try:
            document = json.loads(raw)
        except RecursionError:
            raise ImgpackError(f"{source}: manifest is JSON nested too deeply to parse") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ImgpackError(f"{source}: manifest is not valid JSON: {e}") from None
        if isinstance(document, dict) and document.get("mediaType") in (spec.OCI_INDEX, spec.DOCKER_MANIFEST_LIST):
            raise ImgpackError(f"{source}: is an image index, not a model manifest")
        digest = sha256_bytes(raw)
        if digest not in _SCHEMA_VALID:
            validate("manifest", document, source)
            _SCHEMA_VALID.add(digest)
        layers = [Layer.from_json(d) for d in document["layers"]]
        for i, layer in enumerate(layers):
            check_name(layer.name, f"{source}: layers[{i}]")
            if layer.is_tensor and layer.dtype is not None and layer.shape is not None and not layer.quantization:
                expected = tensor_nbytes(layer.dtype or "", layer.shape or [], f"{source}: layer {layer.name!r}")
                if layer.size < expected + 16:
                    raise ImgpackError(
                        f"{source}: layer {layer.name!r}: size {layer.size} is too small for a"
                        f" {layer.dtype} tensor of shape {layer.shape} ({expected} data bytes plus header)"
                    )
        check_unique([layer.name or "" for layer in layers if not layer.is_header], source)
        check_unique([layer.name or "" for layer in layers if layer.is_header], source)
        check_tree([layer.name for layer in layers if layer.name and not layer.is_header], source)
        return cls(raw, document, Layer.from_json(document["config"]), layers, source)
