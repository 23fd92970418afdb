"""Docker Hub names resolve as docker resolves them: for requests (``registry-1.docker.io``, ``library/``) and
for credentials (``https://index.docker.io/v1/`` in docker's config.json, and what a credential helper is asked).

No network: requests are caught by a recording adapter mounted on the client's session.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
import requests
from requests.adapters import BaseAdapter

from imgpack.registry import credentials
from imgpack.registry.locations import Clients, open_location
from imgpack.schemas.locations import parse_location
from imgpack.schemas.reference import Reference

pytestmark = pytest.mark.usefixtures("isolated_credentials", "no_network_env")

HUB_FORMS = ["docker.io/zimage", "index.docker.io/zimage", "registry-1.docker.io/zimage",
             "docker.io/library/zimage", "DOCKER.IO/zimage"]


class Recorder(BaseAdapter):
    """Answers every request 404 and remembers (method, URL, Authorization)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, str | None]] = []

    def send(self, request: requests.PreparedRequest, **kwargs: object) -> requests.Response:
        self.seen.append((request.method or "", request.url or "", request.headers.get("Authorization")))
        resp = requests.Response()
        resp.status_code = 404
        resp.url = request.url or ""
        resp.request = request
        resp._content = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}'
        return resp

    def close(self) -> None:
        pass


@pytest.mark.parametrize("text", HUB_FORMS)
def test_hub_forms_are_one_repository(text: str) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag) == ("docker.io", "library/zimage", "latest")
    assert str(ref) == "docker.io/library/zimage:latest"
    org = Reference.parse(text.replace("zimage", "acme/zimage") if "library" not in text else "docker.io/acme/zimage")
    assert org.repository == "acme/zimage"


def test_a_bare_name_is_a_store_entry_not_docker_hub() -> None:
    """imgpack keeps host-less names for the local store (create, run, tag), unlike docker."""
    assert parse_location("zimage").kind == "store"
    assert parse_location("zimage:v1").reference.registry is None  # type: ignore[union-attr]


@pytest.mark.parametrize("text", HUB_FORMS[:3])
def test_requests_go_to_registry_1_with_library(text: str) -> None:
    clients = Clients()
    endpoint = open_location(text + ":v1", store=None, clients=clients, write=False)
    client = clients.client("docker.io")
    recorder = Recorder()
    session = client.session()
    session.mount("https://", recorder)
    session.mount("http://", recorder)
    assert endpoint.target.resolve("v1") is None
    assert recorder.seen and recorder.seen[0][:2] == ("HEAD",
                                                      "https://registry-1.docker.io/v2/library/zimage/manifests/v1")
    assert list(clients.by_host) == ["docker.io"]  # one client, keyed by the name credentials use
    clients.close()


def test_config_json_hub_key_is_used_for_every_form(isolated_credentials: Path) -> None:
    docker = Path(os.environ["DOCKER_CONFIG"])
    auth = base64.b64encode(b"hubuser:hubpass").decode()
    (docker / "config.json").write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": auth}}}))
    for text in HUB_FORMS[:3]:
        host = Reference.parse(text).registry
        assert host == "docker.io"
        cred = credentials.lookup(host)
        assert (cred.username, cred.password) == ("hubuser", "hubpass")
    clients = Clients()
    open_location("registry-1.docker.io/acme/zimage:v1", store=None, clients=clients, write=False)
    assert clients.client("docker.io").authorizer.credential.username == "hubuser"
    clients.close()
    # Another registry does not get Docker Hub's secret.
    assert credentials.lookup("ghcr.io").anonymous


def test_credential_helper_is_asked_for_index_docker_io(isolated_credentials: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    asked = tmp_path / "asked"
    helper = bin_dir / "docker-credential-fake"
    helper.write_text("#!/bin/sh\ncat > " + str(asked) + "\n"
                      'echo \'{"ServerURL":"x","Username":"hub","Secret":"tok"}\'\n')
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    (Path(os.environ["DOCKER_CONFIG"]) / "config.json").write_text(json.dumps({"credsStore": "fake"}))
    cred = credentials.lookup(Reference.parse("index.docker.io/zimage").registry or "")
    assert (cred.username, cred.password) == ("hub", "tok")
    assert asked.read_text() == "https://index.docker.io/v1/"
