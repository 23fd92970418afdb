"""``imgpack convert SRC DST --quantize Q --dtype D``: a new stored model whose tensors are stored another way.

The source is any stored model (imgpack's, or imported from ollama). Each tensor is quantized, cast or kept by
the same rules ``create`` uses; a kept tensor is the source's own blob, so the VAE, the configs and every
unchanged tensor are shared (stored once, pulled once). Tensors already quantized are kept as they are. A
component whose tensors change loses its source-file header layers and shard indexes (they describe files that
no longer match); ``export`` writes it as one standard safetensors file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from imgpack.packager.create import tensor_layer
from imgpack.packager.transform import StoragePolicy, transform_tensor
from imgpack.schemas import spec
from imgpack.schemas.config import model_config
from imgpack.schemas.content import read_tensor_header
from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.jsondoc import parse_json_object
from imgpack.schemas.manifest import Layer, build_manifest, encode_json
from imgpack.schemas.quantized import QuantLayout, _split_keys, blob_quantization, quant_type
from imgpack.schemas.reference import Reference
from imgpack.store.store import Store

ProgressFn = Callable[[int], None]


@dataclass
class ConvertResult:
    reference: str
    digest: str
    quantized: int
    cast: int
    unchanged: int
    new_blobs: int
    new_bytes: int
    total_bytes: int


def _source_tensor(store: Store, layer: Layer) -> tuple[Layer, str, list[int], int, int, bool]:
    """(the layer with dtype, shape and quantization filled in from its blob where the descriptor lacks them —
    ollama's do —, dtype, shape, data offset, nbytes, already quantized) of a stored tensor blob."""
    path = store.blob_path(layer.digest)

    def read(offset: int, length: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    header = read_tensor_header(read, layer.size, f"layer {layer.name!r}")
    if layer.quantization or blob_quantization(header) is not None:
        if layer.quantization and layer.dtype and layer.shape is not None:
            return layer, layer.dtype, list(layer.shape), 0, 0, True
        base, _ = _split_keys(header.entries, layer.name)
        if base is None or header.metadata is None:
            raise ImgpackError(f"layer {layer.name!r}: unreadable quantized blob")
        q = quant_type(header.metadata["quant_type"]).with_group_size(int(header.metadata["group_size"]))
        scale = header.entries[base + ".scale"]
        quant = QuantLayout(q, tuple(header.entries[base].shape), scale.dtype)
        dtype = layer.dtype or (scale.dtype if q.has_biases else "BF16")
        filled = tensor_layer(layer.name or "", layer.digest, layer.size, dtype, quant.shape,
                              {spec.QUANTIZATION_ANNOTATION: quant.annotation()})
        return filled, dtype, quant.shape, 0, 0, True
    if len(header.entries) != 1:
        raise ImgpackError(f"layer {layer.name!r}: blob holds {len(header.entries)} tensors, not one")
    (entry,) = header.entries.values()
    filled = layer if layer.dtype and layer.shape is not None else tensor_layer(
        layer.name or "", layer.digest, layer.size, entry.dtype, list(entry.shape))
    return filled, entry.dtype, list(entry.shape), header.data_start + entry.begin, entry.nbytes, False


def convert_model(store: Store, source: str, target: str, *, quantize: str | None = None, dtype: str | None = None,
                  workers: int | None = None, progress: ProgressFn | None = None,
                  plan_done: Callable[[int], None] | None = None) -> ConvertResult:
    policy = StoragePolicy.parse(quantize, dtype)
    if not policy.active:
        raise ImgpackError("convert: give --quantize TYPE and/or --dtype DTYPE")
    ref = Reference.parse(target)
    if ref.digest:
        raise ImgpackError(f"{target}: a model name cannot contain a digest; use NAME[:TAG]")
    manifest = store.get_manifest(source)
    jobs: list[tuple[Layer, str, list[int], int, int]] = []
    kept: list[Layer] = []
    for layer in manifest.tensors:
        name = layer.name or ""
        component, _, key = name.partition("/")
        filled, dtype_, shape, offset, nbytes, quantized = _source_tensor(store, layer)
        transform = None if quantized else policy.for_tensor(component, key, dtype_, shape)
        if transform is None:
            kept.append(filled)
        else:
            jobs.append((layer, dtype_, shape, offset, nbytes))
    if not jobs:
        raise ImgpackError(f"{source}: no tensor would change (already stored that way?)")
    if plan_done:
        plan_done(sum(nbytes for *_, nbytes in jobs))
    new_blobs = new_bytes = 0

    def convert(job: tuple[Layer, str, list[int], int, int]) -> tuple[Layer, bool]:
        layer, dtype_, shape, offset, nbytes = job
        name = layer.name or ""
        component, _, key = name.partition("/")
        transform = policy.for_tensor(component, key, dtype_, shape)
        assert transform is not None
        with open(store.blob_path(layer.digest), "rb") as f:
            f.seek(offset)
            data = f.read(nbytes)
        parts, out_dtype, out_shape, annotations = transform_tensor(name, data, dtype_, shape, transform)
        del data
        with store.writer() as w:
            for part in parts:
                w.write(part)
            new = w.keep_if_new()
            digest, size = w.current_digest(), w.size
        if progress:
            progress(nbytes)
        return tensor_layer(name, digest, size, out_dtype, out_shape, annotations), new

    changed = {(layer.name or "").split("/", 1)[0] for layer, *_ in jobs}
    with store.writing():
        with ThreadPoolExecutor(max_workers=workers or max(1, min(2, os.cpu_count() or 1))) as pool:
            converted = list(pool.map(convert, jobs))
        for layer, new in converted:
            if new:
                new_blobs += 1
                new_bytes += layer.size
        files = [f for f in manifest.files
                 if not ((f.name or "").endswith(".safetensors.index.json") and f.component in changed)]
        headers = [h for h in manifest.headers if h.component not in changed]
        tensors = sorted([*kept, *(layer for layer, _ in converted)], key=lambda t: t.name or "")
        index_layer = manifest.find("model_index.json")
        if index_layer is None:
            raise ImgpackError(f"{source}: no model_index.json layer")
        model_index = parse_json_object(store.read_blob(index_layer.digest), f"{source}: model_index.json")
        n_quantized = sum(1 for layer, _ in converted if layer.quantization)
        n_cast = len(converted) - n_quantized
        config = model_config(model_index, tensors, None, policy.config_record(n_quantized, n_cast))
        config_digest, config_size = store.put_bytes(encode_json(config))
        config_type = spec.CONFIG_MEDIA_TYPE if manifest.flavour == "oci" else spec.OLLAMA_CONFIG_MEDIA_TYPE
        layers = files + headers + tensors
        raw = build_manifest(Layer(config_type, config_digest, config_size), layers, manifest.flavour)
        digest = store.put_manifest(ref, raw)
    return ConvertResult(str(ref), digest, n_quantized, n_cast, len(kept), new_blobs, new_bytes,
                         sum(layer.size for layer in layers) + config_size)
