"""What a copy of an imgpack *model* adds to a plain graph copy: the hooks ``pull``, ``push`` and ``copy`` install.

* :func:`model_hooks` — validate the root as a model manifest before any blob moves (a foreign artifact is
  named for what it is, not dumped as a schema error), turn an index-split model back into its manifest, take
  only the selected components (partial pull), check every tensor/header/config blob's content once it is at
  the destination and before the manifest is indexed, and push in the split form where the destination caps
  layers.
* :func:`describe_artifact` — what a manifest that is not an imgpack model is ("a container image", "a CNCF
  ModelPack model", …), and what to do with it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

from imgpack.registry.copy import CopyHooks, CopyResult, Graph
from imgpack.registry.layout import RefusedContent
from imgpack.registry.progress import descriptor_component, descriptor_name
from imgpack.registry.remote import LayerLimit
from imgpack.registry.split import (
    MANIFEST_ANNOTATION,
    check_parts_cover,
    is_split_index,
    manifest_blob_of,
    split_model,
)
from imgpack.registry.target import Target, read_node, read_range
from imgpack.schemas import spec
from imgpack.schemas.content import MAX_CONFIG_BLOB, config_problems, layer_problems
from imgpack.schemas.errors import ImgpackError, IntegrityError, UsageError
from imgpack.schemas.foreign import (  # noqa: F401 - re-exported: callers import them from here
    BUNDLE_TYPE,
    COSIGN_LAYER,
    HELM_CONFIG,
    IMAGE_CONFIG_TYPES,
    MODELPACK_TYPES,
    describe_artifact,
    foreign_hint,
)
from imgpack.schemas.graph import Descriptor, Node, parse_node
from imgpack.schemas.manifest import ModelManifest
from imgpack.schemas.safetensors import TOLERATED


class NotAModel(ImgpackError):
    """The artifact is something other than an imgpack model; the message says what."""


def require_model(raw: bytes, node: Node, where: str) -> ModelManifest:
    """The imgpack model a manifest is, or :class:`NotAModel` saying what it is instead."""
    foreign = describe_artifact(node)
    if foreign is not None:
        raise NotAModel(f"{where} is {foreign}, not an imgpack model; {foreign_hint(foreign)}")
    return ModelManifest.from_bytes(raw, source=where)


def unsplit(src: Target, desc: Descriptor, raw: bytes) -> tuple[Descriptor, bytes]:
    """For an index-split model, the original model manifest it carries (checked); otherwise the node itself."""
    node = parse_node(raw, src.describe(desc.digest), desc.media_type)
    if not is_split_index(node):
        return desc, raw
    where = src.describe(desc.digest)
    parts = [parse_node(read_node(src, child), where, child.media_type) for child in node.manifests]
    if not parts:
        raise IntegrityError(f"{where}: split index has no parts")
    blob = manifest_blob_of(node, parts[0], where)
    original = read_node(src, Descriptor(spec.OCI_MANIFEST, blob.digest, blob.size))
    model = parse_node(original, where)
    check_parts_cover(parts, model, where)
    return Descriptor(model.media_type, blob.digest, blob.size), original


@dataclass
class Selection:
    """What a partial pull takes: whole components and/or layer-name globs (configs and files always)."""

    components: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        return bool(self.components or self.include)

    def describe(self) -> str:
        parts = [f"components={','.join(self.components)}"] if self.components else []
        parts += [f"include={','.join(self.include)}"] if self.include else []
        return ";".join(parts)

    def takes(self, desc: Descriptor) -> bool:
        if desc.media_type != spec.TENSOR_MEDIA_TYPE:
            return True  # configs, JSON files and headers are small and every command needs them
        name = descriptor_name(desc) or ""
        return descriptor_component(desc) in self.components or any(fnmatch.fnmatchcase(name, g)
                                                                    for g in self.include)


def check_content(dst: Target, graph: Graph, flavour: str, where: str) -> None:
    """Refuse the copy (:class:`RefusedContent`) when a tensor, header, JSON or config blob now at ``dst`` is
    malformed."""
    root = graph.root_node()
    problems: list[str] = []

    local_read = getattr(dst, "read_range", None)  # a local layout reads exactly the bytes asked for

    def reader(desc: Descriptor) -> Callable[[int, int], bytes]:
        if local_read is not None:
            return lambda offset, length: local_read(desc, offset, length)
        return lambda offset, length: read_range(dst, desc, offset, length)

    for layer in root.layers:
        if layer.digest in graph.skipped:
            continue
        name = descriptor_name(layer) or layer.digest
        for check, message in layer_problems(layer.to_json(), reader(layer), layer.size, f"layer {name!r}"):
            if check in TOLERATED:
                continue  # departures every reader accepts (padding, key name, encoding); conformance reports them
            problems.append(f"layer {name!r}: {message} ({check})")
    if root.config is not None and root.config.size <= MAX_CONFIG_BLOB:
        _, config = config_problems(reader(root.config)(0, root.config.size), flavour)
        problems.extend(f"config blob: {message} ({check})" for check, message in config)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise RefusedContent(f"{where}: the model's content is invalid: {'; '.join(problems[:3])}{more};"
                             " nothing was indexed")


def model_hooks(
    *,
    validate: bool = True,
    check_content_at_destination: bool = True,
    selection: Selection | None = None,
    max_layers: int | None = None,
    auto_split: bool = True,
    mount_candidates: Callable[[Descriptor], list[str]] | None = None,
    referrers: bool = False,
    verify_root: Callable[[Descriptor, bytes], None] | None = None,
    after_copy: Callable[[Graph], None] | None = None,
) -> CopyHooks:
    """The hooks of a model copy: ``validate`` refuses anything that is not a model, and (for a local destination,
    ``check_content_at_destination``) any model whose blobs are malformed."""
    flavour: dict[str, str] = {}
    partial = selection is not None and selection.partial

    def prepare_root(src: Target, desc: Descriptor, raw: bytes) -> tuple[Descriptor, bytes]:
        desc, raw = unsplit(src, desc, raw)
        node = parse_node(raw, src.describe(desc.digest), desc.media_type)
        if validate:
            manifest = require_model(raw, node, src.describe(desc.digest))
            flavour["value"] = manifest.flavour
        if partial:
            assert selection is not None
            components = {descriptor_component(layer) for layer in node.layers} - {"."}
            unknown = [c for c in selection.components if c not in components]
            if unknown:
                raise UsageError(f"--component: {', '.join(unknown)} is not a component of"
                                 f" {src.describe(desc.digest)} (it has {', '.join(sorted(components))})")
        if verify_root is not None:
            verify_root(desc, raw)  # signature policy: before a byte of the model moves
        return desc, raw

    def before_commit(dst: Target, graph: Graph) -> None:
        if validate and check_content_at_destination:
            check_content(dst, graph, flavour.get("value", "oci"), dst.describe(graph.root.digest))
        if partial and hasattr(dst, "allow_missing"):
            assert selection is not None
            dst.allow_missing = set(graph.skipped)  # type: ignore[attr-defined]
            dst.partial = selection.describe()  # type: ignore[attr-defined]

    def encode_root(graph: Graph) -> list[tuple[Descriptor, bytes]]:
        root_node = graph.root_node()
        if max_layers is None or len(root_node.layers) <= max_layers or root_node.config is None:
            return [(graph.root, graph.root_raw())]
        return split_model(graph.root_raw(), max_layers, str(graph.root.digest)).pushes()

    def is_current(dst: Target, existing: Descriptor, graph: Graph) -> bool:
        """A split index of this very manifest is already there (pushed by an earlier fallback)."""
        if existing.media_type != spec.OCI_INDEX or existing.size > spec.MAX_MANIFEST_BYTES:
            return False
        try:
            node = parse_node(read_node(dst, existing), dst.describe(existing.digest), existing.media_type)
        except ImgpackError:
            return False
        if not is_split_index(node):
            return False
        return (node.document.get("annotations") or {}).get(MANIFEST_ANNOTATION) == graph.root.digest

    def on_layer_limit(graph: Graph, limit: LayerLimit) -> list[tuple[Descriptor, bytes]]:
        if not auto_split or graph.root_node().config is None:
            raise limit
        cap = min(500, max(2, limit.layers // 2)) if max_layers is None else max(2, max_layers // 2)
        return split_model(graph.root_raw(), cap, str(graph.root.digest)).pushes()

    return CopyHooks(
        prepare_root=prepare_root,
        select=selection.takes if selection is not None and selection.partial else None,
        before_commit=before_commit,
        encode_root=encode_root,
        on_layer_limit=on_layer_limit,
        is_current=is_current,
        mount_candidates=mount_candidates,
        referrers=referrers,
        after_copy=after_copy,
    )


def copy_model(src: Target, reference: str, dst: Target, dst_reference: str | None, **options: object) -> CopyResult:
    """Copy one imgpack model between two targets, validated as a pull validates it."""
    from imgpack.registry.copy import copy_graph
    from imgpack.registry.remote import RemoteRepository

    hooks = model_hooks(check_content_at_destination=not isinstance(dst, RemoteRepository))
    return copy_graph(src, reference, dst, dst_reference, hooks=hooks, **options)  # type: ignore[arg-type]
