"""Write imgpack's conformance test vectors: small OCI layouts, valid ones and ones that break one check each.

Run ``python conformance/vectors/generate.py`` (from the repository, with imgpack installed); it rewrites
``valid/``, ``invalid/`` and ``VECTORS.json`` byte-identically on every run: weights come from fixed seeds,
the config records a fixed ``imgpackVersion`` and no timestamp.

Every invalid vector is named ``<CHECK-ID>-<what is wrong>`` and is built so that exactly that check fails:
bases are chosen so no other check sees the defect (a tensor mutation happens in a model without header
layers or architecture rules when those would notice it too).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgpack.schemas import spec
from imgpack.schemas.config import model_config
from imgpack.schemas.manifest import Layer, encode_json, title_for
from imgpack.schemas.quantized import QUANT_TYPES, QuantLayout
from imgpack.schemas.safetensors import DTYPE_SIZES, encode_entries, encode_header

HERE = Path(__file__).resolve().parent
TOKENIZER_DIR = HERE.parent.parent / "tests" / "models" / "zimage-tiny" / "tokenizer"
VECTOR_IMGPACK_VERSION = "conformance-vectors-1"
#: Tensors larger than this repeat a seeded pattern, so the committed files compress well in git.
PATTERN_ELEMENTS = 4096


# -- tensors ---------------------------------------------------------------------------------------------


@dataclass
class Tensor:
    name: str
    dtype: str
    shape: list[int]
    data: bytes


def _values(name: str, count: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    pattern = (rng.standard_normal(min(count, PATTERN_ELEMENTS)) * 0.05).astype(np.float32)
    return np.resize(pattern, count) if count else pattern[:0]


def tensor_bytes(name: str, dtype: str, shape: list[int]) -> bytes:
    """Deterministic little-endian bytes of a tensor; norm weights are near 1 as a trained model's are."""
    count = math.prod(shape)
    values = _values(name, count)
    if "norm" in name and name.endswith("weight"):
        values = values + 1.0
    if dtype == "BF16":
        return (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    floats = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}
    if dtype in floats:
        return values.astype(floats[dtype]).tobytes()
    if dtype == "C64":
        return np.stack([values, -values], axis=-1).astype("<f4").tobytes()
    if dtype == "BOOL":
        return (values > 0).astype(np.uint8).tobytes()
    ints = {"U8": "<u1", "I8": "<i1", "I16": "<i2", "U16": "<u2", "I32": "<i4", "U32": "<u4", "I64": "<i8",
            "U64": "<u8", "F8_E5M2": "<u1", "F8_E4M3": "<u1", "F8_E8M0": "<u1"}
    return (np.abs(values) * 1000).astype(np.int64).astype(ints[dtype]).tobytes()


def make_tensor(name: str, dtype: str, shape: list[int]) -> Tensor:
    return Tensor(name, dtype, list(shape), tensor_bytes(name, dtype, shape))


