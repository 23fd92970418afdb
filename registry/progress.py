"""Progress reporting for transfers: silent, JSON lines for CI logs, or a rich bar on a TTY.

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


class RichReporter(Reporter):
    """A byte bar (speed, ETA) plus one counting row per model component."""

    def __init__(self, operation: str) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        from imgpack.cli import ui

        self.operation = operation
        self.bytes_progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=ui.console,
            transient=True,
        )
        self.count_progress = Progress(
            TextColumn("  {task.description:<14}"), MofNCompleteColumn(), console=ui.console, transient=True
        )
        self.lock = threading.Lock()
        self.bytes_task = None
        self.components: dict[str, int] = {}
        self.live = None

    def start(self, result: CopyResult, layers: list[Descriptor]) -> None:
        from rich.console import Group
        from rich.live import Live

        from imgpack.cli import ui

        self.bytes_task = self.bytes_progress.add_task(self.operation, total=result.bytes_total)
        totals: dict[str, int] = {}
        for layer in layers:
            key = _row(layer)
            totals[key] = totals.get(key, 0) + 1
        for key, count in sorted(totals.items()):
            self.components[key] = self.count_progress.add_task(key, total=count)
        self.live = Live(
            Group(self.bytes_progress, self.count_progress), console=ui.console, transient=True, refresh_per_second=8
        )
        self.live.start()

    def advance(self, n: int) -> None:
        with self.lock:
            if self.bytes_task is not None:
                self.bytes_progress.update(self.bytes_task, advance=n)

    def blob_done(self, layer: Descriptor, status: str, moved: int) -> None:
        key = _row(layer)
        with self.lock:
            if self.bytes_task is not None and layer.size - moved:
                self.bytes_progress.update(self.bytes_task, advance=layer.size - moved)
            if key in self.components:
                self.count_progress.update(self.components[key], advance=1)

    def finish(self, result: CopyResult) -> None:
        self.close()

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def _row(desc: Descriptor) -> str:
    if descriptor_name(desc) is None:
        return "(config)"
    component = descriptor_component(desc)
    return "(files)" if component == "." else component
