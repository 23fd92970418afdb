"""Registry mirrors and pull-through caches, as containers' ``registries.conf`` (v2) describes them.

A cluster that outgrows one registry puts caches in front of it (Harbor proxy caches, Dragonfly, Spegel,
distribution in proxy mode). The same file skopeo, podman and CRI-O read says where: ``[[registry]]`` tables
with a ``prefix`` (or ``location``) and ``[[registry.mirror]]`` entries, each with ``location``, ``insecure`` and
``pull-from-mirror`` (``all``, ``digest-only``, ``tag-only``). The file is ``$CONTAINERS_REGISTRIES_CONF``, else
``~/.config/containers/registries.conf`` if it exists, else ``/etc/containers/registries.conf``, plus the
``*.conf`` drop-ins of the ``registries.conf.d`` beside it. Pulls try mirrors in order and fall back to the
origin; every byte is verified against its digest whichever server sent it, so a mirror can be slow or stale,
never wrong.
"""

from __future__ import annotations

import contextlib
import os
import threading
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imgpack.registry.target import BlobSource, BlobStatus, ProgressFn, Stream
from imgpack.schemas.digest import is_digest
from imgpack.schemas.errors import AuthError, ImgpackError, IntegrityError, NotFoundError, TransferError
from imgpack.schemas.graph import Descriptor

SYSTEM_CONF = Path("/etc/containers/registries.conf")
USER_CONF = Path("~/.config/containers/registries.conf")
MIRROR_ERRORS = (TransferError, AuthError, NotFoundError, IntegrityError, OSError)


@dataclass(frozen=True)
class Mirror:
    location: str  # host[:port][/path]
    insecure: bool = False
    pull_from_mirror: str = "all"  # all | digest-only | tag-only

    def serves(self, reference: str) -> bool:
        if self.pull_from_mirror == "digest-only":
            return is_digest(reference)
        if self.pull_from_mirror == "tag-only":
            return not is_digest(reference)
        return True


@dataclass(frozen=True)
class RegistryEntry:
    prefix: str
    location: str
    mirrors: tuple[Mirror, ...] = ()
    insecure: bool = False
    blocked: bool = False


@dataclass
class MirrorConfig:
    entries: list[RegistryEntry] = field(default_factory=list)
    source: str | None = None

    def match(self, name: str) -> RegistryEntry | None:
        """The entry with the longest prefix that names ``name`` (``host/repo``) at a path boundary."""
        best = None
        for entry in self.entries:
            prefix = entry.prefix.rstrip("/")
            if name == prefix or name.startswith(prefix + "/"):
                if best is None or len(prefix) > len(best.prefix.rstrip("/")):
                    best = entry
        return best

    def mirrors_for(self, host: str, repository: str) -> list[tuple[str, str, bool, Mirror]]:
        """(mirror host, mirror repository, insecure, mirror) in order, for ``host/repository``."""
        entry = self.match(f"{host}/{repository}")
        if entry is None:
            return []
        if entry.blocked:
            raise ImgpackError(f"{host}/{repository}: blocked by {self.source}")
        rest = f"{host}/{repository}"[len(entry.prefix.rstrip("/")):].lstrip("/")
        out = []
        for mirror in entry.mirrors:
            target = mirror.location.rstrip("/") + ("/" + rest if rest else "")
            mirror_host, _, mirror_repo = target.partition("/")
            out.append((mirror_host, mirror_repo or repository, mirror.insecure, mirror))
        return out


def _conf_files() -> list[Path]:
    env = os.environ.get("CONTAINERS_REGISTRIES_CONF")
    if env:
        main = Path(env).expanduser()
    else:
        user = USER_CONF.expanduser()
        main = user if user.exists() else SYSTEM_CONF
    files = [main] if main.is_file() else []
    dropins = main.parent / "registries.conf.d"
    if dropins.is_dir():
        files.extend(sorted(dropins.glob("*.conf")))
    return files


def _mirror(d: object, where: str) -> Mirror:
    if not isinstance(d, dict) or not isinstance(d.get("location"), str) or not d["location"]:
        raise ImgpackError(f"{where}: every [[registry.mirror]] needs a location")
    mode = d.get("pull-from-mirror", "all")
    if mode not in ("all", "digest-only", "tag-only"):
        raise ImgpackError(f"{where}: pull-from-mirror {mode!r} is not all, digest-only or tag-only")
    return Mirror(d["location"], bool(d.get("insecure", False)), mode)


