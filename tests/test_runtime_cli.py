"""``imgpack run`` and ``imgpack doctor`` end to end: exit codes, messages, the PNG written, and the runtime
being optional (``imgpack --help`` and a clear install hint without MLX)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fixtures_runtime import MODELS, load_reference

pytest.importorskip("mlx.core")


@pytest.fixture
def tiny_store(store, store_dir: Path) -> Path:
    from imgpack.packager.create import create_model

    create_model(store, "tiny:latest", MODELS / "zimage-tiny")
    return store_dir


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        return np.array(img)


def assert_image_matches(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    within = float((np.abs(got.astype(np.int16) - want.astype(np.int16)) <= 1).mean())
    assert within >= 0.999, f"only {within:.4%} of pixels within 1/255"


def test_run_writes_png_and_reports_progress(cli, tiny_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "fox.png"
    r = cli("run", "tiny", "a red fox in the snow", "--size", "64x64", "--seed", "42", "-o", str(out))
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[:8] == [f"Generating: step {i}/8" for i in range(1, 9)]
    assert lines[-1] == f"Saved {out}"
    assert_image_matches(read_png(out), load_reference("zimage-tiny", "square").data["image"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "store") == ["fox.png"]


def test_run_nonsquare_with_guidance_and_negative(cli, tiny_store: Path, tmp_path: Path) -> None:
    ref = load_reference("zimage-tiny", "cfg")
    out = tmp_path / "cfg.png"
    r = cli(
        "run", "tiny", "a lighthouse at dusk", "--negative", "blurry, low quality", "--guidance", "3",
        "--steps", "4", "--seed", "3", "--size", "64x64", "-o", str(out),
    )  # fmt: skip
    assert r.code == 0, r.err
    assert "Generating: step 4/4" in r.out
    assert_image_matches(read_png(out), ref.data["image"])

    out = tmp_path / "wide.png"
    r = cli("run", "tiny", "a red fox in the snow", "--size", "96x64", "--seed", "7", "-o", str(out))
    assert r.code == 0, r.err
    assert_image_matches(read_png(out), load_reference("zimage-tiny", "nonsquare").data["image"])


def test_default_output_is_timestamped_in_cwd(cli, tiny_store: Path, tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    r = cli("run", "tiny", "a fox", "--size", "32x32", "--steps", "2", "--seed", "5")
    assert r.code == 0, r.err
    files = list(work.iterdir())
    assert len(files) == 1 and files[0].name.startswith("imgpack-") and files[0].name.endswith("-5.png")
    assert r.out.splitlines()[-1] == f"Saved {files[0]}"
    assert read_png(files[0]).shape == (32, 32, 3)


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("65x64", "width 65 is not a positive multiple of 16"),
        ("64x40", "height 40 is not a positive multiple of 16"),
        ("big", "'big' is not WIDTHxHEIGHT"),
        ("0x64", "width 0 is not a positive multiple of 16"),
    ],
)
def test_bad_size_is_usage_error(cli, tiny_store: Path, tmp_path: Path, size: str, message: str) -> None:
    out = tmp_path / "x.png"
    r = cli("run", "tiny", "a fox", "--size", size, "-o", str(out))
    assert r.code == 2
    assert f"imgpack: error: --size: {message}" in r.err
    assert not out.exists()


def test_bad_steps_and_guidance_are_usage_errors(cli, tiny_store: Path) -> None:
    assert cli("run", "tiny", "a fox", "--steps", "0").code == 2
    r = cli("run", "tiny", "a fox", "--guidance", "-1")
    assert r.code == 2 and "--guidance" in r.err


def test_unknown_model_is_not_found(cli, tiny_store: Path, tmp_path: Path) -> None:
    r = cli("run", "nosuch", "a fox", "-o", str(tmp_path / "x.png"))
    assert r.code == 4
    assert "nosuch" in r.err


def test_missing_output_directory(cli, tiny_store: Path, tmp_path: Path) -> None:
    r = cli("run", "tiny", "a fox", "-o", str(tmp_path / "nodir" / "x.png"))
    assert r.code == 1 and "does not exist" in r.err


def test_missing_tensor_via_cli_names_it(cli, store, tiny_store: Path, tmp_path: Path) -> None:
    import json

    doc = json.loads(store.get_manifest("tiny:latest").raw)
    doc["layers"] = [x for x in doc["layers"] if x.get("name") != "vae/decoder.conv_out.weight"]
    store.put_manifest("broken:latest", json.dumps(doc).encode())
    out = tmp_path / "x.png"
    r = cli("run", "broken", "a fox", "--size", "32x32", "-o", str(out))
    assert r.code == 1
    assert "lacks tensor 'vae/decoder.conv_out.weight'" in r.err
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_verbose_reports_blas_and_memory(cli, tiny_store: Path, tmp_path: Path) -> None:
    from imgpack.runtime.backend import BLAS

    r = cli("run", "tiny", "a fox", "--size", "32x32", "--steps", "1", "-v", "-o", str(tmp_path / "v.png"))
    assert r.code == 0, r.err
    assert f"BLAS: {BLAS.describe()}; numpy's (the CPU kernels'): " in r.err
    assert "memory: weights" in r.err and "loaded transformer" in r.err


def test_doctor_reports_blas_and_speed(cli) -> None:
    r = cli("doctor")
    assert r.code == 0, r.err
    assert "mlx " in r.out and "device " in r.out
    blas = next(line for line in r.out.splitlines() if line.startswith("BLAS"))
    matmul = next(line for line in r.out.splitlines() if line.startswith("matmul"))
    assert float(matmul.split()[1]) > 0
    if sys.platform.startswith("linux"):
        from imgpack.runtime.backend import BLAS
        from imgpack.runtime.cpu_pool import numpy_blas_core

        assert BLAS.describe() in blas
        numpy_blas = next(line for line in r.out.splitlines() if line.startswith("numpy BLAS"))
        core = numpy_blas_core()  # numpy's wheels bundle an OpenBLAS on Linux: its kernels are named
        assert core and f"{core} kernels" in numpy_blas
        forced = os.environ.get("OPENBLAS_CORETYPE")
        assert (f"(OPENBLAS_CORETYPE={forced})" in numpy_blas) == bool(forced)


def test_linux_loads_openblas_before_mlx() -> None:
    """A fresh interpreter importing the runtime gets cmeel-openblas mapped in, without any user action."""
    if not sys.platform.startswith("linux"):
        pytest.skip("OpenBLAS preloading is Linux-only")
    pytest.importorskip("cmeel")
    code = textwrap.dedent(
        """
        import imgpack.runtime.backend as b
        maps = open("/proc/self/maps").read()
        print(b.BLAS.library)
        print("libopenblas" in maps)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    library, mapped = r.stdout.split()
    assert library.endswith("libopenblas.so.0") and mapped == "True"


