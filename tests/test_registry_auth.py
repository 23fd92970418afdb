"""Auth against real registries: htpasswd (basic) and token auth (bearer JWTs), credential sources."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest
from fixtures_registry import PASSWORD, USER, needs_registry

from imgpack.conformance.verify import verify_store
from imgpack.registry import credentials
from imgpack.registry.transport import RegistryClient, TransportOptions
from imgpack.schemas.errors import AuthError
from imgpack.store.store import Store

pytestmark = [needs_registry, pytest.mark.usefixtures("isolated_credentials")]


def login(cli, monkeypatch, host: str, user: str, password: str):
    monkeypatch.setattr(sys, "stdin", io.StringIO(password + "\n"))
    return cli("login", host, "-u", user, "--password-stdin")


def test_htpasswd_login_push_pull_logout(cli, store, make_model, htpasswd_registry, monkeypatch, tmp_path):
    host = htpasswd_registry.host
    make_model(store, "h:1", {"transformer": 71})
    denied = cli("push", "h:1", f"{host}/basic:1")
    assert denied.code == 3 and "login" in denied.err

    bad = login(cli, monkeypatch, host, USER, "wrong-password")
    assert bad.code == 3
    assert not credentials.credentials_path().exists()
    assert "wrong-password" not in bad.out + bad.err

    ok = login(cli, monkeypatch, host, USER, PASSWORD)
    assert ok.code == 0, ok.err
    assert PASSWORD not in ok.out + ok.err
    path = credentials.credentials_path()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    saved = json.loads(path.read_text())["auths"][host]["auth"]
    assert base64.b64decode(saved).decode() == f"{USER}:{PASSWORD}"

    pushed = cli("push", "h:1", f"{host}/basic:1")
    assert pushed.code == 0, pushed.err
    pulled = cli("pull", f"{host}/basic:1", store=tmp_path / "other")
    assert pulled.code == 0, pulled.err
    assert verify_store(Store.open(tmp_path / "other")).ok
    assert PASSWORD not in pushed.out + pushed.err + pulled.out + pulled.err

    assert cli("logout", host).code == 0
    assert host not in json.loads(path.read_text())["auths"]
    assert cli("pull", f"{host}/basic:1", store=tmp_path / "third").code == 3


def test_environment_credentials_scoped_to_one_registry(cli, store, make_model, htpasswd_registry, monkeypatch):
    host = htpasswd_registry.host
    make_model(store, "env:1", {"vae": 72})
    monkeypatch.setenv("IMGPACK_REGISTRY_USER", USER)
    monkeypatch.setenv("IMGPACK_REGISTRY_PASSWORD", PASSWORD)
    monkeypatch.setenv("IMGPACK_REGISTRY", "registry.example.com")
    assert cli("push", "env:1", f"{host}/env:1").code == 3  # not offered to another host
    monkeypatch.setenv("IMGPACK_REGISTRY", host)
    result = cli("push", "env:1", f"{host}/env:1")
    assert result.code == 0, result.err


def test_docker_config_auths_entry(cli, store, make_model, htpasswd_registry, isolated_credentials):
    host = htpasswd_registry.host
    docker = Path(os.environ["DOCKER_CONFIG"]) / "config.json"
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    docker.write_text(json.dumps({"auths": {f"http://{host}": {"auth": token}}}))
    make_model(store, "dc:1", {"vae": 73})
    assert cli("push", "dc:1", f"{host}/dockercfg:1").code == 0


def test_credential_helper_executable(cli, store, make_model, token_registry, tmp_path, monkeypatch):
    host = token_registry.host
    helper_dir = tmp_path / "bin"
    helper_dir.mkdir()
    helper = helper_dir / "docker-credential-imgpacktest"
    helper.write_text(
        "#!/bin/sh\n"
        '[ "$1" = get ] || exit 1\n'
        "read server\n"
        f'if [ "$server" = "{host}" ]; then\n'
        f'  echo \'{{"ServerURL":"{host}","Username":"{USER}","Secret":"{PASSWORD}"}}\'\n'
        "else echo 'credentials not found in native keychain'; exit 1; fi\n"
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper_dir}:{os.environ['PATH']}")
    docker = Path(os.environ["DOCKER_CONFIG"]) / "config.json"
    docker.write_text(json.dumps({"credHelpers": {host: "imgpacktest"}, "credsStore": "imgpacktest"}))
    assert credentials.lookup(host).username == USER
    assert credentials.lookup("other.example.com").anonymous
    make_model(store, "helper:1", {"vae": 74})
    result = cli("push", "helper:1", f"{host}/helper:1")
    assert result.code == 0, result.err


def test_token_auth_push_pull_caches_tokens(
    cli, store, tiny_model, token_registry, token_server, monkeypatch, tmp_path
):
    host = token_registry.host
    assert cli("create", "zimage:tiny", str(tiny_model)).code == 0
    blobs = len({b.digest for b in store.get_manifest("zimage:tiny").blobs})
    assert login(cli, monkeypatch, host, USER, PASSWORD).code == 0
    before = len(token_server.requests)
    result = cli("push", "zimage:tiny", f"{host}/tokened/zimage:tiny")
    assert result.code == 0, result.err
    issued = token_server.requests[before:]
    # One token per scope, not per request: hundreds of blobs, a handful of token fetches.
    assert 1 <= len(issued) <= 3 < blobs
    assert all(user == USER for user, _ in issued)
    assert ["repository:tokened/zimage:pull,push"] in [scopes for _, scopes in issued]

    result = cli("pull", f"{host}/tokened/zimage:tiny", store=tmp_path / "pulled")
    assert result.code == 0, result.err
    assert verify_store(Store.open(tmp_path / "pulled")).ok
    assert cli("logout", host).code == 0
    anonymous = cli("pull", f"{host}/tokened/zimage:tiny", store=tmp_path / "anon")
    assert anonymous.code == 3 and "denied" in anonymous.err


def test_token_refreshed_after_expiry(token_registry, token_server):
    cred = credentials.Credential(username=USER, password=PASSWORD, source="test")
    client = RegistryClient(token_registry.host, cred, TransportOptions())
    token_server.lifetime_s = 1
    try:
        scope = ("repository:refresh/x:pull",)
        before = len(token_server.requests)
        assert client.request("GET", "/v2/refresh/x/tags/list", scope=scope).status_code == 404
        assert client.request("GET", "/v2/refresh/x/tags/list", scope=scope).status_code == 404
        assert len(token_server.requests) - before == 1  # cached
        time.sleep(1.2)
        assert client.request("GET", "/v2/refresh/x/tags/list", scope=scope).status_code == 404
        assert len(token_server.requests) - before == 2  # refreshed once expired
    finally:
        token_server.lifetime_s = 300
        client.close()


def test_identity_token_uses_refresh_grant(token_registry, token_server):
    cred = credentials.Credential(username="<token>", identity_token=f"refresh-{USER}", source="test")
    client = RegistryClient(token_registry.host, cred, TransportOptions())
    try:
        resp = client.request("GET", "/v2/idtoken/x/tags/list", scope=("repository:idtoken/x:pull",))
        assert resp.status_code == 404  # authorized; the repository simply does not exist
        assert token_server.requests[-1] == (USER, ["repository:idtoken/x:pull"])
    finally:
        client.close()
    bad = RegistryClient(
        token_registry.host, credentials.Credential(identity_token="nope", source="test"), TransportOptions()
    )
    with pytest.raises(AuthError) as err:
        bad.request("GET", "/v2/idtoken/x/tags/list", scope=("repository:idtoken/x:pull",))
    assert "nope" not in str(err.value)
    bad.close()


def test_registry_token_from_environment_is_sent_as_bearer(token_registry, token_server, monkeypatch):
    token = token_server.sign(USER, token_server.grant(USER, ["repository:envtoken/x:pull"]))
    monkeypatch.setenv("IMGPACK_REGISTRY_TOKEN", token)
    cred = credentials.lookup(token_registry.host)
    assert cred.registry_token == token and token not in repr(cred)
    client = RegistryClient(token_registry.host, cred, TransportOptions())
    before = len(token_server.requests)
    try:
        resp = client.request("GET", "/v2/envtoken/x/tags/list", scope=("repository:envtoken/x:pull",))
        assert resp.status_code == 404
        assert len(token_server.requests) == before
        with pytest.raises(AuthError):
            client.request("GET", "/v2/other/x/tags/list", scope=("repository:other/x:pull",))
    finally:
        client.close()


def test_copy_between_two_registries_streams_blobs(
    cli, store, make_model, open_registry, htpasswd_registry, monkeypatch
):
    monkeypatch.setenv("IMGPACK_REGISTRY_USER", USER)
    monkeypatch.setenv("IMGPACK_REGISTRY_PASSWORD", PASSWORD)
    make_model(store, "x:1", {"transformer": 75, "vae": 76}, tensors=3, rows=2048)
    manifest = store.get_manifest("x:1")
    assert cli("push", "x:1", f"{open_registry.host}/cross:1").code == 0
    result = cli("copy", f"{open_registry.host}/cross:1", f"{htpasswd_registry.host}/cross:1", "--json")
    assert result.code == 0, result.err
    done = json.loads(result.out.splitlines()[-1])
    assert done["transferred"] == len({b.digest for b in manifest.blobs})
    assert done["bytes_moved"] == sum({b.digest: b.size for b in manifest.blobs}.values())
    pulled = cli("pull", f"{htpasswd_registry.host}/cross:1")
    assert pulled.code == 0
    assert store.get_manifest(f"{htpasswd_registry.host}/cross:1").raw == manifest.raw
