"""Remote ``show REF`` reads the manifest and config only, and foreign artifacts are named, not schema-dumped.

Every artifact here is pushed for real to docker-registry: raw blob and manifest PUTs for a CNCF ModelPack
model and container images (OCI and docker v2), oras-py for an oras artifact.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fixtures_registry import FaultProxy, RegistryServer, needs_registry

from imgpack.schemas import spec
from imgpack.schemas.digest import sha256_bytes
from imgpack.store.store import Store

pytestmark = [needs_registry, pytest.mark.usefixtures("isolated_credentials", "no_network_env")]


@pytest.fixture
def front(open_registry: RegistryServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(open_registry)
    yield proxy
    proxy.stop()


def put_blob(host: str, repo: str, data: bytes) -> dict:
    start = requests.post(f"http://{host}/v2/{repo}/blobs/uploads/", timeout=10)
    assert start.status_code == 202, start.text
    location = requests.compat.urljoin(f"http://{host}/", start.headers["Location"])
    digest = sha256_bytes(data)
    sep = "&" if "?" in location else "?"
    done = requests.put(f"{location}{sep}digest={digest}", data=data, timeout=10,
                        headers={"Content-Type": "application/octet-stream"})
    assert done.status_code == 201, done.text
    return {"digest": digest, "size": len(data)}


def put_manifest(host: str, repo: str, tag: str, document: dict) -> bytes:
    raw = json.dumps(document).encode()
    resp = requests.put(f"http://{host}/v2/{repo}/manifests/{tag}", data=raw, timeout=10,
                        headers={"Content-Type": document["mediaType"]})
    assert resp.status_code == 201, resp.text
    return raw


def layer_tar() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("etc/hello")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    return gzip.compress(out.getvalue(), mtime=0)


def modelpack(host: str) -> str:
    config = put_blob(host, "modelpack", json.dumps({"descriptor": {"name": "m"}, "config": {"format": "safetensors"},
                                                    "modelfs": {"type": "layers", "diffIds": []}}).encode())
    weight = put_blob(host, "modelpack", b"\0" * 64)
    put_manifest(host, "modelpack", "1", {
        "schemaVersion": 2, "mediaType": spec.OCI_MANIFEST,
        "artifactType": "application/vnd.cncf.model.manifest.v1+json",
        "config": {"mediaType": "application/vnd.cncf.model.config.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.cncf.model.weight.v1.raw", **weight,
                    "annotations": {"org.cncf.model.filepath": "model.safetensors"}}],
    })
    return f"{host}/modelpack:1"


def oci_image(host: str) -> str:
    config = put_blob(host, "image", json.dumps({"architecture": "amd64", "os": "linux", "rootfs":
                                                {"type": "layers", "diff_ids": []}}).encode())
    layer = put_blob(host, "image", layer_tar())
    put_manifest(host, "image", "oci", {
        "schemaVersion": 2, "mediaType": spec.OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
    })
    return f"{host}/image:oci"


def docker_image(host: str) -> str:
    config = put_blob(host, "image", json.dumps({"architecture": "amd64", "os": "linux"}).encode())
    layer = put_blob(host, "image", layer_tar())
    put_manifest(host, "image", "docker", {
        "schemaVersion": 2, "mediaType": spec.DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", **layer}],
    })
    return f"{host}/image:docker"


def oras_artifact(host: str, tmp_path: Path) -> str:
    oras = pytest.importorskip("oras.client")
    note = tmp_path / "notes.txt"
    note.write_text("not a model\n")
    client = oras.OrasClient(insecure=True)
    client.push(target=f"{host}/oras-thing:1", files=[str(note)], disable_path_validation=True)
    return f"{host}/oras-thing:1"


def test_remote_show_reads_manifest_and_config_only(cli, store, make_model, front, tmp_path):
    make_model(store, "shown:1", {"transformer": 71, "vae": 72}, tensors=3)
    local = store.get_manifest("shown:1")
    ref = f"{front.host}/shown:1"
    assert cli("push", "shown:1", ref).code == 0
    front.log.clear()
    r = cli("show", ref, "--json", store=tmp_path / "empty")
    assert r.code == 0, r.err
    shown = json.loads(r.out)
    assert shown["digest"] == local.digest and shown["location"] == "remote"
    assert shown["manifest"] == local.document
    gets = [e.path for e in front.log if e.method == "GET" and "/blobs/" in e.path]
    assert gets == [f"/v2/shown/blobs/{local.document['config']['digest']}"]  # the config, no tensor
    r = cli("show", ref, "--tensors", store=tmp_path / "empty")
    assert r.code == 0 and "transformer/blocks.0.weight" in r.out
    assert not (tmp_path / "empty").exists() or Store.open(tmp_path / "empty").entries() == []
    r = cli("show", f"{front.host}/shown:nosuch", store=tmp_path / "empty")
    assert r.code == 4 and "shown:nosuch" in r.err


@pytest.mark.parametrize(("make", "name", "hint"), [
    (lambda host, tmp: modelpack(host), "a CNCF ModelPack model (artifactType application/vnd.cncf.model.manifest"
                                         ".v1+json)", "imgpack create"),
    (lambda host, tmp: oci_image(host), "a container image", "imgpack copy"),
    (lambda host, tmp: docker_image(host), "a docker v2 container image", "imgpack copy"),
    (oras_artifact, "an oras artifact", "imgpack copy"),
], ids=["modelpack", "oci-image", "docker-v2-image", "oras"])
def test_foreign_artifacts_are_named(cli, open_registry, tmp_path, make, name, hint):
    ref = make(open_registry.host, tmp_path)
    for argv in (["pull", ref], ["show", ref], ["conformance", ref]):
        r = cli(*argv, store=tmp_path / "store")
        text = r.out + r.err
        assert r.code == 1, (argv, text)
        assert name in text and hint in text, (argv, text)
        assert "Traceback" not in text and "$schema" not in text and "is not valid under" not in text
        assert "is a required property" not in text and len(text) < 600
    store = tmp_path / "store"
    assert not store.exists() or Store.open(store).entries() == []
    assert not [p for p in store.rglob("*") if p.is_file() and "blobs" in p.parts]
    # copy moves it unchanged, as the message says; in the store, commands that need a model still name it.
    r = cli("copy", ref, f"oci:{tmp_path / 'layout'}:x", store=store)
    assert r.code == 0, r.err
    assert cli("copy", ref, "foreign:1", store=store).code == 0
    for argv in (["show", "foreign:1"], ["export", "foreign:1", str(tmp_path / "out")]):
        r = cli(*argv, store=store)
        assert r.code == 1 and name in r.err and "is a required property" not in r.err, (argv, r.err)
    assert not (tmp_path / "out").exists()
