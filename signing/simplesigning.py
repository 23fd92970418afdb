"""cosign's legacy signatures: a simple-signing payload per layer of the ``sha256-<hex>.sig`` manifest.

This is what cosign 1.x/2.x write by default and cosign 3 writes with ``--new-bundle-format=false``, and the
form every ``cosign verify`` falls back to, so it is the one that works with every cosign version.

* The payload (sigstore ``pkg/signature/payload``), Go-marshalled, compact, no trailing newline::

    {"critical":{"identity":{"docker-reference":"<registry>/<repo>"},"image":{"docker-manifest-digest":
    "sha256:<hex>"},"type":"cosign container image signature"},"optional":null}

  ``docker-reference`` is the repository without tag or digest (ggcr ``Repository.Name()``), ``optional`` is
  null or an object with sorted keys (cosign's ``-a k=v``).
* The signature is ECDSA P-256 over SHA-256(payload), DER, standard base64 in the layer annotation
  ``dev.cosignproject.cosign/signature``; the layer blob is the payload, media type
  ``application/vnd.dev.cosign.simplesigning.v1+json``.
* The manifest is ggcr's ``empty.Image`` with the layers appended: an OCI image manifest (no subject, no
  artifactType, no manifest annotations) whose config is the image config ggcr re-marshals, with one
  ``rootfs.diff_ids`` entry (= the layer digest) and one empty ``history`` entry per layer. cosign never reads
  the config, but ggcr re-marshals it when cosign appends a signature, so it is written exactly.
* Signatures accumulate as layers; a new one is skipped when a layer with the same payload already holds a
  signature by the same key (cosign's ``dd.Find``: ECDSA is randomised, so duplicates are found by verifying).

What ``cosign verify --key`` checks, and so what `verify` checks: the signature over the payload bytes, and
``critical.image.docker-manifest-digest`` equal to the image digest (plus ``-a`` claims against ``optional``).
cosign ignores ``docker-reference`` and ``critical.type``; imgpack reports the first and, like podman's strict
parser, requires the payload's exact member set and the cosign type, so a payload cosign would accept but
podman would not is refused with its reason. Without a transparency-log entry cosign needs
``--insecure-ignore-tlog=true``; imgpack verifies offline, key-only, and reads no Rekor bundle annotation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from imgpack.schemas import spec
from imgpack.schemas.digest import check_digest, sha256_bytes
from imgpack.schemas.errors import UsageError
from imgpack.schemas.reference import Reference
from imgpack.signing.keys import PublicKey, SigningKey
from imgpack.signing.oci import (
    DOCKER_CONFIG_MEDIA_TYPE,
    OCI_CONFIG_MEDIA_TYPE,
    SIGNATURE_ANNOTATION,
    SIMPLESIGNING_MEDIA_TYPE,
    Artifact,
    Descriptor,
    SignatureCheck,
    SignatureError,
    Verification,
    b64decode,
    b64encode,
    digest_tag,
    go_json,
    members,
    parse_object,
    read_blob,
    short,
    string,
)

PAYLOAD_TYPE = "cosign container image signature"
#: cosign refuses to grow a ``.sig`` manifest beyond this many layers (``pkg/cosign/remote`` ``maxLayers``).
MAX_LAYERS = 1000
_ZERO_TIME = "0001-01-01T00:00:00Z"
#: Manifest media types a ``.sig`` may have: OCI by default, Docker's with ``COSIGN_DOCKER_MEDIA_TYPES=1``.
_MANIFEST_TYPES = {spec.OCI_MANIFEST: OCI_CONFIG_MEDIA_TYPE, spec.DOCKER_MANIFEST: DOCKER_CONFIG_MEDIA_TYPE}


def signature_tag(digest: str) -> str:
    """The tag cosign reads a digest's signatures from: ``sha256-<hex>.sig``, in the image's repository."""
    return digest_tag(digest) + ".sig"


def docker_reference(ref: Reference) -> str:
    """What cosign writes as ``docker-reference``: registry/repository, no tag or digest, Docker Hub spelled
    as ggcr normalises it (``index.docker.io/library/x``)."""
    if ref.registry is None:
        raise UsageError(
            f"{ref}: a signature names the registry repository the model is published in; give a reference"
            " with a registry host (host/repository)"
        )
    registry = "index.docker.io" if ref.registry == "docker.io" else ref.registry
    repository = ref.repository
    if registry == "index.docker.io" and "/" not in repository:
        repository = "library/" + repository
    return f"{registry}/{repository}"


def make_payload(docker_reference: str, manifest_digest: str, optional: Mapping[str, Any] | None = None) -> bytes:
    """The simple-signing payload, byte-identical to cosign's for the same inputs."""
    check_digest(manifest_digest, "signed manifest digest")
    if not docker_reference or "@" in docker_reference:
        raise UsageError(f"docker-reference {docker_reference!r} must be a repository name, without a digest")
    document = {
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": PAYLOAD_TYPE,
        },
        "optional": dict(sorted(optional.items())) if optional else None,
    }
    return go_json(document)


