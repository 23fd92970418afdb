"""``imgpack run DIR``: a model straight from a directory of title-named layer files, which is what ``oras pull``
writes and what a Kubernetes image volume mounts. The directory comes from a real oras-py pull of a real push,
and the image must be the same PNG, byte for byte, as a run from the store.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fixtures_registry import needs_registry

from imgpack.schemas import spec

pytestmark = [needs_registry, pytest.mark.usefixtures("isolated_credentials", "no_network_env")]

ARGS = ["a red fox in the snow", "--size", "32x32", "--steps", "2", "--seed", "11"]


@pytest.fixture
def oras_dir(cli, store, tiny_model, open_registry, tmp_path) -> Path:
    oras = pytest.importorskip("oras.client")
    assert cli("create", "tiny:1", str(tiny_model)).code == 0
    ref = f"{open_registry.host}/volume:1"
    assert cli("push", "tiny:1", ref).code == 0
    out = tmp_path / "oras-pull"
    oras.OrasClient(insecure=True).pull(target=ref, outdir=str(out))
    return out


def test_oras_pull_is_one_file_per_layer_named_by_title(store, oras_dir: Path) -> None:
    manifest = store.get_manifest("tiny:1")
    titles = {layer["annotations"][spec.TITLE_ANNOTATION] for layer in manifest.document["layers"]}
    on_disk = {p.relative_to(oras_dir).as_posix() for p in oras_dir.rglob("*") if p.is_file()}
    assert on_disk == titles
    for layer in manifest.document["layers"]:  # each file is that layer's blob, byte for byte
        title = layer["annotations"][spec.TITLE_ANNOTATION]
        assert (oras_dir / title).read_bytes() == store.read_blob(layer["digest"], verify=False)


def test_run_dir_gives_the_same_png_as_run_from_the_store(cli, oras_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("mlx.core")
    r = cli("run", "tiny:1", *ARGS, "-o", str(tmp_path / "store.png"))
    assert r.code == 0, r.err
    r = cli("run", str(oras_dir), *ARGS, "-o", str(tmp_path / "dir.png"))
    assert r.code == 0, r.err
    assert (tmp_path / "dir.png").read_bytes() == (tmp_path / "store.png").read_bytes()


def test_run_dir_errors_name_the_directory_and_file(cli, oras_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("mlx.core")
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("run", str(empty), *ARGS, "-o", str(tmp_path / "x.png"))
    assert r.code == 1 and str(empty) in r.err and "model_index.json" in r.err
    broken = tmp_path / "broken"
    shutil.copytree(oras_dir, broken)
    victim = next(p for p in sorted((broken / "vae").iterdir()) if not p.name.endswith(spec.HEADER_TITLE_SUFFIX))
    victim.write_bytes(victim.read_bytes()[:-4])  # a truncated tensor file
    r = cli("run", str(broken), *ARGS, "-o", str(tmp_path / "y.png"))
    assert r.code != 0 and f"vae/{victim.name}" in r.err, r.err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_back_to_a_diffusers_directory(cli, tiny_model: Path, open_registry, oras_dir: Path, tmp_path: Path) -> None:
    """The README's way back to the diffusers layout: pull with imgpack, then export (byte-identical)."""
    ref = f"{open_registry.host}/volume:1"
    other = tmp_path / "elsewhere"
    assert cli("pull", ref, store=other).code == 0
    assert cli("export", ref, str(tmp_path / "diffusers"), store=other).code == 0
    files = {p.relative_to(tiny_model).as_posix(): p.read_bytes() for p in tiny_model.rglob("*") if p.is_file()}
    out = tmp_path / "diffusers"
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
