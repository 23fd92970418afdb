"""The index-split form of a model, for registries that cap the layers of a manifest (Amazon ECR: ~500).

The model manifest itself is carried unchanged, as a blob: part 0's first layer
(``application/vnd.imgpack.model.manifest.v1+json``). The index that replaces it at the tag lists part
manifests, each holding at most ``max_layers`` layers: the model's config blob as their config and a run of
the model's layers, split along components first (a component is split only when it alone is too big for a
part). Readers fetch part 0, take the manifest blob, check its digest against the index's
``io.imgpack.split.manifest`` annotation and go on with the original manifest, so a pulled model is
byte-for-byte the one that was pushed; dedup is unchanged because every layer keeps its digest.

The form is a pure function of (manifest bytes, max_layers): the same model gives the same index digest on every
push, so a re-push is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

from imgpack.registry.progress import descriptor_component
from imgpack.schemas import spec
from imgpack.schemas.digest import sha256_bytes
from imgpack.schemas.errors import ImgpackError, IntegrityError
from imgpack.schemas.graph import Descriptor, Node, parse_node
from imgpack.schemas.manifest import encode_json

PART_ARTIFACT_TYPE = "application/vnd.imgpack.model.part.v1"
MANIFEST_BLOB_MEDIA_TYPE = "application/vnd.imgpack.model.manifest.v1+json"
MANIFEST_ANNOTATION = spec.SPLIT_MANIFEST_ANNOTATION
PART_ANNOTATION = "io.imgpack.split.part"
MANIFEST_BLOB_TITLE = "imgpack-manifest.json"
#: Registries known to cap manifest layers, and the cap to use for them.
KNOWN_LAYER_CAPS = {".amazonaws.com": 500}
MIN_LAYERS = 2


@dataclass(frozen=True)
class SplitForm:
    manifest_blob: Descriptor
    manifest_raw: bytes
    parts: list[tuple[Descriptor, bytes]]
    index: tuple[Descriptor, bytes]

    def pushes(self) -> list[tuple[Descriptor, bytes]]:
        """What to push, in order: the manifest blob, the parts, then the index (the root)."""
        return [(self.manifest_blob, self.manifest_raw), *self.parts, self.index]


def default_cap(host: str) -> int | None:
    host = host.split(":", 1)[0].lower()
    for suffix, cap in KNOWN_LAYER_CAPS.items():
        if host.endswith(suffix):
            return cap
    return None


def is_split_index(node: Node) -> bool:
    return node.media_type == spec.OCI_INDEX and MANIFEST_ANNOTATION in (node.document.get("annotations") or {})


def _runs(layers: tuple[Descriptor, ...], capacity_first: int, capacity: int) -> list[list[Descriptor]]:
    """Pack layers into parts: whole components where they fit, split only when one alone is too big."""
    groups: dict[str, list[Descriptor]] = {}
    for layer in layers:
        groups.setdefault(descriptor_component(layer), []).append(layer)
    parts: list[list[Descriptor]] = [[]]
    room = capacity_first
    for group in groups.values():
        if len(group) > room and parts[-1] and len(group) <= capacity:
            parts.append([])
            room = capacity
        for layer in group:
            if room == 0:
                parts.append([])
                room = capacity
            parts[-1].append(layer)
            room -= 1
    return [p for p in parts if p] or [[]]


def split_model(raw: bytes, max_layers: int, where: str = "model") -> SplitForm:
    """The index-split form of the manifest ``raw`` for a registry that accepts ``max_layers`` per manifest."""
    if max_layers < MIN_LAYERS:
        raise ImgpackError(f"--max-layers: {max_layers} is too small; a part needs at least {MIN_LAYERS} layers")
    node = parse_node(raw, where)
    if node.config is None:
        raise ImgpackError(f"{where}: only a manifest can be split, not an index")
    digest = sha256_bytes(raw)
    manifest_blob = Descriptor(MANIFEST_BLOB_MEDIA_TYPE, digest, len(raw),
                               {"annotations": {spec.TITLE_ANNOTATION: MANIFEST_BLOB_TITLE}})
    runs = _runs(node.layers, max_layers - 1, max_layers)
    parts: list[tuple[Descriptor, bytes]] = []
    for i, run in enumerate(runs):
        layers = ([manifest_blob] if i == 0 else []) + run
        document = {
            "schemaVersion": 2,
            "mediaType": spec.OCI_MANIFEST,
            "artifactType": PART_ARTIFACT_TYPE,
            "config": node.config.to_json(),
            "layers": [layer.to_json() for layer in layers],
            "annotations": {PART_ANNOTATION: f"{i + 1}/{len(runs)}"},
        }
        part_raw = encode_json(document)
        parts.append((Descriptor(spec.OCI_MANIFEST, sha256_bytes(part_raw), len(part_raw),
                                 {"artifactType": PART_ARTIFACT_TYPE}), part_raw))
    index_doc = {
        "schemaVersion": 2,
        "mediaType": spec.OCI_INDEX,
        "artifactType": spec.ARTIFACT_TYPE,
        "manifests": [{**desc.to_json(), "artifactType": PART_ARTIFACT_TYPE} for desc, _ in parts],
        "annotations": {MANIFEST_ANNOTATION: digest, "io.imgpack.split.layers": str(len(node.layers))},
    }
    index_raw = encode_json(index_doc)
    index = (Descriptor(spec.OCI_INDEX, sha256_bytes(index_raw), len(index_raw),
                        {"artifactType": spec.ARTIFACT_TYPE}), index_raw)
    return SplitForm(manifest_blob, raw, parts, index)


def manifest_blob_of(index: Node, first_part: Node, where: str) -> Descriptor:
    """The descriptor of the original manifest a split index carries, checked against its annotation."""
    expected = (index.document.get("annotations") or {}).get(MANIFEST_ANNOTATION)
    found = next((d for d in first_part.layers if d.media_type == MANIFEST_BLOB_MEDIA_TYPE), None)
    if found is None:
        raise IntegrityError(f"{where}: split model's first part carries no {MANIFEST_BLOB_MEDIA_TYPE} layer")
    if found.digest != expected:
        raise IntegrityError(f"{where}: split index names manifest {expected}, its first part carries {found.digest}")
    return found


def check_parts_cover(index_parts: list[Node], model: Node, where: str) -> None:
    """The parts must carry exactly the model's layers, so nothing the model needs is outside the index."""
    carried = {d.digest for part in index_parts for d in part.layers if d.media_type != MANIFEST_BLOB_MEDIA_TYPE}
    needed = {d.digest for d in model.layers}
    if needed - carried:
        raise IntegrityError(f"{where}: split index parts lack {len(needed - carried)} of the model's layers")
