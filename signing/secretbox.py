"""NaCl secretbox (XSalsa20-Poly1305), the cipher of cosign's ``ENCRYPTED SIGSTORE PRIVATE KEY`` files.

Why it is written here rather than taken from PyNaCl: `cryptography` (already a dependency) has Poly1305 and
scrypt but no Salsa20, and the only thing imgpack ever puts in a secretbox is one ~140-byte PKCS#8 key, so a
straight transcription of golang/crypto ``nacl/secretbox`` (which cosign uses) costs three Salsa20 blocks and
about forty lines, where PyNaCl would add a compiled libsodium to every install for that one call. Salsa20 is
add-rotate-xor with no secret-dependent table lookups or branches, so the pure-Python version has no cache-timing
leak to speak of, and the authenticator is checked by `cryptography`'s constant-time ``Poly1305.verify_tag``
before a byte is decrypted. The tests pin it to golang/crypto's NaCl vector and to cosign's own key files.

Construction (golang/crypto ``nacl/secretbox/secretbox.go``): subkey = HSalsa20(key, nonce[:16]); keystream =
Salsa20(subkey, nonce[16:24], counter from 0); Poly1305 one-time key = keystream[0:32]; ciphertext = message XOR
keystream[32:]; box = Poly1305 tag (16 bytes) || ciphertext.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305

KEY_SIZE = 32
NONCE_SIZE = 24
TAG_SIZE = 16

_MASK = 0xFFFFFFFF
_SIGMA = struct.unpack("<4I", b"expand 32-byte k")
#: The quarter-rounds of one Salsa20 double round: four columns, then four rows, as (a, b, c, d) indices.
_DOUBLE_ROUND = (
    (0, 4, 8, 12), (5, 9, 13, 1), (10, 14, 2, 6), (15, 3, 7, 11),
    (0, 1, 2, 3), (5, 6, 7, 4), (10, 11, 8, 9), (15, 12, 13, 14),
)  # fmt: skip


class SecretboxError(ValueError):
    """The box does not open: wrong key (for cosign keys, a wrong password) or damaged bytes."""


def _rounds(state: list[int]) -> list[int]:
    """The 20 Salsa20 rounds, without the final feed-forward addition."""
    x = list(state)
    for _ in range(10):
        for a, b, c, d in _DOUBLE_ROUND:
            t = (x[a] + x[d]) & _MASK
            x[b] ^= ((t << 7) | (t >> 25)) & _MASK
            t = (x[b] + x[a]) & _MASK
            x[c] ^= ((t << 9) | (t >> 23)) & _MASK
            t = (x[c] + x[b]) & _MASK
            x[d] ^= ((t << 13) | (t >> 19)) & _MASK
            t = (x[d] + x[c]) & _MASK
            x[a] ^= ((t << 18) | (t >> 14)) & _MASK
    return x


def _state(key: bytes, middle: bytes) -> list[int]:
    k = struct.unpack("<8I", key)
    m = struct.unpack("<4I", middle)
    return [_SIGMA[0], *k[:4], _SIGMA[1], *m, _SIGMA[2], *k[4:], _SIGMA[3]]


def hsalsa20(key: bytes, nonce16: bytes) -> bytes:
    """Derive the XSalsa20 subkey: words 0, 5, 10, 15, 6, 7, 8, 9 of the rounds' output, no feed-forward."""
    x = _rounds(_state(key, nonce16))
    return struct.pack("<8I", *(x[i] for i in (0, 5, 10, 15, 6, 7, 8, 9)))


def salsa20_stream(key: bytes, nonce8: bytes, length: int) -> bytes:
    """``length`` bytes of Salsa20 keystream: each block is the rounds' output plus the input state."""
    blocks = []
    for counter in range(-(-length // 64)):
        state = _state(key, nonce8 + struct.pack("<Q", counter))
        blocks.append(struct.pack("<16I", *((a + b) & _MASK for a, b in zip(_rounds(state), state, strict=True))))
    return b"".join(blocks)[:length]


def _xor(data: bytes, stream: bytes) -> bytes:
    n = len(data)
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream[:n], "little")).to_bytes(n, "little")


def _check(key: bytes, nonce: bytes) -> None:
    if len(key) != KEY_SIZE or len(nonce) != NONCE_SIZE:
        raise SecretboxError(f"secretbox needs a {KEY_SIZE}-byte key and a {NONCE_SIZE}-byte nonce")


def seal(key: bytes, nonce: bytes, message: bytes) -> bytes:
    """Encrypt and authenticate: returns tag || ciphertext, byte-identical to NaCl's ``secretbox``."""
    _check(key, nonce)
    stream = salsa20_stream(hsalsa20(key, nonce[:16]), nonce[16:], 32 + len(message))
    ciphertext = _xor(message, stream[32:])
    return Poly1305.generate_tag(stream[:32], ciphertext) + ciphertext


def open_box(key: bytes, nonce: bytes, box: bytes) -> bytes:
    """Check the tag, then decrypt; raises SecretboxError when the box was not sealed with this key."""
    _check(key, nonce)
    if len(box) < TAG_SIZE:
        raise SecretboxError(f"secretbox is {len(box)} bytes, shorter than its {TAG_SIZE}-byte tag")
    tag, ciphertext = box[:TAG_SIZE], box[TAG_SIZE:]
    stream = salsa20_stream(hsalsa20(key, nonce[:16]), nonce[16:], 32 + len(ciphertext))
    try:
        Poly1305.verify_tag(stream[:32], ciphertext, tag)
    except InvalidSignature:
        raise SecretboxError("secretbox authentication failed") from None
    return _xor(ciphertext, stream[32:])
