"""Turn command-line references into copy targets.

* ``host[:port]/repo[:tag][@digest]`` — a repository on a registry (docker syntax: the first
  component is a host when it has a dot or a colon, or is ``localhost``);
* ``oci:PATH[:TAG]`` — an OCI image layout directory (tag stored as a bare ``ref.name``);
* anything else — a model in the local store.

Registry clients are shared per host, so a copy between two repositories of one registry uses
one connection pool, one token cache and one request limit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from imgpack.registry import credentials
from imgpack.registry.local import LocalLayout
from imgpack.registry.remote import RemoteRepository, UploadPolicy
from imgpack.registry.target import Target
from imgpack.registry.transport import RegistryClient, TransportOptions
from imgpack.schemas.errors import UsageError
from imgpack.schemas.reference import Reference
from imgpack.store.store import Store


@dataclass
class Endpoint:
    """A target plus the reference to use in it."""

    target: Target
    reference: str | None
    kind: str  # "remote" | "store" | "layout"
    parsed: Reference | None = None


@dataclass
class Clients:
    """Registry clients keyed by host, created on demand with shared options."""

    options: TransportOptions = field(default_factory=TransportOptions)
    by_host: dict[str, RegistryClient] = field(default_factory=dict)
    policies: dict[str, UploadPolicy] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, host: str) -> RegistryClient:
        with self.lock:
            if host not in self.by_host:
                self.by_host[host] = RegistryClient(host, credentials.lookup(host), self.options)
                self.policies[host] = UploadPolicy()
            return self.by_host[host]

    def repository(self, host: str, repository: str, push: bool) -> RemoteRepository:
        client = self.client(host)
        return RemoteRepository(client, repository, push=push, policy=self.policies[host])

    def close(self) -> None:
        for client in self.by_host.values():
            client.close()


def split_layout(text: str) -> tuple[str, str | None]:
    """``oci:PATH[:TAG]`` -> (PATH, TAG); a colon counts as a tag separator only after the last '/'."""
    body = text[len("oci:") :]
    if not body:
        raise UsageError(f"invalid reference {text!r}: expected oci:PATH[:TAG]")
    head, sep, tail = body.rpartition(":")
    if sep and head and "/" not in tail and tail:
        return head, tail
    return body, None


def open_endpoint(text: str, *, store: Store | None, clients: Clients, write: bool, cancel=None) -> Endpoint:
    """Resolve a command-line reference; ``write`` opens layouts for creation and asks push scope."""
    if text.startswith("oci:"):
        path, tag = split_layout(text)
        layout = Store.open(Path(path), create=write)
        target = LocalLayout(layout, label=f"oci:{path}", cancel=cancel, plain_tags=True)
        return Endpoint(target, tag or "latest", "layout")
    ref = Reference.parse(text)
    if ref.registry:
        repo = clients.repository(ref.registry, ref.repository, push=write)
        reference = (ref.tag or ref.digest) if write else (ref.digest or ref.tag)
        return Endpoint(repo, reference, "remote", ref)
    if store is None:
        raise UsageError(f"{text}: a local reference needs a store")
    return Endpoint(LocalLayout(store, cancel=cancel), str(ref), "store", ref)
