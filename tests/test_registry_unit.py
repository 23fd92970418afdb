"""Registry building blocks that need no server: challenges, retry headers, credentials, policies."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from imgpack.registry import credentials
from imgpack.registry.blobsources import BlobSources
from imgpack.registry.challenge import parse_challenges
from imgpack.registry.remote import UploadPolicy
from imgpack.registry.retry import RetryPolicy
from imgpack.registry.target import ChunkReader
from imgpack.registry.transport import Authorizer, RegistryClient, TransportOptions, is_loopback, parse_retry_after
from imgpack.schemas.errors import AuthError, ImgpackError
from imgpack.schemas.locations import split_layout

pytestmark = pytest.mark.usefixtures("isolated_credentials")


def test_parse_bearer_and_basic_challenges():
    header = (
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:team/model:pull,push", Basic realm="a \\"quoted\\" realm"'
    )
    bearer, basic = parse_challenges(header)
    assert bearer.scheme == "bearer"
    assert bearer.realm == "https://auth.example/token"
    assert bearer.service == "registry.example"
    assert bearer.scope == "repository:team/model:pull,push"
    assert basic.scheme == "basic" and basic.realm == 'a "quoted" realm'
    assert [c.scheme for c in parse_challenges("Negotiate, Basic realm=x")] == ["negotiate", "basic"]
    assert parse_challenges("BEARER Realm=https://x/t")[0].params == {"realm": "https://x/t"}


@pytest.mark.parametrize("bad", ['Bearer realm="unterminated', "@@", "Bearer realm=x, @"])
def test_malformed_challenge_raises(bad):
    with pytest.raises(ValueError):
        parse_challenges(bad)


def test_retry_after_forms():
    assert parse_retry_after("3", 60) == 3.0
    assert parse_retry_after("600", 60) == 60.0
    assert parse_retry_after(None, 60) is None
    assert parse_retry_after("soon", 60) is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 5))
    assert 3.0 <= parse_retry_after(future, 60) <= 5.0


def test_loopback_detection():
    for host in ("localhost:5000", "127.0.0.1:5000", "127.3.4.5", "[::1]:5000", "::1"):
        assert is_loopback(host), host
    for host in ("registry.example.com", "10.0.0.1:5000", "192.168.1.1"):
        assert not is_loopback(host), host
    assert RegistryClient("127.0.0.1:5000").base_url == "http://127.0.0.1:5000"
    assert RegistryClient("ghcr.io").base_url == "https://ghcr.io"
    assert RegistryClient("10.0.0.1:5000", options=TransportOptions(insecure=True)).base_url == "http://10.0.0.1:5000"


def test_backoff_is_bounded_and_jittered():
    options = RetryPolicy(backoff_base=0.5, backoff_max=4.0)
    values = [options.backoff(attempt) for attempt in range(10) for _ in range(20)]
    assert all(0 <= v <= 4.0 for v in values)
    assert len(set(values)) > 100


def test_credential_repr_hides_secrets():
    cred = credentials.Credential(username="bob", password="hunter2", identity_token="idt", registry_token="rt")
    assert "hunter2" not in repr(cred) and "idt" not in str(cred) and "rt'" not in repr(cred)


def test_login_file_is_private_and_round_trips(isolated_credentials):
    path = credentials.store_login("Registry.Example.com:5000", "bob", "p:ss")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cred = credentials.lookup("registry.example.com:5000")
    assert (cred.username, cred.password) == ("bob", "p:ss")
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".credentials-")]
    assert credentials.remove_login("registry.example.com:5000") is True
    assert credentials.remove_login("registry.example.com:5000") is False
    assert credentials.lookup("registry.example.com:5000").anonymous


def test_docker_config_forms(isolated_credentials):
    docker = Path(os.environ["DOCKER_CONFIG"]) / "config.json"
    auth = base64.b64encode(b"hub-user:hub-pass").decode()
    docker.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": auth},
                    "ghcr.io": {"identitytoken": "id-123"},
                    "https://quay.io/v2/": {"username": "q", "password": "qp"},
                }
            }
        )
    )
    hub = credentials.lookup("docker.io")
    assert (hub.username, hub.password) == ("hub-user", "hub-pass")
    assert credentials.lookup("ghcr.io").identity_token == "id-123"
    assert credentials.lookup("quay.io").password == "qp"
    assert credentials.lookup("example.com").anonymous


def test_malformed_docker_config_names_the_file(isolated_credentials):
    docker = Path(os.environ["DOCKER_CONFIG"]) / "config.json"
    docker.write_text("{not json")
    with pytest.raises(ImgpackError) as err:
        credentials.lookup("example.com")
    assert str(docker) in str(err.value)
    docker.write_text(json.dumps({"auths": {"example.com": {"auth": base64.b64encode(b"no-colon").decode()}}}))
    with pytest.raises(ImgpackError) as err:
        credentials.lookup("example.com")
    assert "auths['example.com'].auth" in str(err.value)


def test_missing_credential_helper_is_an_auth_error(isolated_credentials):
    docker = Path(os.environ["DOCKER_CONFIG"]) / "config.json"
    docker.write_text(json.dumps({"credHelpers": {"example.com": "definitely-not-installed"}}))
    with pytest.raises(AuthError) as err:
        credentials.lookup("example.com")
    assert "docker-credential-definitely-not-installed" in str(err.value)


def test_environment_token_takes_precedence(monkeypatch):
    monkeypatch.setenv("IMGPACK_REGISTRY_USER", "ci")
    monkeypatch.setenv("IMGPACK_REGISTRY_PASSWORD", "pw")
    assert credentials.lookup("any.example").username == "ci"
    monkeypatch.setenv("IMGPACK_REGISTRY_TOKEN", "tok")
    assert credentials.lookup("any.example").registry_token == "tok"


def test_basic_challenge_without_credentials_says_how_to_log_in():
    auth = Authorizer(RegistryClient("registry.example.com"), credentials.ANONYMOUS)
    with pytest.raises(AuthError) as err:
        auth.handle_challenge('Basic realm="x"', (), None)
    assert "imgpack login registry.example.com" in str(err.value)


def test_bearer_realm_over_plain_http_is_refused_for_remote_hosts():
    cred = credentials.Credential(username="u", password="secret", source="test")
    auth = Authorizer(RegistryClient("registry.example.com"), cred)
    auth.handle_challenge('Bearer realm="http://auth.example.com/token",service="s"', (), None)
    with pytest.raises(AuthError) as err:
        auth.header(("repository:x:pull",))
    assert "non-TLS" in str(err.value) and "secret" not in str(err.value)


def test_split_layout_reference():
    assert split_layout("oci:/tmp/layout:v1") == ("/tmp/layout", "v1")
    assert split_layout("oci:/tmp/layout") == ("/tmp/layout", None)
    assert split_layout("oci:relative/dir:tag") == ("relative/dir", "tag")
    assert split_layout("oci:/tmp/a:b/c") == ("/tmp/a:b/c", None)


def test_upload_policy_adapts():
    policy = UploadPolicy(monolithic_max=100, chunk_size=64, min_chunk=16)
    assert policy.use_chunks(101) and not policy.use_chunks(100)
    policy.refuse_monolithic(80)
    assert policy.monolithic_max == 79
    policy.refuse_chunk(64)
    assert policy.chunk_size == 32
    policy.refuse_chunk(20)
    assert policy.chunk_size == 16  # never below the minimum
    policy.refuse_chunked()
    assert not policy.use_chunks(10_000)


def test_chunk_reader_reports_length_and_progress():
    seen: list[int] = []
    reader = ChunkReader(iter([b"abc", b"defg", b"hi", b"ignored-extra"]), 9, seen.append)
    assert len(reader) == 9
    assert reader.read(2) == b"ab"
    assert reader.read(5) == b"cdefg"
    assert reader.read() == b"hi"
    assert reader.read() == b""
    assert sum(seen) == 9 and reader.sent == 9


def test_blob_sources_merge_concurrent_writers(tmp_path):
    path = tmp_path / ".imgpack" / "blob-sources.json"
    digests = [f"sha256:{i:064x}" for i in range(50)]

    def record(repo: str) -> None:
        BlobSources(path).record("reg.example", repo, digests)

    threads = [threading.Thread(target=record, args=(f"repo{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    hints = BlobSources(path)
    assert sorted(hints.repositories("reg.example", digests[0])) == [f"repo{i}" for i in range(6)]
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]
    path.write_text("garbage")
    assert BlobSources(path).repositories("reg.example", digests[0]) == []


def test_plain_http_urls_are_refused_for_tls_registries():
    """An upload Location of http:// on an https registry must not receive credentials or blob bytes."""
    from imgpack.schemas.errors import TransferError

    client = RegistryClient("registry.example.com")
    with pytest.raises(TransferError, match="plain-HTTP"):
        client._send("PUT", "http://registry.example.com/v2/x/blobs/uploads/u?digest=sha256:0", {}, b"", False, 1)
