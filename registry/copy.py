"""The transfer engine: one graph copy for push, pull, registry-to-registry copy, save and import.

``copy_graph(src, reference, dst, dst_reference, hooks)`` walks any OCI graph — an imgpack model manifest, an
image index and its child manifests, a cosign ``.sig`` manifest, a container image — in this order:

1. resolve the root and fetch it; ``hooks.prepare_root`` may validate it (pull installs imgpack-model
   validation) or replace it (an index-split model becomes its original manifest) before any blob moves;
2. if the destination already has that digest under the reference, stop (referrers are still looked at);
3. fetch every child node (manifests, indexes) into memory, collect the blobs, keep those ``hooks.select``
   takes (partial pull);
4. move the missing blobs on a bounded pool, largest first; each is checked at the destination first, mounted
   where the destination can (:class:`~imgpack.registry.target.Mounter`), otherwise streamed and verified by
   digest before it is kept; only integrity failures and early-ended streams are retried here — the transport
   replays everything else;
5. ``hooks.before_commit`` may inspect the blobs now at the destination (pull validates tensor headers and
   configs), then nodes are pushed children first and the root last, under its reference; a destination that
   refuses the root for its layer count gets ``hooks.on_layer_limit``'s replacement (the index-split form);
6. with ``hooks.referrers``, every referrer of the root (signatures) is copied the same way.
"""

from __future__ import annotations

import errno
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import requests
import urllib3

from imgpack.registry.layout import DiskFull, LayoutTarget, ShortBlob
from imgpack.registry.progress import Reporter, descriptor_component
from imgpack.registry.remote import MIN_RATE, LayerLimit
from imgpack.registry.retry import Cancelled
from imgpack.registry.target import (
    BlobStatus,
    BytesSource,
    Mounter,
    ReferrerFinder,
    Target,
    TargetBlobSource,
    read_node,
    sibling,
)
from imgpack.registry.transport import GaveUp
from imgpack.schemas.errors import AuthError, ImgpackError, IntegrityError, NotFoundError, TransferError
from imgpack.schemas.graph import Descriptor, Node, parse_node

#: After this many blobs failed on every transport attempt, the registry is taken to be down: stop.
GIVE_UP_AFTER = 3
#: Copy-level attempts for one blob (integrity failures, streams that ended early).
BLOB_ATTEMPTS = 4
#: Every blob gets at least this long, plus its size at the minimum rate, before the copy stops retrying it.
BLOB_DEADLINE_BASE = 180.0
#: Local errors no retry can fix (disk full, read-only, no permission, quota).
LOCAL_FATAL_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}
RETRYABLE = (ShortBlob, IntegrityError, TransferError, requests.RequestException, urllib3.exceptions.HTTPError,
             OSError)


class LocalIOError(TransferError):
    """The local disk refused a write (full, read-only, no permission): the whole copy stops."""


@dataclass
class Graph:
    """A root node and everything reachable from it, as the copy found it at the source."""

    root: Descriptor
    nodes: dict[str, tuple[Descriptor, bytes, Node]]
    blobs: dict[str, Descriptor]
    skipped: dict[str, Descriptor] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # node digests, children before parents

    def root_node(self) -> Node:
        return self.nodes[self.root.digest][2]

    def root_raw(self) -> bytes:
        return self.nodes[self.root.digest][1]


@dataclass
class CopyHooks:
    """What a copy does beyond moving bytes; every hook is optional."""

    #: Validate or replace the root before anything moves: returns the (descriptor, bytes) to copy.
    prepare_root: Callable[[Target, Descriptor, bytes], tuple[Descriptor, bytes]] | None = None
    #: Whether to take a blob (partial pull); nodes are always taken.
    select: Callable[[Descriptor], bool] | None = None
    #: Called once every selected blob is at the destination, before any node is pushed there.
    before_commit: Callable[[Target, Graph], None] | None = None
    #: Nodes to push instead of a root the destination refused for its layer count (blobs they add included).
    on_layer_limit: Callable[[Graph, LayerLimit], list[tuple[Descriptor, bytes]]] | None = None
    #: Rewrite the root before pushing (``--max-layers``): the nodes to push, root last.
    encode_root: Callable[[Graph], list[tuple[Descriptor, bytes]]] | None = None
    #: Whether a different node the destination holds under the reference already carries this root (a split
    #: index of it): then the copy is up to date.
    is_current: Callable[[Target, Descriptor, Graph], bool] | None = None
    #: Repositories of the destination registry that may hold a blob (cross-repository mount hints).
    mount_candidates: Callable[[Descriptor], list[str]] | None = None
    #: Also copy the root's referrers (signatures, attestations).
    referrers: bool = False
    #: Called once the copy is done (or found the destination up to date).
    after_copy: Callable[[Graph], None] | None = None


