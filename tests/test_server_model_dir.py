"""``imgpack serve --model-dir``: a model served in place from the directory a generic OCI client writes.

The directory is made the way a user (or a Kubernetes image volume) makes it: the committed tiny model is pushed to
a real ``docker-registry`` and pulled back with oras-py, which writes one file per layer named by its title. The
server runs as its own process over an empty store; its image must be byte for byte the PNG ``imgpack run`` writes
from the store with the same seed, size and steps.
"""

from __future__ import annotations

import base64
import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fixtures_runtime import MODELS

if importlib.util.find_spec("mlx") is None:  # not imported here: the runtime picks its BLAS before MLX loads
    pytest.skip("the MLX runtime is not installed", allow_module_level=True)
openai = pytest.importorskip("openai")
oras_client = pytest.importorskip("oras.client")

pytestmark = pytest.mark.timeout(300)

PROMPT, SEED, SIZE, STEPS = "a red fox in the snow", 7, "64x48", 2


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory, open_registry) -> tuple[Path, str]:
    """A store holding the tiny model, and the reference it was pushed to."""
    from imgpack.packager.create import create_model
    from imgpack.registry.operations import push
    from imgpack.store.store import Store

    root = tmp_path_factory.mktemp("model-dir") / "store"
    store = Store.open(root)
    create_model(store, "zimage-tiny:latest", MODELS / "zimage-tiny")
    ref = f"{open_registry.host}/tiny:v1"
    push(store, "zimage-tiny:latest", ref)
    return root, ref


@pytest.fixture(scope="module")
def oras_dir(tmp_path_factory: pytest.TempPathFactory, pushed: tuple[Path, str]) -> Path:
    """What ``oras pull`` of the pushed model writes: title-named files, one per layer."""
    out = tmp_path_factory.mktemp("oras") / "zimage-tiny"
    oras_client.OrasClient(insecure=True).pull(target=pushed[1], outdir=str(out))
    assert (out / "model_index.json").is_file() and (out / "transformer" / "config.json").is_file()
    return out


