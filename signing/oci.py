"""What both signature forms share: media types, descriptors, the bytes to write, JSON as Go writes it, results.

Signatures are verified over exact bytes, never over re-serialised JSON, so byte-exactness matters only where
another tool compares or rewrites what imgpack wrote: cosign finds a duplicate signature by the payload's digest,
and ggcr re-marshals a ``.sig`` config or a referrers index when it appends to one. Hence two encoders:
`go_json` is Go ``encoding/json`` (compact, UTF-8, ``<``, ``>``, ``&``, U+2028/U+2029 escaped; struct field
order is the dict order given, map keys are sorted by the caller), used for everything ggcr and sigstore's
``payload`` package write; `protojson` is Go protobuf JSON without its random spaces (no HTML escaping), used for
the Sigstore bundle and the in-toto statement.

Verification never raises on bad input: each signature gets a `SignatureCheck` with a reason, and a
`Verification` gathers them so that a command can print who and what was checked, or why nothing verified.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from imgpack.schemas import spec
from imgpack.schemas.digest import check_digest, is_digest, sha256_bytes
from imgpack.schemas.errors import ImgpackError, IntegrityError

# Legacy cosign signatures (`simplesigning`).
SIMPLESIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
OCI_CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"

# Sigstore bundles attached as OCI 1.1 referrers (`bundle`).
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
BUNDLE_MEDIA_TYPE_PREFIX = "application/vnd.dev.sigstore.bundle"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_BLOB = b"{}"
EMPTY_DIGEST = sha256_bytes(EMPTY_BLOB)

#: Largest signature payload, bundle or signature manifest read. Real ones are a few hundred bytes (payloads)
#: to a few kilobytes (bundles with a certificate chain and log entries).
MAX_SIGNATURE_BYTES = spec.MAX_MANIFEST_BYTES


class SignatureError(ImgpackError):
    """Signature data imgpack was asked to extend or index is malformed (an existing ``.sig`` or index)."""


class VerificationError(IntegrityError):
    """No signature verified; the message says what was checked and why each one failed."""


def digest_tag(digest: str) -> str:
    """``sha256:<hex>`` as a tag, ``sha256-<hex>``: cosign's and the OCI referrers tag schema's spelling."""
    return "sha256-" + check_digest(digest)


def short(digest: str) -> str:
    """A digest abbreviated for messages: ``sha256:0123456789ab``."""
    return digest[:19] if is_digest(digest) else repr(digest)


def go_json(document: Any) -> bytes:
    """Go ``encoding/json.Marshal`` bytes: compact, UTF-8, HTML-sensitive characters escaped."""
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):  # fmt: skip
        text = text.replace(char, escape)
    return _utf8(text)


def protojson(document: Any) -> bytes:
    """Go ``protojson.Marshal`` bytes in its compact form: fields in proto order as given, UTF-8, no escaping."""
    return _utf8(json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=False))


def _utf8(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as e:
        raise SignatureError(f"cannot encode a string as UTF-8 JSON: {e}") from None


def b64encode(data: bytes) -> str:
    """Standard base64 with padding: Go ``[]byte`` in JSON, cosign's signature annotation, protojson bytes."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: object, what: str, *, lenient: bool = False) -> bytes:
    """Decode standard padded base64 strictly, as Go's ``StdEncoding``; ``lenient`` also takes what protojson
    takes (URL-safe alphabet, missing padding). Raises SignatureError naming ``what``."""
    if not isinstance(text, str):
        raise SignatureError(f"{what} is {type(text).__name__}, not a base64 string")
    try:
        if lenient:
            text = text.replace("-", "+").replace("_", "/")
            text += "=" * (-len(text) % 4)
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise SignatureError(f"{what} is not valid base64") from None


def parse_object(data: bytes, what: str) -> dict[str, Any]:
    """Parse one JSON object; duplicate keys are refused (two readers could pick different values)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise SignatureError(f"{what} has the key {key!r} twice")
            out[key] = value
        return out

    if len(data) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{what} is {len(data)} bytes, over the {MAX_SIGNATURE_BYTES}-byte limit")
    try:
        document = json.loads(data, object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SignatureError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(document, dict):
        raise SignatureError(f"{what} is a JSON {type(document).__name__}, not an object")
    return document


def members(document: object, what: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """``document`` as an object holding only ``allowed`` keys and every ``required`` one."""
    if not isinstance(document, dict):
        raise SignatureError(f"{what} is {'null' if document is None else type(document).__name__}, not an object")
    unknown = sorted(set(document) - set(allowed))
    if unknown:
        raise SignatureError(f"{what} has unknown field(s) {', '.join(map(repr, unknown))}")
    missing = [key for key in required if key not in document]
    if missing:
        raise SignatureError(f"{what} lacks {', '.join(map(repr, missing))}")
    return document


def string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise SignatureError(f"{what} is {'null' if value is None else type(value).__name__}, not a string")
    return value


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor, as far as signatures use one."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    artifact_type: str | None = None

    @classmethod
    def of(cls, media_type: str, data: bytes, annotations: Mapping[str, str] | None = None) -> Descriptor:
        return cls(media_type, sha256_bytes(data), len(data), dict(annotations or {}))

    def to_json(self) -> dict[str, Any]:
        """Go field order of ggcr's ``v1.Descriptor``: mediaType, size, digest, annotations, artifactType."""
        out: dict[str, Any] = {"mediaType": self.media_type, "size": self.size, "digest": self.digest}
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return out

    @classmethod
    def from_json(cls, document: object, what: str) -> Descriptor:
        """Read a descriptor; fields signatures never use (urls, platform, data) are ignored."""
        if not isinstance(document, dict):
            raise SignatureError(f"{what} is not an object")
        media_type, digest, size = document.get("mediaType"), document.get("digest"), document.get("size")
        annotations = document.get("annotations") or {}
        artifact_type = document.get("artifactType")
        if not isinstance(media_type, str) or not media_type:
            raise SignatureError(f"{what} has no mediaType")
        if not is_digest(digest):
            raise SignatureError(f"{what} has digest {digest!r}, not sha256:<64 hex>")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise SignatureError(f"{what} has size {size!r}, not a non-negative integer")
        if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
            raise SignatureError(f"{what} has annotations that are not a string-to-string map")
        if artifact_type is not None and not isinstance(artifact_type, str):
            raise SignatureError(f"{what} has an artifactType that is not a string")
        return cls(media_type, digest, size, dict(annotations), artifact_type or None)