@dataclass
class CopyResult:
    """What a copy did; ``bytes_moved`` counts only payload bytes that crossed the wire or disk."""

    source: str
    destination: str
    digest: str
    media_type: str
    blobs: int = 0
    bytes_total: int = 0
    transferred: int = 0
    existing: int = 0
    mounted: int = 0
    bytes_moved: int = 0
    up_to_date: bool = False
    seconds: float = 0.0
    components: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    referrers: int = 0
    #: The digest pushed under the destination reference when it differs from ``digest`` (index-split form).
    pushed_digest: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _label(desc: Descriptor) -> str:
    name = desc.fields.get("name")
    return f"layer {name!r}" if isinstance(name, str) else f"blob {desc.digest}"


def collect_graph(src: Target, root: Descriptor, raw: bytes, select: Callable[[Descriptor], bool] | None) -> Graph:
    """Fetch every node reachable from ``root`` and list the blobs the copy must move."""
    graph = Graph(root, {}, {})

    def visit(desc: Descriptor, content: bytes) -> None:
        if desc.digest in graph.nodes:
            return
        node = parse_node(content, src.describe(desc.digest), desc.media_type)
        graph.nodes[desc.digest] = (desc, content, node)
        for child in node.children:
            if child.is_graph_node:
                visit(child, read_node(src, child))
            elif select is None or select(child):
                graph.blobs.setdefault(child.digest, child)
            else:
                graph.skipped.setdefault(child.digest, child)
        graph.order.append(desc.digest)

    visit(root, raw)
    for digest in graph.blobs:
        graph.skipped.pop(digest, None)  # a blob another node needs is taken after all
    return graph


def copy_graph(
    src: Target,
    reference: str,
    dst: Target,
    dst_reference: str | None,
    *,
    hooks: CopyHooks | None = None,
    concurrency: int = 8,
    reporter: Reporter | None = None,
    cancel: threading.Event | None = None,
) -> CopyResult:
    """Copy the graph ``reference`` names in ``src`` to ``dst`` (tagged ``dst_reference``, or by digest)."""
    hooks = hooks or CopyHooks()
    reporter = reporter or Reporter()
    cancel = cancel or threading.Event()
    started = time.monotonic()
    root = src.resolve(reference)
    if root is None:
        raise NotFoundError(f"{src.describe(reference)}: not found")
    raw = read_node(src, root)
    if hooks.prepare_root is not None:
        root, raw = hooks.prepare_root(src, root, raw)
    graph = collect_graph(src, root, raw, hooks.select)
    blobs = sorted(graph.blobs.values(), key=lambda b: b.size, reverse=True)
    result = CopyResult(
        source=src.describe(reference),
        destination=dst.describe(dst_reference or root.digest),
        digest=root.digest,
        media_type=root.media_type,
        blobs=len(blobs),
        bytes_total=sum(b.size for b in blobs),
        skipped=len(graph.skipped),
    )
    for layer in graph.root_node().layers:
        key = descriptor_component(layer)
        result.components[key] = result.components.get(key, 0) + 1
    reporter.start(result, blobs)
    pushes = hooks.encode_root(graph) if hooks.encode_root is not None else [(root, raw)]
    final = pushes[-1][0]
    existing = dst.resolve(dst_reference or final.digest)
    if existing is not None and existing.digest != final.digest and final.digest == root.digest \
            and hooks.is_current is not None and hooks.is_current(dst, existing, graph):
        final = existing  # the destination holds this root in another form (the index-split one)
    # A local layout is asked for every blob too (a stat each): a store holding the model in part is not up to
    # date, and blobs are not fsynced one by one, so after a crash the index may name a blob the disk lost or cut
    # short, which the next pull must fetch.
    if (existing is not None and existing.digest == final.digest and not graph.skipped
            and (not isinstance(dst, LayoutTarget) or all(dst.exists(b) for b in blobs))):
        result.up_to_date = True
        result.existing = len(blobs)
    else:
        with dst.session():
            if isinstance(dst, LayoutTarget):
                dst.check_space(blobs)  # a registry declaring a 1 TB blob is refused before a byte moves
            _move_blobs(src, dst, blobs, result, hooks, reporter, cancel, concurrency)
            if hooks.before_commit is not None:
                hooks.before_commit(dst, graph)
            for digest in graph.order[:-1]:
                desc, content, _ = graph.nodes[digest]
                if not dst.exists(desc):
                    dst.push_node(desc, content)
            final = _push_root(dst, dst_reference, graph, pushes, hooks, result)
    if final.digest != root.digest:
        result.pushed_digest = final.digest
    if hooks.after_copy is not None:
        hooks.after_copy(graph)
    if hooks.referrers and isinstance(src, ReferrerFinder):
        _copy_referrers(src, dst, dst_reference, root, result, concurrency, cancel)
    result.seconds = time.monotonic() - started
    reporter.finish(result)
    return result


