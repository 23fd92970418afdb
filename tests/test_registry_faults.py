"""Transfers through a fault-injecting proxy: they succeed or fail cleanly, and nothing corrupt lands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures_registry import PASSWORD, USER, FaultProxy, basic_header, needs_registry

from imgpack.conformance.verify import verify_store
from imgpack.registry.layout import LayoutTarget as LocalLayout
from imgpack.registry.locations import Clients
from imgpack.registry.model import copy_model
from imgpack.registry.transport import TransportOptions
from imgpack.schemas.errors import IntegrityError
from imgpack.store.store import Store

pytestmark = [needs_registry, pytest.mark.usefixtures("isolated_credentials")]
BLOB_GET = r"/v2/[^?]*/blobs/sha256:"


@pytest.fixture
def pushed(cli, store, make_model, open_registry):
    """A mini model with ~150 KB tensors, pushed straight to the registry as faults:1."""
    make_model(store, "faults:1", {"transformer": 81, "vae": 82}, tensors=4, rows=1024)
    assert cli("push", "faults:1", f"{open_registry.host}/faults:1").code == 0
    return store.get_manifest("faults:1")


def pull_through(cli, proxy: FaultProxy, store_dir: Path, *extra: str):
    return cli("pull", f"{proxy.host}/faults:1", *extra, store=store_dir)


@pytest.mark.parametrize(
    ("kind", "arg"),
    [("status", 500), ("status", 503), ("429", 1), ("reset", 0), ("truncate", 0), ("flip", 0)],
)
def test_pull_recovers_from_fault(cli, pushed, fault_proxy, tmp_path, kind, arg):
    fault = fault_proxy.add("GET", BLOB_GET, kind, times=2, arg=arg)
    started = time.monotonic()
    result = pull_through(cli, fault_proxy, tmp_path / "s")
    assert result.code == 0, result.err
    assert fault.hits == 2
    store = Store.open(tmp_path / "s")
    assert store.resolve(f"{fault_proxy.host}/faults:1")[1] == pushed.digest
    report = verify_store(store)
    assert report.ok, report.problems
    assert not list(store.ingest_dir.iterdir())
    if kind in ("reset", "truncate"):
        # The retry resumed the partial file instead of starting over.
        assert any(r.headers.get("Range", "").startswith("bytes=") for r in fault_proxy.log)
    if kind == "429":
        assert time.monotonic() - started >= 1.0  # Retry-After honoured


def test_stalled_stream_is_detected_and_resumed(store, pushed, fault_proxy, tmp_path):
    fault = fault_proxy.add("GET", BLOB_GET, "stall", times=1, arg=30)
    clients = Clients(TransportOptions(read_timeout=1.0))
    target = Store.open(tmp_path / "s")
    started = time.monotonic()
    try:
        repo = clients.repository(fault_proxy.host, "faults", push=False)
        copy_model(repo, "1", LocalLayout(target), "stalled:1", concurrency=4)
    finally:
        clients.close()
    assert fault.hits == 1
    assert time.monotonic() - started < 20.0  # gave up on the stall (1 s read timeout), did not wait it out
    assert verify_store(target).ok


def test_persistent_corruption_fails_cleanly(cli, pushed, fault_proxy, tmp_path):
    victim = max(pushed.tensors, key=lambda layer: layer.size)
    fault_proxy.add("GET", f"/blobs/{victim.digest}", "flip", times=100)
    result = pull_through(cli, fault_proxy, tmp_path / "s")
    assert result.code == IntegrityError.exit_code
    assert victim.name in result.err and "manifest was not written" in result.err
    store = Store.open(tmp_path / "s")
    assert not store.has_blob(victim.digest)
    assert store.references() == []
    assert not store.partial_path(victim.digest).exists()
    # Everything else arrived and a clean rerun only fetches the missing blob.
    fault_proxy.faults.clear()
    fault_proxy.log.clear()
    assert pull_through(cli, fault_proxy, tmp_path / "s").code == 0
    blob_gets = [r for r in fault_proxy.log if r.method == "GET" and "/blobs/" in r.path]
    assert [r.path.rsplit("/", 1)[1] for r in blob_gets] == [victim.digest]
    assert verify_store(store).ok


def test_push_recovers_from_faults(cli, store, make_model, fault_proxy, open_registry):
    make_model(store, "pushfault:1", {"transformer": 83}, tensors=4, rows=512)
    manifest = store.get_manifest("pushfault:1")
    fault_proxy.add("PUT", r"/blobs/uploads/", "status", times=2, arg=500)
    fault_proxy.add("PUT", r"/blobs/uploads/", "reset", times=1)
    fault_proxy.add("HEAD", r"/blobs/sha256:", "429", times=1, arg=0)
    fault_proxy.add("PUT", r"/manifests/", "status", times=1, arg=503)
    result = cli("push", "pushfault:1", f"{fault_proxy.host}/pushfault:1")
    assert result.code == 0, result.err
    assert all(f.hits == f.times for f in fault_proxy.faults)
    other = Store.open(Path(store.root).parent / "verify-pushfault")
    assert cli("pull", f"{open_registry.host}/pushfault:1", store=other.root).code == 0
    assert other.get_manifest(f"{open_registry.host}/pushfault:1").raw == manifest.raw
    assert verify_store(other).ok


def test_persistent_server_errors_give_transfer_exit_code(cli, pushed, fault_proxy, tmp_path):
    fault_proxy.add("GET", BLOB_GET, "status", times=1000, arg=500)
    result = pull_through(cli, fault_proxy, tmp_path / "s")
    assert result.code == 5
    assert Store.open(tmp_path / "s").references() == []


def test_redirect_to_storage_drops_registry_credentials(
    cli, store, make_model, htpasswd_registry, monkeypatch, tmp_path
):
    monkeypatch.setenv("IMGPACK_REGISTRY_USER", USER)
    monkeypatch.setenv("IMGPACK_REGISTRY_PASSWORD", PASSWORD)
    make_model(store, "redir:1", {"vae": 84})
    assert cli("push", "redir:1", f"{htpasswd_registry.host}/redir:1").code == 0
    proxy = FaultProxy(htpasswd_registry, upstream_auth=basic_header())
    try:
        proxy.add("GET", BLOB_GET, "redirect", times=1000)
        result = cli("pull", f"{proxy.host}/redir:1", store=tmp_path / "s")
        assert result.code == 0, result.err
        storage = [r for r in proxy.log if r.path.startswith("/_blobstore/")]
        registry = [r for r in proxy.log if not r.path.startswith("/_blobstore/") and "/blobs/" in r.path]
        assert storage and len(storage) == len(registry)
        assert all(r.host.startswith("localhost:") for r in storage)
        assert not [r for r in storage if "Authorization" in r.headers]
        assert all(r.headers.get("Authorization", "").startswith("Basic ") for r in registry)
        assert verify_store(Store.open(tmp_path / "s")).ok
    finally:
        proxy.stop()


def test_pull_killed_with_sigkill_resumes(store, make_model, open_registry, fault_proxy, tmp_path, cli):
    make_model(store, "kill:1", {"transformer": 85}, tensors=3, rows=8192)  # ~1.1 MB tensors
    manifest = store.get_manifest("kill:1")
    assert cli("push", "kill:1", f"{open_registry.host}/kill:1").code == 0
    fault_proxy.add("GET", BLOB_GET, "throttle", times=1000, arg=300_000)
    target = tmp_path / "s"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "imgpack.cli.main", "--store", str(target), "-q"]
    proc = subprocess.Popen([*command, "pull", f"{fault_proxy.host}/kill:1"], env=env)
    try:
        deadline = time.monotonic() + 30
        partial_bytes = 0
        while time.monotonic() < deadline and partial_bytes < 200_000:
            time.sleep(0.1)
            ingest = target / ".imgpack" / "ingest"
            partial_bytes = sum(p.stat().st_size for p in ingest.glob("*.partial")) if ingest.exists() else 0
        assert partial_bytes >= 200_000, "pull did not make progress"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert Store.open(target).references() == []  # killed before the manifest: nothing indexed
    fault_proxy.faults.clear()
    fault_proxy.log.clear()
    rerun = subprocess.run([*command, "pull", f"{fault_proxy.host}/kill:1"], env=env, timeout=120)
    assert rerun.returncode == 0
    ranges = [r.headers["Range"] for r in fault_proxy.log if "Range" in r.headers]
    assert ranges and all(int(r.split("=")[1].rstrip("-")) > 0 for r in ranges)
    verify = subprocess.run([*command, "verify"], env=env, timeout=120, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert Store.open(target).resolve(f"{fault_proxy.host}/kill:1")[1] == manifest.digest


def test_ctrl_c_stops_quickly_and_keeps_partials(store, make_model, open_registry, fault_proxy, tmp_path, cli):
    make_model(store, "sigint:1", {"transformer": 86}, tensors=3, rows=8192)
    assert cli("push", "sigint:1", f"{open_registry.host}/sigint:1").code == 0
    fault_proxy.add("GET", BLOB_GET, "throttle", times=1000, arg=200_000)
    target = tmp_path / "s"
    command = [sys.executable, "-m", "imgpack.cli.main", "--store", str(target)]
    proc = subprocess.Popen(
        [*command, "pull", f"{fault_proxy.host}/sigint:1"], stderr=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    ingest = target / ".imgpack" / "ingest"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if ingest.exists() and sum(p.stat().st_size for p in ingest.glob("*.partial")) > 100_000:
            break
    proc.send_signal(signal.SIGINT)
    interrupted_at = time.monotonic()
    try:
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 130, err
    assert time.monotonic() - interrupted_at < 5
    assert "interrupted" in err
    kept = sum(p.stat().st_size for p in ingest.glob("*.partial"))
    assert kept > 100_000
    assert Store.open(target).references() == []
    fault_proxy.faults.clear()
    assert cli("pull", f"{fault_proxy.host}/sigint:1", store=target).code == 0
    assert verify_store(Store.open(target)).ok
