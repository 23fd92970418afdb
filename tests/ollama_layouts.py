"""Write a diffusers model directory out as an ollama models directory, the way ``ollama create`` did at a date.

Written from ollama's code (``x/create/imagegen.go``, ``x/create/client/{create,quantize}.go``,
``x/imagegen/safetensors/extractor.go``, ``server/manifest.go``), not from its
README, so tests can read every layout ollama really wrote without ollama:

* unquantized tensors: Go's writer, one tensor per blob, ``{"<key>":{"dtype","shape","data_offsets"}}`` padded
  with spaces to a multiple of 8, no ``__metadata__``; the key is ``data`` before 2026-02-10 and the tensor's
  name without the component prefix from then on;
* quantized, 2026-01-12 .. 02-09: three layers ``<name>``, ``<name>_scale``, ``<name>_qbias`` (no qbias for the
  float modes), each an ``mx.save_safetensors`` blob keyed ``data`` with ``__metadata__: null``;
* quantized, from 2026-02-10: one ``mx.save_safetensors`` blob with ``<component>/<tensor>``, ``.scale``,
  ``.bias`` and ``__metadata__`` ``{"group_size", "quant_type"}`` (unpadded, data in MLX's hash-map order);
* the nine JSON files ollama imported (``model_index.json`` rewritten with Go's ``MarshalIndent``), layers
  with only ``mediaType``/``digest``/``size``/``name``, and the docker container config (``ConfigV2``).

Everything is deterministic: the same source, layout and name give the same bytes (on one platform: MLX's data
order follows libstdc++'s ``unordered_map``, as ollama's did on Linux).

    python tests/ollama_layouts.py tests/models/zimage-tiny OUT_DIR feb-int8 [--name z-image] [--tag latest]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST, NAMESPACE, TAG = "registry.ollama.ai", "library", "latest"
TENSOR_MEDIA_TYPE = "application/vnd.ollama.image.tensor"
JSON_MEDIA_TYPE = "application/vnd.ollama.image.json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
COMPONENTS = ("text_encoder", "transformer", "vae")
#: The files ollama imported, in this order (2026-01-09 .. 07-02); anything else was dropped.
IMPORTED_FILES = (
    "model_index.json",
    "text_encoder/config.json",
    "text_encoder/generation_config.json",
    "transformer/config.json",
    "vae/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
)
FIRST_DATE, LAST_DATE = "2026-01-09", "2026-07-02"  # image-model create: introduced, removed the next day

#: (first date, accepted --quantize values -> MLX (group size, bits, mode)), each period until the next.
QUANTIZE_PERIODS: list[tuple[str, dict[str, tuple[int, int, str]]]] = [
    ("2026-01-09", {}),
    ("2026-01-12", {"fp8": (32, 8, "affine")}),
    ("2026-01-19", {"fp8": (32, 8, "affine"), "fp4": (32, 4, "affine")}),
    ("2026-02-02", {"q4": (32, 4, "affine"), "q8": (64, 8, "affine"), "nvfp4": (16, 4, "nvfp4"),
                    "mxfp8": (32, 8, "mxfp8")}),
    ("2026-02-10", {"int4": (32, 4, "affine"), "int8": (64, 8, "affine"), "nvfp4": (16, 4, "nvfp4"),
                    "mxfp8": (32, 8, "mxfp8")}),
    ("2026-03-06", {"int4": (64, 4, "affine"), "int8": (64, 8, "affine"), "nvfp4": (16, 4, "nvfp4"),
                    "mxfp8": (32, 8, "mxfp8")}),
]


@dataclass(frozen=True)
class OllamaLayout:
    """What decides the bytes: the date of the ollama build that wrote the model and the ``--quantize`` value."""

    date: str
    quantize: str = ""

    @property
    def name_keyed(self) -> bool:
        """Blob headers keyed by tensor name, and quantized tensors as one combined blob (a0407d07f)."""
        return self.date >= "2026-02-10"

    def quant_params(self) -> tuple[int, int, str] | None:
        if not FIRST_DATE <= self.date <= LAST_DATE:
            raise ValueError(f"ollama created image models from {FIRST_DATE} to {LAST_DATE}, not on {self.date}")
        if not self.quantize:
            return None
        accepted = [table for start, table in QUANTIZE_PERIODS if start <= self.date][-1]
        if self.quantize not in accepted:
            raise ValueError(f"ollama of {self.date} refused --quantize {self.quantize!r}"
                             f" (accepted: {', '.join(accepted) or 'none'})")
        return accepted[self.quantize]


#: The layouts tests use, by the name of the period that wrote them.
LAYOUTS: dict[str, OllamaLayout] = {
    "jan-unquantized": OllamaLayout("2026-01-16"),
    "jan-fp8": OllamaLayout("2026-01-16", "fp8"),  # separate layers, affine 8-bit group 32
    "jan-fp4": OllamaLayout("2026-01-19", "fp4"),  # separate layers, affine 4-bit group 32
    "feb-q8": OllamaLayout("2026-02-02", "q8"),  # separate layers, affine 8-bit group 64
    "feb-unquantized": OllamaLayout("2026-02-10"),
    "feb-int8": OllamaLayout("2026-02-10", "int8"),  # combined blobs
    "feb-int4": OllamaLayout("2026-02-10", "int4"),  # combined blobs, group 32
    "feb-nvfp4": OllamaLayout("2026-02-10", "nvfp4"),
    "feb-mxfp8": OllamaLayout("2026-02-10", "mxfp8"),
    "mar-unquantized": OllamaLayout("2026-03-27"),  # requires 0.19.0
    "mar-int8": OllamaLayout("2026-03-27", "int8"),  # file_type "int8"
    "mar-int4": OllamaLayout("2026-03-27", "int4"),  # group 64, but only a multiple of 32 checked
}


class OllamaCreateFailed(Exception):
    """ollama's own create would have failed on this model with this layout (e.g. its int4 group-64 bug)."""