def _copy_referrers(src: Target, dst: Target, dst_reference: str | None, root: Descriptor, result: CopyResult,
                    concurrency: int, cancel: threading.Event) -> None:
    """Signatures travel with the model: cosign's ``.sig`` under its tag, OCI referrers by digest, listed in the
    destination's referrers tag-schema index (what registries without the referrers API, and layouts, offer)."""
    assert isinstance(src, ReferrerFinder)
    by_digest: list[Descriptor] = []
    for referrer, tag in src.referrers(root):
        target_ref = sibling(dst, dst_reference, tag) if tag else None
        copy_graph(src, referrer.digest, dst, target_ref, concurrency=concurrency, cancel=cancel)
        if tag is None:
            by_digest.append(referrer)
        result.referrers += 1
    if by_digest:
        from imgpack.registry.signatures import attach_referrers

        attach_referrers(dst, dst_reference, root.digest, by_digest)


def _push_root(dst: Target, dst_reference: str | None, graph: Graph, pushes: list[tuple[Descriptor, bytes]],
               hooks: CopyHooks, result: CopyResult) -> Descriptor:
    """Push the root (or what replaces it) last; fall back to the split form when the registry caps layers."""
    try:
        _push_nodes(dst, dst_reference, pushes)
    except LayerLimit as limit:
        if hooks.on_layer_limit is None:
            raise
        pushes = hooks.on_layer_limit(graph, limit)
        _push_nodes(dst, dst_reference, pushes, result)
    return pushes[-1][0]


def _push_nodes(dst: Target, dst_reference: str | None, pushes: list[tuple[Descriptor, bytes]],
                result: CopyResult | None = None) -> None:
    for i, (desc, content) in enumerate(pushes):
        last = i == len(pushes) - 1
        if not desc.is_graph_node:  # a blob the replacement adds (the split form's manifest blob)
            if not dst.exists(desc):
                dst.push(desc, BytesSource(desc, content), lambda _n: None)
                if result is not None:
                    result.transferred += 1
            continue
        if last:
            dst.push_node(desc, content, dst_reference)
        elif not dst.exists(desc):
            dst.push_node(desc, content)


