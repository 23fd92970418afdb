"""push, pull and copy of models: locations opened, hooks chosen, mount hints kept, then one :func:`copy_graph`.

These are the functions the CLI and the server call; each returns the :class:`~imgpack.registry.copy.CopyResult`.

* A copy whose root is an imgpack model is validated (``prepare_root``) before a blob moves; one that lands on
  local disk has every tensor, header and config blob checked (``before_commit``) before the manifest is
  indexed. Any other graph (an image index, a signature, a container image) is copied as it is, digest for
  digest — except by ``pull``, which only takes models and says what anything else is.
* Signatures and other referrers travel with the model (``referrers``).
* ``max_layers`` (or a known registry cap, or the registry's own layer-limit answer) pushes the index-split form.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from imgpack.registry.blobsources import BlobSources
from imgpack.registry.copy import CopyHooks, CopyResult, Graph, copy_graph
from imgpack.registry.layout import LayoutTarget
from imgpack.registry.locations import Clients, Endpoint, open_location
from imgpack.registry.model import Selection, describe_artifact, model_hooks
from imgpack.registry.progress import Reporter
from imgpack.registry.remote import RemoteRepository
from imgpack.registry.retry import RetryPolicy
from imgpack.registry.split import default_cap
from imgpack.registry.target import Target, read_node
from imgpack.registry.transport import TransportOptions
from imgpack.schemas.errors import UsageError
from imgpack.schemas.graph import Descriptor, parse_node
from imgpack.schemas.locations import Location, parse_location
from imgpack.schemas.reference import Reference
from imgpack.store.store import Store


@dataclass
class TransferSettings:
    """What the transfer commands' options say."""

    concurrency: int = 8
    insecure: bool = False
    ca_file: str | None = None
    max_layers: int | None = None
    mirrors: list[str] = field(default_factory=list)
    selection: Selection | None = None
    referrers: bool = True
    #: Called with the root (descriptor, bytes) before a blob moves: a signature policy refuses here.
    verify_root: Callable[[Target, Descriptor, bytes], None] | None = None
    log: Callable[[str], None] | None = None

    def transport(self, cancel: threading.Event) -> TransportOptions:
        return TransportOptions(insecure=self.insecure, max_requests=self.concurrency,
                                max_streams=max(1, (self.concurrency + 1) // 2), ca_file=self.ca_file,
                                retry=RetryPolicy(cancel=cancel))


def _is_model_root(target: Target, reference: str | None) -> bool:
    """Whether the graph a reference names is (or may be) an imgpack model, rather than a foreign artifact."""
    if reference is None:
        return True
    desc = target.resolve(reference)
    if desc is None:
        return True  # copy_graph reports the missing reference
    return describe_artifact(parse_node(read_node(target, desc), target.describe(reference), desc.media_type)) is None


def _hooks(src: Target, dst: Target, settings: TransferSettings, sources: BlobSources, *, model: bool,
           local_dst: bool) -> CopyHooks:
    cap = settings.max_layers
    if cap is None and isinstance(dst, RemoteRepository):
        cap = default_cap(dst.host)

    def mount_candidates(desc: Descriptor) -> list[str]:
        if not isinstance(dst, RemoteRepository):
            return []
        found = []
        if isinstance(src, RemoteRepository) and src.host == dst.host:
            found.append(src.repository)
        found += [r for r in sources.repositories(dst.host, desc.digest) if r not in found]
        return found

    def after_copy(graph: Graph) -> None:
        """Remember which repositories hold these blobs, for cross-repository mounts later."""
        for side in (src, dst):
            if isinstance(side, RemoteRepository):
                sources.record(side.host, side.repository, list(graph.blobs))

    verify_root = None
    if settings.verify_root is not None:
        hook = settings.verify_root

        def verify_root(desc: Descriptor, raw: bytes) -> None:
            hook(src, desc, raw)

    if not model:
        return CopyHooks(mount_candidates=mount_candidates, referrers=settings.referrers, after_copy=after_copy)
    return model_hooks(validate=True, check_content_at_destination=local_dst, selection=settings.selection,
                       max_layers=cap, mount_candidates=mount_candidates, referrers=settings.referrers,
                       verify_root=verify_root, after_copy=after_copy)


def transfer(
    store: Store,
    source: Location | str,
    destination: Location | str | None,
    *,
    local_name: str | None = None,
    source_in_store: bool = False,
    settings: TransferSettings | None = None,
    reporter: Reporter | None = None,
    cancel: threading.Event | None = None,
    models_only: bool = False,
) -> CopyResult:
    """Copy ``source`` to ``destination`` (None: the store, under ``local_name``).

    ``source_in_store`` reads the source from the store even when its name carries a registry host
    (``imgpack push host/repo:tag``); ``models_only`` (pull) refuses anything that is not an imgpack model.
    """
    settings = settings or TransferSettings()
    cancel = cancel or threading.Event()
    clients = Clients(settings.transport(cancel))
    reporter = reporter or Reporter()
    try:
        src_loc = parse_location(source) if isinstance(source, str) else source
        if source_in_store and src_loc.kind == "remote":
            assert src_loc.reference is not None
            src = Endpoint(LayoutTarget(store, cancel=cancel), str(src_loc.reference), src_loc)
        else:
            src = open_location(src_loc, store=store, clients=clients, write=False, cancel=cancel,
                                mirrors=settings.mirrors, log=settings.log)
        if destination is None:
            dst_target: Target = LayoutTarget(store, cancel=cancel)
            dst_ref = local_name
        else:
            dst = open_location(destination, store=store, clients=clients, write=True, cancel=cancel)
            dst_target = dst.target
            dst_ref = local_name if dst.location.kind == "store" and local_name else dst.reference
        if src.reference is None:
            raise UsageError(f"{src_loc.text}: needs a tag or digest")
        model = models_only or _is_model_root(src.target, src.reference)
        local_dst = not isinstance(dst_target, RemoteRepository)
        if settings.selection is not None and settings.selection.partial:
            if not isinstance(dst_target, LayoutTarget):
                raise UsageError("--component/--include: a partial pull goes into the store or an oci: layout")
        hooks = _hooks(src.target, dst_target, settings, BlobSources.for_store(store.root), model=model,
                       local_dst=local_dst)
        return copy_graph(src.target, src.reference, dst_target, dst_ref, hooks=hooks,
                          concurrency=settings.concurrency, reporter=reporter, cancel=cancel)
    except KeyboardInterrupt:
        cancel.set()
        raise
    finally:
        reporter.close()
        clients.close()


def pulled_name(reference: str) -> str:
    """The store name a pull gives: the reference with its tag, or (pulled by digest) the digest reference."""
    ref = Reference.parse(reference)
    if ref.registry is None:
        raise UsageError(f"pull: {reference!r} has no registry host (expected HOST[:PORT]/REPO[:TAG])")
    return str(Reference(ref.registry, ref.repository, ref.tag) if ref.tag else ref)


def pull(store: Store, reference: str, *, settings: TransferSettings | None = None, reporter: Reporter | None = None,
         cancel: threading.Event | None = None) -> CopyResult:
    """Fetch a model from a registry into the store; by tag it is stored under that tag, by digest pinned."""
    local = pulled_name(reference)
    return transfer(store, reference, None, local_name=local, settings=settings, reporter=reporter, cancel=cancel,
                    models_only=True)


def push(store: Store, reference: str, destination: str | None = None, *, settings: TransferSettings | None = None,
         reporter: Reporter | None = None, cancel: threading.Event | None = None) -> CopyResult:
    """Upload a stored model to a registry or an ``oci:`` layout (by default under its own name)."""
    dest = destination or reference
    if parse_location(dest).kind == "store":
        raise UsageError(f"push: {dest!r} has no registry host; use `imgpack push {reference} HOST[:PORT]/REPO:TAG`")
    return transfer(store, reference, dest, source_in_store=True, settings=settings, reporter=reporter,
                    cancel=cancel)


def copy(store: Store, source: str, destination: str, *, settings: TransferSettings | None = None,
         reporter: Reporter | None = None, cancel: threading.Event | None = None) -> CopyResult:
    """Copy any graph between registries, layouts, ollama directories and the store, keeping every digest."""
    dst_loc = parse_location(destination)
    local_name = str(dst_loc.reference) if dst_loc.kind == "store" else None
    return transfer(store, source, destination, local_name=local_name, settings=settings, reporter=reporter,
                    cancel=cancel)
