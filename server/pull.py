"""``POST /api/pull``'s one call into the registry code: copy a model from its registry into the store, exactly as
``imgpack pull`` does, reporting progress in ollama's terms."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from imgpack.registry.progress import Reporter
from imgpack.schemas.errors import UsageError
from imgpack.schemas.reference import Reference
from imgpack.store.store import Store

Progress = Callable[[dict[str, Any]], None]


def pull_model(store: Store, reference: str, progress: Progress, *, insecure: bool = False,
               cancel: threading.Event | None = None) -> tuple[str, str]:
    """Pull ``HOST[:PORT]/REPO[:TAG|@DIGEST]`` into ``store``; returns (the name it is stored under, its digest).

    ``progress`` gets ollama's pull statuses: ``pulling model`` with ``total``/``completed`` bytes while blobs
    move. Raises the registry's ``ImgpackError``s (not found, auth, transfer) and ``Cancelled`` when ``cancel``
    is set.
    """
    from imgpack.registry.operations import TransferSettings, pull, pulled_name

    if Reference.parse(reference).registry is None:
        raise UsageError(f"{reference!r} names no registry; pull HOST[:PORT]/REPOSITORY[:TAG]")
    result = pull(store, reference, settings=TransferSettings(insecure=insecure), reporter=_OllamaProgress(progress),
                  cancel=cancel or threading.Event())
    return pulled_name(reference), result.digest


class _OllamaProgress(Reporter):
    """Blob progress as ollama's one aggregated ``pulling model`` status, at most ten times a second."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.lock = threading.Lock()
        self.digest = ""
        self.total = self.completed = 0
        self.last = 0.0

    def _emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= 0.1:
            self.last = now
            self.progress({"status": "pulling model", "digest": self.digest, "total": self.total,
                           "completed": min(self.completed, self.total)})

    def start(self, result: Any, layers: list[Any]) -> None:
        with self.lock:
            self.digest, self.total = result.digest, result.bytes_total
            self._emit(force=True)

    def advance(self, n: int) -> None:
        with self.lock:
            self.completed += n
            self._emit()

    def blob_done(self, layer: Any, status: str, moved: int) -> None:
        with self.lock:
            self.completed += layer.size - moved  # a blob present already, mounted or resumed counts whole
            self._emit()

    def finish(self, result: Any) -> None:
        with self.lock:
            self.completed = self.total
            self._emit(force=True)
