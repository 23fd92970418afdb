"""Layer names: relative, path-style, unique — safe to join under any directory."""

from __future__ import annotations

from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.spec import MAX_NAME_LENGTH


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid layer name, or None when it is."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if len(name) > MAX_NAME_LENGTH:
        return f"is longer than {MAX_NAME_LENGTH} characters"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "contains a control character"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/"):
        return "is absolute (starts with '/')"
    segments = name.split("/")
    if any(s == "" for s in segments):
        return "has an empty path segment"
    if any(s in (".", "..") for s in segments):
        return "has a '.' or '..' path segment"
    if len(segments[0]) == 2 and segments[0][1] == ":":
        return "looks like a drive-qualified path"
    return None


def check_name(name: object, where: str) -> str:
    """Return ``name`` if valid; otherwise raise naming ``where`` (the layer or file it came from)."""
    problem = name_problem(name)
    if problem:
        raise ImgpackError(f"{where}: unsafe name {name!r}: {problem}")
    return name  # type: ignore[return-value]


def check_unique(names: list[str], where: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ImgpackError(f"{where}: duplicate layer name {name!r}")
        seen.add(name)
