"""Signing keys: ECDSA P-256 pairs in the files imgpack, openssl and cosign write.

imgpack signs with ECDSA P-256 and SHA-256, ASN.1 DER signatures: cosign's default key type, which every cosign
version verifies with ``--key``. Other key types (RSA, Ed25519, other curves) are refused with a clear message
rather than half-supported: cosign picks the hash by key type, and a mismatch would be a silent interop failure.

Private keys are written in two forms, both password-protected:

* ``pkcs8`` (imgpack's default): PEM ``ENCRYPTED PRIVATE KEY``, `cryptography`'s BestAvailableEncryption
  (PBES2), which openssl and every PKCS#8 reader open;
* ``cosign``: PEM ``ENCRYPTED SIGSTORE PRIVATE KEY``, what ``cosign generate-key-pair`` writes, so the same
  key file works with cosign. Its body is compact JSON ``{"kdf":{"name":"scrypt","params":{"N":65536,"r":8,
  "p":1},"salt":…},"cipher":{"name":"nacl/secretbox","nonce":…},"ciphertext":…}`` (go-securesystemslib
  ``encrypted``), the key being scrypt(password, salt, N, r, p, 32) and the plaintext PKCS#8 DER. cosign decrypts
  only N = 32768, 65536 or 131072 with r = 8, p = 1, so only those are written or read. The secretbox is
  `imgpack.signing.secretbox` (see there why it is not PyNaCl); scrypt is `cryptography`'s.

Read: both cosign PEM labels (``ENCRYPTED COSIGN PRIVATE KEY`` is the older one), PKCS#8 encrypted or not, and
SEC1 ``EC PRIVATE KEY`` as ``openssl ecparam -genkey`` writes it (its ``EC PARAMETERS`` block is skipped); a
cosign file whose plaintext is SEC1 rather than PKCS#8 is accepted too, though cosign refuses it. Public
keys: PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo, cosign.pub), DER SPKI, or an X.509 certificate's key. Passwords
come in as arguments; the command decides between ``IMGPACK_SIGNING_PASSWORD``, ``COSIGN_PASSWORD`` (for cosign
key files; cosign accepts it set but empty) and a prompt, using `inspect_private_key` to know whether one is needed.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from imgpack.schemas.errors import ImgpackError
from imgpack.signing import secretbox
from imgpack.signing.oci import SignatureError, b64decode, b64encode, go_json, members, parse_object, short, string

KeyForm = Literal["pkcs8", "cosign"]

COSIGN_PEM_LABEL = "ENCRYPTED SIGSTORE PRIVATE KEY"
COSIGN_LEGACY_PEM_LABEL = "ENCRYPTED COSIGN PRIVATE KEY"
COSIGN_LABELS = (COSIGN_PEM_LABEL, COSIGN_LEGACY_PEM_LABEL)
#: Labels of private-key PEM blocks, and whether each is encrypted by its label alone.
_PRIVATE_LABELS = {
    COSIGN_PEM_LABEL: True,
    COSIGN_LEGACY_PEM_LABEL: True,
    "ENCRYPTED PRIVATE KEY": True,
    "PRIVATE KEY": False,
    "EC PRIVATE KEY": False,  # encrypted when it carries a "Proc-Type: 4,ENCRYPTED" header
}
#: The scrypt work factors cosign's decrypt accepts (go-securesystemslib ``encrypted.CheckParams``), r=8, p=1.
COSIGN_SCRYPT_N = (32768, 65536, 131072)
COSIGN_DEFAULT_SCRYPT_N = 65536

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----[ \t]*(?:\r?\n|$)", re.DOTALL)


class KeyFileError(ImgpackError):
    """A key file is unreadable: not a key, a wrong password, an unsupported key type, damaged."""


@dataclass(frozen=True)
class PublicKey:
    """An ECDSA P-256 public key; `fingerprint` is how imgpack names it in output and in policy."""

    key: ec.EllipticCurvePublicKey = field(compare=False, repr=False)
    der: bytes = field(init=False)

    def __post_init__(self) -> None:
        der = self.key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        object.__setattr__(self, "der", der)

    @property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the SubjectPublicKeyInfo DER (the same hash cosign's bundle ``hint`` encodes)."""
        return "sha256:" + hashlib.sha256(self.der).hexdigest()

    @property
    def hint(self) -> str:
        """cosign's ``verificationMaterial.publicKey.hint``: base64 of SHA-256 over the SPKI DER."""
        return b64encode(hashlib.sha256(self.der).digest())

    def pem(self) -> bytes:
        """PEM ``PUBLIC KEY``, byte-identical to cosign.pub for the same key."""
        return self.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def signature_problem(self, signature: bytes, data: bytes) -> str | None:
        """Why ``signature`` is not this key's DER ECDSA-SHA256 signature over ``data``; None when it is."""
        if not signature:
            return "the signature is empty"
        try:
            decode_dss_signature(signature)
        except ValueError:
            return "the signature is not a DER ECDSA signature (truncated or malformed)"
        try:
            self.key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return (
                f"the signature does not verify under key {short(self.fingerprint)}"
                " (another key signed it, or the signed data was altered)"
            )
        return None


