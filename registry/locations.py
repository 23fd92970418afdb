"""Turn a parsed :class:`~imgpack.schemas.locations.Location` into a copy target.

Registry clients are shared per host, so a copy between two repositories of one registry uses one connection
pool, one token cache and one request limit. Docker Hub's API lives at ``registry-1.docker.io`` while its
references and credentials say ``docker.io``; pulls go through the mirrors ``registries.conf`` and ``--mirror``
name, in order, before the origin.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from imgpack.registry import credentials
from imgpack.registry.layout import LayoutTarget
from imgpack.registry.mirrors import Mirror, MirrorConfig, MirroredSource, load_mirror_config
from imgpack.registry.ollama import OllamaTarget, is_ollama_dir
from imgpack.registry.remote import RemoteRepository, UploadPolicy
from imgpack.registry.target import Target
from imgpack.registry.transport import RegistryClient, TransportOptions
from imgpack.schemas.errors import NotFoundError, UsageError
from imgpack.schemas.locations import Location, parse_location
from imgpack.schemas.reference import DOCKER_HUB
from imgpack.store.store import Store

DOCKER_HUB_API = "registry-1.docker.io"


def api_host(host: str) -> str:
    return DOCKER_HUB_API if host == DOCKER_HUB else host


@dataclass
class Clients:
    """Registry clients keyed by host, created on demand with shared options."""

    options: TransportOptions = field(default_factory=TransportOptions)
    by_host: dict[str, RegistryClient] = field(default_factory=dict)
    policies: dict[str, UploadPolicy] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Hosts reached over plain HTTP although not loopback (a mirror marked ``insecure``).
    insecure_hosts: set[str] = field(default_factory=set)

    def client(self, host: str) -> RegistryClient:
        with self.lock:
            if host not in self.by_host:
                options = self.options
                if host in self.insecure_hosts and not options.insecure:
                    options = TransportOptions(**{**options.__dict__, "insecure": True})
                self.by_host[host] = RegistryClient(host, credentials.lookup(host), options, api_host(host))
                self.policies[host] = UploadPolicy()
            return self.by_host[host]

    def repository(self, host: str, repository: str, push: bool) -> RemoteRepository:
        client = self.client(host)
        return RemoteRepository(client, repository, push=push, policy=self.policies[host])

    def close(self) -> None:
        for client in self.by_host.values():
            client.close()


@dataclass
class Endpoint:
    """A target, the reference to use in it, and what kind of location it came from."""

    target: Target
    reference: str | None
    location: Location


def open_location(
    location: Location | str,
    *,
    store: Store | None,
    clients: Clients,
    write: bool,
    cancel: threading.Event | None = None,
    mirrors: list[str] | None = None,
    mirror_config: MirrorConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> Endpoint:
    """Open ``location`` for reading (``write`` False) or as a destination; a read of a remote reference goes
    through the configured mirrors."""
    loc = parse_location(location) if isinstance(location, str) else location
    if loc.kind == "layout":
        assert loc.path is not None
        try:
            layout = Store.open(loc.path, create=write)
        except NotFoundError:
            raise NotFoundError(f"{loc.text}: {loc.path} is not an OCI image layout") from None
        reference = loc.tag
        if reference is None:
            # As containers-image reads an untagged oci: reference: the layout's only manifest, if it has one.
            entries = layout.entries() if not write else []
            reference = (entries[0].name or entries[0].digest) if len(entries) == 1 else "latest"
        return Endpoint(LayoutTarget(layout, label=f"oci:{loc.path}", cancel=cancel, plain_tags=True),
                        reference, loc)
    if loc.kind == "ollama":
        assert loc.path is not None
        target = OllamaTarget(loc.path, create=write)
        return Endpoint(target, loc.tag, loc)
    if loc.kind == "directory":
        assert loc.path is not None
        if (loc.path / "oci-layout").exists():
            return Endpoint(LayoutTarget(Store.open(loc.path, create=False), label=str(loc.path), cancel=cancel,
                                         plain_tags=True), None, loc)
        if is_ollama_dir(loc.path):
            return Endpoint(OllamaTarget(loc.path), None, loc)
        raise UsageError(f"{loc.text}: a directory is a location only when it is an OCI layout or an ollama models"
                         " directory (use oci:PATH or ollama:DIR)")
    ref = loc.reference
    assert ref is not None
    if ref.registry is None:
        if store is None:
            raise UsageError(f"{loc.text}: a local reference needs a store")
        return Endpoint(LayoutTarget(store, cancel=cancel), str(ref), loc)
    repo = clients.repository(ref.registry, ref.repository, push=write)
    reference = (ref.tag or ref.digest) if write else (ref.digest or ref.tag)
    if write:
        return Endpoint(repo, reference, loc)
    config = mirror_config if mirror_config is not None else load_mirror_config()
    chain = [(host, repository, insecure, mirror)
             for host, repository, insecure, mirror in config.mirrors_for(ref.registry, ref.repository)]
    chain += [(host, ref.repository, False, Mirror(host)) for host in mirrors or []]
    if not chain:
        return Endpoint(repo, reference, loc)
    mirrored = []
    for host, repository, insecure, mirror in chain:
        if insecure:
            clients.insecure_hosts.add(host)
        mirrored.append((clients.repository(host, repository, push=False), mirror))
    return Endpoint(MirroredSource(repo, mirrored, log), reference, loc)