def _move_blobs(src: Target, dst: Target, blobs: list[Descriptor], result: CopyResult, hooks: CopyHooks,
                reporter: Reporter, cancel: threading.Event, concurrency: int) -> None:
    lock = threading.Lock()
    # Asked once per copy, not per blob: isinstance against a runtime-checkable Protocol walks its attributes.
    mounts = hooks.mount_candidates if isinstance(dst, Mounter) else None

    def transfer(desc: Descriptor) -> None:
        try:
            status, moved = _transfer(src, dst, desc, hooks, reporter, cancel, mounts)
        except ImgpackError as exc:
            exc.descriptor = desc  # type: ignore[attr-defined]
            raise
        with lock:
            if status.moved_nothing:
                result.existing += 1
            elif status is BlobStatus.MOUNTED:
                result.mounted += 1
            else:
                result.transferred += 1
            result.bytes_moved += moved
        reporter.blob_done(desc, status.value, moved)

    failures: list[BaseException] = []
    aborted = False  # we cancelled the remaining blobs ourselves (auth refused, registry down, disk full)
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="imgpack-copy")
    # Finished futures arrive on a queue: waiting on the whole pending set instead locks every one of a thousand
    # futures on each wake-up, which cost the main thread more than all the blobs' bookkeeping.
    finished: queue.SimpleQueue[Future] = queue.SimpleQueue()
    try:
        for desc in blobs:
            pool.submit(transfer, desc).add_done_callback(finished.put)
        for _ in blobs:
            while True:
                try:
                    future = finished.get(timeout=0.5)  # a timeout keeps Ctrl-C answered promptly
                    break
                except queue.Empty:
                    continue
            if future.cancelled():
                continue
            exc = future.exception()
            if exc is None or isinstance(exc, Cancelled):
                continue
            failures.append(exc)
            gave_up = sum(isinstance(f, GaveUp) for f in failures)
            if isinstance(exc, (AuthError, LocalIOError, DiskFull)) or gave_up >= GIVE_UP_AFTER:
                aborted = True
                cancel.set()
    except BaseException:
        cancel.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True, cancel_futures=True)
    if cancel.is_set() and not aborted:
        raise Cancelled("interrupted; finished blobs and partial downloads are kept for the next run")
    if failures:
        first = next((f for f in failures if isinstance(f, AuthError)), failures[0])
        kind: type[ImgpackError] = type(first) if isinstance(first, ImgpackError) else TransferError
        if isinstance(first, GaveUp):
            kind = TransferError
        count = f"{len(failures)} of {len(blobs)} blobs failed" if len(failures) > 1 else "a blob failed"
        stopped = "; stopped early" if aborted else ""
        failed = getattr(first, "descriptor", None)
        what = f"{_label(failed)} (blob {failed.digest}): " if failed is not None and failed.fields.get("name") else ""
        raise kind(f"{result.destination}: {count}{stopped}; {what}{first}; the manifest was not written")


def _transfer(src: Target, dst: Target, desc: Descriptor, hooks: CopyHooks, reporter: Reporter,
              cancel: threading.Event,
              mounts: Callable[[Descriptor], list[str]] | None = None) -> tuple[BlobStatus, int]:
    deadline = time.monotonic() + BLOB_DEADLINE_BASE + desc.size / MIN_RATE
    last: BaseException | None = None
    for attempt in range(BLOB_ATTEMPTS):
        if cancel.is_set():
            raise Cancelled("interrupted")
        moved = 0

        def progress(n: int) -> None:
            nonlocal moved
            moved += n
            reporter.advance(n)

        try:
            if dst.exists(desc):
                return BlobStatus.EXISTS, 0
            if mounts is not None:
                assert isinstance(dst, Mounter)
                for repository in mounts(desc):
                    if repository != dst.repository and dst.mount(desc, repository):
                        return BlobStatus.MOUNTED, 0
            return dst.push(desc, TargetBlobSource(src, desc), progress), moved
        except (AuthError, NotFoundError, Cancelled, GaveUp, DiskFull):
            raise
        except OSError as exc:
            if exc.errno in LOCAL_FATAL_ERRNOS:
                # A full or read-only disk will not heal between retries: stop, and say why.
                where = f" {exc.filename}" if exc.filename else ""
                raise LocalIOError(f"{_label(desc)}: local I/O error{where}: {exc.strerror}") from None
            last = exc
        except RETRYABLE as exc:
            last = exc
        if attempt + 1 < BLOB_ATTEMPTS and time.monotonic() < deadline:
            if cancel.wait(min(8.0, 0.2 * 2**attempt)):
                raise Cancelled("interrupted") from None
            continue
        break
    assert last is not None
    if isinstance(last, ImgpackError):
        detail = str(last)
    elif isinstance(last, OSError) and last.strerror:
        detail = f"{type(last).__name__}: {last.strerror}"
    else:
        detail = type(last).__name__
    kind = IntegrityError if isinstance(last, IntegrityError) and not isinstance(last, ShortBlob) else TransferError
    raise kind(f"{detail} (gave up after {attempt + 1} attempts)")


__all__ = ["CopyHooks", "CopyResult", "Graph", "collect_graph", "copy_graph"]
