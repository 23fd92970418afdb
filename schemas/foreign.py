"""What an artifact that is not an imgpack model is, by name ("a container image", "a CNCF ModelPack model", …),
and what to do with it: one answer for the store, the copy engine and conformance, instead of a schema dump."""

from __future__ import annotations

from imgpack.schemas import spec
from imgpack.schemas.graph import Node

MODELPACK_TYPES = ("application/vnd.cncf.model.manifest.v1+json", "application/vnd.cncf.model.config.v1+json")
IMAGE_CONFIG_TYPES = ("application/vnd.oci.image.config.v1+json",)
COSIGN_LAYER = "application/vnd.dev.cosign.simplesigning.v1+json"
BUNDLE_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"


def describe_artifact(node: Node) -> str | None:
    """A name for a node that is not an imgpack model manifest, or None when it is one (or may be)."""
    config_type = node.config.media_type if node.config else None
    layer_types = {d.media_type for d in node.layers}
    artifact = node.document.get("artifactType")
    annotations = node.document.get("annotations") or {}
    if node.media_type == spec.OCI_INDEX and spec.SPLIT_MANIFEST_ANNOTATION in annotations:
        return None  # an imgpack model in its index-split form
    if node.media_type in (spec.OCI_INDEX, spec.DOCKER_MANIFEST_LIST):
        platforms = [m.fields.get("platform") for m in node.manifests if isinstance(m.fields.get("platform"), dict)]
        if platforms:
            return "a multi-platform container image index"
        return f"an OCI image index of {len(node.manifests)} manifests"
    if artifact in MODELPACK_TYPES or config_type in MODELPACK_TYPES:
        return f"a CNCF ModelPack model (artifactType {artifact or config_type})"
    if COSIGN_LAYER in layer_types:
        return "a cosign signature"
    if artifact == BUNDLE_TYPE:
        return "a Sigstore bundle (a cosign 3 signature)"
    if config_type == HELM_CONFIG:
        return "a Helm chart"
    imgpack_layers = layer_types & set(spec.LAYER_MEDIA_TYPES)
    if config_type in IMAGE_CONFIG_TYPES:
        return "a container image"
    if node.media_type == spec.DOCKER_MANIFEST and config_type == spec.OLLAMA_CONFIG_MEDIA_TYPE:
        return None if imgpack_layers else "a docker v2 container image"
    if node.media_type == spec.OCI_MANIFEST and artifact != spec.ARTIFACT_TYPE and not imgpack_layers:
        return f"an oras artifact (artifactType {artifact or config_type})"
    return None


def foreign_hint(foreign: str) -> str:
    """What to do with an artifact :func:`describe_artifact` named."""
    hint = "use 'imgpack copy' to move it between registries and layouts unchanged"
    if "ModelPack" in foreign:
        hint = "imgpack reads diffusers models packed by 'imgpack create'; " + hint
    return hint
