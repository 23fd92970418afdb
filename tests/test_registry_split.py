"""Registries that cap the layers of a manifest (Amazon ECR: ~500): the index-split form, end to end.

A proxy in front of a real docker-registry answers ECR's exact 405 for manifests over the cap. Everything is
asserted on bytes and digests: what the registry holds, what crossed the wire, what a pull writes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fixtures_registry import FaultProxy, RegistryServer, needs_registry, write_wide_model

from imgpack.registry.split import MANIFEST_ANNOTATION, MANIFEST_BLOB_MEDIA_TYPE, default_cap, split_model
from imgpack.schemas import spec
from imgpack.schemas.digest import sha256_bytes
from imgpack.store.store import Store

pytestmark = [needs_registry, pytest.mark.usefixtures("isolated_credentials", "no_network_env")]

CAP = 500
ACCEPT = ", ".join(spec.MANIFEST_ACCEPT)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def get_manifest(host: str, repo: str, ref: str) -> requests.Response:
    resp = requests.get(f"http://{host}/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT}, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source directory, store) of a 1,168-layer model, tagged ``wide:1``."""
    from imgpack.packager.create import create_model

    root = tmp_path_factory.mktemp("wide")
    source = write_wide_model(root / "src")
    create_model(Store.open(root / "store"), "wide:1", source)
    return source, root / "store"


