"""Terminal output shared by every command: rich progress on a TTY, plain lines elsewhere."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def is_tty() -> bool:
    return sys.stderr.isatty()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class ByteProgress:
    """A thread-safe byte counter that drives a rich bar when attached to a TTY."""

    def __init__(self, progress: Progress | None, description: str) -> None:
        self._progress = progress
        self._task = progress.add_task(description, total=None) if progress else None
        self._lock = threading.Lock()
        self.done = 0

    def set_total(self, total: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, total=total)

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self._progress is not None and self._task is not None:
                self._progress.update(self._task, advance=n)


@contextmanager
def byte_progress(description: str, enabled: bool = True) -> Iterator[ByteProgress]:
    if not (enabled and is_tty()):
        yield ByteProgress(None, description)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    with progress:
        yield ByteProgress(progress, description)