@dataclass
class OllamaModel:
    """An ollama models directory the generator wrote, and where to find things in it."""

    root: Path
    name: str
    tag: str
    manifest_path: Path
    manifest: dict[str, Any]
    layout: OllamaLayout
    blobs: dict[str, bytes] = field(default_factory=dict)  # digest -> bytes, every blob written

    def layer(self, name: str) -> dict[str, Any]:
        return next(layer for layer in self.manifest["layers"] if layer.get("name") == name)

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / digest.replace(":", "-")

    def read(self, name: str) -> bytes:
        return self.blob_path(self.layer(name)["digest"]).read_bytes()

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.blob_path(self.manifest["config"]["digest"]).read_bytes())


def write_ollama_model(source: Path, root: Path, layout: OllamaLayout | str, name: str = "z-image",
                       tag: str = TAG) -> OllamaModel:
    """Import the diffusers directory ``source`` into the ollama models directory ``root`` as ``name:tag``."""
    if isinstance(layout, str):
        layout = LAYOUTS[layout]
    params = layout.quant_params()
    namespace, _, model = name.rpartition("/")
    model_path = root / "manifests" / HOST / (namespace or NAMESPACE) / model / tag
    writer = _BlobWriter(root)
    layers: list[dict[str, Any]] = []
    total_params = 0
    for component in COMPONENTS:
        folder = source / component
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.iterdir() if p.name.endswith(".safetensors")):
            for key, dtype, shape, raw in _read_tensors(path):
                total_params += math.prod(shape)
                full = f"{component}/{key}"
                go_blob = _go_tensor_blob(key if layout.name_keyed else "data", dtype, shape, raw)
                if params and _should_quantize(layout, key, component, shape):
                    blobs = _quantized_blobs(layout, full, go_blob, params)
                    layers += [_layer(TENSOR_MEDIA_TYPE, writer.put(data), n) for n, data in blobs]
                else:
                    layers.append(_layer(TENSOR_MEDIA_TYPE, writer.put(go_blob), full))
    for rel in IMPORTED_FILES:
        path = source / rel
        if not path.is_file():
            continue
        data = path.read_bytes()
        if rel == "model_index.json":
            data = _rewrite_model_index(json.loads(data), layout, total_params, source)
        layers.append(_layer(JSON_MEDIA_TYPE, writer.put(data), rel))
    config = _config_blob(layout, json.loads((source / "model_index.json").read_bytes()))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": _layer(CONFIG_MEDIA_TYPE, writer.put(config)),
        "layers": layers,
    }
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(_go_json(manifest, sort=False) + b"\n")  # json.Encoder: compact, trailing newline
    return OllamaModel(root, name, tag, model_path, manifest, layout, writer.written)


