"""Which repositories of which registry are known to hold a blob, for cross-repository mounts.

Kept in ``<store>/.imgpack/blob-sources.json`` as ``{host: {digest: [repository, ...]}}``.  Every
successful push or pull records the blobs it saw; a later push to another repository of the same
registry can then ask for ``?mount=<digest>&from=<repository>`` instead of uploading the bytes.
A stale entry only costs one refused mount (the registry answers 202 and we upload), so the file
is a hint, never a source of truth.  Updates merge under a file lock and replace the file
atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

MAX_REPOS_PER_BLOB = 8


class BlobSources:
    """Read once at the start of a copy, merged and written back at its end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, dict[str, list[str]]] = self._load()

    @classmethod
    def for_store(cls, store_root: Path) -> BlobSources:
        return cls(Path(store_root) / ".imgpack" / "blob-sources.json")

    def _load(self) -> dict[str, dict[str, list[str]]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError, OSError):
            return {}  # a missing or damaged hint file just means "no mounts known"
        if not isinstance(data, dict):
            return {}
        return {
            h: {d: [r for r in repos if isinstance(r, str)] for d, repos in v.items() if isinstance(repos, list)}
            for h, v in data.items()
            if isinstance(v, dict)
        }

    def repositories(self, host: str, digest: str) -> list[str]:
        return list(self.data.get(host, {}).get(digest, []))

    def record(self, host: str, repository: str, digests: Iterable[str]) -> None:
        """Remember that ``repository`` on ``host`` holds ``digests``; persisted atomically."""
        digests = list(digests)
        if not digests:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_suffix(".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.data = self._load()
            hosts = self.data.setdefault(host, {})
            for digest in digests:
                repos = hosts.setdefault(digest, [])
                if repository in repos:
                    repos.remove(repository)
                repos.insert(0, repository)
                del repos[MAX_REPOS_PER_BLOB:]
            self._write()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _write(self) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".blob-sources-", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.data, fh, separators=(",", ":"), sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