@dataclass(frozen=True, eq=False)
class SigningKey:
    """An ECDSA P-256 private key, and the form its file had (``cosign``, ``pkcs8``, ``sec1``, or ``new``)."""

    key: ec.EllipticCurvePrivateKey = field(repr=False)
    form: str = "new"

    @cached_property
    def public_key(self) -> PublicKey:
        return PublicKey(self.key.public_key())

    def sign(self, data: bytes) -> bytes:
        """ECDSA over SHA-256(data), ASN.1 DER: what sigstore's ``SignMessage`` produces."""
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))


@dataclass(frozen=True)
class PrivateKeyFile:
    """What a private-key file is, before it is decrypted: enough to pick a password source."""

    label: str
    encrypted: bool

    @property
    def cosign(self) -> bool:
        return self.label in COSIGN_LABELS


def generate_key() -> SigningKey:
    return SigningKey(ec.generate_private_key(ec.SECP256R1()))


def _password(password: bytes | str | None) -> bytes | None:
    return password.encode() if isinstance(password, str) else password


def encode_private_key(
    key: SigningKey, password: bytes | str | None, form: KeyForm = "pkcs8", *, scrypt_n: int = COSIGN_DEFAULT_SCRYPT_N
) -> bytes:
    """The private key as a PEM file, encrypted with ``password``.

    ``pkcs8`` needs a non-empty password (PKCS#8 encryption has no empty one); None writes it unencrypted, for
    keys held by a secret store that encrypts them itself. ``cosign`` is always encrypted, and an empty password
    is allowed, as in cosign.
    """
    secret = _password(password)
    if form == "pkcs8":
        if secret == b"":
            raise KeyFileError("an empty password cannot encrypt a PKCS#8 key; give a password, or none at all")
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(secret) if secret is not None else serialization.NoEncryption()
        )
        return key.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    if form == "cosign":
        if secret is None:
            raise KeyFileError("a cosign key file is always encrypted: give a password (it may be empty)")
        return _encode_cosign(key, secret, scrypt_n)
    raise KeyFileError(f"unknown private key form {form!r} (use 'pkcs8' or 'cosign')")


def encode_public_key(key: PublicKey | SigningKey) -> bytes:
    return (key.public_key if isinstance(key, SigningKey) else key).pem()


def _scrypt(password: bytes, salt: bytes, n: int) -> bytes:
    return Scrypt(salt=salt, length=secretbox.KEY_SIZE, n=n, r=8, p=1).derive(password)


def _encode_cosign(key: SigningKey, password: bytes, scrypt_n: int) -> bytes:
    if scrypt_n not in COSIGN_SCRYPT_N:
        raise KeyFileError(f"scrypt N={scrypt_n} is not one cosign accepts ({', '.join(map(str, COSIGN_SCRYPT_N))})")
    plaintext = key.key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    salt, nonce = os.urandom(32), os.urandom(secretbox.NONCE_SIZE)
    box = secretbox.seal(_scrypt(password, salt, scrypt_n), nonce, plaintext)
    body = go_json(
        {
            "kdf": {"name": "scrypt", "params": {"N": scrypt_n, "r": 8, "p": 1}, "salt": b64encode(salt)},
            "cipher": {"name": "nacl/secretbox", "nonce": b64encode(nonce)},
            "ciphertext": b64encode(box),
        }
    )
    return _pem(COSIGN_PEM_LABEL, body)


def _pem(label: str, body: bytes) -> bytes:
    """Go ``pem.EncodeToMemory``: base64 in 64-character lines, trailing newline."""
    text = base64.b64encode(body).decode("ascii")
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return ("\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"]) + "\n").encode("ascii")