def safetensors_header(entries: list[tuple[str, str, list[int]]]) -> bytes:
    """The header part (length + JSON) of a safetensors file holding ``entries`` in order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape in entries:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def padded_header(document: dict[str, Any], pad: bytes = b" ") -> bytes:
    text = json.dumps(document, separators=(",", ":")).encode()
    text += pad * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


# -- models ----------------------------------------------------------------------------------------------


@dataclass
class Model:
    """A diffusers-layout model in memory: files by name, tensors, and which safetensors file held which."""

    files: dict[str, bytes]
    tensors: list[Tensor]
    #: safetensors file name -> tensor names in file order (becomes a header layer).
    sources: dict[str, list[str]] = field(default_factory=dict)


def _json(document: Any) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


ZIMAGE_INDEX = {
    "_class_name": "ZImagePipeline",
    "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3Model"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
ZIMAGE_TRANSFORMER = {
    "_class_name": "ZImageTransformer2DModel", "all_f_patch_size": [1], "all_patch_size": [2],
    "axes_dims": [2, 2, 4], "axes_lens": [64, 32, 32], "cap_feat_dim": 16, "dim": 16, "in_channels": 16,
    "n_heads": 2, "n_kv_heads": 2, "n_layers": 1, "n_refiner_layers": 1, "norm_eps": 1e-05, "qk_norm": True,
    "rope_theta": 256.0, "t_scale": 1000.0,
}
ZIMAGE_TEXT_ENCODER = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 8, "hidden_act": "silu",
    "hidden_size": 16, "intermediate_size": 32, "max_position_embeddings": 4096, "model_type": "qwen3",
    "num_attention_heads": 2, "num_hidden_layers": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 512,
}
ZIMAGE_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [4, 8],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"], "force_upcast": True, "in_channels": 3,
    "latent_channels": 16, "layers_per_block": 1, "mid_block_add_attention": True, "norm_num_groups": 4,
    "out_channels": 3, "sample_size": 64, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "use_post_quant_conv": False,
    "use_quant_conv": False,
}
ZIMAGE_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                    "use_dynamic_shifting": False}


def zimage_model(*, sharded: bool = False, te_prefix: str = "model.", lm_head: bool = False,
                 encoder: bool = True, transformer_config: dict | None = None) -> Model:
    """A micro Z-Image-Turbo pipeline; its tensor set is derived by the suite's own rules (checked there)."""
    from imgpack.architectures import zimage

    configs = {
        "transformer/config.json": transformer_config or ZIMAGE_TRANSFORMER,
        "text_encoder/config.json": ZIMAGE_TEXT_ENCODER,
        "vae/config.json": ZIMAGE_VAE,
    }
    expectation = zimage.expected_tensors({**configs, "transformer/config.json": ZIMAGE_TRANSFORMER})
    shapes = dict(expectation.required)
    if encoder:
        shapes.update({k: v for k, v in expectation.optional.items() if k.startswith("vae/")})
    if lm_head:
        shapes["text_encoder/lm_head.weight"] = expectation.optional["text_encoder/lm_head.weight"]
    tensors = []
    for name, shape in sorted(shapes.items()):
        if name.startswith("text_encoder/model."):
            name = "text_encoder/" + te_prefix + name[len("text_encoder/model."):]
        dtype = "BF16"
        if sharded and ("norm" in name or name.endswith(".bias")):
            dtype = "F32"
        elif sharded and name.startswith("text_encoder/"):
            dtype = "F16"
        tensors.append(make_tensor(name, dtype, shape))
    files = {name: _json(doc) for name, doc in configs.items()}
    files["model_index.json"] = _json(ZIMAGE_INDEX)
    files["scheduler/scheduler_config.json"] = _json(ZIMAGE_SCHEDULER)
    for path in sorted(TOKENIZER_DIR.iterdir()):
        files["tokenizer/" + path.name] = path.read_bytes()
    sources: dict[str, list[str]] = {}
    by_component: dict[str, list[str]] = {}
    for t in tensors:
        by_component.setdefault(t.name.split("/", 1)[0], []).append(t.name)
    weights = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
    for component, names in sorted(by_component.items()):
        stem = weights[component]
        if sharded and component in ("transformer", "text_encoder"):
            half = len(names) // 2
            shards = [names[:half], names[half:]]
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                file = f"{component}/{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
                sources[file] = shard
                weight_map.update({n.split("/", 1)[1]: file.split("/", 1)[1] for n in shard})
            total = sum(len(t.data) for t in tensors if t.name.startswith(component + "/"))
            files[f"{component}/{stem}.safetensors.index.json"] = _json(
                {"metadata": {"total_size": total}, "weight_map": weight_map})
        else:
            sources[f"{component}/{stem}.safetensors"] = names
    return Model(files, tensors, sources)


GENERIC_INDEX = {"_class_name": "ConformanceTestPipeline", "weights": ["diffusers", "ModelMixin"]}


