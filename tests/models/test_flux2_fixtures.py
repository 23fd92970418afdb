"""Guards on the committed FLUX.2 [klein] models and reference data (see FLUX2.md), with numpy alone.

The parity tests trust these files, so a corrupted or hand-edited fixture must fail here, naming the file, tensor
or key, rather than as a confusing parity failure elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from test_model_fixtures import as_float32

MODELS = Path(__file__).resolve().parent
REFERENCE = MODELS.parent / "reference"
MODEL_DIRS = ["flux2-tiny", "flux2-base"]
CASES = [
    ("flux2-tiny", "square"),
    ("flux2-tiny", "nonsquare"),
    ("flux2-tiny", "unicode"),
    ("flux2-base", "cfg"),
    ("flux2-base", "tall"),
]
SHARDS = {("flux2-base", "transformer"): 3, ("flux2-base", "text_encoder"): 2}
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I64": 8}  # I64: the VAE's bn.num_batches_tracked


def read_safetensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """Parse a safetensors file by hand: (dtype, shape, raw bytes) per tensor, offsets contiguous."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    header.pop("__metadata__", None)
    data = raw[8 + header_len :]
    tensors, end = {}, 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, stop = info["data_offsets"]
        assert start == end, f"{path}: tensor {name} starts at {start}, previous ended at {end}"
        assert stop - start == math.prod(info["shape"]) * DTYPE_BYTES[info["dtype"]], f"{path}: {name} byte size"
        tensors[name] = (info["dtype"], info["shape"], data[start:stop])
        end = stop
    assert end == len(data), f"{path}: {len(data) - end} trailing bytes after the last tensor"
    return tensors


def expected_dtype(model: str, component: str, name: str, ndim: int) -> str:
    if name == "bn.num_batches_tracked":
        return "I64"
    if model == "flux2-tiny":
        return "BF16"
    if component == "text_encoder":
        return "F16"
    return ("BF16" if component == "transformer" else "F16") if ndim >= 2 else "F32"  # mixed storage


def test_flux2_files_match_their_checksums() -> None:
    sums = {}
    for line in (MODELS / "flux2.SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        sums[name] = digest
    for name, digest in sums.items():
        actual = hashlib.sha256((MODELS / name).read_bytes()).hexdigest()
        assert actual == digest, f"{MODELS / name}: sha256 {actual}, flux2.SHA256SUMS says {digest}"
    present = {p.relative_to(MODELS).as_posix() for d in MODEL_DIRS for p in (MODELS / d).rglob("*") if p.is_file()}
    assert present == set(sums), f"files not covered by flux2.SHA256SUMS: {sorted(present ^ set(sums))}"


def load_component(model: str, component: str) -> dict[str, tuple[str, list[int], bytes]]:
    folder = MODELS / model / component
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == SHARDS.get((model, component), 1), [f.name for f in files]
    tensors: dict[str, tuple[str, list[int], bytes]] = {}
    for path in files:
        for name, entry in read_safetensors(path).items():
            assert name not in tensors, f"{path}: tensor {name} is in two shards"
            tensors[name] = entry
    index = next(folder.glob("*.index.json"), None)
    if len(files) > 1:
        spec = json.loads(index.read_text())
        assert set(spec["weight_map"]) == set(tensors), f"{index}: weight_map disagrees with the shards"
    else:
        assert index is None
    return tensors


@pytest.mark.parametrize("model", MODEL_DIRS)
@pytest.mark.parametrize("component", ["transformer", "text_encoder", "vae"])
def test_flux2_weights_are_well_formed_and_nontrivial(model: str, component: str) -> None:
    tensors = load_component(model, component)
    for name, (dtype, shape, buf) in tensors.items():
        assert dtype == expected_dtype(model, component, name, len(shape)), f"{model}/{component}/{name} is {dtype}"
        if dtype == "I64":
            continue
        values = as_float32(dtype, buf)
        assert np.isfinite(values).all(), f"{model}/{component}/{name} has non-finite values"
        if values.size > 1:
            assert values.std() > 0, f"{model}/{component}/{name} is constant"
    if component == "text_encoder":
        prefixed = model == "flux2-tiny"  # Qwen3ForCausalLM keys; the base model is stored as a bare Qwen3Model
        assert all(n.startswith("model.") == prefixed for n in tensors if n != "lm_head.weight")
        assert ("lm_head.weight" in tensors) == prefixed  # untied in the tiny model, like Qwen3-8B


@pytest.mark.parametrize("model", MODEL_DIRS)
def test_flux2_configs_are_consistent(model: str) -> None:
    def read(name: str) -> dict:
        return json.loads((MODELS / model / name).read_text())

    index, tr, te, vae = (read(n) for n in ("model_index.json", "transformer/config.json",
                                            "text_encoder/config.json", "vae/config.json"))
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] == (model == "flux2-tiny")
    assert tr["joint_attention_dim"] == 3 * te["hidden_size"] and te["num_hidden_layers"] >= 27
    assert tr["in_channels"] == 4 * vae["latent_channels"] == 128 and len(vae["block_out_channels"]) == 4
    assert sum(tr["axes_dims_rope"]) == tr["attention_head_dim"] and not tr["guidance_embeds"]
    sched = read("scheduler/scheduler_config.json")
    assert sched["use_dynamic_shifting"] and sched["time_shift_type"] == "exponential"