@dataclass(frozen=True)
class SignatureLayer:
    """One signature: the payload (the layer blob) and its annotations (the base64 signature, and any others)."""

    payload: bytes
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor.of(SIMPLESIGNING_MEDIA_TYPE, self.payload, self.annotations)


def sign_payload(key: SigningKey, payload: bytes) -> SignatureLayer:
    """Sign a payload: DER ECDSA over SHA-256(payload), base64 in ``dev.cosignproject.cosign/signature``."""
    return SignatureLayer(payload, {SIGNATURE_ANNOTATION: b64encode(key.sign(payload))})


def config_for(layers: Sequence[Descriptor]) -> bytes:
    """ggcr's re-marshalled image config for these layers (233 bytes for one)."""
    return go_json(
        {
            "architecture": "",
            "created": _ZERO_TIME,
            "history": [{"created": _ZERO_TIME} for _ in layers],
            "os": "",
            "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
            "config": {},
        }
    )


def _manifest(media_type: str, layers: Sequence[Descriptor]) -> tuple[bytes, bytes]:
    config = config_for(layers)
    document = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": Descriptor.of(_MANIFEST_TYPES[media_type], config).to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    return go_json(document), config


def _read_manifest(data: bytes, what: str) -> tuple[str, list[Descriptor]]:
    """The media type and layers of a ``.sig`` manifest; raises SignatureError when it is not one."""
    document = parse_object(data, what)
    media_type = document.get("mediaType", spec.OCI_MANIFEST)
    if media_type not in _MANIFEST_TYPES:
        raise SignatureError(f"{what} has media type {media_type!r}, not an image manifest")
    if document.get("schemaVersion") != 2:
        raise SignatureError(f"{what} has schemaVersion {document.get('schemaVersion')!r}, not 2")
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise SignatureError(f"{what} has no layers list")
    return media_type, [Descriptor.from_json(layer, f"{what} layer {i}") for i, layer in enumerate(layers)]


def add_signature(
    existing: bytes | None, layer: SignatureLayer, manifest_digest: str, signer: PublicKey
) -> Artifact | None:
    """The ``.sig`` manifest with ``layer`` appended (a new one when ``existing`` is None, the tag's 404).

    Returns None when ``existing`` already holds this signature: a layer with the same payload, media type and
    annotations, whose signature verifies under ``signer`` (cosign's duplicate detection). The existing
    manifest's media type and layers are kept; the config is regenerated from the layers. The artifact's blobs
    are the new config and the new payload; the existing layers' blobs are already beside the manifest.
    """
    tag = signature_tag(manifest_digest)
    media_type, layers = spec.OCI_MANIFEST, list[Descriptor]()
    if existing is not None:
        media_type, layers = _read_manifest(existing, f"existing signature manifest {tag}")
    new = layer.descriptor
    if any(_is_duplicate(old, new, layer.payload, signer) for old in layers):
        return None
    if len(layers) >= MAX_LAYERS:
        raise SignatureError(f"signature manifest {tag} already holds {len(layers)} signatures (cosign's limit)")
    manifest, config = _manifest(media_type, [*layers, new])
    return Artifact(manifest, media_type, {sha256_bytes(config): config, new.digest: layer.payload}, tag)


def _is_duplicate(old: Descriptor, new: Descriptor, payload: bytes, signer: PublicKey) -> bool:
    if (old.digest, old.media_type) != (new.digest, new.media_type):
        return False
    if any(old.annotations.get(k) != v for k, v in new.annotations.items() if k != SIGNATURE_ANNOTATION):
        return False
    try:
        signature = b64decode(old.annotations.get(SIGNATURE_ANNOTATION, ""), "signature")
    except SignatureError:
        return False
    return signer.signature_problem(signature, payload) is None


def sign(
    key: SigningKey,
    docker_reference: str,
    manifest_digest: str,
    existing: bytes | None = None,
    optional: Mapping[str, Any] | None = None,
) -> Artifact | None:
    """Sign ``manifest_digest``: the ``.sig`` manifest to put at `signature_tag`, or None if already signed."""
    layer = sign_payload(key, make_payload(docker_reference, manifest_digest, optional))
    return add_signature(existing, layer, manifest_digest, key.public_key)


