"""``imgpack conformance --registry HOST/REPO``: probe the registry features imgpack relies on.

Every probe uses fresh random blobs and run-specific tags, so a result never rests on content an earlier run
left behind; at the end the probe deletes what it pushed where the registry allows DELETE.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import quote, urljoin

import requests

from imgpack.conformance.catalog import REGISTRY_CHECKS
from imgpack.conformance.report import PASS, Report
from imgpack.registry import credentials
from imgpack.registry.transport import RegistryClient, TransportOptions, describe_response
from imgpack.schemas import spec
from imgpack.schemas.errors import ImgpackError, UsageError
from imgpack.schemas.manifest import Layer, build_manifest, encode_json
from imgpack.schemas.reference import Reference
from imgpack.schemas.safetensors import encode_header

#: Layer count of the large-manifest probe: well past what a big diffusion pipeline needs (~1,000 tensors).
MANY_LAYERS = 1200
CHUNK_SIZE = 64 * 1024
PARALLEL_UPLOADS = 8


class ProbeFailed(Exception):
    """One probe step failed; the message says which request and what came back."""


@dataclass
class Blob:
    data: bytes
    name: str
    media_type: str = spec.TENSOR_MEDIA_TYPE
    dtype: str | None = "U8"
    shape: list[int] | None = None

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def layer(self) -> Layer:
        from imgpack.schemas.manifest import title_for

        return Layer(self.media_type, self.digest, len(self.data), self.name, self.dtype, self.shape,
                     {spec.TITLE_ANNOTATION: title_for(self.name, self.media_type)})


def tensor_blob(name: str, nbytes: int) -> Blob:
    """A genuine tensor blob (U8 vector) of random content, so no earlier run can have stored it."""
    return Blob(encode_header("U8", [nbytes]) + os.urandom(nbytes), name, shape=[nbytes])


@dataclass
class RegistryProbe:
    client: RegistryClient
    repository: str
    report: Report
    keep: bool = False
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    pushed_manifests: list[tuple[str, str]] = field(default_factory=list)  # (repository, digest)
    pushed_blobs: list[tuple[str, str]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)

    def scope(self, repository: str | None = None, actions: str = "pull,push") -> tuple[str, ...]:
        return (f"repository:{repository or self.repository}:{actions}",)

    def request(self, method: str, path: str, repository: str | None = None, **kw) -> requests.Response:
        kw.setdefault("scope", self.scope(repository))
        return self.client.request(method, path, **kw)

    @property
    def mount_repository(self) -> str:
        return f"{self.repository}-mount"

    # -- blobs ----------------------------------------------------------------------------------------

    def _start(self, repository: str) -> str:
        resp = self.request("POST", f"/v2/{repository}/blobs/uploads/", repository)
        resp.close()
        if resp.status_code != 202 or not resp.headers.get("Location"):
            raise ProbeFailed(f"POST /v2/{repository}/blobs/uploads/ answered {describe_response(resp)}")
        return urljoin(self.client.base_url + "/", resp.headers["Location"])

    @staticmethod
    def _with_digest(location: str, digest: str) -> str:
        return location + ("&" if "?" in location else "?") + "digest=" + quote(digest, safe=":")

    def upload_monolithic(self, blob: Blob, repository: str | None = None) -> str:
        """POST+PUT (the flow every registry supports); returns how the blob was committed."""
        repository = repository or self.repository
        location = self._start(repository)
        resp = self.request("PUT", self._with_digest(location, blob.digest), repository,
                            headers={"Content-Type": "application/octet-stream"}, body=blob.data)
        resp.close()
        if resp.status_code != 201:
            raise ProbeFailed(f"PUT upload of {len(blob.data)} bytes answered {describe_response(resp)}")
        self.pushed_blobs.append((repository, blob.digest))
        return "POST then PUT"

    def upload_single_post(self, blob: Blob) -> bool:
        """The one-request POST ?digest= upload; registries may answer 202 and open a session instead."""
        path = f"/v2/{self.repository}/blobs/uploads/?digest={quote(blob.digest, safe=':')}"
        resp = self.request("POST", path, headers={"Content-Type": "application/octet-stream"}, body=blob.data)
        resp.close()
        if resp.status_code == 201:
            self.pushed_blobs.append((self.repository, blob.digest))
            return True
        if resp.status_code == 202 and resp.headers.get("Location"):
            self.request("DELETE", urljoin(self.client.base_url + "/", resp.headers["Location"])).close()
        return False

    def upload_chunked(self, blob: Blob) -> int:
        location = self._start(self.repository)
        offset = chunks = 0
        while offset < len(blob.data):
            part = blob.data[offset : offset + CHUNK_SIZE]
            resp = self.request("PATCH", location, headers={
                "Content-Type": "application/octet-stream", "Content-Length": str(len(part)),
                "Content-Range": f"{offset}-{offset + len(part) - 1}"}, body=part)
            resp.close()
            if resp.status_code != 202 or not resp.headers.get("Location"):
                raise ProbeFailed(f"PATCH of bytes {offset}-{offset + len(part) - 1} answered"
                                  f" {describe_response(resp)}")
            location = urljoin(self.client.base_url + "/", resp.headers["Location"])
            offset += len(part)
            chunks += 1
        resp = self.request("PUT", self._with_digest(location, blob.digest))
        resp.close()
        if resp.status_code != 201:
            raise ProbeFailed(f"closing PUT after {chunks} chunks answered {describe_response(resp)}")
        self.pushed_blobs.append((self.repository, blob.digest))
        return chunks

    def verify_blob(self, blob: Blob, repository: str | None = None) -> None:
        repository = repository or self.repository
        resp = self.request("GET", f"/v2/{repository}/blobs/{blob.digest}", repository,
                            headers={"Accept-Encoding": "identity"})
        if resp.status_code != 200 or resp.content != blob.data:
            raise ProbeFailed(f"GET of the uploaded blob {blob.digest} answered {describe_response(resp)}"
                              f" with {len(resp.content)} bytes, expected {len(blob.data)} identical bytes")

    # -- manifests ------------------------------------------------------------------------------------

    def put_manifest(self, reference: str, raw: bytes, media_type: str, repository: str | None = None) -> str:
        repository = repository or self.repository
        resp = self.request("PUT", f"/v2/{repository}/manifests/{reference}", repository,
                            headers={"Content-Type": media_type}, body=raw)
        resp.close()
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if resp.status_code not in (200, 201):
            raise ProbeFailed(f"PUT manifest {reference} ({len(raw)} bytes, {media_type}) answered"
                              f" {describe_response(resp)}")
        returned = resp.headers.get("Docker-Content-Digest")
        if returned and returned != digest:
            raise ProbeFailed(f"PUT manifest {reference}: registry says {returned}, the bytes hash to {digest}")
        self.pushed_manifests.append((repository, digest))
        if not reference.startswith("sha256:"):
            self.tags.append(reference)
        return digest

    def get_manifest(self, reference: str, accept: list[str]) -> requests.Response:
        return self.request("GET", f"/v2/{self.repository}/manifests/{reference}",
                            headers={"Accept": ", ".join(accept)}, scope=self.scope(actions="pull"))

    def round_trip(self, tag: str, raw: bytes, media_type: str) -> str:
        digest = self.put_manifest(tag, raw, media_type)
        for accept in ([media_type], spec.MANIFEST_ACCEPT):
            resp = self.get_manifest(tag, accept)
            got_type = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
            if resp.status_code != 200:
                raise ProbeFailed(f"GET {tag} with Accept {', '.join(accept)} answered {describe_response(resp)}")
            if resp.content != raw:
                raise ProbeFailed(f"GET {tag} returned {len(resp.content)} bytes that differ from the"
                                  f" {len(raw)} pushed")
            if got_type != media_type:
                raise ProbeFailed(f"GET {tag} answered Content-Type {got_type!r}, expected {media_type}")
            if resp.headers.get("Docker-Content-Digest", digest) != digest:
                raise ProbeFailed(f"GET {tag}: Docker-Content-Digest {resp.headers['Docker-Content-Digest']}"
                                  f" is not {digest}")
        return digest

    # -- the probes -----------------------------------------------------------------------------------

    def step(self, check: str, fn: Callable[[], str], *, warn: bool = False) -> bool:
        try:
            message = fn()
        except (ProbeFailed, ImgpackError, requests.RequestException) as e:
            self.report.fail(check, self.repository, str(e), warn=warn)
            return False
        self.report.add(check, PASS, self.repository, message)
        return True

    def run(self) -> Report:
        r = self.report
        if not self.step("REG-001", self.api_base):
            for check in REGISTRY_CHECKS[1:]:
                r.skip(check, "the registry API is not reachable")
            return r
        config = Blob(encode_json({"probe": self.token}), "config", spec.CONFIG_MEDIA_TYPE, None, None)
        small = tensor_blob("probe/small", 4096)
        chunked = tensor_blob("probe/chunked", 3 * CHUNK_SIZE + 123)
        mono_ok = self.step("REG-002", lambda: self.probe_monolithic(config, small))
        chunk_ok = self.step("REG-003", lambda: self.probe_chunked(chunked))
        if not mono_ok:
            for check in REGISTRY_CHECKS[3:]:
                r.skip(check, "needs blob upload (REG-002)")
            return r
        self.step("REG-004", lambda: self.probe_mount(small))
        self.step("REG-005", lambda: self.probe_range(chunked if chunk_ok else small))
        layers = [small, chunked] if chunk_ok else [small]
        oci_raw = build_manifest(config.layer(), [b.layer() for b in layers], "oci")
        manifest_ok = self.step("REG-006", lambda: self.probe_accept(config, layers, oci_raw))
        self.step("REG-007", lambda: self.probe_many_layers(config))
        self.step("REG-008", lambda: self.probe_big_manifest(config))
        self.step("REG-009", self.probe_tags)
        if manifest_ok:
            self.step("REG-010", lambda: self.probe_referrers(config, layers, oci_raw))
        else:
            r.skip("REG-010", "needs a pushed manifest (REG-006)")
        if self.keep:
            r.skip("REG-011", f"--keep: probe data left in {self.repository} (tags {', '.join(self.tags)})")
        else:
            self.step("REG-011", self.cleanup)
        return r

    def api_base(self) -> str:
        resp = self.client.request("GET", "/v2/")
        resp.close()
        if resp.status_code != 200:
            raise ProbeFailed(f"GET /v2/ answered {describe_response(resp)}")
        version = resp.headers.get("Docker-Distribution-API-Version", "not sent")
        return f"GET /v2/ answered 200 (Docker-Distribution-API-Version: {version})"

    def probe_monolithic(self, config: Blob, small: Blob) -> str:
        single = self.upload_single_post(small)
        if not single:
            self.upload_monolithic(small)
        self.verify_blob(small)
        self.upload_monolithic(config)
        self.verify_blob(config)
        how = "single POST ?digest= accepted" if single else "single POST ?digest= not supported; POST+PUT works"
        return f"{how}; content served back byte-exact"

    def probe_chunked(self, blob: Blob) -> str:
        chunks = self.upload_chunked(blob)
        self.verify_blob(blob)
        return f"{len(blob.data)} bytes in {chunks} PATCH chunks of {CHUNK_SIZE} bytes, served back byte-exact"

    def probe_mount(self, blob: Blob) -> str:
        target = self.mount_repository
        path = f"/v2/{target}/blobs/uploads/?mount={quote(blob.digest, safe=':')}&from={quote(self.repository)}"
        scope = (*self.scope(target), f"repository:{self.repository}:pull")
        resp = self.client.request("POST", path, scope=scope)
        resp.close()
        if resp.status_code == 201:
            self.pushed_blobs.append((target, blob.digest))
            self.verify_blob(blob, target)
            return f"blob mounted from {self.repository} into {target} (201)"
        if resp.status_code == 202 and resp.headers.get("Location"):
            self.request("DELETE", urljoin(self.client.base_url + "/", resp.headers["Location"]), target).close()
            raise ProbeFailed("mount refused (202 with an upload session): imgpack re-uploads instead of mounting")
        raise ProbeFailed(f"POST ?mount= answered {describe_response(resp)}")

    def probe_range(self, blob: Blob) -> str:
        start, end = 100, min(len(blob.data), 5000) - 1
        resp = self.request("GET", f"/v2/{self.repository}/blobs/{blob.digest}",
                            headers={"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"})
        if resp.status_code != 206:
            raise ProbeFailed(f"GET with Range bytes={start}-{end} answered {describe_response(resp)}, not 206:"
                              " interrupted pulls restart from zero")
        if resp.content != blob.data[start : end + 1]:
            raise ProbeFailed(f"206 reply carried {len(resp.content)} bytes that are not bytes {start}-{end}")
        return f"206 with bytes {start}-{end} ({resp.headers.get('Content-Range', 'no Content-Range')})"

    def probe_accept(self, config: Blob, layers: list[Blob], oci_raw: bytes) -> str:
        self.round_trip(f"imgpack-conformance-{self.token}-oci", oci_raw, spec.OCI_MANIFEST)
        ollama_config = Blob(config.data, "config", spec.OLLAMA_CONFIG_MEDIA_TYPE, None, None)
        ollama_raw = build_manifest(ollama_config.layer(), [b.layer() for b in layers], "ollama")
        self.round_trip(f"imgpack-conformance-{self.token}-ollama", ollama_raw, spec.DOCKER_MANIFEST)
        resp = self.get_manifest(f"imgpack-conformance-{self.token}-oci", [spec.DOCKER_MANIFEST])
        note = (f"an OCI manifest asked for as docker v2 only answers {resp.status_code}"
                f" {(resp.headers.get('Content-Type') or '').split(';')[0]}").rstrip()
        return f"OCI and docker v2 manifests round-trip byte-exact with their Content-Type; {note}"

    def _upload_many(self, blobs: list[Blob]) -> None:
        with ThreadPoolExecutor(max_workers=PARALLEL_UPLOADS) as pool:
            list(pool.map(self.upload_monolithic, blobs))

    def _many_layer_manifest(self, config: Blob, extra_annotation: int = 0) -> bytes:
        blobs = getattr(self, "_many", None)
        if blobs is None:
            blobs = [tensor_blob(f"probe/layers.{i:04d}.weight", 16) for i in range(MANY_LAYERS)]
            self._upload_many(blobs)
            self._many = blobs
        annotations = {"org.imgpack.conformance.padding": "x" * extra_annotation} if extra_annotation else None
        return build_manifest(config.layer(), [b.layer() for b in blobs], "oci", annotations)

    def probe_many_layers(self, config: Blob) -> str:
        raw = self._many_layer_manifest(config)
        self.round_trip(f"imgpack-conformance-{self.token}-layers", raw, spec.OCI_MANIFEST)
        return f"{MANY_LAYERS}-layer manifest ({len(raw)} bytes) accepted and served byte-exact"

    def probe_big_manifest(self, config: Blob) -> str:
        base = self._many_layer_manifest(config, 1)
        padding = spec.MAX_MANIFEST_BYTES - len(base) + 1
        raw = self._many_layer_manifest(config, padding)
        if len(raw) != spec.MAX_MANIFEST_BYTES:
            raise ProbeFailed(f"internal: built a {len(raw)}-byte manifest, wanted {spec.MAX_MANIFEST_BYTES}")
        self.round_trip(f"imgpack-conformance-{self.token}-4mib", raw, spec.OCI_MANIFEST)
        return f"{len(raw)}-byte manifest accepted and served byte-exact"

    def probe_tags(self) -> str:
        resp = self.request("GET", f"/v2/{self.repository}/tags/list", scope=self.scope(actions="pull"))
        if resp.status_code != 200:
            raise ProbeFailed(f"GET tags/list answered {describe_response(resp)}")
        try:
            listed = set(resp.json().get("tags") or [])
        except (ValueError, AttributeError):
            raise ProbeFailed("tags/list did not answer a JSON object with a 'tags' list") from None
        missing = sorted(set(self.tags) - listed)
        if missing:
            raise ProbeFailed(f"tags/list lacks the pushed tags {', '.join(missing)}")
        page = self.request("GET", f"/v2/{self.repository}/tags/list?n=1", scope=self.scope(actions="pull"))
        page.close()
        paged = "Link header for the next page" if page.headers.get("Link") else "no Link header on n=1"
        return f"all {len(self.tags)} pushed tags listed; pagination: {paged}"

    def probe_referrers(self, config: Blob, layers: list[Blob], oci_raw: bytes) -> str:
        subject = {"mediaType": spec.OCI_MANIFEST, "digest": "sha256:" + hashlib.sha256(oci_raw).hexdigest(),
                   "size": len(oci_raw)}
        role = {"org.imgpack.conformance.role": "referrer"}
        referrer = json.loads(build_manifest(config.layer(), [layers[0].layer()], "oci", role))
        referrer["subject"] = subject
        raw = encode_json(referrer)
        note = ""
        try:
            referrer_digest = self.put_manifest("sha256:" + hashlib.sha256(raw).hexdigest(), raw, spec.OCI_MANIFEST)
        except ProbeFailed as e:
            referrer_digest, note = None, f" (pushing a manifest with a subject failed: {e})"
        resp = self.request("GET", f"/v2/{self.repository}/referrers/{subject['digest']}",
                            scope=self.scope(actions="pull"), headers={"Accept": spec.OCI_INDEX})
        if resp.status_code != 200:
            raise ProbeFailed(f"GET referrers answered {describe_response(resp)}: no referrers API{note};"
                              " clients must use the referrers tag schema")
        try:
            listed = [m.get("digest") for m in resp.json().get("manifests", [])]
        except (ValueError, AttributeError):
            raise ProbeFailed("referrers answered 200 but not an image index") from None
        if referrer_digest and referrer_digest not in listed:
            raise ProbeFailed(f"referrers index does not list the pushed referrer {referrer_digest}")
        return f"referrers API answers an index ({len(listed)} referrer(s)){note}"

    def cleanup(self) -> str:
        refused: list[str] = []
        deleted = 0
        for repository, digest in reversed(self.pushed_manifests):
            resp = self.request("DELETE", f"/v2/{repository}/manifests/{digest}", repository)
            resp.close()
            if resp.status_code in (200, 202, 404):
                deleted += resp.status_code != 404
            else:
                refused.append(f"manifest {digest[:19]}: {resp.status_code}")
        def delete_blob(item: tuple[str, str]) -> int | None:
            repository, digest = item
            resp = self.request("DELETE", f"/v2/{repository}/blobs/{digest}", repository)
            resp.close()
            if resp.status_code in (200, 202, 404):
                return int(resp.status_code != 404)
            refused.append(f"blob {digest[:19]}: {resp.status_code}")
            return None

        with ThreadPoolExecutor(max_workers=PARALLEL_UPLOADS) as pool:
            deleted += sum(n or 0 for n in pool.map(delete_blob, dict.fromkeys(self.pushed_blobs)))
        if refused:
            raise ProbeFailed(f"DELETE refused for {len(refused)} item(s) ({'; '.join(refused[:3])}); probe data"
                              f" left in {self.repository}")
        return f"deleted {deleted} manifests and blobs"


def probe_registry(target: str, *, insecure: bool = False, keep: bool = False) -> Report:
    """Probe HOST/REPO; the repository is written to (run-specific tags) and cleaned up afterwards."""
    ref = Reference.parse(target, default_tag=None)
    if not ref.registry or ref.tag or ref.digest:
        raise UsageError(f"--registry takes HOST/REPO (no tag or digest), got {target!r}")
    client = RegistryClient(ref.registry, credentials.lookup(ref.registry), TransportOptions(insecure=insecure))
    report = Report(target=f"{ref.registry}/{ref.repository}", kind="registry")
    report.info["scheme"] = client.scheme
    try:
        RegistryProbe(client, ref.repository, report, keep=keep).run()
    finally:
        client.close()
    for check in REGISTRY_CHECKS:
        report.start(check)
    return report
