"""imgpack.signing: key files, cosign's two signature forms, and a cross-check against an independent implementation.

cosign cannot run here, so interoperability rests on exact bytes: cosign's own key-file vectors, a signature
cosign made (from containers/image's fixtures), NaCl/libsodium secretbox vectors, and `Cosign` below, a second
implementation of cosign's formats written straight from their description (sigstore/cosign's source as read in
the project notes), sharing no code with imgpack.signing: each side must accept what the other writes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from imgpack.schemas.errors import ImgpackError, IntegrityError, UsageError
from imgpack.schemas.reference import Reference
from imgpack.signing import bundle, keys, oci, secretbox, simplesigning
from imgpack.signing.oci import Descriptor, SignatureError, Verification, VerificationError, combine

# ------------------------------------------------------------------------------------------------------------
# Vectors from other implementations.

#: sigstore/cosign pkg/cosign/keys_test.go (Apache-2.0): key files cosign's tests load with password "hello".
#: pemsigstorekey and pemcosignkey hold PKCS#8 P-256 keys; pemcosigneckey holds the SEC1 encoding of validecp256.
COSIGN_PASSWORD = "hello"
PEMSIGSTOREKEY = b"""-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----
eyJrZGYiOnsibmFtZSI6InNjcnlwdCIsInBhcmFtcyI6eyJOIjozMjc2OCwiciI6
OCwicCI6MX0sInNhbHQiOiI3T3VGd2VsbWZZNXVId2NoaURSc210anNwZ2ZlZjFG
Mk5lOGFDTjVLYVpZPSJ9LCJjaXBoZXIiOnsibmFtZSI6Im5hY2wvc2VjcmV0Ym94
Iiwibm9uY2UiOiJQNHk4OGhCb3ZTa09MbXN0bFVBaGJwdDJ0K2xTNUxQSCJ9LCJj
aXBoZXJ0ZXh0IjoiMnB1QzdyZldJOWh3bnJlQ2s4aUZDRlVwQlRrSzRJNlIvbFBF
cnBDekpXUGpJWXl4eGVIL1A2VW52cFJHdVhla1NNb3JMdGhLamdoQ1JlNy82NDVH
QWtoVm1LRC92eEF0S2EvbE1abENSQ3FlekJGUFd1dzNpeFRtZ2xhb2J1ZFVSbUVs
bmNGOGlZbzBTMVl6Y1ZOMVFwY2J2c0dNcUlYRzVlbmdteGp5dCtBcXlyZTF0Q0Y0
V01tU1BlaEljNlBqd2h1Q2xHaVpJUWRvTGc9PSJ9
-----END ENCRYPTED SIGSTORE PRIVATE KEY-----
"""
PEMCOSIGNKEY = b"""-----BEGIN ENCRYPTED COSIGN PRIVATE KEY-----
eyJrZGYiOnsibmFtZSI6InNjcnlwdCIsInBhcmFtcyI6eyJOIjozMjc2OCwiciI6
OCwicCI6MX0sInNhbHQiOiJ4WWdoc09JTUxUWGNOT0RsclNIOUNKc1FlOVFnZmN1
cmUrMXlLdHh1TlkwPSJ9LCJjaXBoZXIiOnsibmFtZSI6Im5hY2wvc2VjcmV0Ym94
Iiwibm9uY2UiOiI0cS9PSlVmaXJkSUkrUjZ0ajZBMmcyQ0JqL25xdFNicCJ9LCJj
aXBoZXJ0ZXh0IjoiKzB4Q3NzcFN0WStBczdKanJpOWtsbHBWd2JhcUI4ZWJNdWto
eS9aVE1MSXRsL3B1YS9jWVJvbytLRGxMWWdmOW1kSjk4K1FnQW9oTktoYnJPMTcw
MHdBY1JTMjFDOE4zQUNJRUVZaWpOMllBNnMraGJSbkhjUnd4eGhDMDFtb2FvL0dO
Y1pmbEJheXZMV3pXblo4d2NDZ2ZpT1o1VXlRTEFJMHh0dnR6dEh3cTdDV1Vhd3V4
RlhlNDZzck9TUE9SNHN6bytabWErUGovSFE9PSJ9
-----END ENCRYPTED COSIGN PRIVATE KEY-----
"""
PEMCOSIGNECKEY = b"""-----BEGIN ENCRYPTED COSIGN PRIVATE KEY-----
eyJrZGYiOnsibmFtZSI6InNjcnlwdCIsInBhcmFtcyI6eyJOIjo2NTUzNiwiciI6
OCwicCI6MX0sInNhbHQiOiJHK3F5WTYrNzhNS0JzMXNGTGs1ajYwcS9kS3Z1czBW
VkhlSHZybC9POTF3PSJ9LCJjaXBoZXIiOnsibmFtZSI6Im5hY2wvc2VjcmV0Ym94
Iiwibm9uY2UiOiJRc2JGdG13WDRDK2ttV3ZCcVRaMEFGOUFYdk1jRmg1SCJ9LCJj
aXBoZXJ0ZXh0IjoiREM5T28zeldiYVQzSXYwdFVnWEdycjUxYW1samwwNlQ5MTNP
VkxPbWpuMWhnK2o2WXRUbWg3SGhZSlY1N2J5eGE0Q281bE9YYmRqbTJ3aklubEd1
Um5aZCt5OExnekpSNzFSeEhKVzgrWmRlcFJmYWJMTjdHbDgrSFZEcERVQ3NxQnRh
VngyblpGbFEwWUl1anZwbFphblNGaUVvdERLVGkxZ3VhUXIwUHNzYU01NXZxbTRY
WS9rPSJ9
-----END ENCRYPTED COSIGN PRIVATE KEY-----
"""
VALIDECP256 = b"""-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIIGhcmCI5F7BPMH4r3pWCpQdAsveErdU5DjvVQerErJuoAoGCCqGSM49
AwEHoUQDQgAE+9E3Qe+h25ofmz3Uo2T004Dfy49iX06MMbxf9rsGmLkOPrS0KYDl
1QMfFuSbrtf8wTWNT9HNxrW/Foz39mDhHw==
-----END EC PRIVATE KEY-----
"""
#: containers/image signature/fixtures (Apache-2.0): a signature made by cosign, its key, and the digest it
#: signs (of dir-img-cosign-valid/manifest.json). The payload is cosign's, byte for byte.
CI_COSIGN_PUB = b"""-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEFNLqFhf4fiN6o/glAuYnq2jYUeL0
vRuLu/z39pmbVwS9ff5AYnlwaP9sxREajdLY9ynM6G1sy6AAmb7Z63TsLg==
-----END PUBLIC KEY-----
"""
CI_REFERENCE = "192.168.64.2:5000/cosign-signed-single-sample"
CI_DIGEST = "sha256:634a8f35b5f16dcf4aaa0822adc0b1964bb786fca12f6831de8ddc45e5986a00"
CI_PAYLOAD = base64.b64decode(
    "eyJjcml0aWNhbCI6eyJpZGVudGl0eSI6eyJkb2NrZXItcmVmZXJlbmNlIjoiMTkyLjE2OC42NC4yOjUwMDAvY29zaWduLXNpZ25lZC1zaW5n"
    "bGUtc2FtcGxlIn0sImltYWdlIjp7ImRvY2tlci1tYW5pZmVzdC1kaWdlc3QiOiJzaGEyNTY6NjM0YThmMzViNWYxNmRjZjRhYWEwODIyYWRj"
    "MGIxOTY0YmI3ODZmY2ExMmY2ODMxZGU4ZGRjNDVlNTk4NmEwMCJ9LCJ0eXBlIjoiY29zaWduIGNvbnRhaW5lciBpbWFnZSBzaWduYXR1cmUi"
    "fSwib3B0aW9uYWwiOm51bGx9"
)
CI_SIGNATURE = "MEYCIQDmtamqYPjMg81nqeBhptrPls44aA/r7PwLmspINJY4MwIhANKRpqe2E9UCBtGFdPoz/8jAbaQm4uP4h+IpwKTE6ClR"

#: Made for these tests with OpenSSL 3.0: `openssl ecparam -genkey -name prime256v1`, then `openssl ec -aes256`,
#: `openssl pkcs8 -topk8 -v2 aes-256-cbc` (password s3cret), `openssl ec -pubout` and `openssl req -x509`.
OPENSSL_ECPARAM = b"""-----BEGIN EC PARAMETERS-----
BggqhkjOPQMBBw==
-----END EC PARAMETERS-----
-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIEy+tHZomgntp3MQe6nnTHIOm59phW0gZvs2OZtoy3ZPoAoGCCqGSM49
AwEHoUQDQgAElfS7brWlyO6qi8yfZyQj3l09C+sgIUbMRHqiJ2KZTLIOmwRjuhTz
0CaeALKaDIIaCBGaUVcQ2hI8nK7j60nC5A==
-----END EC PRIVATE KEY-----
"""
OPENSSL_SEC1_ENCRYPTED = b"""-----BEGIN EC PRIVATE KEY-----
Proc-Type: 4,ENCRYPTED
DEK-Info: AES-256-CBC,BF677398F87CA0E57BB5FD29CB8DE572

