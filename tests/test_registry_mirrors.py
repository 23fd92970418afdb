"""Mirrors and pull-through caches: ``--mirror`` and containers' registries.conf, against real registries.

The origin is a docker-registry; the cache is a second docker-registry in proxy mode (``proxy: remoteurl:``)
in front of it, as a cluster runs distribution, Harbor or Spegel. Fault proxies in front of both count what
each one served, so "the mirror served it" is measured on the wire.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_registry import FaultProxy, RegistryServer, free_port, needs_registry, start_registry

from imgpack.store.store import Store

pytestmark = [needs_registry, pytest.mark.usefixtures("isolated_credentials", "no_network_env")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, open_registry: RegistryServer) -> Iterator[RegistryServer]:
    server = start_registry(tmp_path_factory.mktemp("pull-through"), remote_url=open_registry.url)
    yield server
    server.stop()


@pytest.fixture
def fronts(open_registry: RegistryServer, cache: RegistryServer) -> Iterator[tuple[FaultProxy, FaultProxy]]:
    """(origin, cache) as the client sees them, each behind a logging proxy."""
    origin, mirror = FaultProxy(open_registry), FaultProxy(cache)
    yield origin, mirror
    origin.stop()
    mirror.stop()


def blob_gets(proxy: FaultProxy) -> set[str]:
    return {e.path.rsplit("/", 1)[-1] for e in proxy.log if e.method == "GET" and "/blobs/sha256:" in e.path
            and e.status in (200, 206)}


@pytest.fixture
def published(cli, store, make_model, fronts) -> tuple[str, set[str]]:
    """A model pushed to the origin: (reference through the origin's front, its blob digests)."""
    origin, _ = fronts
    make_model(store, "mirrored:1", {"transformer": 61, "vae": 62}, tensors=4)
    ref = f"{origin.host}/mirrored:1"
    assert cli("push", "mirrored:1", ref).code == 0
    origin.log.clear()
    return ref, {b.digest for b in store.get_manifest("mirrored:1").blobs}


def pulled_same(store, into: Path, ref: str) -> None:
    assert Store.open(into).get_manifest(ref).raw == store.get_manifest("mirrored:1").raw


def test_pull_through_cache_by_flag(cli, store, published, fronts, tmp_path):
    origin, mirror = fronts
    ref, blobs = published
    r = cli("pull", ref, "--mirror", mirror.host, store=tmp_path / "a")
    assert r.code == 0, r.err
    pulled_same(store, tmp_path / "a", ref)
    assert blob_gets(mirror) == blobs  # every blob came from the cache...
    assert blob_gets(origin) == set()  # ...and none from the origin directly
    assert cli("verify", store=tmp_path / "a").code == 0


def test_registries_conf_mirrors_in_order_and_dead_ones_skipped(cli, store, published, fronts, tmp_path,
                                                                monkeypatch):
    origin, mirror = fronts
    ref, blobs = published
    dead = f"127.0.0.1:{free_port()}"
    second = FaultProxy(mirror.upstream)
    try:
        conf = tmp_path / "registries.conf"
        conf.write_text(
            "[[registry]]\n"
            f'prefix = "{origin.host}"\n'
            f'location = "{origin.host}"\n'
            "[[registry.mirror]]\n"
            f'location = "{dead}"\n'
            "[[registry.mirror]]\n"
            f'location = "{mirror.host}"\n'
            "[[registry.mirror]]\n"
            f'location = "{second.host}"\n'
        )
        monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))
        r = cli("pull", ref, store=tmp_path / "a")
        assert r.code == 0, r.err
        pulled_same(store, tmp_path / "a", ref)
        assert dead in r.err  # said it skipped the dead mirror
        assert blob_gets(mirror) == blobs and blob_gets(second) == set() and blob_gets(origin) == set()
    finally:
        second.stop()


def test_origin_serves_when_every_mirror_is_down(cli, store, published, fronts, tmp_path):
    origin, _ = fronts
    ref, blobs = published
    r = cli("pull", ref, "--mirror", f"127.0.0.1:{free_port()}", store=tmp_path / "a")
    assert r.code == 0, r.err
    pulled_same(store, tmp_path / "a", ref)
    assert blob_gets(origin) == blobs


def test_a_mirror_serving_wrong_bytes_is_caught_and_the_origin_used(cli, store, published, fronts, tmp_path):
    origin, mirror = fronts
    ref, blobs = published
    mirror.add("GET", r"/blobs/sha256:", "flip", times=1000)  # every blob body it sends is corrupt
    r = cli("pull", ref, "--mirror", mirror.host, store=tmp_path / "a")
    assert r.code == 0, r.err
    pulled_same(store, tmp_path / "a", ref)
    assert blob_gets(origin) == blobs  # each blob came, verified, from the origin in the end
    assert cli("verify", store=tmp_path / "a").code == 0


def test_bad_registries_conf_is_named(cli, published, tmp_path, monkeypatch):
    ref, _ = published
    conf = tmp_path / "registries.conf"
    conf.write_text("[[registry]]\nprefix = 'x'\n[[registry.mirror]]\ninsecure = true\n")
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))
    r = cli("pull", ref, store=tmp_path / "a")
    assert r.code == 1 and str(conf) in r.err and "location" in r.err
    assert not (tmp_path / "a" / "index.json").exists() or Store.open(tmp_path / "a").entries() == []
