"""Signatures on targets: write them where cosign looks, read them back, carry them along with a copy.

The formats are :mod:`imgpack.signing`'s (pure functions over bytes); this module fetches and pushes through the
:class:`~imgpack.registry.target.Target` verbs, so signing and verifying work the same on a registry, the store
and an ``oci:`` layout:

* cosign's legacy form: the ``sha256-<hex>.sig`` manifest in the model's repository, one layer per signature;
* cosign 3's bundle, pushed by digest as an OCI 1.1 referrer and listed in the referrers tag-schema index
  ``sha256-<hex>`` (what registries without the referrers API, such as distribution 2.8, offer).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from imgpack.registry.target import BytesSource, Target, read_node, sibling
from imgpack.schemas import spec
from imgpack.schemas.errors import ImgpackError, NotFoundError
from imgpack.schemas.graph import Descriptor
from imgpack.signing import Artifact, Verification, bundle, combine, simplesigning
from imgpack.signing import Descriptor as SigDescriptor
from imgpack.signing.keys import PublicKey, SigningKey

#: Largest signature payload or bundle read into memory.
MAX_SIGNATURE_BLOB = 1024 * 1024


class _Blobs(Mapping[str, bytes]):
    """Signature blobs fetched from a target on first use (a failed fetch is reported as a reason)."""

    def __init__(self, target: Target, sizes: dict[str, tuple[str, int]]) -> None:
        self.target = target
        self.sizes = sizes
        self.cache: dict[str, bytes] = {}

    def __getitem__(self, digest: str) -> bytes:
        if digest not in self.cache:
            media_type, size = self.sizes.get(digest, ("application/octet-stream", MAX_SIGNATURE_BLOB))
            desc = Descriptor(media_type, digest, size)
            out = bytearray()
            with self.target.fetch(desc) as (_, chunks):
                for chunk in chunks:
                    out += chunk
                    if len(out) > MAX_SIGNATURE_BLOB:
                        raise ImgpackError(f"signature blob {digest} is over {MAX_SIGNATURE_BLOB} bytes")
            self.cache[digest] = bytes(out)
        return self.cache[digest]

    def __iter__(self) -> Iterator[str]:
        return iter(self.sizes)

    def __len__(self) -> int:
        return len(self.sizes)


@dataclass
class SignResult:
    digest: str
    legacy: str | None  # the .sig manifest written (None: this key had signed it already)
    bundle: str
    fallback_index: str | None


def _push_artifact(target: Target, artifact: Artifact, reference: str | None) -> Descriptor:
    for digest, data in artifact.blobs.items():
        desc = Descriptor("application/octet-stream", digest, len(data))
        if not target.exists(desc):
            target.push(desc, BytesSource(desc, data), lambda _n: None)
    node = Descriptor(artifact.media_type, artifact.digest, len(artifact.manifest),
                      {"artifactType": artifact.artifact_type} if artifact.artifact_type else {})
    target.push_node(node, artifact.manifest, reference)
    return node


def _existing(target: Target, reference: str) -> bytes | None:
    try:
        found = target.resolve(reference)
    except NotFoundError:
        return None
    return read_node(target, found) if found is not None else None


def attach_referrers(target: Target, model_reference: str | None, subject_digest: str,
                     referrers: list[Descriptor]) -> str | None:
    """Merge ``referrers`` into the subject's referrers tag-schema index at ``target``; returns its digest."""
    tag = bundle.referrers_tag(subject_digest)
    where = sibling(target, model_reference, tag)
    entries = []
    for desc in referrers:
        raw = read_node(target, desc)
        entries.append(bundle.referrer_descriptor(raw))
    artifact = bundle.add_referrers(_existing(target, where), subject_digest, entries)
    if artifact is None:
        return None
    return _push_artifact(target, artifact, where).digest


def sign(target: Target, reference: str, key: SigningKey, docker_reference: str) -> SignResult:
    """Sign the manifest ``reference`` names in ``target``, in both of cosign's forms."""
    desc = target.resolve(reference)
    if desc is None:
        raise NotFoundError(f"{target.describe(reference)}: not found; nothing to sign")
    sig_ref = sibling(target, reference, simplesigning.signature_tag(desc.digest))
    legacy = simplesigning.sign(key, docker_reference, desc.digest, existing=_existing(target, sig_ref))
    legacy_digest = _push_artifact(target, legacy, sig_ref).digest if legacy is not None else None
    subject = SigDescriptor(desc.media_type, desc.digest, desc.size)
    referrer = bundle.sign(key, subject)
    node = _push_artifact(target, referrer, None)
    index = attach_referrers(target, reference, desc.digest, [node])
    return SignResult(desc.digest, legacy_digest, node.digest, index)


def verify(target: Target, reference: str, key: PublicKey, digest: str | None = None) -> Verification:
    """Every signature of the manifest ``reference`` names (or ``digest``), checked against ``key``."""
    if digest is None:
        desc = target.resolve(reference)
        if desc is None:
            raise NotFoundError(f"{target.describe(reference)}: not found")
        digest = desc.digest
    sig_manifest = _existing(target, sibling(target, reference, simplesigning.signature_tag(digest)))
    sizes: dict[str, tuple[str, int]] = {}
    if sig_manifest is not None:
        for d in simplesigning.payload_descriptors(sig_manifest):
            sizes[d.digest] = (d.media_type, d.size)
    legacy = simplesigning.verify(sig_manifest, _Blobs(target, sizes), key, digest)
    index = _existing(target, sibling(target, reference, bundle.referrers_tag(digest)))
    referrer_nodes: dict[str, bytes] = {}
    bundle_sizes: dict[str, tuple[str, int]] = {}
    if index is not None:
        try:
            listed = bundle.parse_referrers(index)
        except ImgpackError:
            listed = []
        for entry in listed:
            try:
                raw = read_node(target, Descriptor(entry.media_type or spec.OCI_MANIFEST, entry.digest, entry.size))
            except ImgpackError:
                continue
            referrer_nodes[entry.digest] = raw
            layer = bundle.bundle_layer(raw)
            if layer is not None:
                bundle_sizes[layer.digest] = (layer.media_type, layer.size)
    bundles = bundle.verify(referrer_nodes, _Blobs(target, bundle_sizes), key, digest)
    return combine(legacy, bundles)


__all__ = ["SignResult", "attach_referrers", "sign", "verify"]