def bn_statistics(model: str) -> tuple[np.ndarray, np.ndarray, float]:
    tensors = load_component(model, "vae")
    eps = json.loads((MODELS / model / "vae" / "config.json").read_text())["batch_norm_eps"]
    mean, var = (as_float32(*tensors[f"bn.running_{k}"][::2]) for k in ("mean", "var"))
    return mean, var, eps


@pytest.mark.parametrize(("model", "case"), CASES)
def test_flux2_reference_is_self_consistent(model: str, case: str) -> None:
    """The documented formulas (FLUX2.md) reproduce each captured value from the previous ones."""
    ref = np.load(REFERENCE / model / f"{case}.npz")
    p = json.loads(str(ref["params"]))
    h, w, n, g = p["height"] // 16, p["width"] // 16, p["num_inference_steps"], p["guidance_scale"]
    noise = np.random.default_rng(p["seed"]).standard_normal((1, 128, h, w), dtype=np.float32)
    assert np.array_equal(ref["initial_latents"], noise)
    assert p["do_classifier_free_guidance"] == (g > 1 and not p["is_distilled"])
    for prefix in ("", "negative_") if p["do_classifier_free_guidance"] else ("",):
        assert str(ref[f"{prefix}prompt_text"]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        valid = int(ref[f"{prefix}attention_mask"].sum())
        assert (ref[f"{prefix}input_ids"][0, valid:] == 452).all() and ref[f"{prefix}input_ids"].shape == (1, 512)
        assert ref[f"{prefix}prompt_embeds"].shape[0] == 512
    # schedule
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    slope = ((a2 * h * w + b2) - (a1 * h * w + b1)) / 190.0
    assert float(ref["mu"]) == pytest.approx(slope * n + (a2 * h * w + b2) - 200.0 * slope, abs=1e-12)
    ramp = np.linspace(1.0, 1.0 / n, n).astype(np.float32)
    mu = float(ref["mu"])
    assert np.array_equal(ref["sigmas"][:-1], (math.exp(mu) / (math.exp(mu) + (1 / ramp - 1))).astype(np.float32))
    assert np.array_equal(ref["transformer_timesteps"], ref["timesteps"] / np.float32(1000))
    # packing and the first step
    packed = noise.reshape(1, 128, h * w).transpose(0, 2, 1)
    assert np.array_equal(ref["transformer_in_hidden_states"], packed)
    v = ref["transformer_out"][:1]
    if p["do_classifier_free_guidance"]:
        v = ref["transformer_out"][1:] + g * (v - ref["transformer_out"][1:])
    step0 = packed + (ref["sigmas"][1] - ref["sigmas"][0]) * v
    assert np.allclose(ref["step_latents"][0], step0, atol=1e-6)
    assert np.array_equal(ref["final_latents"], ref["step_latents"][-1])
    # decode input: unpack, de-normalise with the VAE's batch-norm statistics, unpatchify
    mean, var, eps = bn_statistics(model)
    lat = ref["final_latents"].transpose(0, 2, 1).reshape(1, 128, h, w)
    lat = lat * np.sqrt(var + eps)[None, :, None, None] + mean[None, :, None, None]
    lat = lat.reshape(1, 32, 2, 2, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(1, 32, 2 * h, 2 * w)
    assert np.allclose(ref["vae_in"], lat, atol=1e-6)
    pixels = np.clip(ref["vae_out"][0] / 2 + 0.5, 0, 1).transpose(1, 2, 0)
    assert np.array_equal((pixels * 255).round().astype(np.uint8), ref["image"])


@pytest.mark.parametrize(("model", "case"), CASES)
def test_flux2_reference_png_and_tokens(model: str, case: str) -> None:
    image_mod = pytest.importorskip("PIL.Image")
    tokenizers = pytest.importorskip("tokenizers")
    ref = np.load(REFERENCE / model / f"{case}.npz")
    png = np.asarray(image_mod.open(REFERENCE / model / f"{case}.png").convert("RGB"))
    assert np.array_equal(png, ref["image"])
    tok = tokenizers.Tokenizer.from_file(str(MODELS / model / "tokenizer" / "tokenizer.json"))
    ids = tok.encode(str(ref["prompt_text"])).ids
    assert ref["input_ids"][0, : len(ids)].tolist() == ids and int(ref["attention_mask"].sum()) == len(ids)
