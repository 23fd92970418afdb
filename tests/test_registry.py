"""Push, pull and copy against a real docker-registry (distribution 2.8) on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from fixtures_registry import FaultProxy, needs_registry

from imgpack.conformance.verify import verify_store
from imgpack.registry.blobsources import BlobSources
from imgpack.registry.layout import LayoutTarget as LocalLayout
from imgpack.registry.locations import Clients
from imgpack.registry.model import copy_model
from imgpack.registry.remote import UploadPolicy
from imgpack.schemas import spec
from imgpack.schemas.digest import sha256_bytes
from imgpack.store.store import Store

pytestmark = [needs_registry, pytest.mark.usefixtures("isolated_credentials")]

ACCEPT = ", ".join(spec.MANIFEST_ACCEPT)


def remote_manifest(host: str, repo: str, ref: str) -> requests.Response:
    resp = requests.get(f"http://{host}/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT}, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp


def blob_uploads(log) -> list:
    """Requests that carried blob bytes to the registry."""
    return [r for r in log if r.method in ("PUT", "PATCH") and "/blobs/uploads/" in r.path]


def test_push_then_pull_tiny_model_byte_exact(cli, store, tiny_model, open_registry, tmp_path):
    assert cli("create", "zimage:tiny", str(tiny_model)).code == 0
    local = store.get_manifest("zimage:tiny")
    dest = f"{open_registry.host}/zimage:tiny"

    result = cli("push", "zimage:tiny", dest, "--json")
    assert result.code == 0, result.err
    events = [json.loads(line) for line in result.out.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    layer_events = [e for e in events if e["event"] == "layer"]
    assert len(layer_events) == len({b.digest for b in local.blobs})
    assert events[-1]["bytes_moved"] == sum({b.digest: b.size for b in local.blobs}.values())

    resp = remote_manifest(open_registry.host, "zimage", "tiny")
    assert resp.content == local.raw  # exact bytes, never re-serialised
    assert resp.headers["Docker-Content-Digest"] == local.digest
    assert resp.headers["Content-Type"] == spec.OCI_MANIFEST

    other = tmp_path / "other-store"
    result = cli("pull", dest, store=other)
    assert result.code == 0, result.err
    pulled = Store.open(other)
    assert pulled.references() == [(dest, local.digest)]
    assert pulled.read_blob(local.digest) == local.raw
    report = verify_store(pulled)
    assert report.ok and report.blobs == len({b.digest for b in local.blobs})
    assert not list(pulled.ingest_dir.iterdir())  # no partial or temp file left behind


def test_second_push_moves_no_blob_bytes(cli, store, make_model, open_registry):
    make_model(store, "mini:1", {"transformer": 1, "vae": 2})
    proxy = FaultProxy(open_registry)
    try:
        dest = f"{proxy.host}/repush:v1"
        assert cli("push", "mini:1", dest).code == 0
        assert len(blob_uploads(proxy.log)) == len({b.digest for b in store.get_manifest("mini:1").blobs})
        proxy.log.clear()
        result = cli("push", "mini:1", dest, "--json")
        assert result.code == 0
        done = json.loads(result.out.splitlines()[-1])
        assert done["up_to_date"] is True and done["bytes_moved"] == 0
        assert blob_uploads(proxy.log) == []
        # Only the manifest HEAD was needed.
        assert [(r.method, "/manifests/" in r.path) for r in proxy.log if r.path != "/v2/"] == [("HEAD", True)]
    finally:
        proxy.stop()


def test_pull_of_model_sharing_components_fetches_only_new_blobs(cli, store, make_model, open_registry, tmp_path):
    make_model(store, "a:1", {"transformer": 1, "text_encoder": 7, "vae": 8})
    make_model(store, "b:1", {"transformer": 2, "text_encoder": 7, "vae": 8})
    for name in ("a", "b"):
        assert cli("push", f"{name}:1", f"{open_registry.host}/shared-{name}:1").code == 0
    a, b = store.get_manifest("a:1"), store.get_manifest("b:1")
    new = {blob.digest: blob.size for blob in b.blobs} | {}
    for blob in a.blobs:
        new.pop(blob.digest, None)
    assert 0 < len(new) < len(b.blobs)

    other = tmp_path / "pull-store"
    assert cli("pull", f"{open_registry.host}/shared-a:1", store=other).code == 0
    result = cli("pull", f"{open_registry.host}/shared-b:1", "--json", store=other)
    assert result.code == 0, result.err
    done = json.loads(result.out.splitlines()[-1])
    assert done["bytes_moved"] == sum(new.values())
    assert done["transferred"] == len(new)
    assert verify_store(Store.open(other)).ok


def test_push_to_second_repository_mounts_known_blobs(cli, store, make_model, open_registry):
    make_model(store, "m:1", {"transformer": 11})
    manifest = store.get_manifest("m:1")
    assert cli("push", "m:1", f"{open_registry.host}/mount-src:1").code == 0
    hints = BlobSources.for_store(store.root)
    assert hints.repositories(open_registry.host, manifest.layers[0].digest) == ["mount-src"]

    result = cli("push", "m:1", f"{open_registry.host}/mount-dst:1", "--json")
    done = json.loads(result.out.splitlines()[-1])
    assert result.code == 0
    assert done["mounted"] == len({b.digest for b in manifest.blobs})
    assert done["bytes_moved"] == 0
    assert remote_manifest(open_registry.host, "mount-dst", "1").content == manifest.raw


def test_stale_mount_hint_falls_back_to_upload(cli, store, make_model, open_registry):
    make_model(store, "stale:1", {"transformer": 12})
    manifest = store.get_manifest("stale:1")
    BlobSources.for_store(store.root).record(open_registry.host, "never-pushed", [b.digest for b in manifest.blobs])
    result = cli("push", "stale:1", f"{open_registry.host}/stale-dst:1", "--json")
    assert result.code == 0, result.err
    done = json.loads(result.out.splitlines()[-1])
    assert done["mounted"] == 0 and done["transferred"] == len({b.digest for b in manifest.blobs})
    assert remote_manifest(open_registry.host, "stale-dst", "1").content == manifest.raw


def test_copy_between_repositories_and_to_oci_layout(cli, store, make_model, open_registry, tmp_path):
    make_model(store, "c:1", {"transformer": 21, "vae": 22})
    manifest = store.get_manifest("c:1")
    host = open_registry.host
    assert cli("push", "c:1", f"{host}/copy-src:1").code == 0
    result = cli("copy", f"{host}/copy-src:1", f"{host}/copy-dst:2", "--json")
    assert result.code == 0, result.err
    done = json.loads(result.out.splitlines()[-1])
    assert done["mounted"] == done["blobs"]  # same registry: mounted, not re-uploaded
    assert remote_manifest(host, "copy-dst", "2").content == manifest.raw

    layout = tmp_path / "layout"
    assert cli("copy", f"{host}/copy-dst:2", f"oci:{layout}:v2").code == 0
    index = json.loads((layout / "index.json").read_text())
    assert [(m["digest"], m["annotations"][spec.REF_NAME_ANNOTATION]) for m in index["manifests"]] == [
        (manifest.digest, "v2")
    ]
    assert verify_store(Store.open(layout)).ok
    # And back from the layout into a fresh store under a local name.
    other = tmp_path / "from-layout"
    assert cli("copy", f"oci:{layout}:v2", "restored:v2", store=other).code == 0
    assert Store.open(other).resolve("restored:v2")[1] == manifest.digest


def test_tags_lists_pushed_tags(cli, store, make_model, open_registry):
    make_model(store, "t:1", {"vae": 31})
    for tag in ("b", "a", "c"):
        assert cli("push", "t:1", f"{open_registry.host}/tagged:{tag}").code == 0
    result = cli("tags", f"{open_registry.host}/tagged")
    assert result.code == 0
    assert result.out.split() == ["a", "b", "c"]
    result = cli("tags", f"{open_registry.host}/tagged", "--json")
    assert json.loads(result.out) == {"repository": f"{open_registry.host}/tagged", "tags": ["a", "b", "c"]}


def test_error_exit_codes(cli, store, make_model, open_registry):
    make_model(store, "e:1", {"vae": 41})
    missing = cli("pull", f"{open_registry.host}/does-not-exist:1")
    assert missing.code == 4 and "does-not-exist" in missing.err
    assert cli("push", "e:1", "local-only:1").code == 2
    assert cli("pull", "no-host:1").code == 2
    assert cli("push", "absent:1", f"{open_registry.host}/x:1").code == 4
    assert cli("push", "e:1", f"{open_registry.host}/x:1", "--concurrency", "0").code == 2
    assert cli("tags", f"{open_registry.host}/never-created").code == 4


def test_invalid_remote_manifest_is_refused_before_any_blob(cli, open_registry, tmp_path):
    host = open_registry.host
    session = requests.Session()
    config = b'{"architecture":"x"}'
    config_digest = sha256_bytes(config)
    location = session.post(f"http://{host}/v2/bad/blobs/uploads/").headers["Location"]
    session.put(f"{location}&digest={config_digest}", data=config).raise_for_status()
    document = {
        "schemaVersion": 2,
        "mediaType": spec.OCI_MANIFEST,
        "artifactType": spec.ARTIFACT_TYPE,
        "config": {"mediaType": spec.CONFIG_MEDIA_TYPE, "digest": config_digest, "size": len(config)},
        "layers": [
            {
                "mediaType": spec.TENSOR_MEDIA_TYPE,
                "digest": config_digest,
                "size": len(config),
                "name": "../escape.weight",
                "dtype": "F32",
                "shape": [1],
                "annotations": {spec.TITLE_ANNOTATION: "../escape.weight"},
            }
        ],
    }
    resp = session.put(
        f"http://{host}/v2/bad/manifests/1",
        data=json.dumps(document).encode(),
        headers={"Content-Type": spec.OCI_MANIFEST},
    )
    assert resp.status_code == 201, resp.text
    proxy = FaultProxy(open_registry)
    try:
        result = cli("pull", f"{proxy.host}/bad:1", store=tmp_path / "s")
        assert result.code == 1
        assert "escape" in result.err
        assert not [r for r in proxy.log if "/blobs/" in r.path]
    finally:
        proxy.stop()
    assert Store.open(tmp_path / "s").references() == []


def _push_with_policy(store: Store, host: str, repo: str, policy: UploadPolicy) -> None:
    clients = Clients()
    clients.client(host)
    clients.policies[host] = policy
    target = clients.repository(host, repo, push=True)
    try:
        copy_model(LocalLayout(store), "big:1", target, "1", concurrency=4)
    finally:
        clients.close()


def test_chunked_upload_and_fallbacks(store, make_model, open_registry, tmp_path):
    make_model(store, "big:1", {"transformer": 51}, tensors=3, rows=4096)  # ~0.5 MB tensors
    manifest = store.get_manifest("big:1")
    proxy = FaultProxy(open_registry)
    try:
        # Chunked PATCH uploads in 256 KiB pieces.
        policy = UploadPolicy(monolithic_max=100_000, chunk_size=256 * 1024, min_chunk=64 * 1024)
        _push_with_policy(store, proxy.host, "chunked", policy)
        patches = [r for r in proxy.log if r.method == "PATCH"]
        assert len(patches) >= 3
        assert all(r.headers.get("Content-Range") for r in patches)
        assert "transfer-encoding" not in {k.lower() for r in patches for k in r.headers}
        assert remote_manifest(open_registry.host, "chunked", "1").content == manifest.raw

        # A registry that refuses PATCH (GAR): fall back to monolithic PUT.
        proxy.log.clear()
        proxy.add("PATCH", r"/v2/nopatch/blobs/uploads/", "status", times=1, arg=405)
        policy = UploadPolicy(monolithic_max=100_000, chunk_size=256 * 1024, min_chunk=64 * 1024)
        _push_with_policy(store, proxy.host, "nopatch", policy)
        assert policy.chunked is False
        assert remote_manifest(open_registry.host, "nopatch", "1").content == manifest.raw

        # A registry that caps single PUTs (413): switch to chunks.
        proxy.log.clear()
        proxy.add("PUT", r"/v2/capped/blobs/uploads/.*digest=", "status", times=1, arg=413)
        policy = UploadPolicy(monolithic_max=10 << 20, chunk_size=8 << 20, min_chunk=64 * 1024)
        _push_with_policy(store, proxy.host, "capped", policy)
        assert policy.monolithic_max < 10 << 20
        assert [r for r in proxy.log if r.method == "PATCH"]
        assert remote_manifest(open_registry.host, "capped", "1").content == manifest.raw

        # A registry that caps PATCH bodies (GHCR): halve the chunk size and go on.
        proxy.log.clear()
        proxy.add("PATCH", r"/v2/smallpatch/blobs/uploads/", "status", times=1, arg=413)
        policy = UploadPolicy(monolithic_max=100_000, chunk_size=512 * 1024, min_chunk=64 * 1024)
        _push_with_policy(store, proxy.host, "smallpatch", policy)
        assert policy.chunk_size == 256 * 1024
        assert remote_manifest(open_registry.host, "smallpatch", "1").content == manifest.raw
    finally:
        proxy.stop()


def test_ollama_flavour_round_trips_byte_exactly(cli, store, make_model, open_registry, tmp_path):
    make_model(store, "ollama:1", {"transformer": 61, "text_encoder": 62}, fmt="ollama")
    manifest = store.get_manifest("ollama:1")
    assert manifest.media_type == spec.DOCKER_MANIFEST
    dest = f"{open_registry.host}/ollama-flavour:1"
    assert cli("push", "ollama:1", dest).code == 0
    resp = remote_manifest(open_registry.host, "ollama-flavour", "1")
    assert resp.content == manifest.raw and resp.headers["Content-Type"] == spec.DOCKER_MANIFEST
    other = tmp_path / "ollama-pull"
    assert cli("pull", dest, store=other).code == 0
    pulled = Store.open(other)
    assert pulled.get_manifest(dest).raw == manifest.raw
    for blob in manifest.blobs:
        assert Path(pulled.blob_path(blob.digest)).read_bytes() == Path(store.blob_path(blob.digest)).read_bytes()
    assert verify_store(pulled).ok


def test_push_store_entry_named_after_its_registry(cli, store, make_model, open_registry, tmp_path):
    make_model(store, "named:1", {"vae": 34})
    dest = f"{open_registry.host}/named:1"
    assert cli("tag", "named:1", dest).code == 0
    result = cli("push", dest)
    assert result.code == 0, result.err
    assert remote_manifest(open_registry.host, "named", "1").content == store.get_manifest("named:1").raw
    # Pulling it back into the same store is a no-op.
    again = cli("pull", dest, "--json")
    assert again.code == 0
    done = json.loads(again.out.splitlines()[-1])
    assert done["up_to_date"] is True and done["bytes_moved"] == 0


def test_pull_by_digest_is_pinned_and_survives_prune(cli, store, make_model, open_registry, tmp_path):
    make_model(store, "pinme:1", {"vae": 21})
    dest = f"{open_registry.host}/pinme:1"
    assert cli("push", "pinme:1", dest).code == 0
    digest = store.get_manifest("pinme:1").digest
    other = tmp_path / "pinned"
    by_digest = f"{open_registry.host}/pinme@{digest}"
    assert cli("pull", by_digest, store=other).code == 0
    pulled = Store.open(other)
    assert dict(pulled.references()) == {by_digest: digest}  # pinned, not tagged :latest
    assert cli("prune", store=other).code == 0
    assert verify_store(pulled, by_digest).ok


def test_repull_restores_a_blob_the_disk_lost(cli, store, make_model, open_registry, tmp_path):
    """Blobs are renamed into place without an fsync each; after a crash the index may name one the disk cut
    short. The next pull is then not 'up to date': it fetches exactly that blob again, byte-exact."""
    make_model(store, "lost:1", {"transformer": 3, "text_encoder": 4, "vae": 5})
    assert cli("push", "lost:1", f"{open_registry.host}/lost:1").code == 0
    other = tmp_path / "pull-store"
    assert cli("pull", f"{open_registry.host}/lost:1", store=other).code == 0
    pulled = Store.open(other)
    victim = max(pulled.get_manifest(f"{open_registry.host}/lost:1").tensors, key=lambda t: t.size)
    original = pulled.blob_path(victim.digest).read_bytes()
    pulled.blob_path(victim.digest).write_bytes(original[: len(original) // 3])

    result = cli("pull", f"{open_registry.host}/lost:1", "--json", store=other)
    assert result.code == 0, result.err
    done = json.loads(result.out.splitlines()[-1])
    assert (done["up_to_date"], done["transferred"], done["bytes_moved"]) == (False, 1, victim.size)
    assert sha256_bytes(pulled.blob_path(victim.digest).read_bytes()) == victim.digest
    again = json.loads(cli("pull", f"{open_registry.host}/lost:1", "--json", store=other).out.splitlines()[-1])
    assert again["up_to_date"] is True and again["bytes_moved"] == 0
