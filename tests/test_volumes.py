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
from imgpack.store.store import Store

TINY = Path(__file__).resolve().parent / "models" / "zimage-tiny"

pytestmark = [needs_registry, pytest.mark.usefixtures("isolated_credentials", "no_network_env")]

ARGS = ["a red fox in the snow", "--size", "32x32", "--steps", "2", "--seed", "11"]


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory, open_registry) -> tuple[Path, str, Path]:
    """(store holding ``tiny:1``, the reference it was pushed to, the directory oras-py's pull of it wrote)."""
    oras = pytest.importorskip("oras.client")
    from imgpack.packager.create import create_model
    from imgpack.registry.operations import push

    root = tmp_path_factory.mktemp("volumes")
    store = Store.open(root / "store")
    create_model(store, "tiny:1", TINY)
    ref = f"{open_registry.host}/volume:1"
    push(store, "tiny:1", ref)
    oras.OrasClient(insecure=True).pull(target=ref, outdir=str(root / "oras-pull"))
    return root / "store", ref, root / "oras-pull"


@pytest.fixture
def oras_dir(pushed) -> Path:
    return pushed[2]


@pytest.fixture
def store(pushed) -> Store:
    return Store.open(pushed[0])


@pytest.fixture
def store_dir(pushed) -> Path:
    return pushed[0]


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


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_back_to_a_diffusers_directory(cli, tiny_model: Path, pushed, oras_dir: Path, tmp_path: Path) -> None:
    """The README's ways back to the diffusers layout, both byte-identical to what was packed: export the
    oras directory itself, or pull with imgpack and export from the store."""
    r = cli("export", str(oras_dir), str(tmp_path / "from-dir"), store=tmp_path / "unused")
    assert r.code == 0, r.err
    assert tree(tmp_path / "from-dir") == tree(tiny_model)
    ref = pushed[1]
    other = tmp_path / "elsewhere"
    assert cli("pull", ref, store=other).code == 0
    assert cli("export", ref, str(tmp_path / "from-store"), store=other).code == 0
    assert tree(tmp_path / "from-store") == tree(tiny_model)


def test_export_of_a_damaged_directory_names_the_file_and_writes_nothing(cli, oras_dir: Path,
                                                                         tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(oras_dir, broken)
    victim = broken / "transformer" / "layers.0.attention.to_q.weight"
    victim.write_bytes(victim.read_bytes()[:-4])
    r = cli("export", str(broken), str(tmp_path / "out"), store=tmp_path / "unused")
    assert r.code != 0 and str(victim) in r.err, r.err
    (broken / "vae" / "config.json").unlink()
    victim.unlink()
    r = cli("export", str(broken), str(tmp_path / "out"), store=tmp_path / "unused")
    assert r.code == 1 and str(victim) in r.err and "missing" in r.err, r.err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.export-*"))
