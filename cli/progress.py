"""The transfer progress bar on a terminal: bytes (speed, ETA) and one counting row per model component.

The copy engine calls it from worker threads (see :class:`imgpack.registry.progress.Reporter`), so it locks.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from imgpack.cli import ui
from imgpack.registry.progress import Reporter, descriptor_component, descriptor_name
from imgpack.schemas.graph import Descriptor

if TYPE_CHECKING:
    from rich.live import Live
    from rich.progress import TaskID

    from imgpack.registry.copy import CopyResult

#: The bar's title while the operation runs (the summary line after it says "Pulled", "Pushed", "Copied").
ACTIVE = {"push": "Pushing", "pull": "Pulling", "copy": "Copying"}


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
        self.bytes_task: TaskID | None = None
        self.components: dict[str, TaskID] = {}
        self.live: Live | None = None

    def start(self, result: CopyResult, layers: list[Descriptor]) -> None:
        from rich.console import Group
        from rich.live import Live

        title = ACTIVE.get(self.operation, self.operation)
        self.bytes_task = self.bytes_progress.add_task(ui.markup_safe(title), total=result.bytes_total)
        totals: dict[str, int] = {}
        for layer in layers:
            key = row_of(layer)
            totals[key] = totals.get(key, 0) + 1
        for key, count in sorted(totals.items()):
            self.components[key] = self.count_progress.add_task(ui.markup_safe(key), total=count)  # a layer name
        self.live = Live(
            Group(self.bytes_progress, self.count_progress), console=ui.console, transient=True, refresh_per_second=8
        )
        self.live.start()

    def advance(self, n: int) -> None:
        with self.lock:
            if self.bytes_task is not None:
                self.bytes_progress.update(self.bytes_task, advance=n)

    def blob_done(self, layer: Descriptor, status: str, moved: int) -> None:
        key = row_of(layer)
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


def row_of(desc: Descriptor) -> str:
    if descriptor_name(desc) is None:
        return "(config)"
    component = descriptor_component(desc)
    return "(files)" if component == "." else component
