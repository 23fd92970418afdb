"""SHA-256 content digests in OCI form (``sha256:<64 hex>``)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TypeGuard

from imgpack.schemas.errors import ImgpackError

_DIGEST_RE = re.compile(r"^sha256:([a-f0-9]{64})$")
CHUNK = 4 * 1024 * 1024


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str, what: str = "digest") -> str:
    """Return the hex part of a sha256 digest, or raise naming ``what`` when it is malformed."""
    match = _DIGEST_RE.match(digest) if isinstance(digest, str) else None
    if not match:
        raise ImgpackError(f"{what}: {digest!r} is not a sha256 digest (expected sha256:<64 lowercase hex>)")
    return match.group(1)


def is_digest(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and _DIGEST_RE.match(value) is not None


def sha256_file(path: str | Path) -> tuple[str, int]:
    """Hash a file in bounded memory; returns (digest, size)."""
    hasher = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            hasher.update(view[:n])
            size += n
    return "sha256:" + hasher.hexdigest(), size
