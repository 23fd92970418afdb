"""The transfer engine: one ``copy_model(src, dst)`` for push, pull and registry-to-registry copy.

Steps, in this order:

1. fetch the source manifest and validate it (schema, layer names) before touching any blob;
2. if the destination already has that digest under the reference, stop: nothing to do;
3. move every missing blob on a bounded worker pool (largest first, so big bodies start early
   and small ones fill the gaps); each blob is checked at the destination first, retried with
   backoff on transfer or integrity failures, and verified by digest before it is kept;
4. write (store) or PUT (registry) the manifest only after every blob it references is in place.
"""

from __future__ import annotations

import errno
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field

import requests
import urllib3

from imgpack.registry.blobsources import BlobSources
from imgpack.registry.local import LocalLayout
from imgpack.registry.progress import NullReporter, Reporter
from imgpack.registry.remote import RemoteRepository
from imgpack.registry.target import ManifestInfo, Target
from imgpack.registry.transport import Cancelled, GaveUp
from imgpack.schemas.errors import AuthError, ImgpackError, IntegrityError, NotFoundError, TransferError
from imgpack.schemas.manifest import Layer, ModelManifest

#: After this many blobs failed on every transport attempt, the registry is taken to be down: stop.
GIVE_UP_AFTER = 3
#: Local errors no retry can fix (disk full, read-only, no permission, quota).
LOCAL_FATAL_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}
RETRYABLE = (TransferError, IntegrityError, requests.RequestException, urllib3.exceptions.HTTPError, OSError)


class LocalIOError(TransferError):
    """The local disk refused a write (full, read-only, no permission): the whole copy stops."""


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

    def to_json(self) -> dict:
        return asdict(self)


def _label(layer: Layer) -> str:
    return f"layer {layer.name!r}" if layer.name else "config"


def _backoff(attempt: int, base: float = 0.2, cap: float = 8.0) -> float:
    return random.uniform(0, min(cap, base * 2**attempt))


