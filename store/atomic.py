"""The one way imgpack replaces a file: write a temp file beside it, then rename it into place.

Readers see the old content or the new, never a mix; an interrupted writer leaves no half-written file, and its
temp file is removed (or, after kill -9, carries a name ``prune`` and the next writer recognise).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".imgpack-tmp"


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: int = 0o644, *, durable: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` when the block ends without an exception."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | Path, data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` (fsynced by default: index files and credentials must survive a crash)."""
    with atomic_file(path, mode, durable=durable) as f:
        f.write(data)
