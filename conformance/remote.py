"""An artifact on a registry, read through the registry engineer's client (auth, retries, redirects)."""

from __future__ import annotations

from collections.abc import Iterator

from imgpack.conformance.sources import LayoutProblem, Source
from imgpack.registry.endpoints import Clients
from imgpack.registry.remote import RemoteRepository
from imgpack.registry.transport import TransportOptions, describe_response
from imgpack.schemas.errors import ImgpackError, TransferError
from imgpack.schemas.reference import Reference

READ_CHUNK = 1 << 20


class RemoteSource(Source):
    """A manifest and its blobs on a registry; blobs are streamed, never written to disk."""

    def __init__(self, label: str, clients: Clients, repo: RemoteRepository, raw: bytes,
                 descriptor: dict) -> None:
        super().__init__(label=label, descriptor=descriptor, kind="remote")
        self.clients = clients
        self.repo = repo
        self._raw = raw
        self._sizes: dict[str, int | None] = {}

    @classmethod
    def open(cls, ref: Reference, *, insecure: bool = False) -> RemoteSource:
        assert ref.registry is not None
        clients = Clients(options=TransportOptions(insecure=insecure))
        repo = clients.repository(ref.registry, ref.repository, push=False)
        reference = ref.digest or ref.tag or "latest"
        try:
            info = repo.fetch_manifest(reference)
        except ImgpackError as e:
            clients.close()
            raise LayoutProblem(str(e)) from None
        descriptor = {"mediaType": info.media_type, "digest": info.digest, "size": len(info.raw)}
        if ref.digest:
            descriptor["digest"] = ref.digest
        return cls(str(ref), clients, repo, info.raw, descriptor)

    def manifest_bytes(self) -> bytes:
        return self._raw

    def _blob_path(self, digest: str) -> str:
        return f"/v2/{self.repo.repository}/blobs/{digest}"

    def blob_size(self, digest: str) -> int | None:
        if digest not in self._sizes:
            resp = self.repo.client.request("HEAD", self._blob_path(digest), scope=self.repo.scope)
            resp.close()
            if resp.status_code == 404:
                self._sizes[digest] = None
            elif resp.status_code != 200:
                raise TransferError(f"{self.label}: HEAD blob {digest} answered {describe_response(resp)}")
            else:
                length = resp.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    self._sizes[digest] = sum(len(c) for c in self.iter_blob(digest))
                else:
                    self._sizes[digest] = int(length)
        return self._sizes[digest]

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        headers = {"Range": f"bytes={offset}-{offset + length - 1}", "Accept-Encoding": "identity"}
        resp = self.repo.client.request("GET", self._blob_path(digest), scope=self.repo.scope, headers=headers,
                                        stream=True)
        try:
            if resp.status_code == 206:
                data = b"".join(resp.iter_content(READ_CHUNK))
                return data[:length]
            if resp.status_code != 200:
                raise TransferError(f"{self.label}: GET blob {digest} answered {describe_response(resp)}")
            out = bytearray()
            for chunk in resp.iter_content(READ_CHUNK):  # no Range support: read up to what we need
                out += chunk
                if len(out) >= offset + length:
                    break
            return bytes(out[offset : offset + length])
        finally:
            resp.close()

    def iter_blob(self, digest: str) -> Iterator[bytes]:
        resp = self.repo.client.request("GET", self._blob_path(digest), scope=self.repo.scope,
                                        headers={"Accept-Encoding": "identity"}, stream=True)
        try:
            if resp.status_code != 200:
                raise TransferError(f"{self.label}: GET blob {digest} answered {describe_response(resp)}")
            yield from resp.raw.stream(READ_CHUNK, decode_content=False)
        finally:
            resp.close()

    def close(self) -> None:
        self.clients.close()