def generic_model(tensors: list[Tensor] | None = None, *, headers: bool = False) -> Model:
    """A model of an architecture the suite has no rules for: only the generic checks apply."""
    tensors = tensors or [
        make_tensor("weights/embed.weight", "BF16", [8, 4]),
        make_tensor("weights/proj.bias", "F32", [4]),
        make_tensor("weights/proj.weight", "BF16", [2, 3]),
    ]
    files = {"model_index.json": _json(GENERIC_INDEX),
             "weights/config.json": _json({"_class_name": "ModelMixin", "width": 4})}
    sources = {"weights/diffusion_pytorch_model.safetensors": [t.name for t in tensors]} if headers else {}
    return Model(files, tensors, sources)


def dtype_model() -> Model:
    """One tensor of every dtype, plus 0-d, 1-d and empty tensors."""
    tensors = [make_tensor(f"weights/{dtype.lower()}.weight", dtype, [3, 2]) for dtype in DTYPE_SIZES]
    tensors += [
        make_tensor("weights/scalar", "F32", []),
        make_tensor("weights/vector", "BF16", [5]),
        make_tensor("weights/empty", "F16", [0, 4]),
    ]
    return generic_model(sorted(tensors, key=lambda t: t.name), headers=True)


def quantized_blob(name: str, qtype: str, shape: list[int], *, scale_shape: list[int] | None = None
                   ) -> tuple[bytes, dict[str, Any]]:
    """A canonical quantized tensor blob (spec §2.6) of seeded bytes and the descriptor fields it needs."""
    q = QUANT_TYPES[qtype]
    rows, cols = shape
    packed = [rows, cols * q.bits // 32]
    scales = scale_shape or [rows, cols // q.group_size]
    scale_dtype = "BF16" if q.has_biases else "U8"
    entries = [(name, "U32", packed), (name + ".scale", scale_dtype, scales)]
    if q.has_biases:
        entries.append((name + ".bias", scale_dtype, scales))
    header = encode_entries(entries, {"group_size": str(q.group_size), "quant_type": q.name})
    data = b"".join(tensor_bytes(key, dtype, s) for key, dtype, s in sorted(entries))
    info = QuantLayout(q, tuple(packed), scale_dtype)
    fields = {"dtype": "BF16", "shape": list(shape), "annotations": {spec.QUANTIZATION_ANNOTATION:
                                                                     info.annotation()}}
    return header + data, fields


def quantized_vector(name: str, *, break_scale: bool = False) -> Vector:
    """A generic model whose linear weights are stored in each quantization type."""
    tensors = [make_tensor(f"weights/{n}.weight", "BF16", shape) for n, shape in
               (("q8", [4, 64]), ("q4", [4, 64]), ("fp8", [4, 64]), ("fp4", [4, 32]))]
    vector = pack(name, generic_model(tensors + [make_tensor("weights/norm.weight", "F32", [64])]))
    for t, qtype in zip(tensors, ("int8", "int4", "mxfp8", "nvfp4"), strict=True):
        layer = vector.layer(t.name)
        wrong = [4, 3] if break_scale and qtype == "int4" else None
        blob, fields = quantized_blob(t.name, qtype, t.shape, scale_shape=wrong)
        vector.replace_blob(layer, blob)
        layer["annotations"].update(fields.pop("annotations"))
        layer.update(fields)
    return vector


# -- packing ---------------------------------------------------------------------------------------------


@dataclass
class Vector:
    """A packed model before it is written: blobs, layer descriptors, config and manifest, all mutable."""

    name: str
    flavour: str
    blobs: dict[str, bytes]
    layers: list[dict[str, Any]]
    model_index: dict[str, Any] | None
    config: dict[str, Any] | None = None
    document: dict[str, Any] | None = None
    raw: bytes | None = None
    index_entry: dict[str, Any] | None = None

    def put(self, data: bytes) -> tuple[str, int]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest, len(data)

    def layer(self, name: str) -> dict[str, Any]:
        return next(d for d in self.layers if d.get("name") == name)

    def replace_blob(self, layer: dict[str, Any], data: bytes) -> None:
        layer["digest"], layer["size"] = self.put(data)


def pack(name: str, model: Model, flavour: str = "oci", *, tensor_key: Callable[[Tensor], str] | None = None,
         titles: bool = True, json_type: str = spec.JSON_MEDIA_TYPE) -> Vector:
    """Lay the model out as imgpack create would (files, header layers, tensors, each sorted by name)."""
    vector = Vector(name, flavour, {}, [], None)
    files, headers, tensors = [], [], []
    for file, data in sorted(model.files.items()):
        media_type = json_type if file.endswith(".json") else spec.FILE_MEDIA_TYPE
        digest, size = vector.put(data)
        files.append({"mediaType": media_type, "digest": digest, "size": size, "name": file})
    by_name = {t.name: t for t in model.tensors}
    for file, names in model.sources.items():
        prefix = file.rsplit("/", 1)[0] + "/"
        entries = [(n[len(prefix):], by_name[n].dtype, by_name[n].shape) for n in names]
        digest, size = vector.put(safetensors_header(entries))
        headers.append({"mediaType": spec.SAFETENSORS_HEADER_MEDIA_TYPE, "digest": digest, "size": size,
                        "name": file})
    for t in sorted(model.tensors, key=lambda t: t.name):
        if tensor_key is None:
            header = encode_header(t.dtype, t.shape)
        else:
            nbytes = len(t.data)
            header = padded_header({tensor_key(t): {"dtype": t.dtype, "shape": t.shape,
                                                    "data_offsets": [0, nbytes]}})
        digest, size = vector.put(header + t.data)
        tensors.append({"mediaType": spec.TENSOR_MEDIA_TYPE, "digest": digest, "size": size, "name": t.name,
                        "dtype": t.dtype, "shape": list(t.shape)})
    vector.layers = files + headers + tensors
    if titles:
        for layer in vector.layers:
            layer["annotations"] = {spec.TITLE_ANNOTATION: title_for(str(layer["name"]), str(layer["mediaType"]))}
    if "model_index.json" in model.files:
        vector.model_index = json.loads(model.files["model_index.json"])
    return vector


def build_config(vector: Vector) -> dict[str, Any]:
    """The imgpack config blob for the vector's layers, with a fixed version so the output is stable."""
    tensors = [Layer.from_json(d) for d in vector.layers if d.get("mediaType") == spec.TENSOR_MEDIA_TYPE
               and isinstance(d.get("shape"), list)]
    config = model_config(vector.model_index or {"_class_name": "Unknown"}, tensors, None)
    config["imgpackVersion"] = VECTOR_IMGPACK_VERSION
    return config


def ollama_config(vector: Vector) -> dict[str, Any]:
    """A docker-style container config like the ones ollama writes (not imgpack's config schema)."""
    return {"architecture": "amd64", "os": "linux", "model_format": "safetensors",
            "model_family": (vector.model_index or {}).get("_class_name", ""),
            "rootfs": {"type": "layers", "diff_ids": []}}


def finish(vector: Vector, *, config: Callable[[dict], None] | None = None,
           document: Callable[[dict], None] | None = None) -> Vector:
    """Add config and manifest, after the layer mutations so the config summary matches them."""
    if vector.config is None:
        vector.config = build_config(vector)
    if config:
        config(vector.config)
    digest, size = vector.put(encode_json(vector.config))
    config_type = spec.CONFIG_MEDIA_TYPE if vector.flavour == "oci" else spec.OLLAMA_CONFIG_MEDIA_TYPE
    doc: dict[str, Any] = {"schemaVersion": 2}
    if vector.flavour == "oci":
        doc.update({"mediaType": spec.OCI_MANIFEST, "artifactType": spec.ARTIFACT_TYPE})
    else:
        doc["mediaType"] = spec.DOCKER_MANIFEST
    doc["config"] = {"mediaType": config_type, "digest": digest, "size": size}
    doc["layers"] = vector.layers
    if document:
        document(doc)
    vector.document = doc
    if vector.raw is None:
        vector.raw = encode_json(doc)
    digest, size = vector.put(vector.raw)
    entry: dict[str, Any] = {"mediaType": doc.get("mediaType", spec.OCI_MANIFEST), "digest": digest, "size": size}
    if vector.flavour == "oci":
        entry["artifactType"] = spec.ARTIFACT_TYPE
    entry["annotations"] = {spec.REF_NAME_ANNOTATION: f"vectors/{vector.name.lower()}:v1"}
    vector.index_entry = entry
    return vector


def write_layout(vector: Vector, root: Path, *, referenced_only: bool = True) -> None:
    """Write an OCI image layout holding exactly the blobs the vector's manifest and config reference."""
    if root.exists():
        shutil.rmtree(root)
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}) + "\n")
    index = {"schemaVersion": 2, "mediaType": spec.OCI_INDEX, "manifests": [vector.index_entry]}
    (root / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    for digest, data in sorted(vector.blobs.items()):
        (blobs / digest.split(":", 1)[1]).write_bytes(data)


# -- the vectors -----------------------------------------------------------------------------------------


@dataclass
class Spec:
    name: str
    description: str
    build: Callable[[], Vector]
    #: Layout-level edits after writing (remove a blob, drop oci-layout).
    after: Callable[[Path, Vector], None] | None = None

    @property
    def valid(self) -> bool:
        return not self.name[:3].isupper()

    @property
    def check(self) -> str | None:
        return None if self.valid else self.name[:7]


def _mutate_tensor(vector: Vector, name: str, header: bytes, data: bytes) -> dict[str, Any]:
    layer = vector.layer(name)
    vector.replace_blob(layer, header + data)
    return layer


def _generic(name: str, **kw: Any) -> Vector:
    return pack(name, generic_model(**kw))


def v_missing_oci_layout(root: Path, vector: Vector) -> None:
    (root / "oci-layout").unlink()


def v_missing_blob(root: Path, vector: Vector) -> None:
    (root / "blobs" / "sha256" / vector.layer("weights/proj.weight")["digest"].split(":")[1]).unlink()


def v_flip_byte(root: Path, vector: Vector) -> None:
    path = root / "blobs" / "sha256" / vector.layer("weights/proj.weight")["digest"].split(":")[1]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def build_specs() -> list[Spec]:
    specs: list[Spec] = []

    def add(name: str, description: str, build: Callable[[], Vector],
            after: Callable[[Path, Vector], None] | None = None) -> None:
        specs.append(Spec(name, description, build, after))

    # Valid.
    add("zimage-oci", "micro Z-Image-Turbo, single-file components, BF16, OCI flavour with header layers",
        lambda: finish(pack("zimage-oci", zimage_model())))
    add("zimage-ollama", "the same model in imgpack's ollama flavour (docker v2 manifest)",
        lambda: finish(pack("zimage-ollama", zimage_model(), "ollama")))
    add("zimage-sharded", "sharded source (transformer and text encoder in two files each, with index JSON),"
        " mixed F32/F16/BF16, text-encoder keys without 'model.', lm_head present, VAE decoder only",
        lambda: finish(pack("zimage-sharded", zimage_model(sharded=True, te_prefix="", lm_head=True,
                                                            encoder=False))))
    add("dtypes", "every safetensors dtype, a 0-d, a 1-d and an empty tensor (unknown architecture: ARC-001 warns)",
        lambda: finish(pack("dtypes", dtype_model())))

    def ollama_made() -> Vector:
        vector = pack("ollama-made", zimage_model(), "ollama", tensor_key=lambda t: t.name.split("/", 1)[1],
                      titles=False, json_type=spec.OLLAMA_LEGACY_JSON_MEDIA_TYPE)
        vector.config = ollama_config(vector)
        return finish(vector)

    add("ollama-made", "shaped like an ollama-written image model: docker config, no title annotations, tensors"
        " keyed by name, legacy JSON media type (passes with warnings)", ollama_made)
    add("quantized", "linear weights stored int8, int4, mxfp8 and nvfp4 in the canonical combined form (§2.6)",
        lambda: finish(quantized_vector("quantized")))

    # Invalid: each breaks exactly the check its name starts with.
    add("LAY-001-missing-oci-layout", "the oci-layout file is missing",
        lambda: finish(_generic("lay-001")), v_missing_oci_layout)

    def not_json() -> Vector:
        vector = _generic("man-001")
        vector.raw = b"this is not a manifest\n"
        return finish(vector)

    add("MAN-001-manifest-not-json", "the index points at a manifest blob that is not JSON", not_json)
    add("MAN-002-schema-version-1", "schemaVersion is 1",
        lambda: finish(_generic("man-002"), document=lambda d: d.update(schemaVersion=1)))

    def unknown_type() -> Vector:
        vector = _generic("man-003")
        vector.layer("weights/config.json")["mediaType"] = "application/octet-stream"
        return finish(vector)

    add("MAN-003-unknown-layer-media-type", "a file layer has media type application/octet-stream", unknown_type)

    def index_size() -> Vector:
        vector = finish(_generic("man-004"))
        assert vector.index_entry is not None
        vector.index_entry["size"] += 1
        return vector

    add("MAN-004-index-size-mismatch", "index.json's descriptor gives the manifest size plus one", index_size)

    def wrong_title() -> Vector:
        vector = _generic("man-005")
        vector.layer("weights/config.json")["annotations"][spec.TITLE_ANNOTATION] = "config.json"
        return finish(vector)

    add("MAN-005-title-not-name", "a layer's title annotation is not its name", wrong_title)
    add("TNS-010-quantized-scale-shape", "an int4 tensor's scale has 3 groups where its 64 columns make 2",
        lambda: finish(quantized_vector("tns-010", break_scale=True)))

    def no_shape() -> Vector:
        vector = _generic("man-006")
        del vector.layer("weights/proj.weight")["shape"]
        return finish(vector)

    add("MAN-006-tensor-without-shape", "an OCI-flavour tensor layer has no shape field", no_shape)
    add("BLB-001-missing-blob", "a tensor blob is absent from the layout", lambda: finish(_generic("blb-001")),
        v_missing_blob)

    def size_mismatch() -> Vector:
        vector = _generic("blb-002")
        vector.layer("weights/proj.weight")["size"] += 1
        return finish(vector)

    add("BLB-002-size-mismatch", "a tensor descriptor's size is one more than its blob", size_mismatch)
    add("BLB-003-digest-mismatch", "a tensor blob's last byte was flipped after hashing",
        lambda: finish(_generic("blb-003")), v_flip_byte)
    add("CFG-001-config-without-spec-version", "the config blob lacks specVersion",
        lambda: finish(_generic("cfg-001"), config=lambda c: c.pop("specVersion")))

    def unsafe_name() -> Vector:
        vector = _generic("nam-001")
        layer = vector.layer("weights/config.json")
        layer["name"] = "weights/../escape.json"
        layer["annotations"][spec.TITLE_ANNOTATION] = layer["name"]
        return finish(vector)

    add("NAM-001-parent-segment", "a layer name climbs out with '..'", unsafe_name)

    def bidi_name() -> Vector:
        vector = _generic("nam-001-bidi")
        layer = vector.layer("weights/config.json")
        layer["name"] = "weights/nosj.\u202egifnoc.json"  # shows as weights/nosj.json.config on a terminal
        layer["annotations"][spec.TITLE_ANNOTATION] = layer["name"]
        return finish(vector)

    add("NAM-001-bidi-override", "a layer name holds U+202E, which shows its tail reversed", bidi_name)

    def duplicate() -> Vector:
        vector = _generic("nam-002")
        layer = dict(vector.layer("weights/config.json"))
        vector.replace_blob(layer, _json({"_class_name": "ModelMixin", "width": 5}))
        vector.layers.insert(vector.layers.index(vector.layer("weights/config.json")) + 1, layer)
        return finish(vector)

    add("NAM-002-duplicate-name", "two file layers are both named weights/config.json", duplicate)

    def file_and_dir() -> Vector:
        model = generic_model()
        model.files["weights"] = b"a file where a folder must be\n"
        return finish(pack("nam-003", model))

    add("NAM-003-file-and-directory", "a file layer 'weights' collides with the folder of weights/*", file_and_dir)

    def header_past_end() -> Vector:
        vector = _generic("tns-001")
        t = make_tensor("weights/proj.weight", "BF16", [2, 3])
        header = encode_header(t.dtype, t.shape)
        _mutate_tensor(vector, t.name, struct.pack("<Q", len(header) + len(t.data)) + header[8:], t.data)
        return finish(vector)

    add("TNS-001-header-past-end", "the header length field runs past the end of the blob", header_past_end)

    def two_tensors() -> Vector:
        vector = _generic("tns-002")
        t = make_tensor("weights/proj.weight", "BF16", [2, 3])
        header = padded_header({"data": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
                                "more": {"dtype": "BF16", "shape": [0], "data_offsets": [12, 12]}})
        _mutate_tensor(vector, t.name, header, t.data)
        return finish(vector)

    add("TNS-002-two-tensors", "a tensor blob's header holds two tensors", two_tensors)

    def bad_padding() -> Vector:
        vector = _generic("tns-003")
        t = make_tensor("weights/proj.weight", "BF16", [2, 3])
        header = padded_header({"data": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}, pad=b"\n")
        assert header.endswith(b"\n"), "choose a tensor whose header needs padding"
        _mutate_tensor(vector, t.name, header, t.data)
        return finish(vector)

    add("TNS-003-padding-not-spaces", "a tensor header is padded with newlines instead of spaces", bad_padding)

    def key_not_data() -> Vector:
        vector = _generic("tns-004")
        t = make_tensor("weights/proj.weight", "BF16", [2, 3])
        header = padded_header({"proj.weight": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}})
        _mutate_tensor(vector, t.name, header, t.data)
        return finish(vector)

    add("TNS-004-tensor-key-not-data", "an OCI-flavour tensor blob keys its tensor by name, not 'data'",
        key_not_data)

    def unknown_dtype() -> Vector:
        vector = _generic("tns-005")
        t = make_tensor("weights/proj.weight", "BF16", [2, 3])
        header = padded_header({"data": {"dtype": "Q4_K", "shape": [2, 3], "data_offsets": [0, 12]}})
        _mutate_tensor(vector, t.name, header, t.data)
        return finish(vector)

    add("TNS-005-unknown-dtype", "a tensor header names dtype Q4_K", unknown_dtype)

    def bad_offsets() -> Vector:
        vector = _generic("tns-006")
        t = make_tensor("weights/proj.weight", "BF16", [2, 3])
        header = padded_header({"data": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 10]}})
        _mutate_tensor(vector, t.name, header, t.data)
        return finish(vector)

    add("TNS-006-data-offsets", "data_offsets say [0, 10] for a 12-byte BF16 [2, 3] tensor", bad_offsets)

    def trailing() -> Vector:
        vector = _generic("tns-007")
        t = make_tensor("weights/proj.weight", "BF16", [2, 3])
        _mutate_tensor(vector, t.name, encode_header(t.dtype, t.shape), t.data + b"\0\0\0\0")
        return finish(vector)

    add("TNS-007-trailing-bytes", "a tensor blob has four bytes after its data", trailing)

    def shape_mismatch() -> Vector:
        vector = _generic("tns-008")
        vector.layer("weights/proj.weight")["shape"] = [3, 2]
        return finish(vector)

    add("TNS-008-descriptor-shape-mismatch", "the descriptor says [3, 2], the blob header [2, 3]", shape_mismatch)

    def not_json_file() -> Vector:
        vector = _generic("fil-001")
        vector.replace_blob(vector.layer("weights/config.json"), b"{\"_class_name\": \"ModelMixin\",\n")
        return finish(vector)

    add("FIL-001-json-layer-not-json", "weights/config.json is cut short", not_json_file)

    def no_index() -> Vector:
        model = generic_model()
        del model.files["model_index.json"]
        vector = pack("fil-002", model)
        vector.model_index = GENERIC_INDEX
        return finish(vector)

    add("FIL-002-no-model-index", "there is no model_index.json layer", no_index)

    def empty_component() -> Vector:
        model = generic_model()
        model.files["model_index.json"] = _json({**GENERIC_INDEX, "scheduler": ["diffusers", "DDIMScheduler"]})
        return finish(pack("fil-003", model))

    add("FIL-003-component-without-layers", "model_index.json lists a scheduler that has no layers",
        empty_component)

    def header_mismatch() -> Vector:
        model = generic_model(headers=True)
        model.sources["weights/diffusion_pytorch_model.safetensors"].append("weights/absent.weight")
        model.tensors.append(make_tensor("weights/absent.weight", "F32", [2]))
        vector = pack("fil-004", model)
        vector.layers = [d for d in vector.layers if d["name"] != "weights/absent.weight"]
        return finish(vector)

    add("FIL-004-header-layer-mismatch", "a safetensors header layer lists a tensor that has no layer",
        header_mismatch)

    def config_missing_dim() -> Vector:
        config = {k: v for k, v in ZIMAGE_TRANSFORMER.items() if k != "dim"}
        model = zimage_model(transformer_config=config)
        model.sources = {}
        return finish(pack("arc-002", model))

    add("ARC-002-transformer-config-without-dim", "transformer/config.json has no 'dim'", config_missing_dim)

    def missing_tensor() -> Vector:
        model = zimage_model()
        model.tensors = [t for t in model.tensors if t.name != "transformer/t_embedder.mlp.0.weight"]
        model.sources = {}
        return finish(pack("arc-003", model))

    add("ARC-003-missing-tensor", "transformer/t_embedder.mlp.0.weight is absent", missing_tensor)

    def wrong_shape() -> Vector:
        model = zimage_model()
        model.tensors = [make_tensor(t.name, t.dtype, [1024, 8]) if t.name == "transformer/t_embedder.mlp.0.weight"
                         else t for t in model.tensors]
        model.sources = {}
        return finish(pack("arc-004", model))

    add("ARC-004-wrong-shape", "transformer/t_embedder.mlp.0.weight is [1024, 8]; the config needs [1024, 256]",
        wrong_shape)
    return specs


def generate(out: Path = HERE) -> list[dict[str, Any]]:
    """Write every vector under ``out`` and return the catalogue written to VECTORS.json."""
    catalogue = []
    for folder in ("valid", "invalid"):
        if (out / folder).exists():
            shutil.rmtree(out / folder)
    for s in build_specs():
        vector = s.build()
        root = out / ("valid" if s.valid else "invalid") / s.name
        write_layout(vector, root)
        if s.after:
            s.after(root, vector)
        catalogue.append({
            "name": s.name,
            "path": str(root.relative_to(out)),
            "valid": s.valid,
            "check": s.check,
            "flavour": vector.flavour,
            "reference": vector.index_entry["annotations"][spec.REF_NAME_ANNOTATION] if vector.index_entry else None,
            "description": s.description,
        })
    (out / "VECTORS.json").write_text(json.dumps(catalogue, indent=2) + "\n")
    return catalogue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="where to write (default: next to this script)")
    args = parser.parse_args()
    catalogue = generate(args.out)
    print(f"wrote {len(catalogue)} vectors to {args.out}")


if __name__ == "__main__":
    main()
