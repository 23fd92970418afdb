"""Quantized and cast models end to end: create --quantize/--dtype -> push -> pull -> run on the tiny Z-Image
model, PSNR against diffusers' float32 image; convert shares unchanged blobs; every layout ollama wrote imports,
conforms as the ollama flavour and runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx.core")

from fixtures_registry import needs_registry  # noqa: E402
from fixtures_runtime import load_reference  # noqa: E402
from ollama_layouts import write_ollama_model  # noqa: E402

from imgpack.conformance.suite import run_target  # noqa: E402
from imgpack.conformance.verify import verify_store  # noqa: E402
from imgpack.packager.convert import convert_model  # noqa: E402
from imgpack.packager.create import create_model  # noqa: E402
from imgpack.runtime import open_pipeline  # noqa: E402
from imgpack.runtime.common.pipeline import GenerationRequest, run_to_image  # noqa: E402
from imgpack.schemas import spec  # noqa: E402
from imgpack.store.store import Store  # noqa: E402

TINY = Path(__file__).resolve().parent / "models" / "zimage-tiny"
#: Floors a few dB under what the tiny random-weight model measures (int8 50.9, mxfp8 40.1, int4 31.3, nvfp4 29.9
#: dB): random weights have no outliers, so these check the packing and the runtime path end to end, not quality.
PSNR_FLOOR = {"int8": 45.0, "mxfp8": 36.0, "int4": 27.0, "nvfp4": 26.0}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def reference_request() -> tuple[GenerationRequest, np.ndarray]:
    ref = load_reference("zimage-tiny", "square")
    p = ref.params
    request = GenerationRequest(prompt=p["prompt"], width=p["width"], height=p["height"],
                                steps=p["num_inference_steps"], seed=p["seed"], guidance=p["guidance_scale"],
                                negative=p["negative_prompt"] or "")
    return request, ref.data["image"]


@needs_registry
@pytest.mark.usefixtures("isolated_credentials")
@pytest.mark.parametrize("qtype", list(PSNR_FLOOR))
def test_quantized_model_round_trips_create_push_pull_run(qtype, cli, store, open_registry, tmp_path) -> None:
    result = create_model(store, f"q-{qtype}:1", TINY, quantize=qtype)
    assert result.quantized > 40
    manifest = store.get_manifest(f"q-{qtype}:1")
    quantized = [t for t in manifest.tensors if t.quantization]
    assert len(quantized) == result.quantized
    assert all(json.loads(t.quantization)["type"] == qtype for t in quantized)
    assert not any(t.component == "vae" for t in quantized)
    remote = f"{open_registry.host}/quantized/{qtype}:1"
    assert cli("push", f"q-{qtype}:1", remote).code == 0
    consumer = tmp_path / "consumer"
    pulled = cli("pull", remote, store=consumer)
    assert pulled.code == 0, pulled.err
    pulled_store = Store.open(consumer)
    assert verify_store(pulled_store).ok
    request, want = reference_request()
    model = open_pipeline(pulled_store, remote)
    assert model.forms["transformer"] == "stored"
    image = run_to_image(model, request)
    value = psnr(image.pixels, want)
    print(f"{qtype}: PSNR {value:.1f} dB against the float32 diffusers image")
    assert value >= PSNR_FLOOR[qtype]


def test_cast_and_convert_share_unchanged_blobs(store) -> None:
    create_model(store, "base:1", TINY, dtype="f32")
    base = store.get_manifest("base:1")
    assert {t.dtype for t in base.tensors} == {"F32"}
    converted = convert_model(store, "base:1", "base:int8", quantize="int8")
    result = store.get_manifest("base:int8")
    assert converted.quantized > 40 and converted.unchanged == len(base.tensors) - converted.quantized
    base_blobs = {t.name: t.digest for t in base.tensors}
    for t in result.tensors:
        if t.quantization:
            assert t.digest != base_blobs[t.name]
        else:
            assert t.digest == base_blobs[t.name]  # the same blob: stored once
    assert {t.name for t in result.tensors if t.component == "vae" and t.digest == base_blobs[t.name]} == \
        {t.name for t in base.tensors if t.component == "vae"}
    config = json.loads(store.read_blob(result.config.digest))
    assert config["quantization"]["type"] == "int8" and config["quantization"]["tensors"] == converted.quantized
    assert verify_store(store).ok
    request, want = reference_request()
    assert psnr(run_to_image(open_pipeline(store, "base:1"), request).pixels, want) > 60
    assert psnr(run_to_image(open_pipeline(store, "base:int8"), request).pixels, want) >= PSNR_FLOOR["int8"]


def test_quantized_export_writes_loadable_files(store, tmp_path) -> None:
    from safetensors import safe_open

    from imgpack.packager.export import export_model

    create_model(store, "qx:1", TINY, quantize="int8")
    export_model(store, "qx:1", tmp_path / "out")
    path = tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(path), "np") as f:
        keys = set(f.keys())  # noqa: SIM118 - safe_open is not a mapping
    assert "layers.0.attention.to_q.weight" in keys and "layers.0.attention.to_q.weight.scale" in keys
    assert not (tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()


@pytest.mark.parametrize("layout", ["jan-unquantized", "feb-unquantized", "mar-unquantized", "jan-fp8", "feb-q8",
                                    "feb-int8", "feb-int4", "feb-mxfp8", "feb-nvfp4", "mar-int8"])
def test_every_ollama_layout_imports_conforms_and_runs(layout, cli, store, tmp_path) -> None:
    made = write_ollama_model(TINY, tmp_path / "ollama", layout)
    assert "tokenizer/merges.txt" not in {layer["name"] for layer in made.manifest["layers"]}
    report = run_target(f"ollama:{tmp_path / 'ollama'}:z-image", None)
    assert report.ok, [f for f in report.findings if f.status == "fail"]
    assert report.info["flavour"] == "ollama"
    imported = cli("copy", f"ollama:{tmp_path / 'ollama'}:z-image", f"imported-{layout}:1")
    assert imported.code == 0, imported.err
    assert verify_store(store).ok
    request, want = reference_request()
    image = run_to_image(open_pipeline(store, f"imported-{layout}:1"), request)
    if "unquantized" in layout:
        # ollama's bytes are the source's bytes: the same pixels as diffusers' float32 run.
        assert psnr(image.pixels, want) > 60
    else:
        assert psnr(image.pixels, want) >= 26.0
    shown = cli("show", f"imported-{layout}:1", "--json")
    assert shown.code == 0 and json.loads(shown.out)["config"]["architecture"] == "ZImagePipeline"


def test_ollama_dir_round_trip_as_a_target(cli, store, tmp_path) -> None:
    """A model copied into an ollama directory is written as ollama lays it out, and reads back unchanged."""
    create_model(store, "tiny:1", TINY, fmt="ollama")
    out = tmp_path / "models"
    assert cli("copy", "tiny:1", f"ollama:{out}:library/tiny:v1").code == 0
    manifest = out / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "v1"
    assert manifest.is_file()
    assert json.loads(manifest.read_bytes())["mediaType"] == spec.DOCKER_MANIFEST
    assert all(p.name.startswith("sha256-") for p in (out / "blobs").iterdir())
    assert cli("copy", f"ollama:{out}:library/tiny:v1", "back:1").code == 0
    assert store.resolve("back:1")[1] == store.resolve("tiny:1")[1]


def test_quantized_flux2_runs(store) -> None:
    """A second architecture through the same quantized path (FLUX.2 [klein], distilled)."""
    base = Path(__file__).resolve().parent / "models" / "flux2-tiny"
    create_model(store, "f2:1", base)
    result = create_model(store, "f2:int4", base, quantize="int4")
    assert result.quantized > 0
    request = GenerationRequest("a red fox in the snow", 64, 64, seed=5)
    plain = run_to_image(open_pipeline(store, "f2:1"), request)
    quantized = run_to_image(open_pipeline(store, "f2:int4"), request)
    assert psnr(quantized.pixels, plain.pixels) >= 26.0
