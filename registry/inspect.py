"""What ``imgpack show`` prints, from any location: the manifest and config only, never a tensor blob.

A remote reference is read like ``skopeo inspect --raw`` / ``oras manifest fetch`` (an index-split model is
shown as the model it carries); an artifact that is not an imgpack model is named for what it is.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any

from imgpack.registry.layout import LayoutTarget
from imgpack.registry.locations import Clients, Endpoint, open_location
from imgpack.registry.model import require_model, unsplit
from imgpack.registry.retry import RetryPolicy
from imgpack.registry.target import Target, read_node
from imgpack.registry.transport import TransportOptions
from imgpack.schemas.config import architecture_of, model_config
from imgpack.schemas.content import MAX_CONFIG_BLOB
from imgpack.schemas.errors import ImgpackError, NotFoundError
from imgpack.schemas.graph import Descriptor, parse_node
from imgpack.schemas.jsondoc import parse_json
from imgpack.schemas.locations import parse_location
from imgpack.schemas.manifest import ModelManifest
from imgpack.schemas.validate import schema_errors
from imgpack.store.store import Store

MAX_MODEL_INDEX = 1024 * 1024


@dataclass
class ModelInfo:
    where: str
    digest: str
    media_type: str
    manifest: ModelManifest
    config: dict[str, Any]
    split_index: str | None = None
    partial: str | None = None
    missing_components: list[str] = field(default_factory=list)


def _read_small(target: Target, desc: Descriptor, limit: int) -> bytes | None:
    if desc.size > limit:
        return None
    try:
        return read_node(target, Descriptor(desc.media_type, desc.digest, desc.size), limit)
    except ImgpackError:
        return None


def config_summary(target: Target, manifest: ModelManifest) -> dict[str, Any]:
    """The config blob when it is imgpack's; otherwise (ollama's container config) a summary from the layers."""
    raw = _read_small(target, Descriptor(manifest.config.media_type, manifest.config.digest, manifest.config.size),
                      MAX_CONFIG_BLOB)
    if raw is not None:
        try:
            config = parse_json(raw, "config")
            if not schema_errors("config", config):
                return config
        except ImgpackError:
            pass
    model_index: dict[str, Any] = {"_class_name": "unknown"}
    layer = manifest.find("model_index.json")
    if layer is not None:
        index_raw = _read_small(target, Descriptor(layer.media_type, layer.digest, layer.size), MAX_MODEL_INDEX)
        try:
            found = parse_json(index_raw, "model_index.json") if index_raw is not None else None
        except ImgpackError:
            found = None
        if isinstance(found, dict) and architecture_of(found):
            model_index = found
    tensors = [t for t in manifest.tensors if t.dtype is not None and t.shape is not None]
    return model_config(model_index, tensors, None) | {"imgpackVersion": "n/a (config not written by imgpack)"}


def inspect_model(text: str, store_path: str | None, *, insecure: bool = False,
                  ca_file: str | None = None) -> ModelInfo:
    location = parse_location(text)
    store = Store.open(store_path, create=False) if location.kind == "store" else None
    local = None
    if location.kind == "remote":
        # A pulled model is stored under its registry name: show that copy (partial or not) when there is one.
        with contextlib.suppress(ImgpackError):
            candidate = Store.open(store_path, create=False)
            candidate.resolve(str(location.reference))
            local = candidate
    cancel = threading.Event()
    clients = Clients(TransportOptions(insecure=insecure, ca_file=ca_file, retry=RetryPolicy(cancel=cancel)))
    try:
        endpoint = (Endpoint(LayoutTarget(local), str(location.reference), location) if local is not None
                    else open_location(location, store=store, clients=clients, write=False))
        reference = endpoint.reference or "latest"
        desc = endpoint.target.resolve(reference)
        if desc is None:
            raise NotFoundError(f"{endpoint.target.describe(reference)}: not found")
        raw = read_node(endpoint.target, desc)
        root, model_raw = unsplit(endpoint.target, desc, raw)
        where = endpoint.target.describe(reference)
        manifest = require_model(model_raw, parse_node(model_raw, where, root.media_type), where)
        info = ModelInfo("store" if local is not None else location.kind, root.digest, manifest.media_type, manifest,
                         config_summary(endpoint.target, manifest),
                         split_index=desc.digest if root.digest != desc.digest else None)
        if isinstance(endpoint.target, LayoutTarget):
            entry = next((e for e in endpoint.target.store.entries() if e.digest == root.digest and e.partial), None)
            if entry is not None:
                info.partial = entry.partial
                info.missing_components = sorted({t.component or "." for t in manifest.tensors
                                                  if not endpoint.target.store.has_blob(t.digest, t.size)})
        return info
    finally:
        clients.close()
