"""Partial pull: ``--component`` and ``--include`` move only those tensors' bytes (configs and files always).

Counted on the wire (a logging proxy in front of docker-registry) and in the store's blob set; then the
partial model is shown, verified, pruned, refused by ``run`` with the missing components named, and completed
by a full pull that fetches only what is missing.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_registry import FaultProxy, RegistryServer, needs_registry

from imgpack.schemas import spec
from imgpack.store.store import Store

pytestmark = [needs_registry, pytest.mark.usefixtures("isolated_credentials", "no_network_env")]


@pytest.fixture
def front(open_registry: RegistryServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(open_registry)
    yield proxy
    proxy.stop()


@pytest.fixture
def pushed(cli, store, tiny_model, front) -> str:
    assert cli("create", "tiny:1", str(tiny_model)).code == 0
    ref = f"{front.host}/partial:1"
    assert cli("push", "tiny:1", ref).code == 0
    front.log.clear()
    return ref


def fetched(proxy: FaultProxy) -> dict[str, int]:
    """Blob digest -> body bytes the registry sent."""
    out: dict[str, int] = {}
    for e in proxy.log:
        if e.method == "GET" and "/blobs/sha256:" in e.path and e.status == 200:
            out[e.path.rsplit("/", 1)[-1]] = out.get(e.path.rsplit("/", 1)[-1], 0) + 1
    return out


def stored_blobs(root: Path) -> set[str]:
    return {"sha256:" + p.name for p in (root / "blobs" / "sha256").iterdir()}


def test_component_pull_moves_only_that_component_then_completes(cli, store, pushed, front, tmp_path):
    manifest = store.get_manifest("tiny:1")
    layers = manifest.document["layers"]
    tensors = [x for x in layers if x["mediaType"] == spec.TENSOR_MEDIA_TYPE]
    others = {x["digest"] for x in layers if x["mediaType"] != spec.TENSOR_MEDIA_TYPE}
    config = manifest.document["config"]["digest"]

    def component(layer: dict) -> str:
        return layer["annotations"][spec.TITLE_ANNOTATION].split("/", 1)[0]

    wanted = {x["digest"] for x in tensors if component(x) == "transformer"}
    left_out = {x["digest"] for x in tensors} - wanted - others
    assert wanted and left_out

    part = tmp_path / "part"
    r = cli("pull", pushed, "--component", "transformer", "--json", store=part)
    assert r.code == 0, r.err
    assert set(fetched(front)) == wanted | others | {config}
    done = json.loads(r.out.splitlines()[-1])
    assert done["bytes_moved"] == sum(x["size"] for x in layers if x["digest"] in wanted | others) \
        + manifest.document["config"]["size"]
    assert stored_blobs(part) == wanted | others | {config, manifest.digest}

    # The store says it is partial, and which components are missing.
    (entry,) = Store.open(part).entries()
    assert entry.partial == "components=transformer"
    r = cli("show", pushed, store=part)
    assert r.code == 0 and "partial" in r.out and "text_encoder, vae" in r.out
    r = cli("list", "--json", store=part)
    assert "components=transformer" in r.out

    # verify accepts what is there and says it is partial; prune keeps the partial model's blobs.
    r = cli("verify", store=part)
    assert r.code == 0, r.out + r.err
    assert "partial model (components=transformer)" in r.err
    assert cli("prune", store=part).code == 0
    assert stored_blobs(part) == wanted | others | {config, manifest.digest}

    # run names what is missing instead of failing on the first absent tensor.
    r = cli("run", pushed, "a fox", "--size", "32x32", "--steps", "1", "-o", str(tmp_path / "x.png"), store=part)
    assert r.code != 0 and not (tmp_path / "x.png").exists()
    assert "text_encoder" in r.err and "vae" in r.err and "transformer" not in r.err.split("missing")[-1], r.err

    # A full pull fetches exactly what was left out.
    front.log.clear()
    r = cli("pull", pushed, store=part)
    assert r.code == 0, r.err
    assert set(fetched(front)) == left_out
    assert Store.open(part).entries()[0].partial is None
    assert Store.open(part).get_manifest(pushed).raw == manifest.raw
    assert cli("verify", store=part).code == 0
    assert cli("export", pushed, str(tmp_path / "export"), store=part).code == 0


def test_include_glob_and_unknown_component(cli, store, pushed, front, tmp_path):
    manifest = store.get_manifest("tiny:1")
    layers = manifest.document["layers"]
    glob = "vae/decoder.*"
    wanted = {x["digest"] for x in layers if x["mediaType"] == spec.TENSOR_MEDIA_TYPE
              and fnmatch.fnmatchcase(x["annotations"][spec.TITLE_ANNOTATION], glob)}
    others = {x["digest"] for x in layers if x["mediaType"] != spec.TENSOR_MEDIA_TYPE}
    assert wanted
    r = cli("pull", pushed, "--include", glob, store=tmp_path / "glob")
    assert r.code == 0, r.err
    assert set(fetched(front)) == wanted | others | {manifest.document["config"]["digest"]}
    assert Store.open(tmp_path / "glob").entries()[0].partial == f"include={glob}"

    r = cli("pull", pushed, "--component", "unet", store=tmp_path / "bad")
    assert r.code == 2 and "unet" in r.err and "transformer" in r.err
    assert not [p for p in (tmp_path / "bad").rglob("*") if p.is_file() and "blobs" in p.parts]
