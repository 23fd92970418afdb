"""A repository on an OCI distribution (v1.1) registry, as a copy :class:`~imgpack.registry.target.Target`.

Manifests: HEAD/GET with the full ``Accept`` list (distribution answers 404 or MANIFEST_INVALID to a type it
was not asked for), PUT of the exact local bytes with the matching ``Content-Type``, and the
``Docker-Content-Digest`` reply checked against the local digest. A registry that caps the layers of a
manifest (Amazon ECR: ~500) answers the PUT with an error this module recognises as :class:`LayerLimit`, so
the caller can push the model in its index-split form instead.

Blobs: HEAD before upload; cross-repository mount (:meth:`RemoteRepository.mount`; a 202 reply means the mount
was refused); a monolithic POST+PUT for blobs up to ``UploadPolicy.monolithic_max``, chunked PATCH above it.
The policy adapts per registry: a 413 on a single PUT lowers the monolithic limit (ECR, Quay, Harbor), a 413 on
PATCH halves the chunk size (GHCR), a refused PATCH (GAR) turns chunking off.

Referrers: the OCI 1.1 referrers API where the registry has it, else the referrers tag schema
(``sha256-<hex>`` holding an index), plus cosign's ``sha256-<hex>.sig`` tag.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, urljoin

import requests

from imgpack.registry.retry import THROTTLE_STATUSES, Cancelled, throttled_answer
from imgpack.registry.target import BlobSource, BlobStatus, ChunkReader, ProgressFn, Stream
from imgpack.registry.transport import (
    RegistryClient,
    describe_response,
    iter_bounded,
    json_or_error,
    raise_for_exhausted,
    registry_errors,
)
from imgpack.schemas import spec
from imgpack.schemas.digest import is_digest, sha256_bytes
from imgpack.schemas.errors import AuthError, ImgpackError, IntegrityError, NotFoundError, TransferError
from imgpack.schemas.graph import Descriptor, parse_node

READ_CHUNK = 1 << 20
MAX_TAG_PAGES = 100
#: A stream slower than this (bytes/s, averaged over STALL_WINDOW) is treated as stalled and resumed.
MIN_RATE = 32 * 1024
STALL_WINDOW = 30.0
#: Phrases registries use when a manifest has more layers than they accept.
LAYER_LIMIT_PHRASES = ("limit on number of layers", "too many layers", "layers per image", "layer limit")


class LayerLimit(TransferError):
    """The registry refused a manifest for having too many layers (ECR's 405 UNSUPPORTED, and kin)."""

    def __init__(self, message: str, layers: int) -> None:
        super().__init__(message)
        self.layers = layers


@dataclass
class UploadPolicy:
    """How blobs are uploaded to one registry; learned from refusals and shared by all workers."""

    monolithic_max: int = 256 * 1024 * 1024
    chunk_size: int = 64 * 1024 * 1024
    min_chunk: int = 1024 * 1024
    chunked: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def use_chunks(self, size: int) -> bool:
        with self.lock:
            return self.chunked and size > self.monolithic_max

    def refuse_monolithic(self, size: int) -> None:
        with self.lock:
            self.monolithic_max = min(self.monolithic_max, max(0, size - 1))
            self.chunk_size = min(self.chunk_size, max(self.min_chunk, self.monolithic_max))

    def refuse_chunk(self, sent: int) -> None:
        with self.lock:
            self.chunk_size = max(self.min_chunk, min(self.chunk_size, sent) // 2)

    def refuse_chunked(self) -> None:
        with self.lock:
            self.chunked = False


class _RetryUpload(Exception):
    """The upload session must be restarted (policy changed or the session broke)."""


class _Throttled(Exception):
    """The registry answered an upload body with 429/503: wait, then restart the upload."""

    def __init__(self, status: int, retry_after: str | None) -> None:
        super().__init__(status)
        self.status = status
        self.retry_after = retry_after


class RemoteRepository:
    """One repository on one registry."""

    def __init__(
        self, client: RegistryClient, repository: str, push: bool = False, policy: UploadPolicy | None = None
    ) -> None:
        self.client = client
        self.repository = repository
        self.policy = policy or UploadPolicy()
        actions = "pull,push" if push else "pull"
        self.scope: tuple[str, ...] = (f"repository:{repository}:{actions}",)

    @property
    def host(self) -> str:
        return self.client.host

    def describe(self, reference: str | None = None) -> str:
        name = f"{self.client.host}/{self.repository}"
        if reference:
            name += ("@" if is_digest(reference) else ":") + reference
        return name

    def session(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    # -- manifests ---------------------------------------------------------------------------------------

    def _manifest_path(self, reference: str) -> str:
        return f"/v2/{self.repository}/manifests/{quote(reference, safe=':')}"

    def resolve(self, reference: str) -> Descriptor | None:
        resp = self.client.request("HEAD", self._manifest_path(reference), scope=self.scope,
                                   headers={"Accept": ", ".join(spec.MANIFEST_ACCEPT)})
        resp.close()
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise TransferError(f"{self.describe(reference)}: HEAD manifest answered {describe_response(resp)}")
        digest = resp.headers.get("Docker-Content-Digest")
        length = resp.headers.get("Content-Length", "")
        media_type = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
        if digest and is_digest(digest) and length.isdigit() and media_type:
            if is_digest(reference) and digest != reference:
                raise IntegrityError(f"{self.describe(reference)}: registry answered for {digest}")
            return Descriptor(media_type, digest, int(length))
        raw, media_type = self.fetch_manifest_bytes(reference)
        return Descriptor(parse_node(raw, self.describe(reference), media_type).media_type, sha256_bytes(raw),
                          len(raw))

    def fetch_manifest_bytes(self, reference: str) -> tuple[bytes, str]:
        """A manifest's exact bytes and declared media type; a digest reference is checked against them."""
        resp = self.client.request("GET", self._manifest_path(reference), scope=self.scope,
                                   headers={"Accept": ", ".join(spec.MANIFEST_ACCEPT)}, stream=True)
        try:
            if resp.status_code == 404:
                raise NotFoundError(f"{self.describe(reference)}: manifest not found")
            if resp.status_code != 200:
                raise TransferError(f"{self.describe(reference)}: GET manifest answered {describe_response(resp)}")
            raw = iter_bounded(resp.iter_content(65536), spec.MAX_MANIFEST_BYTES, self.describe(reference))
            media_type = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
            claimed = resp.headers.get("Docker-Content-Digest")
        except requests.RequestException as exc:
            raise TransferError(f"{self.describe(reference)}: manifest download failed: {type(exc).__name__}") from None
        finally:
            resp.close()
        digest = sha256_bytes(raw)
        if is_digest(reference) and digest != reference:
            raise IntegrityError(f"{self.describe(reference)}: manifest content hashes to {digest}")
        if claimed and is_digest(claimed) and claimed != digest:
            raise IntegrityError(
                f"{self.describe(reference)}: manifest content hashes to {digest}, registry says {claimed}"
            )
        return raw, media_type

    def push_node(self, desc: Descriptor, raw: bytes, reference: str | None = None) -> None:
        target = reference or desc.digest
        resp = self.client.request("PUT", self._manifest_path(target), scope=self.scope,
                                   headers={"Content-Type": desc.media_type}, body=raw)
        resp.close()
        if resp.status_code not in (200, 201):
            text = describe_response(resp)
            messages = " ".join(m for _, m in registry_errors(resp)).lower()
            if any(phrase in messages for phrase in LAYER_LIMIT_PHRASES):
                layers = len(parse_node(raw, target, desc.media_type).layers)
                raise LayerLimit(f"{self.describe(target)}: the registry refused a manifest of {layers} layers"
                                 f" ({text})", layers)
            raise TransferError(f"{self.describe(target)}: PUT manifest answered {text}")
        returned = resp.headers.get("Docker-Content-Digest")
        if returned and returned != desc.digest:
            raise IntegrityError(
                f"{self.describe(target)}: registry stored the manifest as {returned}, expected {desc.digest}"
            )

    def tag(self, desc: Descriptor, reference: str) -> None:
        raw, _ = self.fetch_manifest_bytes(desc.digest)
        self.push_node(desc, raw, reference)

    def tags(self) -> list[str]:
        """Every tag, following ``Link`` pagination (bounded)."""
        path: str | None = f"/v2/{self.repository}/tags/list?n=1000"
        found: list[str] = []
        for _ in range(MAX_TAG_PAGES):
            if path is None:
                break
            resp = self.client.request("GET", path, scope=self.scope)
            if resp.status_code == 404:
                raise NotFoundError(f"{self.describe()}: repository not found")
            if resp.status_code != 200:
                raise TransferError(f"{self.describe()}: tag list answered {describe_response(resp)}")
            body = json_or_error(resp, f"{self.describe()}: tag list")
            found.extend(t for t in (body.get("tags") or []) if isinstance(t, str))
            link = resp.headers.get("Link", "")
            match = re.search(r"<([^>]+)>\s*;\s*rel=\"?next\"?", link)
            path = urljoin(self.client.base_url + "/", match.group(1)) if match else None
        return sorted(set(found))

    def referrers(self, desc: Descriptor) -> list[tuple[Descriptor, str | None]]:
        """OCI referrers of ``desc`` (API, else the ``sha256-<hex>`` tag-schema index) and its cosign ``.sig``."""
        found: dict[str, tuple[Descriptor, str | None]] = {}
        hex_digest = desc.digest.split(":", 1)[1]
        resp = self.client.request("GET", f"/v2/{self.repository}/referrers/{desc.digest}", scope=self.scope,
                                   headers={"Accept": spec.OCI_INDEX})
        index_raw: bytes | None = None
        try:
            if resp.status_code == 200 and (resp.headers.get("Content-Type") or "").startswith(spec.OCI_INDEX):
                index_raw = iter_bounded(resp.iter_content(65536), spec.MAX_MANIFEST_BYTES, "referrers")
        finally:
            resp.close()
        if index_raw is None:
            fallback = self.resolve(f"sha256-{hex_digest}")
            if fallback is not None and fallback.is_index:
                index_raw, _ = self.fetch_manifest_bytes(fallback.digest)
        if index_raw is not None:
            for child in parse_node(index_raw, f"{self.describe()} referrers", spec.OCI_INDEX).manifests:
                found.setdefault(child.digest, (child, None))
        sig = self.resolve(f"sha256-{hex_digest}.sig")
        if sig is not None:
            found[sig.digest] = (sig, f"sha256-{hex_digest}.sig")
        return list(found.values())

    # -- blobs ------------------------------------------------------------------------------------------

    def exists(self, desc: Descriptor) -> bool:
        if desc.is_graph_node:
            try:
                found = self.resolve(desc.digest)
            except NotFoundError:
                return False
            return found is not None and found.size == desc.size
        resp = self.client.request("HEAD", f"/v2/{self.repository}/blobs/{desc.digest}", scope=self.scope)
        resp.close()
        if resp.status_code == 200:
            length = resp.headers.get("Content-Length")
            return length is None or not length.isdigit() or int(length) == desc.size
        if resp.status_code == 404:
            return False
        raise_for_exhausted(resp, f"{self.describe()}: HEAD blob {desc.digest}")
        raise TransferError(f"{self.describe()}: HEAD blob {desc.digest} answered {describe_response(resp)}")

    def fetch(self, desc: Descriptor, offset: int = 0) -> Stream:
        if desc.is_graph_node:
            return self._fetch_node(desc)
        return self._fetch_blob(desc, offset)

    @contextlib.contextmanager
    def _fetch_node(self, desc: Descriptor) -> Iterator[tuple[int, Iterator[bytes]]]:
        raw, _ = self.fetch_manifest_bytes(desc.digest)
        yield 0, iter([raw])

    @contextlib.contextmanager
    def _fetch_blob(self, desc: Descriptor, offset: int) -> Iterator[tuple[int, Iterator[bytes]]]:
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        # A body that fits in one read holds no bandwidth or buffer worth queueing for: a slot would only leave
        # the request rate of a thousand small tensors to the registry's latency.
        slot = self.client.stream_slots if desc.size > READ_CHUNK else contextlib.nullcontext()
        with slot:
            resp = self.client.request("GET", f"/v2/{self.repository}/blobs/{desc.digest}", scope=self.scope,
                                       headers=headers, stream=True)
            try:
                if resp.status_code == 404:
                    raise NotFoundError(f"{self.describe()}: blob {desc.digest} not found")
                start = 0
                if resp.status_code == 206 and offset:
                    match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
                    start = int(match.group(1)) if match else -1
                    if start != offset:
                        raise TransferError(f"{self.describe()}: blob {desc.digest}: bad Content-Range reply")
                elif resp.status_code != 200:
                    raise_for_exhausted(resp, f"{self.describe()}: GET blob {desc.digest}")
                    raise TransferError(f"{self.describe()}: GET blob {desc.digest} answered"
                                        f" {describe_response(resp)}")
                yield start, self._watched(resp, desc)
            finally:
                resp.close()

    def _watched(self, resp: requests.Response, desc: Descriptor) -> Iterator[bytes]:
        """The body's chunks; a stream that falls below the minimum rate is cut off (the caller resumes it)."""
        cancel = self.client.retry.cancel
        window_start, window_bytes = time.monotonic(), 0
        # read1 returns what has arrived; stream() waits for a full READ_CHUNK, so a registry dripping a few bytes
        # a second would never yield a chunk to measure (nor trip the per-read socket timeout).
        read1 = getattr(resp.raw, "read1", None)  # urllib3 >= 2
        chunks = (iter(lambda: read1(READ_CHUNK, decode_content=False), b"") if read1 is not None
                  else resp.raw.stream(READ_CHUNK, decode_content=False))
        for chunk in chunks:
            if cancel.is_set():
                raise Cancelled("interrupted")
            window_bytes += len(chunk)
            now = time.monotonic()
            if now - window_start >= STALL_WINDOW:
                if window_bytes / (now - window_start) < MIN_RATE:
                    raise TransferError(f"{self.describe()}: blob {desc.digest} arrives slower than"
                                        f" {MIN_RATE // 1024} KiB/s; resuming")
                window_start, window_bytes = now, 0
            yield chunk

    def mount(self, desc: Descriptor, from_repository: str) -> bool:
        scope = (*self.scope, f"repository:{from_repository}:pull")
        try:
            resp = self.client.request(
                "POST",
                f"/v2/{self.repository}/blobs/uploads/?mount={desc.digest}&from={quote(from_repository, safe='/')}",
                scope=scope,
            )
        except AuthError:
            return False  # no pull access to the hinted source (any more): a refused mount
        resp.close()
        if resp.status_code == 202 and resp.headers.get("Location"):
            self._cancel_upload(urljoin(self.client.base_url + "/", resp.headers["Location"]))
        return resp.status_code == 201

    def _start_upload(self) -> str:
        resp = self.client.request("POST", f"/v2/{self.repository}/blobs/uploads/", scope=self.scope)
        resp.close()
        if resp.status_code != 202 or not resp.headers.get("Location"):
            raise_for_exhausted(resp, f"{self.describe()}: starting blob upload")
            raise TransferError(f"{self.describe()}: starting blob upload answered {describe_response(resp)}")
        min_chunk = resp.headers.get("OCI-Chunk-Min-Length")
        if min_chunk and min_chunk.isdigit():
            with self.policy.lock:
                self.policy.min_chunk = max(self.policy.min_chunk, int(min_chunk))
                self.policy.chunk_size = max(self.policy.chunk_size, self.policy.min_chunk)
        return urljoin(self.client.base_url + "/", resp.headers["Location"])

    @staticmethod
    def _with_digest(location: str, digest: str) -> str:
        return location + ("&" if "?" in location else "?") + "digest=" + quote(digest, safe=":")

    def push(self, desc: Descriptor, source: BlobSource, progress: ProgressFn) -> BlobStatus:
        """Upload one blob; restarts the upload session when the policy changes, or after a wait when the
        registry throttled a body (a streamed body cannot be replayed by the transport)."""
        changes = throttles = 0
        started = time.monotonic()
        while changes < 8:
            location = self._start_upload()
            try:
                if self.policy.use_chunks(desc.size):
                    self._upload_chunked(location, desc, source, progress)
                else:
                    self._upload_monolithic(location, desc, source, progress)
                return BlobStatus.UPLOADED
            except _Throttled as throttled:
                self._cancel_upload(location)
                retry = self.client.retry
                wait = retry.delay(throttles, throttled.retry_after)
                if not retry.attempts_for(started, throttles, wait,
                                          throttled_answer(throttled.status, throttled.retry_after)):
                    raise TransferError(f"{self.describe()}: uploading blob {desc.digest}: the registry kept"
                                        f" answering {throttled.status} (rate limit)") from None
                retry.sleep(wait)
                throttles += 1
            except _RetryUpload:
                self._cancel_upload(location)
                changes += 1
        raise TransferError(f"{self.describe()}: could not find an upload method the registry accepts")

    def _cancel_upload(self, location: str) -> None:
        with contextlib.suppress(ImgpackError, requests.RequestException):
            self.client.request("DELETE", location, scope=self.scope, retry=False).close()

    def _send_body(self, method: str, url: str, headers: dict[str, str], source: BlobSource, offset: int,
                   length: int, progress: ProgressFn) -> requests.Response:
        """Stream ``length`` bytes of ``source`` from ``offset``; rolls progress back on failure."""
        with self.client.stream_slots, source.open(offset) as (start, chunks):
            if start != offset:
                raise TransferError(f"blob {source.descriptor.digest}: source could not seek to {offset}")
            reader = ChunkReader(chunks, length, progress)
            headers = {**headers, "Content-Length": str(length), "Content-Type": "application/octet-stream"}
            try:
                resp = self.client.request(method, url, scope=self.scope, headers=headers, body=reader, retry=False)
            except BaseException:
                progress(-reader.sent)
                raise
            if resp.status_code >= 300:
                progress(-reader.sent)
            return resp

    def _upload_monolithic(self, location: str, desc: Descriptor, source: BlobSource, progress: ProgressFn) -> None:
        resp = self._send_body("PUT", self._with_digest(location, desc.digest), {}, source, 0, desc.size, progress)
        resp.close()
        if resp.status_code == 413:
            self.policy.refuse_monolithic(desc.size)
            if not self.policy.chunked:
                raise TransferError(f"{self.describe()}: blob {desc.digest} too large for this registry")
            raise _RetryUpload()
        self._check_committed(resp, desc)

    def _upload_chunked(self, location: str, desc: Descriptor, source: BlobSource, progress: ProgressFn) -> None:
        offset = 0
        chunk = self.policy.chunk_size
        while offset < desc.size:
            length = min(chunk, desc.size - offset)
            headers = {"Content-Range": f"{offset}-{offset + length - 1}"}
            resp = self._send_body("PATCH", location, headers, source, offset, length, progress)
            resp.close()
            if resp.status_code in (404, 405, 501) and offset == 0:
                self.policy.refuse_chunked()
                raise _RetryUpload()
            if resp.status_code == 413:
                self.policy.refuse_chunk(length)
                raise _RetryUpload()
            if resp.status_code in THROTTLE_STATUSES:
                raise _Throttled(resp.status_code, resp.headers.get("Retry-After"))
            if resp.status_code != 202:
                raise TransferError(
                    f"{self.describe()}: PATCH blob {desc.digest} at {offset} answered {describe_response(resp)}"
                )
            if resp.headers.get("Location"):
                location = urljoin(self.client.base_url + "/", resp.headers["Location"])
            offset += length
        resp = self.client.request(
            "PUT",
            self._with_digest(location, desc.digest),
            scope=self.scope,
            headers={"Content-Length": "0", "Content-Type": "application/octet-stream"},
            body=b"",
            retry=False,
        )
        resp.close()
        self._check_committed(resp, desc)

    def _check_committed(self, resp: requests.Response, desc: Descriptor) -> None:
        if resp.status_code in THROTTLE_STATUSES:
            raise _Throttled(resp.status_code, resp.headers.get("Retry-After"))
        if resp.status_code in (200, 201, 204):
            returned = resp.headers.get("Docker-Content-Digest")
            if returned and returned != desc.digest:
                raise IntegrityError(f"{self.describe()}: registry committed {returned}, expected {desc.digest}")
            return
        text = describe_response(resp)
        if "DIGEST_INVALID" in text or "SIZE_INVALID" in text:
            raise IntegrityError(f"{self.describe()}: registry rejected blob {desc.digest}: {text}")
        raise TransferError(f"{self.describe()}: committing blob {desc.digest} answered {text}")


__all__ = ["LayerLimit", "RemoteRepository", "UploadPolicy"]
