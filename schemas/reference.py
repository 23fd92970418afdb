"""Model references in docker/OCI syntax: ``[host[:port]/]repository[:tag][@sha256:<hex>]``.

A reference without a host names a model in the local store only; one with a host can also be pushed and
pulled. The first path component is a host when it contains a dot or a colon, or is ``localhost`` — the
same rule docker uses, so references read the same in both tools.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from imgpack.schemas.digest import is_digest
from imgpack.schemas.errors import UsageError

DEFAULT_TAG = "latest"
#: Names of Docker Hub; references to it are normalised to ``docker.io`` (and ``library/`` for one component),
#: as docker does, so ``docker.io/alpine`` and ``index.docker.io/library/alpine`` are one repository.
DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST = re.compile(
    r"^(?:localhost|\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)(?::[0-9]{1,5})?$"
)


@dataclass(frozen=True)
class Reference:
    registry: str | None
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str, default_tag: str | None = DEFAULT_TAG) -> Reference:
        """Parse ``text``; a reference with neither tag nor digest gets ``default_tag``."""
        if not isinstance(text, str) or not text or text != text.strip():
            raise UsageError(f"invalid reference {text!r}: empty or surrounded by whitespace")
        rest, digest = text, None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            if not is_digest(digest):
                raise UsageError(f"invalid reference {text!r}: {digest!r} is not a sha256:<64 hex> digest")
        tag = None
        last_slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > last_slash:
            rest, tag = rest[:colon], rest[colon + 1 :]
            if not _TAG.match(tag):
                raise UsageError(f"invalid reference {text!r}: tag {tag!r} must match [A-Za-z0-9_][A-Za-z0-9_.-]*")
        parts = rest.split("/")
        registry = None
        if len(parts) > 1 and (parts[0] == "localhost" or "." in parts[0] or ":" in parts[0]):
            registry = parts.pop(0)
            if not _HOST.match(registry):
                raise UsageError(f"invalid reference {text!r}: {registry!r} is not a valid registry host")
        if not parts or not all(parts):
            raise UsageError(f"invalid reference {text!r}: empty repository path component")
        for part in parts:
            if not _COMPONENT.match(part):
                raise UsageError(
                    f"invalid reference {text!r}: repository component {part!r} must be lowercase letters,"
                    " digits and single separators (. _ __ -)"
                )
        if registry is not None and registry.lower() in DOCKER_HUB_ALIASES:
            registry = DOCKER_HUB
            if len(parts) == 1:
                parts = ["library", *parts]
        repository = "/".join(parts)
        if len(repository) + len(registry or "") > 255:
            raise UsageError(f"invalid reference {text!r}: longer than 255 characters")
        if tag is None and digest is None:
            tag = default_tag
        return cls(registry, repository, tag, digest)

    @property
    def is_remote(self) -> bool:
        return self.registry is not None

    @property
    def name(self) -> str:
        """Registry and repository, without tag or digest."""
        return f"{self.registry}/{self.repository}" if self.registry else self.repository

    def with_tag(self, tag: str | None) -> Reference:
        return Reference(self.registry, self.repository, tag, None)

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + self.digest
        return text
