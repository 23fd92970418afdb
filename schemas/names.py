"""Layer names: relative, path-style, unique — safe to join under any directory and to print on a terminal."""

from __future__ import annotations

from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.spec import MAX_NAME_LENGTH, MAX_SEGMENT_LENGTH

#: Characters that reorder or split text where a name is shown: bidi embeddings, overrides and isolates, and the
#: Unicode line and paragraph separators (a name that reads ``txt.exe`` backwards, or looks like two lines).
_DECEPTIVE = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029")


def _character_problem(name: str) -> str | None:
    for c in name:
        code = ord(c)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return f"contains the control character U+{code:04X}"
        if c in _DECEPTIVE:
            return f"contains U+{code:04X}, a bidi or line-separator character"
        if 0xD800 <= code <= 0xDFFF:
            return f"contains a lone surrogate (U+{code:04X}), which is not Unicode text"
    return None


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid layer name, or None when it is."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if len(name) > MAX_NAME_LENGTH:
        return f"is longer than {MAX_NAME_LENGTH} characters"
    problem = _character_problem(name)
    if problem:
        return problem
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/"):
        return "is absolute (starts with '/')"
    segments = name.split("/")
    if any(s == "" for s in segments):
        return "has an empty path segment"
    if any(s in (".", "..") for s in segments):
        return "has a '.' or '..' path segment"
    if any(len(s.encode("utf-8")) > MAX_SEGMENT_LENGTH for s in segments):
        return f"has a path segment longer than {MAX_SEGMENT_LENGTH} bytes of UTF-8, which file systems refuse"
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