def test_without_mlx_help_works_and_run_explains(tmp_path: Path) -> None:
    """Block mlx in a fresh interpreter: --help still lists run/doctor, run fails with the install hint."""
    code = textwrap.dedent(
        f"""
        import sys
        for name in ("mlx", "mlx.core", "mlx.nn"):
            sys.modules[name] = None
        from imgpack.cli.main import main
        code = main(["--help"]) if sys.argv[1] == "help" else main(
            ["--store", {str(tmp_path / "store")!r}, "run", "tiny", "a fox", "--size", "32x32"])
        sys.exit(code)
        """
    )
    r = subprocess.run([sys.executable, "-c", code, "help"], capture_output=True, text=True, timeout=120)
    assert "run" in r.stdout and "doctor" in r.stdout
    r = subprocess.run([sys.executable, "-c", code, "run"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "pip install 'imgpack[runtime]'" in r.stderr


def test_bad_seed_and_output_are_refused_before_any_work(cli, tiny_store: Path, tmp_path: Path) -> None:
    r = cli("run", "tiny", "a fox", "--seed", "-1", "-o", str(tmp_path / "x.png"))
    assert r.code == 2 and "--seed" in r.err
    folder = tmp_path / "folder.png"
    folder.mkdir()
    r = cli("run", "tiny", "a fox", "--size", "64x64", "-o", str(folder))
    assert r.code == 1 and "is a directory" in r.err


def test_every_command_and_option_has_help() -> None:
    """``imgpack CMD --help`` explains every option: a flag without help is a flag nobody can discover."""
    import argparse

    from imgpack.cli.main import build_parser

    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {id(action.choices[c.dest]) for c in action._choices_actions if c.help}
                seen: set[int] = set()
                for name, sub in action.choices.items():
                    if id(sub) in seen:  # an alias (ls for list)
                        continue
                    seen.add(id(sub))
                    if id(sub) not in helped:
                        missing.append(f"{path} {name} (the command)")
                    walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "imgpack")
    assert not missing, "options without help:\n" + "\n".join(missing)