def copy_model(
    src: Target,
    src_ref: str,
    dst: Target,
    dst_ref: str | None,
    *,
    concurrency: int = 8,
    attempts: int = 4,
    reporter: Reporter | None = None,
    cancel: threading.Event | None = None,
    sources: BlobSources | None = None,
) -> CopyResult:
    """Copy the model ``src_ref`` names in ``src`` to ``dst`` (tagged ``dst_ref``, or by digest)."""
    reporter = reporter or NullReporter()
    cancel = cancel or threading.Event()
    started = time.monotonic()
    info = src.fetch_manifest(src_ref)
    manifest = ModelManifest.from_bytes(info.raw, source=src.describe(src_ref))
    info = ManifestInfo(raw=info.raw, media_type=manifest.media_type, digest=info.digest)
    unique: dict[str, Layer] = {}
    for layer in manifest.blobs:
        unique.setdefault(layer.digest, layer)
    layers = sorted(unique.values(), key=lambda b: b.size, reverse=True)
    result = CopyResult(
        source=src.describe(src_ref),
        destination=dst.describe(dst_ref or info.digest),
        digest=info.digest,
        media_type=info.media_type,
        blobs=len(layers),
        bytes_total=sum(b.size for b in layers),
    )
    for layer in manifest.layers:
        result.components[layer.component or "."] = result.components.get(layer.component or ".", 0) + 1
    reporter.start(result, layers)

    if dst.resolve(dst_ref or info.digest) == info.digest:
        result.up_to_date = True
        result.existing = len(layers)
        result.seconds = time.monotonic() - started
        _record_sources(sources, src, dst, unique)
        reporter.finish(result)
        return result

    mount_hint: list[str] = []
    if isinstance(src, RemoteRepository) and isinstance(dst, RemoteRepository) and src.host == dst.host:
        mount_hint = [src.repository]
    lock = threading.Lock()

    def transfer(layer: Layer) -> None:
        try:
            _transfer(layer)
        except ImgpackError as exc:
            exc.layer = layer  # type: ignore[attr-defined]
            raise

    def _transfer(layer: Layer) -> None:
        last: BaseException | None = None
        for attempt in range(attempts):
            if cancel.is_set():
                raise Cancelled("interrupted")
            moved = 0

            def progress(n: int) -> None:
                nonlocal moved
                moved += n
                reporter.advance(n)

            try:
                if dst.has_blob(layer):
                    status = "exists"
                else:
                    mounts = list(mount_hint)
                    if sources is not None and isinstance(dst, RemoteRepository):
                        mounts += [r for r in sources.repositories(dst.host, layer.digest) if r not in mounts]
                    status = dst.push_blob(layer, src.blob_source(layer), progress, mounts)
            except (AuthError, NotFoundError, Cancelled, GaveUp):
                raise
            except OSError as exc:
                if exc.errno in LOCAL_FATAL_ERRNOS:
                    # A full or read-only disk will not heal between retries: stop, and say why.
                    where = f" {exc.filename}" if exc.filename else ""
                    raise LocalIOError(f"{_label(layer)}: local I/O error{where}: {exc.strerror}") from None
                last = exc
                if attempt + 1 < attempts:
                    if cancel.wait(_backoff(attempt)):
                        raise Cancelled("interrupted") from None
                continue
            except RETRYABLE as exc:
                last = exc
                if attempt + 1 < attempts:
                    if cancel.wait(_backoff(attempt)):
                        raise Cancelled("interrupted") from None
                continue
            with lock:
                if status in ("exists", "resumed"):
                    result.existing += 1
                elif status == "mounted":
                    result.mounted += 1
                else:
                    result.transferred += 1
                result.bytes_moved += moved
            reporter.blob_done(layer, status, moved)
            return
        assert last is not None
        if isinstance(last, ImgpackError):
            detail = str(last)
        elif isinstance(last, OSError) and last.strerror:
            detail = f"{type(last).__name__}: {last.strerror}"
        else:
            detail = type(last).__name__
        kind = IntegrityError if isinstance(last, IntegrityError) else TransferError
        raise kind(f"{detail} (gave up after {attempts} attempts)")

    failures: list[BaseException] = []
    aborted = False  # we cancelled the remaining blobs ourselves (auth refused, registry down)
    with dst.session():
        pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="imgpack-copy")
        try:
            futures: list[Future] = [pool.submit(transfer, layer) for layer in layers]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
                for future in done:
                    exc = future.exception()
                    if exc is None or isinstance(exc, Cancelled):
                        continue
                    failures.append(exc)
                    gave_up = sum(isinstance(f, GaveUp) for f in failures)
                    if isinstance(exc, (AuthError, LocalIOError)) or gave_up >= GIVE_UP_AFTER:
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
            kind = type(first) if isinstance(first, ImgpackError) else TransferError
            if isinstance(first, GaveUp):
                kind = TransferError
            count = f"{len(failures)} of {len(layers)} blobs failed" if len(failures) > 1 else "a blob failed"
            stopped = "; stopped early" if aborted else ""
            layer = getattr(first, "layer", None)
            what = f"{_label(layer)} (blob {layer.digest}): " if layer is not None else ""
            raise kind(f"{result.destination}: {count}{stopped}; {what}{first}; the manifest was not written")
        dst.push_manifest(dst_ref, info)
    _record_sources(sources, src, dst, unique)
    result.seconds = time.monotonic() - started
    reporter.finish(result)
    return result


def _record_sources(sources: BlobSources | None, src: Target, dst: Target, blobs: dict[str, Layer]) -> None:
    if sources is None:
        return
    for side in (src, dst):
        if isinstance(side, RemoteRepository):
            sources.record(side.host, side.repository, blobs)


__all__ = ["CopyResult", "LocalLayout", "RemoteRepository", "copy_model"]