@pytest.fixture
def capped(open_registry: RegistryServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(open_registry, layer_cap=CAP)
    yield proxy
    proxy.stop()


def test_layer_cap_fallback_pushes_split_form_once(cli, wide, capped, tmp_path):
    source, store_dir = wide
    local = Store.open(store_dir).get_manifest("wide:1")
    assert len(local.layers) > 2 * CAP
    blobs = {b.digest: b.size for b in local.blobs}

    r = cli("push", "wide:1", f"{capped.host}/wide:1", store=store_dir)
    assert r.code == 0, r.err
    assert "index-split form" in r.out

    # The registry refused the whole manifest once, with ECR's answer, and took the index.
    puts = [e for e in capped.log if e.method == "PUT" and "/manifests/" in e.path]
    assert [e.status for e in puts if e.path.endswith("/manifests/1")] == [405, 201]
    # Every blob crossed the wire once (the fallback re-sent none), plus the manifest itself as the part-0 blob.
    assert capped.blob_bytes_sent() == sum(blobs.values()) + len(local.raw)

    index_resp = get_manifest(capped.host, "wide", "1")
    assert index_resp.headers["Content-Type"] == spec.OCI_INDEX
    index = index_resp.json()
    assert index["annotations"][MANIFEST_ANNOTATION] == local.digest
    carried: list[str] = []
    for i, child in enumerate(index["manifests"]):
        part = get_manifest(capped.host, "wide", child["digest"]).json()
        assert len(part["layers"]) <= CAP
        assert part["config"]["digest"] == local.document["config"]["digest"]
        carried += [layer["digest"] for layer in part["layers"] if layer["mediaType"] != MANIFEST_BLOB_MEDIA_TYPE]
        if i == 0:
            assert part["layers"][0]["digest"] == local.digest
    # Grouped by component, every layer of the model exactly once.
    assert sorted(carried) == sorted(layer["digest"] for layer in local.document["layers"])
    # The stored manifest blob is the original manifest, byte for byte.
    blob = requests.get(f"http://{capped.host}/v2/wide/blobs/{local.digest}", timeout=10)
    assert blob.content == local.raw

    # Deterministic: the index is exactly what split_model gives for this manifest and cap.
    assert sha256_bytes(index_resp.content) == split_model(local.raw, CAP).index[0].digest
    assert r.out.count(sha256_bytes(index_resp.content)) == 1

    # Re-push: nothing moves, no manifest PUT is refused again.
    before = len(capped.log)
    r = cli("push", "wide:1", f"{capped.host}/wide:1", "--json", store=store_dir)
    assert r.code == 0, r.err
    done = json.loads(r.out.splitlines()[-1])
    assert done["bytes_moved"] == 0
    again = capped.log[before:]
    assert not [e for e in again if e.method in ("PUT", "PATCH", "POST") and "/blobs/" in e.path]
    assert not [e for e in again if e.status == 405]

    # Pull back from the capped registry: the original manifest, and export gives the source bytes.
    other = tmp_path / "pulled"
    r = cli("pull", f"{capped.host}/wide:1", store=other)
    assert r.code == 0, r.err
    pulled = Store.open(other)
    assert pulled.resolve(f"{capped.host}/wide:1")[1] == local.digest
    assert pulled.get_manifest(f"{capped.host}/wide:1").raw == local.raw
    assert cli("export", f"{capped.host}/wide:1", str(tmp_path / "export"), store=other).code == 0
    assert tree_bytes(tmp_path / "export") == tree_bytes(source)
    assert cli("verify", store=other).code == 0


def test_known_caps() -> None:
    assert default_cap("123456789012.dkr.ecr.eu-west-1.amazonaws.com") == 500
    assert default_cap("ghcr.io") is None and default_cap("127.0.0.1:5000") is None


def test_explicit_max_layers_is_deterministic_and_every_reader_takes_it(cli, open_registry, tmp_path):
    from imgpack.packager.create import create_model

    # A smaller model than the fallback test's, so the readers below stay quick; the transformer alone is
    # over the cap, so it is split within the component too.
    source = write_wide_model(tmp_path / "src", {"transformer": 130, "text_encoder": 60, "vae": 40}, seed=3)
    store_dir = tmp_path / "store"
    create_model(Store.open(store_dir), "mid:1", source)
    local = Store.open(store_dir).get_manifest("mid:1")
    cap = 100
    expected = split_model(local.raw, cap).index[0].digest
    host = open_registry.host

    # --max-layers on an uncapped registry: no refusal needed; the index is the pure function of (manifest, cap).
    r = cli("push", "mid:1", f"{host}/mid:1", "--max-layers", str(cap), store=store_dir)
    assert r.code == 0, r.err
    resp = get_manifest(host, "mid", "1")
    assert resp.headers["Docker-Content-Digest"] == expected
    sizes = [len(get_manifest(host, "mid", m["digest"]).json()["layers"]) for m in resp.json()["manifests"]]
    assert max(sizes) <= cap and sum(sizes) == len(local.layers) + 1  # + the manifest blob in part 1
    # The same source built in another store gives the same manifest, so the same index; a re-push is free.
    rebuilt = tmp_path / "rebuilt"
    assert create_model(Store.open(rebuilt), "mid:1", source).digest == local.digest
    r = cli("push", "mid:1", f"{host}/mid:1", "--max-layers", str(cap), "--json", store=rebuilt)
    assert r.code == 0, r.err
    done = json.loads(r.out.splitlines()[-1])
    assert done["up_to_date"] is True and done["bytes_moved"] == 0

    # show (remote), conformance (remote) and verify read the split form as the model it carries.
    r = cli("show", f"{host}/mid:1", "--json", store=tmp_path / "empty")
    assert r.code == 0, r.err
    shown = json.loads(r.out)
    assert shown["digest"] == local.digest
    r = cli("conformance", f"{host}/mid:1", store=tmp_path / "empty")
    assert r.code == 0, r.out + r.err

    # skopeo copies the whole index (parts included) into a layout; imgpack reads that layout. skopeo 1.9
    # re-serialises the index without OCI 1.1's artifactType (so --preserve-digests refuses): the index digest
    # changes, the parts and the model they carry keep theirs.
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo not installed")
    layout = tmp_path / "skopeo-layout"
    proc = subprocess.run(["skopeo", "copy", "-q", "--all", "--src-tls-verify=false",
                           f"docker://{host}/mid:1", f"oci:{layout}:v1"], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    (root,) = json.loads((layout / "index.json").read_text())["manifests"]
    copied = json.loads((layout / "blobs" / "sha256" / root["digest"].split(":")[1]).read_bytes())
    assert [m["digest"] for m in copied["manifests"]] == [m["digest"] for m in resp.json()["manifests"]]
    assert copied["annotations"][MANIFEST_ANNOTATION] == local.digest
    r = cli("conformance", f"oci:{layout}:v1", store=tmp_path / "empty")
    assert r.code == 0, r.out + r.err
    r = cli("show", f"oci:{layout}:v1", "--json", store=tmp_path / "empty")
    assert r.code == 0 and json.loads(r.out)["digest"] == local.digest, r.err
    into = tmp_path / "from-layout"
    r = cli("copy", f"oci:{layout}:v1", "mid:from-skopeo", store=into)
    assert r.code == 0, r.err
    assert Store.open(into).get_manifest("mid:from-skopeo").raw == local.raw
    assert cli("verify", store=into).code == 0

    # save/load of the pulled model, and of the layout skopeo wrote.
    archive = tmp_path / "mid.tar.zst"
    assert cli("save", "mid:from-skopeo", "-o", str(archive), store=into).code == 0
    r = cli("load", str(archive), store=tmp_path / "loaded")
    assert r.code == 0, r.err
    assert Store.open(tmp_path / "loaded").get_manifest("mid:from-skopeo").raw == local.raw
    # A pull of the split form and an export give the source bytes.
    r = cli("pull", f"{host}/mid:1", store=tmp_path / "pulled")
    assert r.code == 0, r.err
    assert cli("export", f"{host}/mid:1", str(tmp_path / "export"), store=tmp_path / "pulled").code == 0
    assert tree_bytes(tmp_path / "export") == tree_bytes(source)
    # Pulled by the index's digest, the model is pinned under that reference and every command finds it.
    pinned = f"{host}/mid@{expected}"
    assert cli("pull", pinned, store=tmp_path / "pulled").code == 0
    r = cli("show", pinned, "--json", store=tmp_path / "pulled")
    assert r.code == 0 and json.loads(r.out)["location"] == "store", r.err
    assert cli("verify", pinned, store=tmp_path / "pulled").code == 0
    assert cli("export", pinned, str(tmp_path / "export-pinned"), store=tmp_path / "pulled").code == 0
    assert tree_bytes(tmp_path / "export-pinned") == tree_bytes(source)


def test_run_reads_a_model_pulled_from_its_split_form(cli, tiny_model, open_registry, tmp_path):
    pytest.importorskip("mlx.core")
    host = open_registry.host
    assert cli("create", "tiny:1", str(tiny_model)).code == 0
    r = cli("push", "tiny:1", f"{host}/tiny-split:1", "--max-layers", "8")
    assert r.code == 0, r.err
    assert get_manifest(host, "tiny-split", "1").headers["Content-Type"] == spec.OCI_INDEX
    other = tmp_path / "other"
    assert cli("pull", f"{host}/tiny-split:1", store=other).code == 0
    args = ["a red fox", "--size", "32x32", "--steps", "2", "--seed", "3"]
    assert cli("run", "tiny:1", *args, "-o", str(tmp_path / "a.png")).code == 0
    r = cli("run", f"{host}/tiny-split:1", *args, "-o", str(tmp_path / "b.png"), store=other)
    assert r.code == 0, r.err
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