# -- tensors ------------------------------------------------------------------------------------------------


def _read_tensors(path: Path) -> list[tuple[str, str, list[int], bytes]]:
    """(key, dtype, shape, raw bytes) of every tensor in a safetensors file, sorted by key (ListTensors)."""
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    out = []
    for key in sorted(header):
        begin, end = header[key]["data_offsets"]
        out.append((key, header[key]["dtype"], header[key]["shape"], data[8 + n + begin : 8 + n + end]))
    return out


def _go_tensor_blob(key: str, dtype: str, shape: list[int], raw: bytes) -> bytes:
    """extractor.go's safetensorsHeader + data: json.Marshal of a one-entry map, space-padded to 8 bytes."""
    text = _go_json({key: {"dtype": dtype, "shape": shape, "data_offsets": [0, len(raw)]}}, sort=False)
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw


def _should_quantize(layout: OllamaLayout, key: str, component: str, shape: list[int]) -> bool:
    """ShouldQuantize(name, component) && canQuantizeShape(shape[, quantize]) as of ``layout.date``."""
    if component == "vae" or "embed" in key or "norm" in key or not key.endswith(".weight"):
        return False
    if layout.date >= "2026-01-16" and ("ln_" in key or "layernorm" in key or key.endswith(".bias")):
        return False
    if layout.date < "2026-01-16":  # no shape check yet
        return True
    group = 32
    if layout.date >= "2026-02-02":
        group = {"NVFP4": 16, "Q8": 64, "INT8": 64}.get(layout.quantize.upper(), 32)  # int4 stays 32 (the bug)
    return len(shape) >= 2 and shape[-1] % group == 0


def _quantized_blobs(layout: OllamaLayout, full: str, go_blob: bytes,
                     params: tuple[int, int, str]) -> list[tuple[str, bytes]]:
    """quantizeTensor: load the Go blob with MLX, quantize, save with MLX's writer; (layer name, blob) pairs."""
    from imgpack.runtime.backend import mx

    group, bits, mode = params
    with tempfile.TemporaryDirectory(prefix="ollama-quantize-") as tmp:
        src = Path(tmp, "input.safetensors")
        src.write_bytes(go_blob)
        (arr,) = mx.load(str(src)).values()
        if arr.dtype not in (mx.bfloat16, mx.float32, mx.float16):
            arr = arr.astype(mx.bfloat16)
        try:
            out = mx.quantize(arr, group_size=group, bits=bits, mode=mode)
        except ValueError as e:
            raise OllamaCreateFailed(f"ollama create --quantize {layout.quantize} ({layout.date}) fails on"
                                     f" {full} {list(arr.shape)}: {e}") from None
        mx.eval(*out)
        parts = [("", out[0]), (".scale", out[1])] + ([(".bias", out[2])] if mode == "affine" else [])

        def save(arrays: dict[str, mx.array], metadata: dict[str, str] | None) -> bytes:
            path = Path(tmp, "out.safetensors")
            mx.save_safetensors(str(path), arrays, metadata=metadata)
            return path.read_bytes()

        if not layout.name_keyed:
            legacy = {"": "", ".scale": "_scale", ".bias": "_qbias"}
            return [(full + legacy[suffix], save({"data": a}, None)) for suffix, a in parts]
        metadata = {"quant_type": layout.quantize, "group_size": str(group)}
        return [(full, save({full + suffix: a for suffix, a in parts}, metadata))]


# -- configs -------------------------------------------------------------------------------------------------


def _rewrite_model_index(doc: dict[str, Any], layout: OllamaLayout, total_params: int, source: Path) -> bytes:
    if "_class_name" in doc:
        doc["architecture"] = doc.pop("_class_name")
    doc.pop("_diffusers_version", None)
    if layout.date >= "2026-01-12":
        doc["parameter_count"] = total_params
        if layout.quantize:
            doc["quantization"] = layout.quantize.upper()
        elif layout.date < "2026-01-16":
            doc["quantization"] = "BF16"
        else:
            te = source / "text_encoder" / "config.json"
            dtype = json.loads(te.read_bytes()).get("torch_dtype") if te.is_file() else None
            doc["quantization"] = dtype if isinstance(dtype, str) else ""
    return _go_json(doc, indent=4)  # MarshalIndent(cfg, "", "    "): sorted keys, no trailing newline


