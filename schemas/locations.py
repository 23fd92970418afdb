"""Where a command reads or writes a model: one parser for every target string, so all commands agree.

* ``oci:PATH[:TAG]`` — an OCI image layout directory. The tag is what follows the last colon when no ``/``
  follows it: ``oci:/tmp/t/my:dir`` is layout ``/tmp/t/my``, tag ``dir`` (as skopeo reads it), and a directory
  name may still contain colons (``oci:/mnt/a:b/c`` is the layout ``/mnt/a:b/c``).
* ``ollama:DIR[:NAME[:TAG]]`` — an ollama models directory (``~/.ollama/models``) and a model in it, named as
  ollama prints it (``z-image``, ``library/z-image:latest``); DIR is a path (it starts with ``/``, ``.`` or
  ``~``, so a stored model called ``ollama:1`` stays a model) and ends at the first colon.
* a path (``/…``, ``./…``, ``../…``, ``~/…``) — a directory: a layout, an ollama models directory, or a
  directory of title-named layer files (what ``oras pull`` and a Kubernetes image volume give);
* ``[host[:port]/]repo[:tag][@digest]`` — a registry repository when the first component is a host (it has a
  dot or a colon, or is ``localhost``), else a model in the local store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imgpack.schemas.errors import UsageError
from imgpack.schemas.reference import Reference

KINDS = ("store", "remote", "layout", "ollama", "directory")


@dataclass(frozen=True)
class Location:
    kind: str
    text: str
    reference: Reference | None = None  # store and remote
    path: Path | None = None  # layout, ollama, directory
    tag: str | None = None  # a layout's tag, or an ollama model name

    @property
    def is_local(self) -> bool:
        return self.kind != "remote"


def split_layout(text: str) -> tuple[str, str | None]:
    """``oci:PATH[:TAG]`` -> (PATH, TAG); a colon separates a tag only when no ``/`` follows it."""
    body = text[len("oci:"):]
    if not body:
        raise UsageError(f"invalid location {text!r}: expected oci:PATH[:TAG]")
    head, sep, tail = body.rpartition(":")
    if sep and head and tail and "/" not in tail:
        return head, tail
    return body, None


def _split_first(body: str, text: str, form: str) -> tuple[str, str | None]:
    if not body:
        raise UsageError(f"invalid location {text!r}: expected {form}")
    path, sep, rest = body.partition(":")
    if not path:
        raise UsageError(f"invalid location {text!r}: empty path (expected {form})")
    return path, (rest or None) if sep else None


def parse_location(text: str) -> Location:
    """Classify and split a command-line target string; nothing is opened."""
    if not isinstance(text, str) or not text or text != text.strip():
        raise UsageError(f"invalid location {text!r}: empty or surrounded by whitespace")
    if text.startswith("oci:"):
        path, tag = split_layout(text)
        return Location("layout", text, path=Path(path).expanduser(), tag=tag)
    if text.startswith(("ollama:/", "ollama:.", "ollama:~")):
        path, name = _split_first(text[7:], text, "ollama:DIR[:NAME[:TAG]]")
        return Location("ollama", text, path=Path(path).expanduser(), tag=name)
    if text.startswith(("/", "./", "../", "~")) or text in (".", ".."):
        return Location("directory", text, path=Path(text).expanduser())
    ref = Reference.parse(text)
    return Location("remote" if ref.is_remote else "store", text, reference=ref)
