"""Signatures imgpack writes and checks, in the formats ``cosign verify --key`` reads.

Pure functions over bytes and small dataclasses; no network, no store. The commands fetch and push, these
modules decide what the bytes are:

* `keys`: ECDSA P-256 key pairs; PKCS#8, SEC1 and cosign key files (`secretbox` is cosign's key cipher).
* `simplesigning`: cosign's legacy form, a simple-signing payload per layer of the ``sha256-<hex>.sig`` manifest.
* `bundle`: cosign 3's default, a Sigstore bundle (DSSE over an in-toto statement) attached as an OCI 1.1
  referrer, and the referrers-tag-schema index ``sha256-<hex>`` for registries without the referrers API.
* `oci`: what both share: descriptors, the artifacts to write, Go-exact JSON, and the verification results.

Only `imgpack.schemas` and `cryptography` are imported: no PyNaCl (see `secretbox` for why).
"""

from imgpack.signing.oci import (
    Artifact,
    Descriptor,
    SignatureCheck,
    SignatureError,
    Verification,
    VerificationError,
    combine,
)

__all__ = [
    "Artifact",
    "Descriptor",
    "SignatureCheck",
    "SignatureError",
    "Verification",
    "VerificationError",
    "combine",
]