def _config_blob(layout: OllamaLayout, model_index: dict[str, Any]) -> bytes:
    """model.ConfigV2 as json.Marshal writes it for an image model (omitempty fields left out when empty)."""
    capabilities = ["image"]
    if model_index.get("_class_name") == "Flux2KleinPipeline" and layout.date >= "2026-01-23":
        capabilities.append("vision")
    late = layout.date >= "2026-03-27"
    config = {
        "model_format": "safetensors",
        "model_family": "",
        "model_families": None,
        "model_type": "",
        "file_type": layout.quantize.strip().lower() if late else "",
        "requires": "0.19.0" if late else "0.14.0",
        "capabilities": capabilities,
        "architecture": "",
        "os": "",
        "rootfs": {"type": "", "diff_ids": None},
    }
    return _go_json(config, sort=False)


# -- output --------------------------------------------------------------------------------------------------


def _layer(media_type: str, blob: tuple[str, int], name: str | None = None) -> dict[str, Any]:
    digest, size = blob
    layer: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    if name is not None:
        layer["name"] = name
    return layer


class _BlobWriter:
    def __init__(self, root: Path) -> None:
        self.dir = root / "blobs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.written: dict[str, bytes] = {}

    def put(self, data: bytes) -> tuple[str, int]:
        """Store ``data`` as ``blobs/sha256-<hex>`` (temp file, rename, mode 0644); returns (digest, size)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.dir / digest.replace(":", "-")
        if not path.exists():
            tmp = path.with_name(path.name + ".partial")
            tmp.write_bytes(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        self.written[digest] = data
        return digest, len(data)


def _go_json(value: Any, indent: int | None = None, sort: bool = True) -> bytes:
    """Go's encoding/json: HTML-safe escaping, UTF-8 kept, float64 in Go's shortest form; map keys sorted
    (``sort``; structs keep field order); ``indent`` as MarshalIndent."""
    return _go_encode(value, indent, sort, 0).encode()


def _go_encode(value: Any, indent: int | None, sort: bool, depth: int) -> str:
    if isinstance(value, dict):
        items = sorted(value.items()) if sort else list(value.items())
        parts = [f"{_go_string(k)}:{' ' if indent else ''}{_go_encode(v, indent, sort, depth + 1)}" for k, v in items]
        return _go_join("{", parts, "}", indent, depth)
    if isinstance(value, list | tuple):
        return _go_join("[", [_go_encode(v, indent, sort, depth + 1) for v in value], "]", indent, depth)
    if isinstance(value, str):
        return _go_string(value)
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    return _go_float(float(value))


def _go_join(open_: str, parts: list[str], close: str, indent: int | None, depth: int) -> str:
    if not parts:
        return open_ + close
    if not indent:
        return open_ + ",".join(parts) + close
    inner, outer = "\n" + " " * indent * (depth + 1), "\n" + " " * indent * depth
    return open_ + inner + ("," + inner).join(parts) + outer + close


def _go_string(s: str) -> str:
    text = json.dumps(s, ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def _go_float(f: float) -> str:
    """encoding/json's float64: shortest 'f' form, or 'e' (``e-7``, ``e+21``) when |f| < 1e-6 or >= 1e21."""
    if f == 0:
        return "0"
    shortest = repr(f)
    if abs(f) < 1e-6 or abs(f) >= 1e21:  # repr uses an exponent over these ranges too
        mantissa, exp = shortest.split("e")
        e = int(exp)
        return f"{mantissa.removesuffix('.0')}e" + (f"-{-e}" if e < 0 else f"+{e:02d}")
    from decimal import Decimal

    text = format(Decimal(shortest), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("root", type=Path)
    ap.add_argument("layout", choices=sorted(LAYOUTS))
    ap.add_argument("--name", default="z-image")
    ap.add_argument("--tag", default=TAG)
    args = ap.parse_args(argv)
    made = write_ollama_model(args.source, args.root, args.layout, args.name, args.tag)
    print(f"{made.manifest_path}: {len(made.manifest['layers'])} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
