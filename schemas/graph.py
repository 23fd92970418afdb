"""The OCI content graph: which descriptors a manifest or an index points at.

Kept free of I/O so the store (what must be present before a manifest is indexed, what prune keeps), the copy
engine (what to walk) and conformance (what to check) share one definition. Any manifest kind is accepted —
imgpack models, OCI indexes, cosign signatures, container images — because a copy must carry every node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imgpack.schemas import spec
from imgpack.schemas.digest import is_digest
from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.jsondoc import parse_json

MANIFEST_TYPES = frozenset({spec.OCI_MANIFEST, spec.DOCKER_MANIFEST})
INDEX_TYPES = frozenset({spec.OCI_INDEX, spec.DOCKER_MANIFEST_LIST})


@dataclass(frozen=True)
class Descriptor:
    """An OCI descriptor; ``fields`` keeps every member verbatim (imgpack layers carry name, dtype, shape)."""

    media_type: str
    digest: str
    size: int
    fields: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_json(cls, d: Any, where: str) -> Descriptor:
        if not isinstance(d, dict):
            raise ImgpackError(f"{where}: descriptor must be a JSON object")
        media_type, digest, size = d.get("mediaType"), d.get("digest"), d.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise ImgpackError(f"{where}: descriptor has no mediaType")
        if not is_digest(digest):
            raise ImgpackError(f"{where}: descriptor digest {digest!r} is not sha256:<64 hex>")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImgpackError(f"{where}: descriptor size {size!r} is not a non-negative integer")
        return cls(media_type, digest, size, dict(d))

    def to_json(self) -> dict[str, Any]:
        out = dict(self.fields)
        out.update({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
        return out

    @property
    def annotations(self) -> dict[str, str]:
        value = self.fields.get("annotations")
        return dict(value) if isinstance(value, dict) else {}

    @property
    def artifact_type(self) -> str | None:
        value = self.fields.get("artifactType")
        return value if isinstance(value, str) else None

    @property
    def is_manifest(self) -> bool:
        return self.media_type in MANIFEST_TYPES

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def is_graph_node(self) -> bool:
        """Manifests and indexes are nodes whose content names further descriptors."""
        return self.is_manifest or self.is_index


@dataclass(frozen=True)
class Node:
    """A parsed manifest or index: what it points at (``children``) and what it refers to (``subject``)."""

    media_type: str
    document: dict[str, Any]
    config: Descriptor | None
    layers: tuple[Descriptor, ...]
    manifests: tuple[Descriptor, ...]
    subject: Descriptor | None

    @property
    def children(self) -> tuple[Descriptor, ...]:
        """Everything that must be present before this node is: config, layers, child manifests."""
        return ((self.config,) if self.config else ()) + self.layers + self.manifests

    @property
    def artifact_type(self) -> str | None:
        value = self.document.get("artifactType")
        if isinstance(value, str):
            return value
        return self.config.media_type if self.config and self.media_type == spec.OCI_MANIFEST else None


def media_type_of(document: dict[str, Any], declared: str | None = None) -> str:
    """A document's media type: its own ``mediaType`` field, else what the transport declared, else inferred
    (OCI allows manifests without the field)."""
    value = document.get("mediaType")
    if isinstance(value, str) and value:
        return value
    if declared:
        return declared
    return spec.OCI_INDEX if "manifests" in document else spec.OCI_MANIFEST


def parse_node(raw: bytes, where: str, declared: str | None = None) -> Node:
    """Parse manifest or index bytes far enough to walk the graph (not an imgpack-model validation)."""
    if len(raw) > spec.MAX_MANIFEST_BYTES:
        raise ImgpackError(f"{where}: manifest is {len(raw)} bytes, over the {spec.MAX_MANIFEST_BYTES} limit")
    document = parse_json(raw, f"{where}: manifest")
    if not isinstance(document, dict):
        raise ImgpackError(f"{where}: manifest is a JSON {type(document).__name__}, not an object")
    media_type = media_type_of(document, declared)
    config = None
    layers: list[Descriptor] = []
    manifests: list[Descriptor] = []
    if media_type in INDEX_TYPES:
        entries = document.get("manifests")
        if not isinstance(entries, list):
            raise ImgpackError(f"{where}: index has no 'manifests' list")
        manifests = [Descriptor.from_json(d, f"{where}: manifests[{i}]") for i, d in enumerate(entries)]
    elif media_type in MANIFEST_TYPES:
        config = Descriptor.from_json(document.get("config"), f"{where}: config")
        entries = document.get("layers")
        if entries is None:
            entries = []
        if not isinstance(entries, list):
            raise ImgpackError(f"{where}: 'layers' is not a list")
        layers = [Descriptor.from_json(d, f"{where}: layers[{i}]") for i, d in enumerate(entries)]
    else:
        raise ImgpackError(f"{where}: {media_type!r} is not a manifest or index media type")
    subject = None
    if document.get("subject") is not None:
        subject = Descriptor.from_json(document["subject"], f"{where}: subject")
    return Node(media_type, document, config, tuple(layers), tuple(manifests), subject)
