"""cosign 3's default signature: a Sigstore bundle v0.3 attached to the image as an OCI 1.1 referrer.

* What is signed is an in-toto Statement v1 (protojson, fields in proto order)::

    {"_type":"https://in-toto.io/Statement/v1","subject":[{"digest":{"sha256":"<hex>"},"annotations":{}}],
     "predicateType":"https://sigstore.dev/cosign/sign/v1","predicate":{}}

  in a DSSE envelope (payloadType ``application/vnd.in-toto+json``) whose one signature is DER ECDSA-SHA256
  over the pre-authentication encoding ``DSSEv1 <len> <type> <len> <payload>``, never over the JSON.
* The bundle (protojson) holds ``verificationMaterial.publicKey.hint`` (base64 SHA-256 of the SPKI DER, which
  cosign ignores when verifying with ``--key``) and the envelope, and no transparency-log entries or timestamps:
  imgpack signs offline with a key. ``cosign verify --key cosign.pub --insecure-ignore-tlog=true`` accepts it
  (cosign 3, and 2.6.3+; 2.6.0-2.6.2 also need ``--new-bundle-format``; older cosign reads only the ``.sig``).
* The referrer manifest, put by its own digest: an OCI image manifest with ``artifactType`` the bundle media
  type, the empty config ``application/vnd.oci.empty.v1+json`` (bytes ``{}``, carrying the artifactType too, as
  cosign writes it), exactly one bundle layer, ``subject`` the signed manifest, and the annotations
  ``dev.sigstore.bundle.content``, ``dev.sigstore.bundle.predicateType`` and ``org.opencontainers.image.created``.
* Registries without the referrers API (distribution 2.8) get the OCI referrers tag schema, as ggcr writes it:
  the tag ``sha256-<hex>`` holds an OCI index of referrer descriptors (mediaType, size, digest, artifactType),
  sorted by digest, one entry per digest.

Reading, as cosign's ``GetBundles`` and sigstore-go do: only referrers with exactly one layer of a
``application/vnd.dev.sigstore.bundle*`` media type count, others are skipped silently; the bundle and the
statement are parsed as protojson parses them (unknown fields refused, proto field names accepted as aliases,
whitespace free, a missing ``predicate`` tolerated as from cosign 3.0.0-3.0.4); log entries and timestamps are
accepted and not checked (that is what ``--insecure-ignore-tlog`` means). A bundle passes when its one DSSE
signature verifies under the key and a subject's ``sha256`` is the expected digest. Like cosign, the
predicateType is reported, not required. Certificate (keyless) bundles are refused: they need the Sigstore
trust root and the network.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from imgpack.schemas import spec
from imgpack.schemas.digest import check_digest, sha256_bytes
from imgpack.schemas.errors import ImgpackError
from imgpack.signing.keys import PublicKey, SigningKey
from imgpack.signing.oci import (
    BUNDLE_MEDIA_TYPE,
    BUNDLE_MEDIA_TYPE_PREFIX,
    EMPTY_BLOB,
    EMPTY_DIGEST,
    EMPTY_MEDIA_TYPE,
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
    protojson,
    read_blob,
    short,
    string,
)

IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
STATEMENT_TYPES = (STATEMENT_TYPE, "https://in-toto.io/Statement/v0.1")
COSIGN_SIGN_PREDICATE = "https://sigstore.dev/cosign/sign/v1"
#: The bundle versions cosign reads (it requires v0.3 or later; v0.3 is the latest), in both spellings.
BUNDLE_V03_TYPES = (BUNDLE_MEDIA_TYPE, "application/vnd.dev.sigstore.bundle+json;version=0.3")
CONTENT_ANNOTATION = "dev.sigstore.bundle.content"
PREDICATE_TYPE_ANNOTATION = "dev.sigstore.bundle.predicateType"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding, the bytes the envelope's signature covers."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def make_statement(manifest_digest: str, annotations: Mapping[str, str] | None = None) -> bytes:
    """The in-toto statement cosign signs for an image digest (``annotations``: cosign's ``-a k=v``)."""
    subject = {"digest": {"sha256": check_digest(manifest_digest, "signed manifest digest")}}
    subject["annotations"] = dict(sorted((annotations or {}).items()))
    return protojson(
        {"_type": STATEMENT_TYPE, "subject": [subject], "predicateType": COSIGN_SIGN_PREDICATE, "predicate": {}}
    )


def make_bundle(key: SigningKey, manifest_digest: str, annotations: Mapping[str, str] | None = None) -> bytes:
    """A key-signed Sigstore bundle v0.3 over `make_statement`, with no log entries."""
    statement = make_statement(manifest_digest, annotations)
    signature = key.sign(pae(IN_TOTO_PAYLOAD_TYPE, statement))
    return protojson(
        {
            "mediaType": BUNDLE_MEDIA_TYPE,
            "verificationMaterial": {"publicKey": {"hint": key.public_key.hint}},
            "dsseEnvelope": {
                "payload": b64encode(statement),
                "payloadType": IN_TOTO_PAYLOAD_TYPE,
                "signatures": [{"sig": b64encode(signature)}],
            },
        }
    )


def _rfc3339(created: datetime | str | None) -> str:
    if isinstance(created, str):
        return created
    moment = created or datetime.now(UTC)
    if moment.tzinfo is None:
        raise ValueError("created must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def referrer_manifest(bundle: bytes, subject: Descriptor, created: datetime | str | None = None) -> Artifact:
    """The referrer manifest attaching ``bundle`` to ``subject`` (the signed manifest's descriptor).

    ``created`` (default: now) goes into ``org.opencontainers.image.created`` as UTC RFC 3339. The artifact has
    no tag: put it by digest, then (without the referrers API) add it to the `referrers_tag` index.
    """
    layer = Descriptor.of(BUNDLE_MEDIA_TYPE, bundle)
    config = Descriptor(EMPTY_MEDIA_TYPE, EMPTY_DIGEST, len(EMPTY_BLOB), artifact_type=BUNDLE_MEDIA_TYPE)
    document = {
        "schemaVersion": 2,
        "mediaType": spec.OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json()],
        "annotations": {
            CONTENT_ANNOTATION: "dsse-envelope",
            PREDICATE_TYPE_ANNOTATION: COSIGN_SIGN_PREDICATE,
            spec.CREATED_ANNOTATION: _rfc3339(created),
        },
        "subject": Descriptor(subject.media_type, subject.digest, subject.size).to_json(),
        "artifactType": BUNDLE_MEDIA_TYPE,
    }
    blobs = {EMPTY_DIGEST: EMPTY_BLOB, layer.digest: bundle}
    return Artifact(go_json(document), spec.OCI_MANIFEST, blobs, None, BUNDLE_MEDIA_TYPE)


def sign(
    key: SigningKey,
    subject: Descriptor,
    created: datetime | str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Artifact:
    """Sign the manifest ``subject`` describes: the referrer manifest to put by digest, with its blobs."""
    return referrer_manifest(make_bundle(key, subject.digest, annotations), subject, created)


def referrers_tag(digest: str) -> str:
    """The referrers tag schema's tag for a subject: ``sha256-<hex>`` (no ``.sig`` suffix)."""
    return digest_tag(digest)


def referrer_descriptor(manifest: bytes) -> Descriptor:
    """A referrer's entry in a referrers index, as ggcr makes it: its artifactType, else its config's media
    type; no annotations. Raises SignatureError when ``manifest`` is not a manifest."""
    document = parse_object(manifest, "referrer manifest")
    media_type = document.get("mediaType")
    if media_type not in (spec.OCI_MANIFEST, spec.OCI_INDEX):
        raise SignatureError(f"referrer manifest has media type {media_type!r}, not an OCI manifest or index")
    artifact_type = document.get("artifactType")
    if not artifact_type and isinstance(document.get("config"), dict):
        artifact_type = document["config"].get("mediaType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise SignatureError("referrer manifest has an artifactType that is not a string")
    return Descriptor(media_type, sha256_bytes(manifest), len(manifest), {}, artifact_type or None)


def _index(data: bytes) -> tuple[dict[str, Any], list[Descriptor]]:
    document = parse_object(data, "referrers index")
    if document.get("mediaType", spec.OCI_INDEX) != spec.OCI_INDEX:
        raise SignatureError(f"referrers index has media type {document.get('mediaType')!r}, not an OCI index")
    entries = document.get("manifests")
    if entries is None:
        return document, []
    if not isinstance(entries, list):
        raise SignatureError("referrers index has a manifests member that is not a list")
    return document, [Descriptor.from_json(entry, f"referrers index entry {i}") for i, entry in enumerate(entries)]


def parse_referrers(index: bytes) -> list[Descriptor]:
    """The entries of a referrers list (the API's answer, or the fallback tag's index)."""
    return _index(index)[1]


def add_referrers(existing: bytes | None, subject_digest: str, entries: Iterable[Descriptor]) -> Artifact | None:
    """The fallback index at `referrers_tag` with ``entries`` merged in (``existing`` None: the tag's 404).

    Entries are kept one per digest (the first wins) and sorted by digest, as ggcr does; the index's own
    annotations are kept. Returns None when every entry was already listed, so nothing needs writing.
    """
    document, current = _index(existing) if existing is not None else ({}, [])
    merged: dict[str, Descriptor] = {}
    for entry in [*current, *entries]:
        merged.setdefault(entry.digest, entry)
    if existing is not None and set(merged) == {entry.digest for entry in current}:
        return None
    out: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": spec.OCI_INDEX,
        "manifests": [merged[digest].to_json() for digest in sorted(merged)],
    }
    annotations = document.get("annotations")
    if isinstance(annotations, dict) and annotations:
        out["annotations"] = dict(sorted(annotations.items()))
    return Artifact(go_json(out), spec.OCI_INDEX, {}, referrers_tag(subject_digest))


def bundle_layer(manifest: bytes) -> Descriptor | None:
    """The bundle layer of a referrer manifest, or None when the referrer is not a Sigstore bundle (cosign:
    exactly one layer, its media type ``application/vnd.dev.sigstore.bundle…``)."""
    try:
        layers = parse_object(manifest, "referrer manifest").get("layers")
        if not isinstance(layers, list) or len(layers) != 1:
            return None
        layer = Descriptor.from_json(layers[0], "referrer layer")
    except SignatureError:
        return None
    return layer if layer.media_type.startswith(BUNDLE_MEDIA_TYPE_PREFIX) else None


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", r"_\1", name).lower()


def _proto(
    document: object, what: str, fields: tuple[str, ...], required: tuple[str, ...] = (), aliases: dict | None = None
) -> dict[str, Any]:
    """A protojson message: JSON names or proto field names, unknown fields refused, each field once, and
    null read as an absent field (protojson's rule)."""
    names: dict[str, str] = {**{_snake(f): f for f in fields}, **{f: f for f in fields}, **(aliases or {})}
    if not isinstance(document, dict):
        return members(document, what, fields)  # raises, naming the type
    out: dict[str, Any] = {}
    for key, value in document.items():
        name = names.get(key, str(key))
        if value is None and name in fields:
            continue
        if name in out:
            raise SignatureError(f"{what} has the field {name!r} twice")
        out[name] = value
    return members(out, what, fields, required)


def _check_bundle(data: bytes, key: PublicKey) -> dict[str, Any]:
    """Parse the bundle and check its one DSSE signature; returns the statement. Raises SignatureError."""
    bundle = _proto(
        parse_object(data, "the bundle"),
        "the bundle",
        ("mediaType", "verificationMaterial", "messageSignature", "dsseEnvelope"),
        ("mediaType", "verificationMaterial"),
    )
    media_type = string(bundle["mediaType"], "the bundle's mediaType")
    if media_type not in BUNDLE_V03_TYPES:
        raise SignatureError(f"bundle media type {media_type!r} is not a v0.3 Sigstore bundle (cosign reads v0.3)")
    material = _proto(
        bundle["verificationMaterial"],
        "verificationMaterial",
        ("publicKey", "x509CertificateChain", "certificate", "tlogEntries", "timestampVerificationData"),
    )
    if "certificate" in material or "x509CertificateChain" in material:
        raise SignatureError(
            "the bundle carries a certificate (a keyless signature); verifying it needs the Sigstore trust root"
            " and the network, which imgpack does not use — verify it with cosign"
        )
    if "publicKey" not in material:
        raise SignatureError("the bundle has no verification material (publicKey)")
    string(_proto(material["publicKey"], "publicKey", ("hint",)).get("hint", ""), "publicKey.hint")
    if not isinstance(material.get("tlogEntries", []), list):
        raise SignatureError("verificationMaterial.tlogEntries is not a list")
    if not isinstance(material.get("timestampVerificationData", {}), dict):
        raise SignatureError("verificationMaterial.timestampVerificationData is not an object")
    if "dsseEnvelope" not in bundle:
        what = "a message signature (as cosign sign-blob writes)" if "messageSignature" in bundle else "no content"
        raise SignatureError(f"the bundle holds {what}, not a DSSE envelope")
    if "messageSignature" in bundle:
        raise SignatureError("the bundle holds both a message signature and a DSSE envelope")
    envelope = _proto(
        bundle["dsseEnvelope"], "dsseEnvelope", ("payload", "payloadType", "signatures"), ("payload", "payloadType")
    )
    payload_type = string(envelope["payloadType"], "dsseEnvelope.payloadType")
    if payload_type != IN_TOTO_PAYLOAD_TYPE:
        raise SignatureError(f"the envelope's payload type is {payload_type!r}, not {IN_TOTO_PAYLOAD_TYPE}")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or len(signatures) != 1:
        count = len(signatures) if isinstance(signatures, list) else 0
        raise SignatureError(f"the envelope holds {count} signatures; a Sigstore bundle's holds exactly one")
    entry = _proto(signatures[0], "the envelope signature", ("sig", "keyid"), ("sig",))
    signature = b64decode(entry["sig"], "the envelope signature", lenient=True)
    payload = b64decode(envelope["payload"], "the envelope payload", lenient=True)
    problem = key.signature_problem(signature, pae(payload_type, payload))
    if problem:
        raise SignatureError(problem)
    return _proto(
        parse_object(payload, "the statement"),
        "the statement",
        ("_type", "subject", "predicateType", "predicate"),
        ("_type", "subject", "predicateType"),
        {"type": "_type"},
    )


def _subjects(statement: dict[str, Any]) -> list[dict[str, Any]]:
    kind = string(statement["_type"], "the statement's _type")
    if kind not in STATEMENT_TYPES:
        raise SignatureError(f"statement type {kind!r} is not an in-toto Statement")
    string(statement["predicateType"], "predicateType")
    if not isinstance(statement.get("predicate", {}), dict):
        raise SignatureError("the statement's predicate is not an object")
    subjects = statement["subject"]
    if not isinstance(subjects, list) or not subjects:
        raise SignatureError("the statement has no subject")
    fields = ("name", "uri", "digest", "content", "downloadLocation", "mediaType", "annotations")
    out = [_proto(s, f"subject {i}", fields) for i, s in enumerate(subjects)]
    for i, subject in enumerate(out):
        digests = subject.get("digest", {})
        if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
            raise SignatureError(f"subject {i} has a digest that is not an algorithm-to-hex map")
        if not isinstance(subject.get("annotations", {}), dict):
            raise SignatureError(f"subject {i} has annotations that are not an object")
    return out


def verify_bundle(
    data: bytes,
    key: PublicKey,
    expected_digest: str,
    require: Mapping[str, str] | None = None,
    where: str = "bundle",
) -> SignatureCheck:
    """Check one bundle as ``cosign verify --key … --insecure-ignore-tlog`` does; never raises on bad input."""
    expected_hex = check_digest(expected_digest, "expected manifest digest")
    statement: dict[str, Any] | None = None
    subject: dict[str, Any] = {}
    try:
        statement = _check_bundle(data, key)
        subjects = _subjects(statement)
        subject = next((s for s in subjects if s.get("digest", {}).get("sha256") == expected_hex), subjects[0])
        named = subject.get("digest", {}).get("sha256")
        if named != expected_hex:
            shown = ", ".join(f"{a}:{v}" for s in subjects[:3] for a, v in s.get("digest", {}).items()) or "no digest"
            raise SignatureError(f"the statement's subject names {shown}, not {expected_digest}")
        annotations = subject.get("annotations", {})
        for name, value in (require or {}).items():
            if annotations.get(name) != value:
                raise SignatureError(f"the subject annotation {name!r} is {annotations.get(name)!r}, not {value!r}")
        reason = None
    except SignatureError as e:
        reason = e.message
    named = subject.get("digest", {}).get("sha256")  # subject is {} or a checked one
    predicate_type = statement.get("predicateType") if statement else None
    return SignatureCheck(
        "bundle",
        where,
        reason,
        f"sha256:{named}" if named else None,
        predicate_type=predicate_type if isinstance(predicate_type, str) else None,
        annotations=dict(subject.get("annotations", {})),
    )


def verify(
    referrers: Mapping[str, bytes],
    blobs: Mapping[str, bytes],
    key: PublicKey,
    expected_digest: str,
    require: Mapping[str, str] | None = None,
) -> Verification:
    """Check every bundle among the subject's referrers (digest -> manifest bytes; `bundle_layer` says which
    blob each needs, ``blobs`` holds them; both may be lazy). Non-bundle referrers are skipped, as in cosign."""
    check_digest(expected_digest, "expected manifest digest")
    checks: list[SignatureCheck] = []
    for digest in referrers:
        where = f"referrer {short(digest)}"
        try:
            manifest = referrers[digest]
        except ImgpackError as e:
            checks.append(SignatureCheck("bundle", where, f"the referrer manifest could not be read: {e.message}"))
            continue
        if sha256_bytes(manifest) != digest:
            checks.append(SignatureCheck("bundle", where, "the referrer manifest does not match its digest"))
            continue
        layer = bundle_layer(manifest)
        if layer is None:
            continue
        where = f"{where} (bundle {short(layer.digest)})"
        try:
            data = read_blob(blobs, layer, "the bundle blob")
        except SignatureError as e:
            checks.append(SignatureCheck("bundle", where, e.message))
            continue
        checks.append(verify_bundle(data, key, expected_digest, require, where))
    absent = () if checks else (f"no Sigstore bundle among {len(referrers)} referrer(s)",)
    return Verification(expected_digest, key.fingerprint, tuple(checks), absent)