def read_blob(blobs: Mapping[str, bytes], descriptor: Descriptor, what: str) -> bytes:
    """The blob ``descriptor`` names, once it is known to be those bytes; ``blobs`` may fetch lazily, and a
    failed fetch (an ImgpackError) becomes a SignatureError like any other reason."""
    try:
        data = blobs.get(descriptor.digest)
    except SignatureError:
        raise
    except ImgpackError as e:
        raise SignatureError(f"{what} {short(descriptor.digest)} could not be read: {e.message}") from None
    if data is None:
        raise SignatureError(f"{what} {short(descriptor.digest)} was not fetched")
    if len(data) != descriptor.size or sha256_bytes(data) != descriptor.digest:
        raise SignatureError(
            f"{what} does not match its descriptor (size {descriptor.size}, {short(descriptor.digest)})"
        )
    return data


@dataclass(frozen=True)
class Artifact:
    """A manifest (or index) to write, with the blobs it references that may not exist yet.

    ``tag`` is where it goes (``sha256-<hex>.sig``, ``sha256-<hex>``), or None for a referrer, which is put by
    its digest. Blobs go first, then the manifest.
    """

    manifest: bytes
    media_type: str
    blobs: Mapping[str, bytes]
    tag: str | None = None
    artifact_type: str | None = None

    @property
    def digest(self) -> str:
        return sha256_bytes(self.manifest)

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.manifest), {}, self.artifact_type)


@dataclass(frozen=True)
class SignatureCheck:
    """What was checked for one signature (one ``.sig`` layer, or one bundle) and why it failed, if it did."""

    form: str  #: "simplesigning" (cosign's legacy .sig layer) or "bundle" (Sigstore bundle referrer)
    where: str  #: which signature: ".sig layer 0 (sha256:…)", "referrer sha256:… (bundle sha256:…)"
    reason: str | None = None  #: None when it verified
    signed_digest: str | None = None  #: the manifest digest the payload names, when it could be read
    docker_reference: str | None = None  #: simplesigning only: the repository the payload names
    predicate_type: str | None = None  #: bundle only: the in-toto predicate type
    annotations: Mapping[str, Any] = field(default_factory=dict)  #: payload ``optional`` / subject annotations

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class Verification:
    """Every signature found for one manifest digest, checked against one key."""

    expected_digest: str
    key_fingerprint: str
    checks: tuple[SignatureCheck, ...] = ()
    #: Why a whole source gave no signature to check (no ``.sig`` tag, an unreadable manifest, no bundles).
    absent: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return any(check.ok for check in self.checks)

    @property
    def accepted(self) -> tuple[SignatureCheck, ...]:
        return tuple(check for check in self.checks if check.ok)

    @property
    def reason(self) -> str:
        """Why verification failed ('' when it passed)."""
        if self.ok:
            return ""
        what = f"no valid signature for {self.expected_digest} by key {self.key_fingerprint}"
        if not self.checks:
            return f"{what}: no signature found ({'; '.join(self.absent) or 'nothing to check'})"
        return f"{what}: " + "; ".join([*(f"{check.where}: {check.reason}" for check in self.checks), *self.absent])

    def describe(self) -> list[str]:
        """One line per accepted signature: who signed what, and where the signature was found."""
        lines = []
        for check in self.accepted:
            line = f"{check.signed_digest} signed by key {self.key_fingerprint} ({check.form}, {check.where}"
            if check.docker_reference:
                line += f", docker-reference {check.docker_reference}"
            if check.predicate_type:
                line += f", predicateType {check.predicate_type}"
            lines.append(line + ")")
        return lines

    def check(self) -> Verification:
        """Return self when some signature verified; otherwise raise VerificationError with the reason."""
        if not self.ok:
            raise VerificationError(self.reason)
        return self


def combine(*verifications: Verification) -> Verification:
    """Merge the results of both forms for the same digest and key: it passes when any signature verified.

    (cosign 3 judges an image on its bundles alone once it finds any; imgpack accepts a valid signature of
    either form, which is never weaker: each accepted signature is the key's own statement about the digest.)
    """
    first = verifications[0]
    for other in verifications[1:]:
        if (other.expected_digest, other.key_fingerprint) != (first.expected_digest, first.key_fingerprint):
            raise ValueError("combine() needs verifications of the same digest with the same key")
    return Verification(
        first.expected_digest,
        first.key_fingerprint,
        tuple(check for v in verifications for check in v.checks),
        tuple(reason for v in verifications for reason in v.absent),
    )
