"""A repository on an OCI distribution (v1.1) registry, as a copy :class:`~imgpack.registry.target.Target`.

Manifests: HEAD/GET with the full ``Accept`` list (distribution answers 404 or MANIFEST_INVALID to
a type it was not asked for), PUT of the exact local bytes with the matching ``Content-Type``,
and the ``Docker-Content-Digest`` reply checked against the local digest.

Blobs: HEAD before upload; cross-repository mount when another repository of the same registry
is known to hold the blob (a 202 reply means the mount was refused and gives an upload session);
a monolithic POST+PUT for blobs up to ``UploadPolicy.monolithic_max``, chunked PATCH above it.
The policy adapts per registry: a 413 on a single PUT lowers the monolithic limit (ECR, Quay,
Harbor), a 413 on PATCH halves the chunk size (GHCR), a refused PATCH (GAR) turns chunking off.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, urljoin

import requests

from imgpack.registry.target import ChunkReader, ManifestInfo, ProgressFn
from imgpack.registry.transport import (
    Cancelled,
    RegistryClient,
    describe_response,
    iter_bounded,
    json_or_error,
    raise_for_exhausted,
    safe_url,
)
from imgpack.schemas import spec
from imgpack.schemas.digest import is_digest, sha256_bytes
from imgpack.schemas.errors import AuthError, ImgpackError, IntegrityError, NotFoundError, TransferError
from imgpack.schemas.manifest import Layer

READ_CHUNK = 1 << 20
MAX_TAG_PAGES = 100


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


class RemoteBlobSource:
    """A blob read from a registry with ``Range`` support, following redirects to storage."""

    def __init__(self, repo: RemoteRepository, digest: str, size: int) -> None:
        self.repo = repo
        self.digest = digest
        self.size = size

    @contextlib.contextmanager
    def open(self, offset: int = 0) -> Iterator[tuple[int, Iterator[bytes]]]:
        repo = self.repo
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with repo.client.stream_slots:
            resp = repo.client.request(
                "GET", f"/v2/{repo.repository}/blobs/{self.digest}", scope=repo.scope, headers=headers, stream=True
            )
            try:
                if resp.status_code == 404:
                    raise NotFoundError(f"{repo.describe()}: blob {self.digest} not found")
                start = 0
                if resp.status_code == 206 and offset:
                    match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
                    start = int(match.group(1)) if match else -1
                    if start != offset:
                        raise TransferError(f"{repo.describe()}: blob {self.digest}: bad Content-Range reply")
                elif resp.status_code != 200:
                    raise_for_exhausted(resp, f"{repo.describe()}: GET blob {self.digest}")
                    raise TransferError(f"{repo.describe()}: GET blob {self.digest} answered {describe_response(resp)}")
                cancel = repo.client.options.cancel

                def chunks() -> Iterator[bytes]:
                    for chunk in resp.raw.stream(READ_CHUNK, decode_content=False):
                        if cancel.is_set():
                            raise Cancelled("interrupted")
                        yield chunk

                yield start, chunks()
            finally:
                resp.close()


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

    def resolve(self, reference: str) -> str | None:
        resp = self.client.request(
            "HEAD",
            self._manifest_path(reference),
            scope=self.scope,
            headers={"Accept": ", ".join(spec.MANIFEST_ACCEPT)},
        )
        resp.close()
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise TransferError(f"{self.describe(reference)}: HEAD manifest answered {describe_response(resp)}")
        digest = resp.headers.get("Docker-Content-Digest")
        if digest and is_digest(digest):
            return digest
        return self.fetch_manifest(reference).digest

    def fetch_manifest(self, reference: str) -> ManifestInfo:
        resp = self.client.request(
            "GET",
            self._manifest_path(reference),
            scope=self.scope,
            headers={"Accept": ", ".join(spec.MANIFEST_ACCEPT)},
            stream=True,
        )
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
        return ManifestInfo(raw=raw, media_type=media_type, digest=digest)

    def push_manifest(self, reference: str | None, manifest: ManifestInfo) -> None:
        target = reference or manifest.digest
        resp = self.client.request(
            "PUT",
            self._manifest_path(target),
            scope=self.scope,
            headers={"Content-Type": manifest.media_type},
            body=manifest.raw,
        )
        resp.close()
        if resp.status_code not in (200, 201):
            raise TransferError(f"{self.describe(target)}: PUT manifest answered {describe_response(resp)}")
        returned = resp.headers.get("Docker-Content-Digest")
        if returned and returned != manifest.digest:
            raise IntegrityError(
                f"{self.describe(target)}: registry stored the manifest as {returned}, expected {manifest.digest}"
            )

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

    # -- blobs ------------------------------------------------------------------------------------------

    def has_blob(self, layer: Layer) -> bool:
        resp = self.client.request("HEAD", f"/v2/{self.repository}/blobs/{layer.digest}", scope=self.scope)
        resp.close()
        if resp.status_code == 200:
            length = resp.headers.get("Content-Length")
            return length is None or int(length) == layer.size
        if resp.status_code == 404:
            return False
        raise_for_exhausted(resp, f"{self.describe()}: HEAD blob {layer.digest}")
        raise TransferError(f"{self.describe()}: HEAD blob {layer.digest} answered {describe_response(resp)}")

    def blob_source(self, layer: Layer) -> RemoteBlobSource:
        return RemoteBlobSource(self, layer.digest, layer.size)

    def _start_upload(self, digest: str, mount_from: list[str]) -> str | None:
        """Open an upload session (or mount); returns its URL, None when the blob was mounted."""
        for source in mount_from:
            scope = (*self.scope, f"repository:{source}:pull")
            try:
                resp = self.client.request(
                    "POST",
                    f"/v2/{self.repository}/blobs/uploads/?mount={digest}&from={quote(source, safe='/')}",
                    scope=scope,
                )
            except AuthError:
                # No pull access to the hinted source (any more): a refused mount, so upload instead.
                continue
            resp.close()
            if resp.status_code == 201:
                return None
            if resp.status_code == 202 and resp.headers.get("Location"):
                # Mount refused; the registry opened an ordinary upload session instead.
                return urljoin(self.client.base_url + "/", resp.headers["Location"])
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

    def push_blob(self, layer: Layer, source, progress: ProgressFn, mount_from: list[str]) -> str:
        """Upload one blob; restarts the upload session when the policy changes."""
        for _ in range(8):
            location = self._start_upload(layer.digest, [m for m in mount_from if m != self.repository])
            if location is None:
                return "mounted"
            try:
                if self.policy.use_chunks(layer.size):
                    self._upload_chunked(location, layer, source, progress)
                else:
                    self._upload_monolithic(location, layer, source, progress)
                return "uploaded"
            except _RetryUpload:
                self._cancel_upload(location)
                continue
        raise TransferError(f"{self.describe()}: could not find an upload method the registry accepts")

    def _cancel_upload(self, location: str) -> None:
        with contextlib.suppress(ImgpackError, requests.RequestException):
            self.client.request("DELETE", location, scope=self.scope, retry=False).close()

    def _send_body(
        self, method: str, url: str, headers: dict[str, str], source, offset: int, length: int, progress: ProgressFn
    ) -> requests.Response:
        """Stream ``length`` bytes of ``source`` from ``offset``; rolls progress back on failure."""
        with self.client.stream_slots, source.open(offset) as (start, chunks):
            if start != offset:
                raise TransferError(f"blob {source.digest}: source could not seek to {offset}")
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

    def _upload_monolithic(self, location: str, layer: Layer, source, progress: ProgressFn) -> None:
        resp = self._send_body("PUT", self._with_digest(location, layer.digest), {}, source, 0, layer.size, progress)
        resp.close()
        if resp.status_code == 413:
            self.policy.refuse_monolithic(layer.size)
            if not self.policy.chunked:
                raise TransferError(f"{self.describe()}: blob {layer.digest} too large for this registry")
            raise _RetryUpload()
        self._check_committed(resp, layer)

    def _upload_chunked(self, location: str, layer: Layer, source, progress: ProgressFn) -> None:
        offset = 0
        chunk = self.policy.chunk_size
        while offset < layer.size:
            length = min(chunk, layer.size - offset)
            headers = {"Content-Range": f"{offset}-{offset + length - 1}"}
            resp = self._send_body("PATCH", location, headers, source, offset, length, progress)
            resp.close()
            if resp.status_code in (404, 405, 501) and offset == 0:
                self.policy.refuse_chunked()
                raise _RetryUpload()
            if resp.status_code == 413:
                self.policy.refuse_chunk(length)
                raise _RetryUpload()
            if resp.status_code != 202:
                raise TransferError(
                    f"{self.describe()}: PATCH blob {layer.digest} at {offset} answered {describe_response(resp)}"
                )
            if resp.headers.get("Location"):
                location = urljoin(self.client.base_url + "/", resp.headers["Location"])
            offset += length
        resp = self.client.request(
            "PUT",
            self._with_digest(location, layer.digest),
            scope=self.scope,
            headers={"Content-Length": "0", "Content-Type": "application/octet-stream"},
            body=b"",
            retry=False,
        )
        resp.close()
        self._check_committed(resp, layer)

    def _check_committed(self, resp: requests.Response, layer: Layer) -> None:
        if resp.status_code in (200, 201, 204):
            returned = resp.headers.get("Docker-Content-Digest")
            if returned and returned != layer.digest:
                raise IntegrityError(f"{self.describe()}: registry committed {returned}, expected {layer.digest}")
            return
        text = describe_response(resp)
        if "DIGEST_INVALID" in text or "SIZE_INVALID" in text:
            raise IntegrityError(f"{self.describe()}: registry rejected blob {layer.digest}: {text}")
        raise TransferError(f"{self.describe()}: committing blob {layer.digest} answered {text}")


__all__ = ["RemoteBlobSource", "RemoteRepository", "UploadPolicy", "safe_url"]