def load_mirror_config(files: list[Path] | None = None) -> MirrorConfig:
    """Read registries.conf (and drop-ins); later files override entries of the same prefix."""
    found: dict[str, RegistryEntry] = {}
    used = files if files is not None else _conf_files()
    for path in used:
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ImgpackError(f"{path}: unreadable registries.conf: {e}") from None
        for i, table in enumerate(document.get("registry") or []):
            where = f"{path}: [[registry]] #{i + 1}"
            if not isinstance(table, dict):
                raise ImgpackError(f"{where}: must be a table")
            location = table.get("location") or table.get("prefix")
            prefix = table.get("prefix") or location
            if not isinstance(prefix, str) or not prefix:
                raise ImgpackError(f"{where}: needs a prefix or a location")
            by_digest = bool(table.get("mirror-by-digest-only", False))
            mirrors = []
            for m in table.get("mirror") or []:
                mirror = _mirror(m, f"{where} mirror")
                if by_digest and "pull-from-mirror" not in m:
                    mirror = Mirror(mirror.location, mirror.insecure, "digest-only")
                mirrors.append(mirror)
            found[prefix] = RegistryEntry(prefix, str(location), tuple(mirrors), bool(table.get("insecure", False)),
                                          bool(table.get("blocked", False)))
    return MirrorConfig(list(found.values()), ", ".join(map(str, used)) or None)


class MirroredSource:
    """A read-only target: the origin repository behind mirrors tried in order (pulls only)."""

    def __init__(self, origin, mirrors: Sequence[tuple[object, Mirror]], log: Callable[[str], None] | None = None):
        self.origin = origin
        self.mirrors = mirrors  # (RemoteRepository, Mirror)
        self.log = log or (lambda _m: None)
        self.served: dict[str, int] = {}
        self._lock = threading.Lock()
        self._down: set[int] = set()  # mirrors that could not be reached: not asked again in this copy
        self._tries: dict[str, int] = {}  # fetches per digest: a retry goes to the next source in order

    def describe(self, reference: str | None = None) -> str:
        return self.origin.describe(reference)

    def session(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def _order(self, reference: str) -> list:
        with self._lock:
            down = set(self._down)
        return [repo for repo, mirror in self.mirrors if mirror.serves(reference) and id(repo) not in down] \
            + [self.origin]

    def _failed(self, repo, error: BaseException) -> None:  # noqa: ANN001
        if not isinstance(error, (NotFoundError, IntegrityError)):
            with self._lock:
                self._down.add(id(repo))

    def _count(self, repo) -> None:  # noqa: ANN001
        key = repo.describe()
        self.served[key] = self.served.get(key, 0) + 1

    def resolve(self, reference: str) -> Descriptor | None:
        for repo in self._order(reference):
            try:
                found = repo.resolve(reference)
            except MIRROR_ERRORS as e:
                if repo is self.origin:
                    raise
                self._failed(repo, e)
                self.log(f"mirror {repo.describe()} failed ({e}); trying the next")
                continue
            if found is not None or repo is self.origin:
                self._count(repo)
                return found
        return None

    def exists(self, desc: Descriptor) -> bool:
        return self.origin.exists(desc)

    @contextlib.contextmanager
    def _fetch(self, desc: Descriptor, offset: int) -> Iterator[tuple[int, Iterator[bytes]]]:
        last: BaseException | None = None
        with self._lock:
            tries = self._tries.get(desc.digest, 0)
            self._tries[desc.digest] = tries + 1
        order = self._order(desc.digest)
        # A second fetch of a blob means the first failed (bytes that did not match, a stream cut short): the
        # content is verified only after the stream, so move on to the next source rather than ask again.
        for repo in order[min(tries, len(order) - 1):]:
            stream = repo.fetch(desc, offset)
            try:
                opened = stream.__enter__()
            except MIRROR_ERRORS as e:
                last = e
                if repo is not self.origin:
                    self._failed(repo, e)
                    self.log(f"mirror {repo.describe()} failed for {desc.digest} ({e}); trying the next")
                continue
            self._count(repo)
            try:
                yield opened
            except BaseException as exc:
                if not stream.__exit__(type(exc), exc, exc.__traceback__):
                    raise
            else:
                stream.__exit__(None, None, None)
            return
        assert last is not None
        raise last

    def fetch(self, desc: Descriptor, offset: int = 0) -> Stream:
        return self._fetch(desc, offset)

    def referrers(self, desc: Descriptor) -> list[tuple[Descriptor, str | None]]:
        return self.origin.referrers(desc)

    def push(self, desc: Descriptor, source: BlobSource, progress: ProgressFn) -> BlobStatus:
        raise ImgpackError(f"{self.describe()}: a mirrored source is read-only")

    def push_node(self, desc: Descriptor, raw: bytes, reference: str | None = None) -> None:
        raise ImgpackError(f"{self.describe()}: a mirrored source is read-only")

    def tag(self, desc: Descriptor, reference: str) -> None:
        raise ImgpackError(f"{self.describe()}: a mirrored source is read-only")
