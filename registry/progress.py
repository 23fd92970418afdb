"""Progress reporting for transfers: silent, or JSON lines for CI logs (the terminal bar is the CLI's,
:mod:`imgpack.cli.progress`).

The engine calls :meth:`Reporter.advance` from worker threads as bytes move (negative when a
failed attempt is rolled back) and :meth:`Reporter.blob_done` once per blob, so every
implementation here is thread-safe.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import IO, TYPE_CHECKING

from imgpack.schemas.graph import Descriptor

if TYPE_CHECKING:
    from imgpack.registry.copy import CopyResult


def descriptor_name(desc: Descriptor) -> str | None:
    name = desc.fields.get("name")
    return name if isinstance(name, str) else None


def descriptor_component(desc: Descriptor) -> str:
    """The first path segment of an imgpack layer's name ('transformer'), '.' for top-level files."""
    name = descriptor_name(desc) or ""
    return name.split("/", 1)[0] if "/" in name else "."


class Reporter:
    """Base reporter: does nothing (``--quiet``)."""

    def start(self, result: CopyResult, layers: list[Descriptor]) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def blob_done(self, layer: Descriptor, status: str, moved: int) -> None:
        pass

    def finish(self, result: CopyResult) -> None:
        pass

    def close(self) -> None:
        pass


NullReporter = Reporter


class JsonReporter(Reporter):
    """One JSON object per line: ``start``, one ``layer`` per blob, ``done`` with totals."""

    def __init__(self, operation: str, stream: IO[str] | None = None) -> None:
        self.operation = operation
        self.stream = stream or sys.stdout
        self.lock = threading.Lock()
        self.done_blobs = 0
        self.done_bytes = 0
        self.total_blobs = 0
        self.total_bytes = 0

    def _emit(self, event: dict) -> None:
        with self.lock:
            self.stream.write(json.dumps(event, separators=(",", ":")) + "\n")
            self.stream.flush()

    def start(self, result: CopyResult, layers: list[Descriptor]) -> None:
        self.total_blobs, self.total_bytes = result.blobs, result.bytes_total
        self._emit(
            {
                "event": "start",
                "operation": self.operation,
                "source": result.source,
                "destination": result.destination,
                "digest": result.digest,
                "blobs": result.blobs,
                "bytes": result.bytes_total,
            }
        )

    def blob_done(self, layer: Descriptor, status: str, moved: int) -> None:
        with self.lock:
            self.done_blobs += 1
            self.done_bytes += layer.size
            counts = {"blobs_done": self.done_blobs, "bytes_done": self.done_bytes}
        self._emit(
            {
                "event": "layer",
                "name": descriptor_name(layer) or layer.media_type,
                "component": descriptor_component(layer) if descriptor_name(layer) else "",
                "digest": layer.digest,
                "size": layer.size,
                "status": status,
                "bytes_moved": moved,
                **counts,
                "blobs_total": self.total_blobs,
                "bytes_total": self.total_bytes,
            }
        )

    def finish(self, result: CopyResult) -> None:
        self._emit({"event": "done", "operation": self.operation, **result.to_json()})
