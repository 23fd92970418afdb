"""Terminal output shared by every command: rich progress on a TTY, plain lines elsewhere."""

from __future__ import annotations

import json
import sys
import threading
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

#: The rich consoles (``console`` on stderr, ``out`` on stdout), made on first use: importing rich costs a
#: command like ``pull --json`` more CPU than its manifest does.
_consoles: dict[str, Console] = {}


def __getattr__(name: str) -> Any:
    if name in ("console", "out"):
        if name not in _consoles:
            from rich.console import Console

            _consoles[name] = Console(stderr=name == "console", highlight=False, soft_wrap=True)
        return _consoles[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: Characters that reorder or hide text on a terminal (bidi overrides and isolates, line/paragraph separators).
_INVISIBLE = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029")


def safe(text: object) -> str:
    """Untrusted text made fit for a terminal: every control character (C0, DEL, C1 — ESC sequences that clear
    the screen or set the title), bidi override and line separator becomes a visible escape; ``\\n`` and ``\\t``
    too, so one message stays one line. Everything else, non-ASCII letters included, is kept."""
    s = str(text)
    if s.isprintable():
        return s
    out_chars = []
    for ch in s:
        if ch in _INVISIBLE or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            code = ord(ch)
            out_chars.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out_chars.append(ch)
    return "".join(out_chars)


def markup_safe(text: object) -> str:
    """``safe`` plus rich-markup escaping, for text printed through a rich console."""
    from rich.markup import escape

    return escape(safe(text))


def emit_json(event: dict[str, Any], stream: Any = None) -> None:
    """One JSON event per line (``--json``); ASCII-escaped, so no control character reaches a terminal."""
    target = stream or sys.stdout
    target.write(json.dumps(event, separators=(",", ":"), ensure_ascii=True) + "\n")
    target.flush()


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
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=__getattr__("console"),
        transient=True,
    )
    with progress:
        yield ByteProgress(progress, description)