def _blocks(data: bytes) -> list[tuple[str, bytes]]:
    """The PEM blocks of a file, as (label, the whole block's bytes)."""
    return [(m.group(1).decode("ascii"), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


def _pem_body(block: bytes) -> bytes:
    """The base64 body of a header-less PEM block, decoded."""
    lines = block.decode("ascii", "replace").splitlines()[1:-1]
    if any(":" in line for line in lines):
        raise KeyFileError("unexpected PEM headers in a cosign key block")
    try:
        return base64.b64decode("".join(line.strip() for line in lines), validate=True)
    except ValueError:
        raise KeyFileError("the PEM body is not valid base64") from None


def inspect_private_key(data: bytes, source: str = "private key") -> PrivateKeyFile:
    """Which kind of private-key file ``data`` is, and whether opening it needs a password."""
    for label, block in _blocks(data):
        if label in _PRIVATE_LABELS:
            encrypted = _PRIVATE_LABELS[label] or b"Proc-Type: 4,ENCRYPTED" in block
            return PrivateKeyFile(label, encrypted)
    labels = [label for label, _ in _blocks(data)]
    if "PUBLIC KEY" in labels or "CERTIFICATE" in labels:
        raise KeyFileError(f"{source}: holds a public key or certificate, not a private key")
    raise KeyFileError(
        f"{source}: no private key found (expected PEM {COSIGN_PEM_LABEL}, ENCRYPTED PRIVATE KEY,"
        " PRIVATE KEY or EC PRIVATE KEY)"
    )


def load_private_key(data: bytes, password: bytes | str | None = None, source: str = "private key") -> SigningKey:
    """Open a private-key file (cosign, PKCS#8 or SEC1 PEM); ``password`` is ignored for unencrypted files."""
    info = inspect_private_key(data, source)
    secret = _password(password)
    block = next(block for label, block in _blocks(data) if label == info.label)
    if info.encrypted and secret is None:
        raise KeyFileError(f"{source}: the key is encrypted and no password was given")
    form = "cosign" if info.cosign else "sec1" if info.label == "EC PRIVATE KEY" else "pkcs8"
    try:
        if info.cosign:
            assert secret is not None
            key = serialization.load_der_private_key(_decrypt_cosign(block, secret, source), None)
        else:
            key = serialization.load_pem_private_key(block, secret if info.encrypted else None)
    except ValueError as e:
        if info.encrypted and not info.cosign and ("decrypt" in str(e).lower() or "password" in str(e).lower()):
            raise KeyFileError(f"{source}: wrong password") from None
        raise KeyFileError(f"{source}: not a readable private key ({e})") from None
    except (TypeError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{source}: not a readable private key ({e})") from None
    _check_p256(key, source)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return SigningKey(key, form)


def _decrypt_cosign(block: bytes, password: bytes, source: str) -> bytes:
    """The PKCS#8 DER inside a cosign key block (go-securesystemslib ``encrypted.Decrypt``)."""
    try:
        body = parse_object(_pem_body(block), "the cosign key body")
        doc = members(body, "the cosign key body", ("kdf", "cipher", "ciphertext"), ("kdf", "cipher", "ciphertext"))
        kdf = members(doc["kdf"], "kdf", ("name", "params", "salt"), ("name", "params", "salt"))
        cipher = members(doc["cipher"], "cipher", ("name", "nonce"), ("name", "nonce"))
        params = members(kdf["params"], "kdf.params", ("N", "r", "p"), ("N", "r", "p"))
        if string(kdf["name"], "kdf.name") != "scrypt":
            raise KeyFileError(f"unsupported key derivation {kdf['name']!r} (cosign uses scrypt)")
        if string(cipher["name"], "cipher.name") != "nacl/secretbox":
            raise KeyFileError(f"unsupported cipher {cipher['name']!r} (cosign uses nacl/secretbox)")
        if params["N"] not in COSIGN_SCRYPT_N or params["r"] != 8 or params["p"] != 1:
            raise KeyFileError(f"unsupported scrypt parameters N={params['N']}, r={params['r']}, p={params['p']}")
        salt = b64decode(kdf["salt"], "kdf.salt")
        nonce = b64decode(cipher["nonce"], "cipher.nonce")
        box = b64decode(doc["ciphertext"], "ciphertext")
        if len(nonce) != secretbox.NONCE_SIZE:
            raise KeyFileError(f"the nonce is {len(nonce)} bytes, not {secretbox.NONCE_SIZE}")
        return secretbox.open_box(_scrypt(password, salt, params["N"]), nonce, box)
    except secretbox.SecretboxError:
        raise KeyFileError(f"{source}: wrong password (or the key file is damaged)") from None
    except (SignatureError, KeyFileError) as e:
        raise KeyFileError(f"{source}: not a valid cosign key file: {e.message}") from None


def _check_p256(key: object, source: str) -> None:
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if not isinstance(key.curve, ec.SECP256R1):
            raise KeyFileError(
                f"{source}: unsupported curve {key.curve.name}; imgpack signs with ECDSA P-256 (cosign's default)"
            )
        return
    kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "").replace("PublicKey", "") or "unknown"
    raise KeyFileError(f"{source}: {kind} keys are not supported; imgpack signs with ECDSA P-256 (cosign's default)")


def load_public_key(data: bytes, source: str = "public key") -> PublicKey:
    """Read a verification key: PEM ``PUBLIC KEY`` (cosign.pub), DER SubjectPublicKeyInfo, or a certificate."""
    blocks = _blocks(data)
    public = [block for label, block in blocks if label.endswith("PUBLIC KEY")]
    certificates = [block for label, block in blocks if label == "CERTIFICATE"]
    try:
        if public:
            key = serialization.load_pem_public_key(public[0])
        elif certificates:
            key = x509.load_pem_x509_certificate(certificates[0]).public_key()
        elif any(label in _PRIVATE_LABELS for label, _ in blocks):
            raise KeyFileError(f"{source}: is a private key; verify with the public key (cosign.pub)")
        elif blocks:
            raise KeyFileError(f"{source}: PEM {', '.join(label for label, _ in blocks)} is not a public key")
        else:
            key = serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{source}: not a readable public key ({e})") from None
    _check_p256(key, source)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return PublicKey(key)