wHl327pyHgEbW/NKngDMap7a3w/dPmgVCk9uNfq6xng62+N3EjAMxYMQorIQxYAR
lEg7WoGpb70DcFg6CiAxiuVi+82Fun9wRUQoMwRVsbgLspmmcAlqR2ovKKPB15C0
v02R+kiXVqr30lnyi8qGchcGZ2pRz+uYghE51lrqC3s=
-----END EC PRIVATE KEY-----
"""
OPENSSL_PKCS8_ENCRYPTED = b"""-----BEGIN ENCRYPTED PRIVATE KEY-----
MIHsMFcGCSqGSIb3DQEFDTBKMCkGCSqGSIb3DQEFDDAcBAi41yEkctArJQICCAAw
DAYIKoZIhvcNAgkFADAdBglghkgBZQMEASoEEB+QH4ARiPoZqj5I3KdTdw4EgZBD
X24ZRjj+tYyl/Z+yGjVKudgFYBYHwbaERQtLZCktgNK8VMfNB9szUcNdBbB4DOE8
d0wvvaaE/HaGW9Mr+MVL4dRIDGnnLvhjYnyDCCvLHS+QWastkCRW0bcq+0zvWEPq
k/yBHhLwAc2kDEnsRDrhRUEhEwwUhLJ6GYDGy3DSw7qsjabLetdIV8jff/S1krU=
-----END ENCRYPTED PRIVATE KEY-----
"""
OPENSSL_PUB = b"""-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAElfS7brWlyO6qi8yfZyQj3l09C+sg
IUbMRHqiJ2KZTLIOmwRjuhTz0CaeALKaDIIaCBGaUVcQ2hI8nK7j60nC5A==
-----END PUBLIC KEY-----
"""
OPENSSL_CERT = b"""-----BEGIN CERTIFICATE-----
MIIBhDCCASugAwIBAgIUOObXIfrNIICulyEzhN2isKpkLE8wCgYIKoZIzj0EAwIw
FzEVMBMGA1UEAwwMaW1ncGFjay10ZXN0MCAXDTI2MTIwMTE5NDgwOVoYDzIxMjYx
MTA3MTk0ODA5WjAXMRUwEwYDVQQDDAxpbWdwYWNrLXRlc3QwWTATBgcqhkjOPQIB
BggqhkjOPQMBBwNCAASV9LtutaXI7qqLzJ9nJCPeXT0L6yAhRsxEeqInYplMsg6b
BGO6FPPQJp4AspoMghoIEZpRVxDaEjycruPrScLko1MwUTAdBgNVHQ4EFgQUD4O/
4f63qDiLXCHmwzihkaM1PM4wHwYDVR0jBBgwFoAUD4O/4f63qDiLXCHmwzihkaM1
PM4wDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNHADBEAiAwCGswM3Kwviau
zZ0GJKH9+NI87IL0Wfk9Lg/tHRqsXwIgUbbcbKE15L4FYJz8am7+5wCHCM4Dp653
OwQRMiloRgg=
-----END CERTIFICATE-----
"""

DIGEST = "sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "cd" * 32
SUBJECT = Descriptor("application/vnd.oci.image.manifest.v1+json", DIGEST, 1234)
CREATED = datetime(2026, 8, 24, 10, 0, 0, tzinfo=UTC)


def pub_pem(private_pem: bytes, password: bytes | None = None) -> bytes:
    """The public key of an openssl/cosign-test PEM private key, read by `cryptography` alone."""
    key = serialization.load_pem_private_key(private_pem, password)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# ------------------------------------------------------------------------------------------------------------
# An independent implementation of cosign's formats, from their description (not from imgpack.signing).


def _j(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Cosign:
    """cosign's legacy ``.sig`` and cosign 3's bundle referrer, written and checked the way cosign does."""

    @staticmethod
    def payload(docker_reference: str, digest: str) -> bytes:
        return (
            '{"critical":{"identity":{"docker-reference":"' + docker_reference + '"},"image":'
            '{"docker-manifest-digest":"' + digest + '"},"type":"cosign container image signature"},"optional":null}'
        ).encode()

    @staticmethod
    def sig_manifest(layers: list[tuple[bytes, str]]) -> tuple[bytes, dict[str, bytes]]:
        """ggcr empty.Image + mutate.Append per (payload, base64 signature): (manifest, blobs by digest)."""
        history = ",".join(['{"created":"0001-01-01T00:00:00Z"}'] * len(layers))
        diff_ids = ",".join(f'"{_sha(p)}"' for p, _ in layers)
        config = (
            '{"architecture":"","created":"0001-01-01T00:00:00Z","history":[' + history + '],"os":"",'
            '"rootfs":{"type":"layers","diff_ids":[' + diff_ids + ']},"config":{}}'
        ).encode()
        manifest = _j(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": len(config),
                           "digest": _sha(config)},
                "layers": [
                    {"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "size": len(p),
                     "digest": _sha(p), "annotations": {"dev.cosignproject.cosign/signature": s}}
                    for p, s in layers
                ],
            }
        )  # fmt: skip
        blobs = {_sha(config): config, **{_sha(p): p for p, _ in layers}}
        return manifest, blobs

    @staticmethod
    def verify_sig(manifest: bytes, blobs: dict[str, bytes], public: ec.EllipticCurvePublicKey, digest: str) -> bool:
        """cosign verify --key --insecure-ignore-tlog on a .sig: some layer's signature and digest claim hold."""
        for layer in json.loads(manifest)["layers"]:
            payload = blobs[layer["digest"]]
            assert _sha(payload) == layer["digest"] and len(payload) == layer["size"]
            signature = base64.b64decode(layer["annotations"]["dev.cosignproject.cosign/signature"])
            try:
                public.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
            except InvalidSignature:
                continue
            if json.loads(payload)["critical"]["image"]["docker-manifest-digest"] == digest:
                return True
        return False

    @staticmethod
    def pae(payload_type: str, payload: bytes) -> bytes:
        t = payload_type.encode()
        return b"DSSEv1 " + str(len(t)).encode() + b" " + t + b" " + str(len(payload)).encode() + b" " + payload

    @classmethod
    def bundle_document(cls, private: ec.EllipticCurvePrivateKey, digest: str, statement: bytes | None = None) -> dict:
        if statement is None:
            statement = _j(
                {"_type": "https://in-toto.io/Statement/v1",
                 "subject": [{"digest": {"sha256": digest.split(":")[1]}, "annotations": {}}],
                 "predicateType": "https://sigstore.dev/cosign/sign/v1", "predicate": {}}
            )  # fmt: skip
        signature = private.sign(cls.pae("application/vnd.in-toto+json", statement), ec.ECDSA(hashes.SHA256()))
        spki = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return {
            "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
            "verificationMaterial": {"publicKey": {"hint": _b64(hashlib.sha256(spki).digest())}},
            "dsseEnvelope": {"payload": _b64(statement), "payloadType": "application/vnd.in-toto+json",
                             "signatures": [{"sig": _b64(signature)}]},
        }  # fmt: skip

    @staticmethod
    def referrer(bundle_bytes: bytes, subject: dict, created: str = "2026-08-24T10:00:00Z") -> tuple[bytes, dict]:
        bundle_type = "application/vnd.dev.sigstore.bundle.v0.3+json"
        manifest = _j(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", "size": 2, "digest": _sha(b"{}"),
                           "artifactType": bundle_type},
                "layers": [{"mediaType": bundle_type, "size": len(bundle_bytes), "digest": _sha(bundle_bytes)}],
                "annotations": {"dev.sigstore.bundle.content": "dsse-envelope",
                                "dev.sigstore.bundle.predicateType": "https://sigstore.dev/cosign/sign/v1",
                                "org.opencontainers.image.created": created},
                "subject": subject,
                "artifactType": bundle_type,
            }
        )  # fmt: skip
        return manifest, {_sha(b"{}"): b"{}", _sha(bundle_bytes): bundle_bytes}

    @classmethod
    def verify_bundle(cls, bundle_bytes: bytes, public: ec.EllipticCurvePublicKey, digest: str) -> bool:
        """sigstore-go with WithArtifactDigest and no observer timestamps, as cosign verify --key uses it."""
        document = json.loads(bundle_bytes)
        assert document["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
        envelope = document["dsseEnvelope"]
        if envelope["payloadType"] != "application/vnd.in-toto+json" or len(envelope["signatures"]) != 1:
            return False
        payload = base64.b64decode(envelope["payload"])
        try:
            public.verify(
                base64.b64decode(envelope["signatures"][0]["sig"]),
                cls.pae(envelope["payloadType"], payload),
                ec.ECDSA(hashes.SHA256()),
            )
        except InvalidSignature:
            return False
        return any(s["digest"].get("sha256") == digest.split(":")[1] for s in json.loads(payload)["subject"])


@pytest.fixture(scope="module")
def signer() -> keys.SigningKey:
    return keys.generate_key()


@pytest.fixture(scope="module")
def other() -> keys.SigningKey:
    return keys.generate_key()


# ------------------------------------------------------------------------------------------------------------
# secretbox


def test_secretbox_matches_nacl_vector() -> None:
    # golang/crypto nacl/secretbox TestSecretBox: "expected was generated using the C implementation of NaCl".
    expected = bytes.fromhex(
        "8442bc313f4626f1359e3b50122b6ce6fe66ddfe7d39d14e637eb4fd5b45beadab55198df6ab5368439792a23c87db70acb6156dc5"
        "ef957ac04f6276cf6093b84be77ff0849cc33e34b7254d5a8f65ad"
    )
    assert secretbox.seal(b"\x01" * 32, b"\x02" * 24, b"\x03" * 64) == expected
    assert secretbox.open_box(b"\x01" * 32, b"\x02" * 24, expected) == b"\x03" * 64


def test_secretbox_matches_libsodium_over_several_blocks() -> None:
    # PyNaCl 1.6.2 (libsodium) SecretBox(key).encrypt(msg, nonce).ciphertext, 200 bytes: four Salsa20 blocks.
    key, nonce, message = bytes(range(32)), bytes(range(100, 124)), bytes((i * 7 + 3) % 256 for i in range(200))
    expected = bytes.fromhex(
        "bbad21955f5496feee0cfa1413356f3401b388d12590e3dd8bbf6ac460dac6744dd0b92f6b30d6bf0dbefb54cd451c544b8505e0b0"
        "3196f0ee343e52372d982992cacf707df044db8873caa47c1c2bd880419db517daa57e428d16e257ddc8bf67adcc4fe8a92666f9e9"
        "f0a7ff68705a596358c3501ff713d899967b4ba290346b35b762f81d7d4d0bde57c3837fa3403d8a9c80a868b0bdf6e1e2e80a1705"
        "b990d1f71722316f38803b9e3221769cace2155a50a2575ef309424a96ee06272b2f7817f51617da1e4e6935a363772b7cf327d315"
        "90c841a0"
    )
    assert secretbox.seal(key, nonce, message) == expected
    assert secretbox.open_box(key, nonce, expected) == message


def test_secretbox_round_trips_and_refuses_any_altered_byte() -> None:
    key, nonce = bytes(range(32)), bytes(24)
    for size in (0, 1, 31, 32, 33, 64, 97):
        message = bytes(range(size))
        box = secretbox.seal(key, nonce, message)
        assert len(box) == size + secretbox.TAG_SIZE and secretbox.open_box(key, nonce, box) == message
    box = secretbox.seal(key, nonce, b"pkcs8 key bytes")
    for i in range(len(box)):
        damaged = box[:i] + bytes([box[i] ^ 0x20]) + box[i + 1 :]
        with pytest.raises(secretbox.SecretboxError):
            secretbox.open_box(key, nonce, damaged)
    with pytest.raises(secretbox.SecretboxError):
        secretbox.open_box(b"\x00" * 32, nonce, box)
    with pytest.raises(secretbox.SecretboxError):
        secretbox.open_box(key, nonce, box[:10])


# ------------------------------------------------------------------------------------------------------------
# keys


@pytest.mark.parametrize(
    "data, fingerprint",
    [
        (PEMSIGSTOREKEY, "sha256:f1057bf3c114d5486f0bdb3c702596d6154158248980d4be49f6c61fdc62c591"),
        (PEMCOSIGNKEY, "sha256:a6659c08b9909880c6e4bc51cab6fd7265673f67d614c20ba59a18957feb700d"),
        (PEMCOSIGNECKEY, "sha256:6d9d4f02f673f80570d5ed2f61236060ce644751880a95f1e2482fa420f1e33e"),
    ],
    ids=["pemsigstorekey", "pemcosignkey", "pemcosigneckey"],
)
def test_cosign_test_keys_decrypt(data: bytes, fingerprint: str) -> None:
    info = keys.inspect_private_key(data)
    assert info.cosign and info.encrypted
    key = keys.load_private_key(data, COSIGN_PASSWORD, "cosign.key")
    assert key.form == "cosign" and key.public_key.fingerprint == fingerprint
    signature = key.sign(b"data")
    assert key.public_key.signature_problem(signature, b"data") is None
    with pytest.raises(keys.KeyFileError, match="cosign.key: wrong password"):
        keys.load_private_key(data, "hellO", "cosign.key")


def test_cosign_ec_test_key_holds_validecp256() -> None:
    # pemcosigneckey encrypts validecp256 (SEC1); the public key decrypted here must be the one openssl-style
    # parsing of validecp256 gives. (cosign itself refuses SEC1 plaintext; imgpack accepts it.)
    decrypted = keys.load_private_key(PEMCOSIGNECKEY, COSIGN_PASSWORD)
    assert decrypted.public_key.pem() == pub_pem(VALIDECP256)


@pytest.mark.parametrize("n", keys.COSIGN_SCRYPT_N)
def test_cosign_key_file_round_trip(signer: keys.SigningKey, n: int) -> None:
    data = keys.encode_private_key(signer, "pw", "cosign", scrypt_n=n)
    lines = data.decode().splitlines()
    assert lines[0] == "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----" and lines[-1].startswith("-----END ENCRYPTED")
    assert data.endswith(b"-----\n") and all(len(line) == 64 for line in lines[1:-2]) and len(lines[-2]) <= 64
    body = json.loads(base64.b64decode("".join(lines[1:-1])))
    assert list(body) == ["kdf", "cipher", "ciphertext"]
    assert body["kdf"]["name"] == "scrypt" and body["kdf"]["params"] == {"N": n, "r": 8, "p": 1}
    assert list(body["kdf"]) == ["name", "params", "salt"] and len(base64.b64decode(body["kdf"]["salt"])) == 32
    assert body["cipher"]["name"] == "nacl/secretbox" and len(base64.b64decode(body["cipher"]["nonce"])) == 24
    assert b" " not in base64.b64decode("".join(lines[1:-1]))  # compact, as Go writes it
    loaded = keys.load_private_key(data, b"pw")
    assert loaded.form == "cosign" and loaded.public_key == signer.public_key


def test_cosign_key_file_with_empty_password(signer: keys.SigningKey) -> None:
    data = keys.encode_private_key(signer, "", "cosign")
    assert keys.load_private_key(data, "").public_key == signer.public_key
    with pytest.raises(keys.KeyFileError, match="no password"):
        keys.load_private_key(data, None)
    with pytest.raises(keys.KeyFileError, match="always encrypted"):
        keys.encode_private_key(signer, None, "cosign")


def _cosign_body(data: bytes) -> dict:
    return json.loads(base64.b64decode(b"".join(data.splitlines()[1:-1])))


def _cosign_file(body: dict, label: str = keys.COSIGN_PEM_LABEL) -> bytes:
    text = base64.b64encode(json.dumps(body).encode()).decode()
    return f"-----BEGIN {label}-----\n{text}\n-----END {label}-----\n".encode()


def test_cosign_key_file_refusals(signer: keys.SigningKey) -> None:
    good = _cosign_body(keys.encode_private_key(signer, "pw", "cosign"))
    weak = {"N": 16384, "r": 8, "p": 1}
    cases = {
        "unsupported scrypt parameters N=16384": {**good, "kdf": {**good["kdf"], "params": weak}},
        "unsupported key derivation 'pbkdf2'": {**good, "kdf": {**good["kdf"], "name": "pbkdf2"}},
        "unsupported cipher": {**good, "cipher": {**good["cipher"], "name": "aes-gcm"}},
        "ciphertext is not valid base64": {**good, "ciphertext": "!!!"},
        "nonce is 3 bytes": {**good, "cipher": {**good["cipher"], "nonce": "AAAA"}},
        "lacks 'cipher'": {"kdf": good["kdf"], "ciphertext": good["ciphertext"]},
        "wrong password": {**good, "ciphertext": _b64(b"\x00" * 60)},
    }
    for message, body in cases.items():
        with pytest.raises(keys.KeyFileError, match=message):
            keys.load_private_key(_cosign_file(body), "pw")
    with pytest.raises(keys.KeyFileError, match="not a valid cosign key file"):
        keys.load_private_key(b"-----BEGIN ENCRYPTED COSIGN PRIVATE KEY-----\nbm90IGpzb24=\n-----END "
                              b"ENCRYPTED COSIGN PRIVATE KEY-----\n", "pw")  # fmt: skip


def test_pkcs8_key_file_round_trip(signer: keys.SigningKey) -> None:
    data = keys.encode_private_key(signer, "pw")
    assert data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert keys.inspect_private_key(data) == keys.PrivateKeyFile("ENCRYPTED PRIVATE KEY", True)
    assert pub_pem(data, b"pw") == signer.public_key.pem()  # openssl-compatible: cryptography reads it alone
    loaded = keys.load_private_key(data, "pw")
    assert loaded.form == "pkcs8" and loaded.public_key == signer.public_key
    with pytest.raises(keys.KeyFileError, match="wrong password"):
        keys.load_private_key(data, "pW")
    with pytest.raises(keys.KeyFileError, match="no password"):
        keys.load_private_key(data, None)
    with pytest.raises(keys.KeyFileError, match="empty password"):
        keys.encode_private_key(signer, "")
    plain = keys.encode_private_key(signer, None)
    assert plain.startswith(b"-----BEGIN PRIVATE KEY-----") and not keys.inspect_private_key(plain).encrypted
    assert keys.load_private_key(plain, "ignored").public_key == signer.public_key


@pytest.mark.parametrize(
    "data, password, form",
    [(OPENSSL_ECPARAM, None, "sec1"), (OPENSSL_SEC1_ENCRYPTED, "s3cret", "sec1"),
     (OPENSSL_PKCS8_ENCRYPTED, "s3cret", "pkcs8"), (VALIDECP256, None, "sec1")],
    ids=["ecparam-genkey", "sec1-aes256", "pkcs8-aes256", "cosign-validecp256"],
)  # fmt: skip
def test_openssl_private_keys(data: bytes, password: str | None, form: str) -> None:
    key = keys.load_private_key(data, password)
    assert key.form == form
    expected = VALIDECP256 if data is VALIDECP256 else OPENSSL_ECPARAM
    assert key.public_key.pem() == pub_pem(expected)
    if password:
        with pytest.raises(keys.KeyFileError, match="wrong password"):
            keys.load_private_key(data, "nope")


def test_public_keys_from_pem_der_and_certificate() -> None:
    pem = keys.load_public_key(OPENSSL_PUB)
    assert pem.pem() == OPENSSL_PUB
    assert keys.load_public_key(pem.der) == pem
    assert keys.load_public_key(OPENSSL_CERT, "cert.pem") == pem
    assert pem.hint == _b64(hashlib.sha256(pem.der).digest())
    assert pem.fingerprint == _sha(pem.der)
    assert keys.encode_public_key(keys.load_private_key(OPENSSL_ECPARAM)) == OPENSSL_PUB


def test_key_files_that_are_not_p256_keys(tmp_path) -> None:
    def pem(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    p384 = ec.generate_private_key(ec.SECP384R1())
    cases = {
        "unsupported curve secp384r1": pem(p384),
        "RSA keys are not supported": pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "Ed25519 keys are not supported": pem(ed25519.Ed25519PrivateKey.generate()),
        "holds a public key or certificate": OPENSSL_PUB,
        "no private key found": b"hello, not a key\n",
        "not a readable private key": b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    }
    for message, data in cases.items():
        with pytest.raises(keys.KeyFileError, match=message):
            keys.load_private_key(data, None, "k.pem")
    public_cases = {
        "unsupported curve secp384r1": p384.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "is a private key": OPENSSL_ECPARAM,
        "not a readable public key": b"garbage",
        "PEM EC PARAMETERS is not a public key": OPENSSL_ECPARAM.split(b"-----BEGIN EC PRIVATE")[0],
    }
    for message, data in public_cases.items():
        with pytest.raises(keys.KeyFileError, match=message):
            keys.load_public_key(data, "k.pub")


def test_signature_problems(signer: keys.SigningKey, other: keys.SigningKey) -> None:
    signature = signer.sign(b"payload")
    public = signer.public_key
    assert public.signature_problem(signature, b"payload") is None
    assert "empty" in public.signature_problem(b"", b"payload")
    assert "not a DER ECDSA signature" in public.signature_problem(signature[:-3], b"payload")
    assert "not a DER ECDSA signature" in public.signature_problem(signature + b"\x00", b"payload")
    assert "does not verify" in public.signature_problem(signature, b"payloaD")
    assert "does not verify" in other.public_key.signature_problem(signature, b"payload")


# ------------------------------------------------------------------------------------------------------------
# cosign legacy .sig


def test_payload_is_byte_identical_to_cosigns() -> None:
    assert simplesigning.make_payload(CI_REFERENCE, CI_DIGEST) == CI_PAYLOAD
    assert Cosign.payload(CI_REFERENCE, CI_DIGEST) == CI_PAYLOAD


def test_payload_with_optional_annotations() -> None:
    payload = simplesigning.make_payload("ghcr.io/o/m", DIGEST, {"z": "1", "a": "<b&c>", "é": "ü"})
    assert payload == (
        '{"critical":{"identity":{"docker-reference":"ghcr.io/o/m"},"image":{"docker-manifest-digest":"' + DIGEST
        + '"},"type":"cosign container image signature"},"optional":{"a":"\\u003cb\\u0026c\\u003e","z":"1","é":"ü"}}'
    ).encode()  # fmt: skip
    with pytest.raises(UsageError):
        simplesigning.make_payload("ghcr.io/o/m@" + DIGEST, DIGEST)
    with pytest.raises(ImgpackError):
        simplesigning.make_payload("ghcr.io/o/m", "sha256:short")


def test_verify_a_signature_cosign_made() -> None:
    manifest, blobs = Cosign.sig_manifest([(CI_PAYLOAD, CI_SIGNATURE)])
    key = keys.load_public_key(CI_COSIGN_PUB)
    result = simplesigning.verify(manifest, blobs, key, CI_DIGEST).check()
    [accepted] = result.accepted
    assert accepted.docker_reference == CI_REFERENCE and accepted.signed_digest == CI_DIGEST
    assert accepted.where == ".sig layer 0 (sha256:" + hashlib.sha256(CI_PAYLOAD).hexdigest()[:12] + ")"
    assert result.describe() == [
        f"{CI_DIGEST} signed by key {key.fingerprint} (simplesigning, {accepted.where},"
        f" docker-reference {CI_REFERENCE})"
    ]
    assert not simplesigning.verify(manifest, blobs, key, DIGEST).ok


@pytest.mark.parametrize(
    "text, expected",
    [
        ("ghcr.io/org/model:v1", "ghcr.io/org/model"),
        ("localhost:5000/m@" + DIGEST, "localhost:5000/m"),
        ("docker.io/foo", "index.docker.io/library/foo"),
        ("docker.io/org/foo:tag", "index.docker.io/org/foo"),
        ("index.docker.io/foo", "index.docker.io/library/foo"),
        ("[::1]:5000/a/b/c", "[::1]:5000/a/b/c"),
    ],
)
def test_docker_reference(text: str, expected: str) -> None:
    assert simplesigning.docker_reference(Reference.parse(text)) == expected


def test_docker_reference_needs_a_registry() -> None:
    with pytest.raises(UsageError, match="registry host"):
        simplesigning.docker_reference(Reference.parse("model:v1"))


def test_tags() -> None:
    assert simplesigning.signature_tag(DIGEST) == "sha256-" + "ab" * 32 + ".sig"
    assert bundle.referrers_tag(DIGEST) == "sha256-" + "ab" * 32
    with pytest.raises(ImgpackError):
        simplesigning.signature_tag("sha256:ABC")


def test_sig_manifest_bytes_are_ggcrs() -> None:
    """Golden: the exact manifest and config a cosign-made .sig has, for a fixed signature annotation."""
    payload = simplesigning.make_payload("ghcr.io/o/m", DIGEST)
    layer = simplesigning.SignatureLayer(payload, {oci.SIGNATURE_ANNOTATION: CI_SIGNATURE})
    artifact = simplesigning.add_signature(None, layer, DIGEST, keys.generate_key().public_key)
    manifest, blobs = Cosign.sig_manifest([(payload, CI_SIGNATURE)])
    assert artifact.manifest == manifest and dict(artifact.blobs) == blobs
    config = next(blob for blob in blobs.values() if blob.startswith(b'{"architecture"'))
    assert len(config) == 233  # the size of every one-signature cosign .sig config
    assert artifact.tag == simplesigning.signature_tag(DIGEST) and artifact.media_type == oci.spec.OCI_MANIFEST
    assert simplesigning.config_for([layer.descriptor]) == config


def test_sign_verify_append_and_dedupe(signer: keys.SigningKey, other: keys.SigningKey) -> None:
    first = simplesigning.sign(signer, "ghcr.io/o/m", DIGEST)
    assert simplesigning.sign(signer, "ghcr.io/o/m", DIGEST, first.manifest) is None  # cosign's dd.Find
    second = simplesigning.sign(other, "ghcr.io/o/m", DIGEST, first.manifest)
    third = simplesigning.sign(signer, "ghcr.io/o/m", DIGEST, second.manifest, {"ci": "run-7"})
    blobs = {**first.blobs, **second.blobs, **third.blobs}
    layers = simplesigning.payload_descriptors(third.manifest)
    assert len(layers) == 3 and layers[:2] == simplesigning.payload_descriptors(second.manifest)
    config = json.loads(blobs[json.loads(third.manifest)["config"]["digest"]])
    assert config["rootfs"]["diff_ids"] == [layer.digest for layer in layers] and len(config["history"]) == 3
    for key, count in ((signer, 2), (other, 1)):
        result = simplesigning.verify(third.manifest, blobs, key.public_key, DIGEST)
        assert result.ok and len(result.accepted) == count
    claimed = simplesigning.verify(third.manifest, blobs, signer.public_key, DIGEST, {"ci": "run-7"})
    assert [c.annotations for c in claimed.accepted] == [{"ci": "run-7"}]
    assert (
        "optional 'ci' is None, not 'run-8'"
        in simplesigning.verify(third.manifest, blobs, other.public_key, DIGEST, {"ci": "run-8"}).reason
    )
    assert Cosign.verify_sig(third.manifest, blobs, other.public_key.key, DIGEST)


def test_append_keeps_docker_media_types(signer: keys.SigningKey) -> None:
    manifest, _ = Cosign.sig_manifest([(Cosign.payload("r.io/m", DIGEST), "AAAA")])
    document = json.loads(manifest)
    document["mediaType"] = "application/vnd.docker.distribution.manifest.v2+json"
    appended = simplesigning.sign(signer, "r.io/m", DIGEST, _j(document))
    out = json.loads(appended.manifest)
    assert out["mediaType"] == document["mediaType"] and appended.media_type == document["mediaType"]
    assert out["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert out["layers"][0] == document["layers"][0] and len(out["layers"]) == 2


def test_append_to_a_broken_sig_manifest_is_a_clean_error(signer: keys.SigningKey) -> None:
    for existing in (b"not json", b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}',
                     b'{"schemaVersion":2,"layers":[{"mediaType":"x"}]}'):  # fmt: skip
        with pytest.raises(SignatureError, match="existing signature manifest sha256-"):
            simplesigning.sign(signer, "r.io/m", DIGEST, existing)


def _sig_case(signer: keys.SigningKey, payload: bytes | None = None, signature: str | None = None, **layer_changes):
    payload = payload if payload is not None else Cosign.payload("r.io/m", DIGEST)
    if signature is None:
        signature = _b64(signer.key.sign(payload, ec.ECDSA(hashes.SHA256())))
    manifest, blobs = Cosign.sig_manifest([(payload, signature)])
    document = json.loads(manifest)
    document["layers"][0].update(layer_changes)
    return _j(document), blobs


def _payload(**critical_changes) -> bytes:
    document = json.loads(Cosign.payload("r.io/m", DIGEST))
    document["critical"].update(critical_changes)
    return _j(document)


SIG_CASES = {
    "bad base64": (lambda s: _sig_case(s, signature="MEUC!!not base64"), "signature annotation is not valid base64"),
    "empty signature": (lambda s: _sig_case(s, signature=""), "the signature is empty"),
    "truncated DER": (lambda s: _sig_case(s, signature=_b64(s.sign(Cosign.payload("r.io/m", DIGEST))[:-5])),
                      "not a DER ECDSA signature (truncated or malformed)"),
    "wrong key": (lambda s: _sig_case(s, signature=_b64(keys.generate_key().sign(Cosign.payload("r.io/m", DIGEST)))),
                  "does not verify under key"),
    "digest mismatch": (lambda s: _sig_case(s, payload=Cosign.payload("r.io/m", OTHER_DIGEST)),
                        f"the payload names {OTHER_DIGEST}, not {DIGEST}"),
    "wrong payload type": (lambda s: _sig_case(s, payload=_payload(type="atomic container signature")),
                           "payload type is 'atomic container signature'"),
    "unknown payload field": (lambda s: _sig_case(s, payload=_payload(extra=1)), "unknown field(s) 'extra'"),
    "payload not JSON": (lambda s: _sig_case(s, payload=b"\x00\xff garbage"), "payload is not valid JSON"),
    "payload is a list": (lambda s: _sig_case(s, payload=b"[1]"), "payload is a JSON list, not an object"),
    "digest not a string": (lambda s: _sig_case(s, payload=_payload(image={"docker-manifest-digest": 5})),
                            "docker-manifest-digest is int, not a string"),
    "duplicate key": (lambda s: _sig_case(s, payload=b'{"critical":{},"critical":{},"optional":null}'),
                      "has the key 'critical' twice"),
    "no annotation": (lambda s: _sig_case(s, annotations={}), "no dev.cosignproject.cosign/signature annotation"),
    "wrong layer media type": (lambda s: _sig_case(s, mediaType="application/octet-stream"),
                               "media type 'application/octet-stream' is not"),
    "blob size mismatch": (lambda s: _sig_case(s, size=1), "does not match its descriptor"),
    "blob missing": (lambda s: (_sig_case(s)[0], {}), "the payload blob sha256:"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SIG_CASES))
def test_malformed_sig_layers_give_reasons(signer: keys.SigningKey, case: str) -> None:
    make, reason = SIG_CASES[case]
    manifest, blobs = make(signer)
    result = simplesigning.verify(manifest, blobs, signer.public_key, DIGEST)
    assert not result.ok and reason in result.reason, result.reason
    assert result.reason.startswith(f"no valid signature for {DIGEST} by key {signer.public_key.fingerprint}: ")
    with pytest.raises(VerificationError, match="no valid signature") as raised:
        result.check()
    assert isinstance(raised.value, IntegrityError) and raised.value.exit_code == 6


@pytest.mark.parametrize(
    "manifest, reason",
    [
        (None, "no signature found (no sha256-" + "ab" * 32 + ".sig signature manifest)"),
        (b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}', "has no layers"),
        (b"<html>", "is not valid JSON"),
        (b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}', "not an image"),
        (b'{"schemaVersion":1,"layers":[]}', "schemaVersion 1, not 2"),
        (b'{"schemaVersion":2,"layers":[{"mediaType":"x","digest":"sha256:1","size":1}]}', "not sha256:<64 hex>"),
    ],
)
def test_unusable_sig_manifests_give_reasons(signer: keys.SigningKey, manifest: bytes | None, reason: str) -> None:
    result = simplesigning.verify(manifest, {}, signer.public_key, DIGEST)
    assert not result.ok and not result.checks and reason in result.reason, result.reason
    if manifest is not None:
        assert simplesigning.payload_descriptors(manifest) == [] or "no layers" in reason


def test_one_good_layer_among_bad_ones_verifies(signer: keys.SigningKey, other: keys.SigningKey) -> None:
    good = Cosign.payload("r.io/m", DIGEST)
    manifest, blobs = Cosign.sig_manifest(
        [(good, "%%%"), (good, _b64(other.sign(good))), (good, _b64(signer.sign(good)))]
    )
    result = simplesigning.verify(manifest, blobs, signer.public_key, DIGEST)
    assert result.ok and [c.where[:12] for c in result.accepted] == [".sig layer 2"] and len(result.checks) == 3


def test_fetch_failures_in_a_lazy_blob_mapping_become_reasons(signer: keys.SigningKey) -> None:
    class Failing(Mapping):
        """A lazy blob mapping, as a command might pass, whose fetch fails."""

        def __getitem__(self, digest: str) -> bytes:
            raise ImgpackError("registry said 500")

        def __iter__(self):
            return iter(())

        def __len__(self) -> int:
            return 0

    manifest, _ = _sig_case(signer)
    result = simplesigning.verify(manifest, Failing(), signer.public_key, DIGEST)
    assert not result.ok and "could not be read: registry said 500" in result.reason


def _mutations(data: bytes, rng: random.Random, count: int):
    for _ in range(count):
        raw = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(raw))
            raw[position] = rng.choice([rng.randrange(256), ord('"'), ord("{"), ord("}"), ord(","), ord("0")])
        yield bytes(raw)
    for cut in range(0, len(data), max(1, len(data) // 25)):
        yield data[:cut]


def test_simplesigning_never_raises_on_damaged_input(signer: keys.SigningKey) -> None:
    artifact = simplesigning.sign(signer, "r.io/m", DIGEST, optional={"a": "b"})
    payload_digest = simplesigning.payload_descriptors(artifact.manifest)[0].digest
    payload = artifact.blobs[payload_digest]
    rng = random.Random(12)
    for manifest in _mutations(artifact.manifest, rng, 300):
        result = simplesigning.verify(manifest, artifact.blobs, signer.public_key, DIGEST)
        assert isinstance(result, Verification) and (result.ok or result.reason)
    for damaged in _mutations(payload, rng, 300):
        result = simplesigning.verify(artifact.manifest, {payload_digest: damaged}, signer.public_key, DIGEST)
        assert result.ok == (damaged == payload) and (result.ok or result.reason)


# ------------------------------------------------------------------------------------------------------------
# cosign 3 bundle


def test_pae_vector() -> None:
    # The DSSE specification's example (protocol.md): PAE("http://example.com/HelloWorld", "hello world").
    assert bundle.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    assert bundle.pae("t", "é".encode()) == b"DSSEv1 1 t 2 \xc3\xa9"  # lengths in bytes


def test_statement_bytes() -> None:
    assert bundle.make_statement(DIGEST) == (
        b'{"_type":"https://in-toto.io/Statement/v1","subject":[{"digest":{"sha256":"' + b"ab" * 32
        + b'"},"annotations":{}}],"predicateType":"https://sigstore.dev/cosign/sign/v1","predicate":{}}'
    )  # fmt: skip
    assert b'"annotations":{"a":"1","b":"<2>"}' in bundle.make_statement(DIGEST, {"b": "<2>", "a": "1"})


def test_bundle_and_referrer_bytes(signer: keys.SigningKey) -> None:
    data = bundle.make_bundle(signer, DIGEST)
    document = json.loads(data)
    assert list(document) == ["mediaType", "verificationMaterial", "dsseEnvelope"]
    assert document["verificationMaterial"] == {"publicKey": {"hint": signer.public_key.hint}}
    assert list(document["dsseEnvelope"]) == ["payload", "payloadType", "signatures"]
    assert base64.b64decode(document["dsseEnvelope"]["payload"]) == bundle.make_statement(DIGEST)
    assert list(document["dsseEnvelope"]["signatures"][0]) == ["sig"]  # no keyid
    assert data == _j(document)  # compact
    artifact = bundle.referrer_manifest(data, SUBJECT, CREATED)
    expected, blobs = Cosign.referrer(data, {"mediaType": SUBJECT.media_type, "size": 1234, "digest": DIGEST})
    assert artifact.manifest == expected and dict(artifact.blobs) == blobs and artifact.tag is None
    assert oci.EMPTY_DIGEST == "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    assert artifact.descriptor == Descriptor(
        oci.spec.OCI_MANIFEST, _sha(expected), len(expected), {}, oci.BUNDLE_MEDIA_TYPE
    )
    assert bundle.referrer_descriptor(artifact.manifest) == artifact.descriptor
    assert (
        b'"org.opencontainers.image.created":"2026-08-24T12:00:00Z"'
        in bundle.referrer_manifest(
            data, SUBJECT, datetime(2026, 8, 24, 14, 0, tzinfo=timezone(timedelta(hours=2)))
        ).manifest
    )


def test_bundle_sign_verify_round_trip(signer: keys.SigningKey, other: keys.SigningKey) -> None:
    artifact = bundle.sign(signer, SUBJECT, CREATED, {"ci": "run-7"})
    referrers = {artifact.digest: artifact.manifest}
    result = bundle.verify(referrers, artifact.blobs, signer.public_key, DIGEST, {"ci": "run-7"}).check()
    [accepted] = result.accepted
    assert accepted.predicate_type == bundle.COSIGN_SIGN_PREDICATE and accepted.annotations == {"ci": "run-7"}
    assert accepted.where.startswith(f"referrer {artifact.digest[:19]} (bundle sha256:")
    assert "predicateType https://sigstore.dev/cosign/sign/v1" in result.describe()[0]
    assert "does not verify under key" in bundle.verify(referrers, artifact.blobs, other.public_key, DIGEST).reason
    assert (
        f"names sha256:{'ab' * 32}, not {OTHER_DIGEST}"
        in bundle.verify(referrers, artifact.blobs, signer.public_key, OTHER_DIGEST).reason
    )
    assert (
        "annotation 'ci' is 'run-7', not 'run-8'"
        in bundle.verify(referrers, artifact.blobs, signer.public_key, DIGEST, {"ci": "run-8"}).reason
    )


def test_referrers_index(signer: keys.SigningKey) -> None:
    first = bundle.sign(signer, SUBJECT, CREATED)
    second = bundle.sign(signer, SUBJECT, datetime(2026, 8, 25, tzinfo=UTC))
    index = bundle.add_referrers(None, DIGEST, [first.descriptor])
    assert index.tag == "sha256-" + "ab" * 32 and index.media_type == oci.spec.OCI_INDEX and not index.blobs
    assert index.manifest == (
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":'
        b'"application/vnd.oci.image.manifest.v1+json","size":' + str(len(first.manifest)).encode()
        + b',"digest":"' + first.digest.encode()
        + b'","artifactType":"application/vnd.dev.sigstore.bundle.v0.3+json"}]}'
    )  # fmt: skip
    assert bundle.add_referrers(index.manifest, DIGEST, [first.descriptor]) is None
    merged = bundle.add_referrers(index.manifest, DIGEST, [second.descriptor, first.descriptor, second.descriptor])
    entries = bundle.parse_referrers(merged.manifest)
    assert [e.digest for e in entries] == sorted([first.digest, second.digest])
    foreign = {"schemaVersion": 2, "mediaType": oci.spec.OCI_INDEX, "annotations": {"k": "v"},
               "manifests": [first.descriptor.to_json(), first.descriptor.to_json()]}  # fmt: skip
    cleaned = bundle.add_referrers(_j(foreign), DIGEST, [second.descriptor])
    assert len(bundle.parse_referrers(cleaned.manifest)) == 2 and json.loads(cleaned.manifest)["annotations"] == {
        "k": "v"
    }
    assert bundle.parse_referrers(b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}') == []
    for broken, message in ((b"{", "not valid JSON"), (_j({"mediaType": oci.spec.OCI_MANIFEST}), "not an OCI index"),
                            (_j({"manifests": [{"digest": "x"}]}), "entry 0 has no mediaType")):  # fmt: skip
        with pytest.raises(SignatureError, match=message):
            bundle.add_referrers(broken, DIGEST, [first.descriptor])


def test_referrer_descriptor_falls_back_to_the_config_media_type() -> None:
    manifest = _j({"schemaVersion": 2, "mediaType": oci.spec.OCI_MANIFEST,
                   "config": {"mediaType": "application/vnd.example+json", "size": 2, "digest": oci.EMPTY_DIGEST},
                   "layers": []})  # fmt: skip
    assert bundle.referrer_descriptor(manifest).artifact_type == "application/vnd.example+json"
    with pytest.raises(SignatureError):
        bundle.referrer_descriptor(b'{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}')


def _bundle_case(signer: keys.SigningKey, change=None, statement: bytes | None = None) -> bytes:
    document = Cosign.bundle_document(signer.key, DIGEST, statement)
    if change:
        change(document)
    return _j(document)


def _statement(**changes) -> bytes:
    document = json.loads(bundle.make_statement(DIGEST))
    for key, value in changes.items():
        if value is None:
            document.pop(key)
        else:
            document[key] = value
    return _j(document)


def _set(path: str, value):
    def change(document: dict) -> None:
        *parents, last = path.split(".")
        for name in parents:
            document = document[name] if not name.isdigit() else document[int(name)]
        if value is KeyError:
            del document[last]
        else:
            document[last] = value

    return change


BUNDLE_FAILURES = {
    "wrong key": (lambda s: _j(Cosign.bundle_document(keys.generate_key().key, DIGEST)), "does not verify under key"),
    "digest mismatch": (lambda s: _j(Cosign.bundle_document(s.key, OTHER_DIGEST)), f"not {DIGEST}"),
    "wrong payload type": (lambda s: _bundle_case(s, _set("dsseEnvelope.payloadType", "text/plain")),
                           "payload type is 'text/plain', not application/vnd.in-toto+json"),
    "bad base64": (lambda s: _bundle_case(s, _set("dsseEnvelope.signatures.0.sig", "#$%")), "is not valid base64"),
    "truncated DER": (lambda s: _bundle_case(
        s, lambda d: d["dsseEnvelope"]["signatures"][0].update(sig=_b64(base64.b64decode(
            d["dsseEnvelope"]["signatures"][0]["sig"])[:-4]))), "not a DER ECDSA signature"),
    "two signatures": (lambda s: _bundle_case(s, lambda d: d["dsseEnvelope"]["signatures"].append({"sig": "AA=="})),
                       "holds 2 signatures"),
    "no signatures": (lambda s: _bundle_case(s, _set("dsseEnvelope.signatures", [])), "holds 0 signatures"),
    "unknown bundle field": (lambda s: _bundle_case(s, _set("extra", 1)), "unknown field(s) 'extra'"),
    "unknown envelope field": (lambda s: _bundle_case(s, _set("dsseEnvelope.note", "x")), "unknown field(s) 'note'"),
    "unknown statement field": (lambda s: _bundle_case(s, statement=_statement(note="x")), "unknown field(s) 'note'"),
    "unknown subject field": (lambda s: _bundle_case(s, statement=_statement(
        subject=[{"digest": {"sha256": "ab" * 32}, "size": 3}])), "subject 0 has unknown field(s) 'size'"),
    "statement type": (lambda s: _bundle_case(s, statement=_statement(_type="https://example.com/x")),
                       "is not an in-toto Statement"),
    "no subject": (lambda s: _bundle_case(s, statement=_statement(subject=[])), "has no subject"),
    "statement not JSON": (lambda s: _bundle_case(s, statement=b"hello"), "the statement is not valid JSON"),
    "old bundle version": (lambda s: _bundle_case(
        s, _set("mediaType", "application/vnd.dev.sigstore.bundle+json;version=0.2")), "not a v0.3 Sigstore bundle"),
    "certificate": (lambda s: _bundle_case(s, _set("verificationMaterial", {"certificate": {"rawBytes": "AA=="}})),
                    "carries a certificate (a keyless signature)"),
    "message signature": (lambda s: _bundle_case(s, lambda d: d.update(messageSignature=d.pop("dsseEnvelope"))),
                          "holds a message signature (as cosign sign-blob writes), not a DSSE envelope"),
    "no material": (lambda s: _bundle_case(s, _set("verificationMaterial", {})), "no verification material"),
    "duplicate field alias": (lambda s: _bundle_case(s, _set("media_type", oci.BUNDLE_MEDIA_TYPE)),
                              "has the field 'mediaType' twice"),
    "not JSON": (lambda s: b"\x89PNG", "the bundle is not valid JSON"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BUNDLE_FAILURES))
def test_malformed_bundles_give_reasons(signer: keys.SigningKey, case: str) -> None:
    make, reason = BUNDLE_FAILURES[case]
    check = bundle.verify_bundle(make(signer), signer.public_key, DIGEST)
    assert not check.ok and reason in check.reason, check.reason


BUNDLE_TOLERATED = {
    "no predicate (cosign 3.0.0-3.0.4)": lambda s: _bundle_case(s, statement=_statement(predicate=None)),
    "Statement v0.1": lambda s: _bundle_case(s, statement=_statement(_type="https://in-toto.io/Statement/v0.1")),
    "protojson spaces": lambda s: json.dumps(Cosign.bundle_document(s.key, DIGEST), indent=1).encode(),
    "spaces in the statement": lambda s: _bundle_case(s, statement=json.dumps(json.loads(_statement()), indent=2)
                                                      .encode()),
    "log entries and timestamps": lambda s: _bundle_case(s, lambda d: d["verificationMaterial"].update(
        tlogEntries=[{"logIndex": "1"}], timestampVerificationData={"rfc3161Timestamps": []})),
    "proto field names": lambda s: _bundle_case(s, lambda d: d.update(
        media_type=d.pop("mediaType"), dsse_envelope=d.pop("dsseEnvelope"))),
    "URL-safe unpadded base64": lambda s: _bundle_case(s, lambda d: d["dsseEnvelope"].update(
        payload=d["dsseEnvelope"]["payload"].replace("+", "-").replace("/", "_").rstrip("="))),
    "keyid and a wrong hint": lambda s: _bundle_case(s, lambda d: (
        d["dsseEnvelope"]["signatures"][0].update(keyid="whatever"),
        d["verificationMaterial"]["publicKey"].update(hint="not-this-key"))),
    "old media type spelling": lambda s: _bundle_case(
        s, _set("mediaType", "application/vnd.dev.sigstore.bundle+json;version=0.3")),
    "another subject first": lambda s: _bundle_case(s, statement=_statement(
        subject=[{"name": "x", "digest": {"sha512": "00"}}, {"digest": {"sha256": "ab" * 32}}])),
    "other predicate type (an attestation)": lambda s: _bundle_case(
        s, statement=_statement(predicateType="https://slsa.dev/provenance/v1")),
    "null tlogEntries": lambda s: _bundle_case(s, lambda d: d["verificationMaterial"].update(tlogEntries=None)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BUNDLE_TOLERATED))
def test_bundle_variants_cosign_accepts(signer: keys.SigningKey, case: str) -> None:
    check = bundle.verify_bundle(BUNDLE_TOLERATED[case](signer), signer.public_key, DIGEST)
    assert check.ok, check.reason


def test_bundle_verify_skips_other_referrers(signer: keys.SigningKey) -> None:
    good = bundle.sign(signer, SUBJECT, CREATED)
    sbom = _j({"schemaVersion": 2, "mediaType": oci.spec.OCI_MANIFEST, "artifactType": "application/spdx+json",
               "config": {"mediaType": oci.EMPTY_MEDIA_TYPE, "size": 2, "digest": oci.EMPTY_DIGEST},
               "layers": [{"mediaType": "application/spdx+json", "size": 2, "digest": oci.EMPTY_DIGEST}]})  # fmt: skip
    two_layers = json.loads(good.manifest)
    two_layers["layers"] *= 2
    referrers = {_sha(sbom): sbom, _sha(_j(two_layers)): _j(two_layers)}
    none = bundle.verify(referrers, good.blobs, signer.public_key, DIGEST)
    assert not none.ok and not none.checks and "no Sigstore bundle among 2 referrer(s)" in none.reason
    referrers[good.digest] = good.manifest
    assert bundle.verify(referrers, good.blobs, signer.public_key, DIGEST).ok
    lying = {good.digest: good.manifest + b" "}
    assert "does not match its digest" in bundle.verify(lying, good.blobs, signer.public_key, DIGEST).reason
    assert "was not fetched" in bundle.verify({good.digest: good.manifest}, {}, signer.public_key, DIGEST).reason


def test_bundle_never_raises_on_damaged_input(signer: keys.SigningKey) -> None:
    artifact = bundle.sign(signer, SUBJECT, CREATED)
    layer = bundle.bundle_layer(artifact.manifest)
    data = artifact.blobs[layer.digest]
    rng = random.Random(7)
    for damaged in _mutations(data, rng, 400):  # a change to the (unchecked) hint may still verify
        check = bundle.verify_bundle(damaged, signer.public_key, DIGEST)
        assert check.ok or check.reason
    statement = bundle.make_statement(DIGEST)
    for damaged in _mutations(statement, rng, 300):
        check = bundle.verify_bundle(_bundle_case(signer, statement=damaged), signer.public_key, DIGEST)
        assert check.ok or check.reason
    for manifest in _mutations(artifact.manifest, rng, 200):
        result = bundle.verify({_sha(manifest): manifest}, artifact.blobs, signer.public_key, DIGEST)
        assert result.ok or result.reason


# ------------------------------------------------------------------------------------------------------------
# Both ways across the independent implementation


def test_independent_sig_verifies_with_imgpack(signer: keys.SigningKey) -> None:
    payload = Cosign.payload("ghcr.io/org/model", DIGEST)
    signature = _b64(signer.key.sign(payload, ec.ECDSA(hashes.SHA256())))
    manifest, blobs = Cosign.sig_manifest([(payload, signature)])
    assert simplesigning.verify(manifest, blobs, signer.public_key, DIGEST).ok
    assert not simplesigning.verify(manifest, blobs, signer.public_key, OTHER_DIGEST).ok


def test_imgpack_sig_verifies_with_the_independent_verifier(signer: keys.SigningKey, other: keys.SigningKey) -> None:
    artifact = simplesigning.sign(signer, "ghcr.io/org/model", DIGEST)
    assert Cosign.verify_sig(artifact.manifest, dict(artifact.blobs), signer.public_key.key, DIGEST)
    assert not Cosign.verify_sig(artifact.manifest, dict(artifact.blobs), other.public_key.key, DIGEST)
    assert not Cosign.verify_sig(artifact.manifest, dict(artifact.blobs), signer.public_key.key, OTHER_DIGEST)


def test_independent_bundle_verifies_with_imgpack(signer: keys.SigningKey) -> None:
    data = _j(Cosign.bundle_document(signer.key, DIGEST))
    manifest, blobs = Cosign.referrer(data, {"mediaType": SUBJECT.media_type, "size": 1234, "digest": DIGEST})
    assert bundle.verify({_sha(manifest): manifest}, blobs, signer.public_key, DIGEST).ok
    assert not bundle.verify({_sha(manifest): manifest}, blobs, signer.public_key, OTHER_DIGEST).ok


def test_imgpack_bundle_verifies_with_the_independent_verifier(signer: keys.SigningKey, other: keys.SigningKey):
    artifact = bundle.sign(signer, SUBJECT, CREATED)
    data = artifact.blobs[bundle.bundle_layer(artifact.manifest).digest]
    assert Cosign.verify_bundle(data, signer.public_key.key, DIGEST)
    assert not Cosign.verify_bundle(data, other.public_key.key, DIGEST)
    assert not Cosign.verify_bundle(data, signer.public_key.key, OTHER_DIGEST)


def test_combine_both_forms(signer: keys.SigningKey, other: keys.SigningKey) -> None:
    sig = simplesigning.sign(signer, "r.io/m", DIGEST)
    referrer = bundle.sign(other, SUBJECT, CREATED)
    legacy = simplesigning.verify(sig.manifest, sig.blobs, signer.public_key, DIGEST)
    bundles = bundle.verify({referrer.digest: referrer.manifest}, referrer.blobs, signer.public_key, DIGEST)
    both = combine(legacy, bundles)
    assert both.ok and [c.form for c in both.accepted] == ["simplesigning"] and len(both.checks) == 2
    neither = combine(simplesigning.verify(None, {}, signer.public_key, DIGEST), bundles)
    assert (
        not neither.ok and "referrer sha256:" in neither.reason and neither.reason.endswith(".sig signature manifest")
    )
    empty = combine(simplesigning.verify(None, {}, signer.public_key, DIGEST), bundle.verify({}, {}, signer.public_key,
                                                                                              DIGEST))  # fmt: skip
    assert empty.reason.endswith("no signature found (no sha256-" + "ab" * 32 + ".sig signature manifest;"
                                 " no Sigstore bundle among 0 referrer(s))")  # fmt: skip
    with pytest.raises(ValueError):
        combine(legacy, simplesigning.verify(None, {}, other.public_key, DIGEST))