@pytest.fixture(scope="module")
def run_png(tmp_path_factory: pytest.TempPathFactory, pushed: tuple[Path, str]) -> bytes:
    """The PNG ``imgpack run`` writes from the store (its own process, as the server is)."""
    out = tmp_path_factory.mktemp("run") / "fox.png"
    done = subprocess.run([sys.executable, "-m", "imgpack.cli.main", "--store", str(pushed[0]), "run", "zimage-tiny",
                           PROMPT, "--size", SIZE, "--seed", str(SEED), "--steps", str(STEPS), "-o", str(out),
                           "--quiet"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return out.read_bytes()


class Served:
    def __init__(self, process: subprocess.Popen, url: str, banner: list[str]) -> None:
        self.process, self.url, self.banner = process, url, banner


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """``serve(*model_dir_args)``: ``imgpack serve --model-dir ...`` as a process over an empty store."""
    started: list[subprocess.Popen] = []

    def start(*model_dirs: str) -> Served:
        argv = [sys.executable, "-m", "imgpack.cli.main", "--store", str(tmp_path / "empty-store"), "serve",
                "--port", "0", "--quiet"]
        for value in model_dirs:
            argv += ["--model-dir", value]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started.append(process)
        assert process.stdout is not None
        banner = []
        for line in process.stdout:
            banner.append(line.rstrip("\n"))
            if " at http://" in line:
                url = line.split(" at ", 1)[1].split()[0]
                return Served(process, url, banner)
        raise AssertionError(f"the server did not start: {banner}")

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def generate(url: str, model: str) -> bytes:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    result = client.images.generate(model=model, prompt=PROMPT, size=SIZE, response_format="b64_json",
                                    extra_body={"seed": SEED, "steps": STEPS})
    return base64.b64decode(result.data[0].b64_json)


def test_oras_pulled_directory_serves_the_image_run_makes(serve, oras_dir: Path, run_png: bytes,
                                                          tmp_path: Path) -> None:
    served = serve(str(oras_dir))
    assert served.banner[0].startswith(f"imgpack: zimage-tiny:latest is {oras_dir.resolve()}")
    png = generate(served.url, "zimage-tiny")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png == run_png
    listed = requests.get(served.url + "/v1/models", timeout=30).json()["data"]
    assert [row["id"] for row in listed] == ["zimage-tiny:latest"]
    tags = requests.get(served.url + "/api/tags", timeout=30).json()["models"]
    assert [(t["name"], t["details"]["family"]) for t in tags] == [("zimage-tiny:latest", "zimage")]
    assert tags[0]["size"] == sum(p.stat().st_size for p in oras_dir.rglob("*") if p.is_file()
                                  and not p.name.endswith((".safetensors.header", ".safetensors")))
    # Served in place: the store the server opened received no blob.
    assert list((tmp_path / "empty-store" / "blobs" / "sha256").iterdir()) == []
    # A directory model is not the store's to delete.
    refused = requests.delete(served.url + "/api/delete", json={"model": "zimage-tiny"}, timeout=30)
    assert refused.status_code == 400 and str(oras_dir.resolve()) in refused.json()["error"]


def test_named_directories_answer_to_their_names(serve, oras_dir: Path, run_png: bytes, tmp_path: Path) -> None:
    second = tmp_path / "copy"
    shutil.copytree(oras_dir, second)
    served = serve(f"turbo={oras_dir}", f"other:v2={second}")
    listed = sorted(row["id"] for row in requests.get(served.url + "/v1/models", timeout=30).json()["data"])
    assert listed == ["other:v2", "turbo:latest"]
    assert generate(served.url, "turbo:latest") == run_png
    missing = requests.post(served.url + "/v1/images/generations", json={"model": "zimage-tiny", "prompt": "x"},
                            timeout=30)
    assert missing.status_code == 404


# -- refusals: checked at start, naming the directory and the file it lacks -----------------------------------


def serve_error(capsys, tmp_path: Path, *model_dirs: str) -> str:
    from imgpack.cli.main import main

    argv = ["--store", str(tmp_path / "store"), "serve", "--port", "0"]
    for value in model_dirs:
        argv += ["--model-dir", value]
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code in (1, 2), err
    return err


def test_directory_without_model_index(capsys, tmp_path: Path) -> None:
    empty = tmp_path / "volume"
    empty.mkdir()
    (empty / "README").write_text("not a model")
    err = serve_error(capsys, tmp_path, str(empty))
    assert f"{empty / 'model_index.json'} is missing" in err


def test_directory_missing_a_config(capsys, tmp_path: Path, oras_dir: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(oras_dir, broken)
    (broken / "transformer" / "config.json").unlink()
    err = serve_error(capsys, tmp_path, str(broken))
    assert f"{broken / 'transformer' / 'config.json'} is missing" in err


def test_directory_missing_a_tensor(capsys, tmp_path: Path, oras_dir: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(oras_dir, broken)
    victim = next(p for p in sorted((broken / "transformer").iterdir()) if p.name.endswith(".weight"))
    victim.unlink()
    err = serve_error(capsys, tmp_path, str(broken))
    assert f"tensor file {victim} is missing" in err


def test_not_a_directory_and_name_clashes(capsys, tmp_path: Path, oras_dir: Path) -> None:
    assert f"--model-dir {tmp_path / 'nowhere'}: not a directory" in serve_error(capsys, tmp_path,
                                                                                 str(tmp_path / "nowhere"))
    err = serve_error(capsys, tmp_path, f"a={oras_dir}", f"a={oras_dir}")
    assert "both named 'a:latest'" in err
    err = serve_error(capsys, tmp_path, f"Bad Name={oras_dir}")
    assert "is not a model name" in err
