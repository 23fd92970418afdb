"""Interop with other OCI tools: skopeo copies what imgpack pushed, and back, keeping the digest."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import requests
from fixtures_registry import needs_registry

from imgpack.conformance.verify import verify_store
from imgpack.schemas import spec
from imgpack.store.store import Store

pytestmark = [
    needs_registry,
    pytest.mark.usefixtures("isolated_credentials"),
    pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed"),
]


def skopeo(*args: str) -> None:
    proc = subprocess.run(["skopeo", "copy", "-q", "--preserve-digests", *args], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()


def test_skopeo_round_trip_keeps_manifest_digest(cli, store, make_model, open_registry, tmp_path):
    host = open_registry.host
    make_model(store, "interop:1", {"transformer": 91, "vae": 92})
    manifest = store.get_manifest("interop:1")
    assert cli("push", "interop:1", f"{host}/interop:1").code == 0

    layout = tmp_path / "skopeo-layout"
    skopeo("--src-tls-verify=false", f"docker://{host}/interop:1", f"oci:{layout}:v1")
    index = json.loads((layout / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [manifest.digest]

    skopeo("--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{host}/interop-back:1")
    resp = requests.get(
        f"http://{host}/v2/interop-back/manifests/1", headers={"Accept": ", ".join(spec.MANIFEST_ACCEPT)}, timeout=10
    )
    assert resp.status_code == 200 and resp.content == manifest.raw

    # imgpack reads the layout skopeo wrote, and pulls what skopeo pushed, to the same digest.
    assert cli("copy", f"oci:{layout}:v1", "from-skopeo:1", store=tmp_path / "a").code == 0
    assert Store.open(tmp_path / "a").resolve("from-skopeo:1")[1] == manifest.digest
    assert cli("pull", f"{host}/interop-back:1", store=tmp_path / "b").code == 0
    assert verify_store(Store.open(tmp_path / "b")).ok


def test_skopeo_reads_layout_imgpack_wrote(cli, store, make_model, open_registry, tmp_path):
    make_model(store, "layout:1", {"text_encoder": 93})
    manifest = store.get_manifest("layout:1")
    layout = tmp_path / "imgpack-layout"
    assert cli("push", "layout:1", f"oci:{layout}:v7").code == 0
    skopeo("--dest-tls-verify=false", f"oci:{layout}:v7", f"docker://{open_registry.host}/from-layout:7")
    resp = requests.get(
        f"http://{open_registry.host}/v2/from-layout/manifests/7",
        headers={"Accept": ", ".join(spec.MANIFEST_ACCEPT)},
        timeout=10,
    )
    assert resp.content == manifest.raw
