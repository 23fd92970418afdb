"""Proxies and TLS as a user's network has them: HTTP and CONNECT proxies, a private CA, mutual TLS.

Real servers only: docker-registry serving HTTPS with certificates a private CA signed (made here with
``cryptography``), a forward proxy that forwards plain HTTP and tunnels CONNECT. The registry is reached under
this machine's host name, which resolves to loopback but is not a loopback *name*, so imgpack uses HTTPS.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_registry import (
    PASSWORD,
    USER,
    FaultProxy,
    ForwardProxy,
    RegistryServer,
    ServerTls,
    basic_header,
    make_pki,
    needs_registry,
    needs_tls_hostname,
    start_registry,
    tls_hostname,
)

from imgpack.store.store import Store

pytestmark = [needs_registry, needs_tls_hostname, pytest.mark.usefixtures("isolated_credentials", "no_network_env")]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ServerTls:
    return make_pki(tmp_path_factory.mktemp("pki"), tls_hostname() or "localhost")


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory, pki: ServerTls) -> Iterator[RegistryServer]:
    server = start_registry(tmp_path_factory.mktemp("registry-tls"), tls=pki)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_registry(tmp_path_factory: pytest.TempPathFactory, pki: ServerTls) -> Iterator[RegistryServer]:
    server = start_registry(tmp_path_factory.mktemp("registry-mtls"), tls=dataclasses.replace(pki, client_ca=pki.ca))
    yield server
    server.stop()


@pytest.fixture
def model(store, make_model) -> str:
    make_model(store, "tls:1", {"transformer": 51, "vae": 52}, tensors=3)
    return "tls:1"


def pull_matches(cli, store, ref: str, remote: str, into: Path, *extra: str) -> None:
    r = cli("pull", remote, *extra, store=into)
    assert r.code == 0, r.err
    assert Store.open(into).get_manifest(remote).raw == store.get_manifest(ref).raw


def certs_dir(root: Path, host: str, *files: Path) -> Path:
    """A docker-style certs.d with ``files`` under ``<host>/``."""
    (root / host).mkdir(parents=True)
    for f in files:
        (root / host / f.name).write_bytes(f.read_bytes())
    return root


def test_untrusted_ca_fails_fast_naming_host_and_remedy(cli, model, tls_registry, tmp_path):
    started = time.monotonic()
    r = cli("push", model, f"{tls_registry.host}/tls:1")
    assert r.code == 5
    assert tls_registry.host in r.err
    for remedy in ("--ca-file", "SSL_CERT_FILE", f"certs.d/{tls_registry.host}/ca.crt"):
        assert remedy in r.err, r.err
    assert "Traceback" not in r.err and "attempt" not in r.err  # not retried as if the network were down
    assert time.monotonic() - started < 10
    r = cli("pull", f"{tls_registry.host}/tls:1", store=tmp_path / "other")
    assert r.code == 5 and tls_registry.host in r.err and "--ca-file" in r.err
    assert not (tmp_path / "other" / "index.json").exists() or Store.open(tmp_path / "other").entries() == []


def test_ca_file_flag_and_environment(cli, store, model, tls_registry, pki, tmp_path, monkeypatch):
    remote = f"{tls_registry.host}/tls:1"
    r = cli("push", model, remote, "--ca-file", str(pki.ca))
    assert r.code == 0, r.err
    pull_matches(cli, store, model, remote, tmp_path / "a", "--ca-file", str(pki.ca))
    r = cli("show", remote, "--ca-file", str(pki.ca), store=tmp_path / "empty")
    assert r.code == 0, r.err
    r = cli("conformance", remote, "--ca-file", str(pki.ca), store=tmp_path / "empty")
    assert r.code == 0, r.out + r.err
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        with monkeypatch.context() as m:
            m.setenv(name, str(pki.ca))
            pull_matches(cli, store, model, remote, tmp_path / name)
    r = cli("pull", remote, "--ca-file", str(tmp_path / "nope.pem"), store=tmp_path / "b")
    assert r.code == 1 and "nope.pem" in r.err


def test_certs_d_directory_adds_to_the_system_trust(cli, store, model, tls_registry, pki, tmp_path, monkeypatch):
    remote = f"{tls_registry.host}/tls-certsd:1"
    monkeypatch.setenv("IMGPACK_DOCKER_CERTS_DIR", str(certs_dir(tmp_path / "certs.d", tls_registry.host, pki.ca)))
    r = cli("push", model, remote)
    assert r.code == 0, r.err
    pull_matches(cli, store, model, remote, tmp_path / "a")
    # A machine-wide bundle (as most CI images set SSL_CERT_FILE) does not hide the per-registry CA.
    system = Path("/etc/ssl/certs/ca-certificates.crt")
    if system.is_file():
        monkeypatch.setenv("SSL_CERT_FILE", str(system))
        pull_matches(cli, store, model, remote, tmp_path / "b")


def test_mutual_tls_with_client_certificate(cli, store, model, mtls_registry, pki, tmp_path, monkeypatch):
    remote = f"{mtls_registry.host}/mtls:1"
    only_ca = certs_dir(tmp_path / "ca-only", mtls_registry.host, pki.ca)
    monkeypatch.setenv("IMGPACK_DOCKER_CERTS_DIR", str(only_ca))
    r = cli("push", model, remote)
    assert r.code == 5 and mtls_registry.host in r.err
    assert "client.cert" in r.err, r.err  # says what the registry wants
    full = certs_dir(tmp_path / "with-client", mtls_registry.host, pki.ca, pki.client_cert, pki.client_key)
    monkeypatch.setenv("IMGPACK_DOCKER_CERTS_DIR", str(full))
    r = cli("push", model, remote)
    assert r.code == 0, r.err
    pull_matches(cli, store, model, remote, tmp_path / "a")


def test_https_proxy_connect_and_no_proxy(cli, store, model, tls_registry, pki, forward_proxy: ForwardProxy,
                                          tmp_path, monkeypatch):
    remote = f"{tls_registry.host}/proxied:1"
    monkeypatch.setenv("HTTPS_PROXY", forward_proxy.url)
    r = cli("push", model, remote, "--ca-file", str(pki.ca))
    assert r.code == 0, r.err
    assert forward_proxy.connects() and set(forward_proxy.connects()) == {tls_registry.host}
    assert not forward_proxy.forwarded()  # TLS stayed end to end: nothing in clear through the proxy
    pull_matches(cli, store, model, remote, tmp_path / "a", "--ca-file", str(pki.ca))

    seen = len(forward_proxy.log)
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("https_proxy", forward_proxy.url)  # lower case too
    monkeypatch.setenv("no_proxy", f"example.org,{tls_registry.hostname}")
    pull_matches(cli, store, model, remote, tmp_path / "b", "--ca-file", str(pki.ca))
    assert len(forward_proxy.log) == seen


def test_http_proxy_forwards_plain_http_and_no_proxy_bypasses(cli, store, model, open_registry,
                                                              forward_proxy: ForwardProxy, tmp_path, monkeypatch):
    remote = f"{open_registry.host}/via-proxy:1"
    monkeypatch.setenv("http_proxy", forward_proxy.url)
    r = cli("push", model, remote)
    assert r.code == 0, r.err
    urls = [p.target for p in forward_proxy.forwarded()]
    assert urls and all(u.startswith(f"http://{open_registry.host}/v2/") for u in urls)
    assert any("/blobs/uploads/" in u for u in urls)
    pull_matches(cli, store, model, remote, tmp_path / "a")

    seen = len(forward_proxy.log)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    pull_matches(cli, store, model, remote, tmp_path / "b")
    assert len(forward_proxy.log) == seen


def test_off_host_redirect_through_proxy_drops_authorization(cli, store, model, htpasswd_registry,
                                                             forward_proxy: ForwardProxy, tmp_path, monkeypatch):
    """Blob storage on another host (S3-style 307) gets no registry credentials, even when a proxy carries
    both requests and could be blamed for adding nothing."""
    front = FaultProxy(htpasswd_registry, upstream_auth=basic_header())
    try:
        monkeypatch.setenv("IMGPACK_REGISTRY_USER", USER)
        monkeypatch.setenv("IMGPACK_REGISTRY_PASSWORD", PASSWORD)
        remote = f"{front.host}/redirected:1"
        assert cli("push", model, remote).code == 0
        front.add("GET", r"/blobs/sha256:", "redirect", times=100)
        monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
        pull_matches(cli, store, model, remote, tmp_path / "a")
        to_registry = [p for p in forward_proxy.forwarded() if p.target.startswith(f"http://{front.host}/v2/")]
        to_storage = [p for p in forward_proxy.forwarded() if "/_blobstore/" in p.target]
        assert to_storage and all(p.target.startswith(f"http://localhost:{front.port}/") for p in to_storage)
        assert any("Authorization" in p.headers for p in to_registry)
        assert not [p for p in to_storage if "Authorization" in p.headers]
    finally:
        front.stop()