def payload_descriptors(manifest: bytes) -> list[Descriptor]:
    """The layers of a ``.sig`` manifest whose blobs `verify` needs; [] when it is unreadable (`verify` says why)."""
    try:
        return _read_manifest(manifest, "signature manifest")[1]
    except SignatureError:
        return []


@dataclass(frozen=True)
class Payload:
    """A parsed simple-signing payload."""

    docker_reference: str
    manifest_digest: str
    optional: Mapping[str, Any] | None


def parse_payload(data: bytes) -> Payload:
    """Read a payload with podman's strictness: exactly these members, the cosign type; raises SignatureError."""
    top = members(parse_object(data, "payload"), "payload", ("critical", "optional"), ("critical", "optional"))
    critical = members(
        top["critical"], "payload critical", ("identity", "image", "type"), ("identity", "image", "type")
    )
    identity = members(critical["identity"], "critical.identity", ("docker-reference",), ("docker-reference",))
    image = members(critical["image"], "critical.image", ("docker-manifest-digest",), ("docker-manifest-digest",))
    kind = string(critical["type"], "critical.type")
    if kind != PAYLOAD_TYPE:
        raise SignatureError(f"payload type is {kind!r}, not {PAYLOAD_TYPE!r}")
    optional = top["optional"]
    if optional is not None and not isinstance(optional, dict):
        raise SignatureError(f"payload optional is {type(optional).__name__}, not null or an object")
    return Payload(
        string(identity["docker-reference"], "critical.identity.docker-reference"),
        string(image["docker-manifest-digest"], "critical.image.docker-manifest-digest"),
        optional,
    )


def _check_layer(
    layer: Descriptor,
    blobs: Mapping[str, bytes],
    key: PublicKey,
    expected_digest: str,
    require: Mapping[str, str],
    where: str,
) -> SignatureCheck:
    """Check one layer: SignatureError anywhere becomes the check's reason."""
    payload: Payload | None = None
    try:
        if layer.media_type != SIMPLESIGNING_MEDIA_TYPE:
            raise SignatureError(f"media type {layer.media_type!r} is not {SIMPLESIGNING_MEDIA_TYPE}")
        if SIGNATURE_ANNOTATION not in layer.annotations:
            raise SignatureError(f"no {SIGNATURE_ANNOTATION} annotation")
        signature = b64decode(layer.annotations[SIGNATURE_ANNOTATION], "the signature annotation")
        data = read_blob(blobs, layer, "the payload blob")
        problem = key.signature_problem(signature, data)
        if problem:
            raise SignatureError(problem)
        payload = parse_payload(data)
        if payload.manifest_digest != expected_digest:
            raise SignatureError(f"the payload names {payload.manifest_digest}, not {expected_digest}")
        optional = payload.optional or {}
        for name, value in require.items():
            if optional.get(name) != value:
                raise SignatureError(f"the payload's optional {name!r} is {optional.get(name)!r}, not {value!r}")
        reason = None
    except SignatureError as e:
        reason = e.message
    return SignatureCheck(
        "simplesigning",
        where,
        reason,
        payload.manifest_digest if payload else None,
        payload.docker_reference if payload else None,
        annotations=dict(payload.optional or {}) if payload else {},
    )


def verify(
    manifest: bytes | None,
    blobs: Mapping[str, bytes],
    key: PublicKey,
    expected_digest: str,
    require: Mapping[str, str] | None = None,
) -> Verification:
    """Check every layer of the ``.sig`` manifest (None: the tag does not exist) as ``cosign verify --key``.

    ``blobs`` maps layer digests (`payload_descriptors`) to the fetched payloads; it may be lazy. ``require``
    are claims the payload's ``optional`` must hold (cosign's ``verify -a k=v``). Never raises on bad input.
    """
    check_digest(expected_digest, "expected manifest digest")
    tag = signature_tag(expected_digest)
    if manifest is None:
        return Verification(expected_digest, key.fingerprint, absent=(f"no {tag} signature manifest",))
    try:
        layers = _read_manifest(manifest, f"signature manifest {tag}")[1]
    except SignatureError as e:
        return Verification(expected_digest, key.fingerprint, absent=(e.message,))
    if not layers:
        return Verification(expected_digest, key.fingerprint, absent=(f"signature manifest {tag} has no layers",))
    checks = tuple(
        _check_layer(layer, blobs, key, expected_digest, require or {}, f".sig layer {i} ({short(layer.digest)})")
        for i, layer in enumerate(layers)
    )
    return Verification(expected_digest, key.fingerprint, checks)
