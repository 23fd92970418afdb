"""Guards on the committed tiny models and reference data.

Other tests trust these files blindly, so a corrupted or hand-edited fixture must fail here, with
the file, tensor or key named, not as a confusing parity failure somewhere else.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

MODELS = Path(__file__).resolve().parent
REFERENCE = MODELS.parent / "reference"
MODEL_DIRS = ["zimage-tiny", "zimage-sharded"]
CASES = [("zimage-tiny", "square"), ("zimage-tiny", "nonsquare"), ("zimage-tiny", "cfg"), ("zimage-sharded", "square")]

DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4}
EXPECTED_DTYPES = {
    ("zimage-tiny", "transformer"): "BF16",
    ("zimage-tiny", "text_encoder"): "BF16",
    ("zimage-tiny", "vae"): "BF16",
    ("zimage-sharded", "transformer"): "F16",
    ("zimage-sharded", "text_encoder"): "F32",
    ("zimage-sharded", "vae"): "BF16",
}
EXPECTED_SHARDS = {
    ("zimage-tiny", "transformer"): 1,
    ("zimage-tiny", "text_encoder"): 1,
    ("zimage-sharded", "transformer"): 3,
    ("zimage-sharded", "text_encoder"): 2,
}


def read_checksums(root: Path) -> dict[str, str]:
    sums = {}
    for line in (root / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        sums[name] = digest
    return sums


@pytest.mark.parametrize("root", [MODELS, REFERENCE], ids=["models", "reference"])
def test_committed_files_match_their_checksums(root: Path) -> None:
    sums = read_checksums(root)
    assert sums, f"{root / 'SHA256SUMS'} lists no files"
    for name, digest in sums.items():
        actual = hashlib.sha256((root / name).read_bytes()).hexdigest()
        assert actual == digest, f"{root / name}: sha256 {actual}, SHA256SUMS says {digest}"
    if root == MODELS:
        present = {p.relative_to(root).as_posix() for d in MODEL_DIRS for p in (root / d).rglob("*") if p.is_file()}
    else:
        present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix in (".npz", ".png")}
    assert present == set(sums), f"files not covered by SHA256SUMS: {sorted(present ^ set(sums))}"


def read_safetensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """Parse a safetensors file by hand: (dtype, shape, raw bytes) per tensor."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    header.pop("__metadata__", None)
    data = raw[8 + header_len :]
    tensors = {}
    end = 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, stop = info["data_offsets"]
        assert start == end, f"{path}: tensor {name} starts at {start}, previous ended at {end}"
        count = int(np.prod(info["shape"], dtype=np.int64))
        assert stop - start == count * DTYPE_BYTES[info["dtype"]], f"{path}: tensor {name} has wrong byte size"
        tensors[name] = (info["dtype"], info["shape"], data[start:stop])
        end = stop
    assert end == len(data), f"{path}: {len(data) - end} trailing bytes after the last tensor"
    return tensors


def as_float32(dtype: str, buf: bytes) -> np.ndarray:
    if dtype == "BF16":
        return (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(buf, dtype="<f2" if dtype == "F16" else "<f4").astype(np.float32)


@pytest.mark.parametrize("model", MODEL_DIRS)
@pytest.mark.parametrize("component", ["transformer", "text_encoder", "vae"])
def test_weights_are_well_formed_and_nontrivial(model: str, component: str) -> None:
    folder = MODELS / model / component
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == EXPECTED_SHARDS.get((model, component), 1), [f.name for f in files]
    seen: dict[str, str] = {}
    for path in files:
        for name, (dtype, _shape, buf) in read_safetensors(path).items():
            assert name not in seen, f"{path}: tensor {name} also in {seen[name]}"
            seen[name] = path.name
            assert dtype == EXPECTED_DTYPES[(model, component)], f"{path}: tensor {name} is {dtype}"
            values = as_float32(dtype, buf)
            assert np.isfinite(values).all(), f"{path}: tensor {name} has non-finite values"
            if values.size > 1:
                assert values.std() > 0, f"{path}: tensor {name} is constant ({values[0]})"
    if component == "text_encoder":
        assert all(n.startswith("model.") for n in seen), "text encoder keys must carry the model. prefix"
        assert "lm_head.weight" not in seen  # tied embeddings, as in the real checkpoint
    index = next(folder.glob("*.index.json"), None)
    if len(files) > 1:
        assert index is not None, f"{folder}: shards without an index"
        spec = json.loads(index.read_text())
        assert spec["weight_map"] == seen, f"{index}: weight_map disagrees with the shards"
        total = sum(len(t[2]) for f in files for t in read_safetensors(f).values())
        assert spec["metadata"]["total_size"] == total
    else:
        assert index is None


@pytest.mark.parametrize("model", MODEL_DIRS)
def test_transformer_config_is_consistent(model: str) -> None:
    cfg = json.loads((MODELS / model / "transformer" / "config.json").read_text())
    te = json.loads((MODELS / model / "text_encoder" / "config.json").read_text())
    assert cfg["dim"] // cfg["n_heads"] == sum(cfg["axes_dims"])
    assert cfg["cap_feat_dim"] == te["hidden_size"]
    assert (cfg["n_layers"], cfg["n_refiner_layers"], cfg["n_heads"]) == (2, 1, 2)
    index = json.loads((MODELS / model / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    sched = json.loads((MODELS / model / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["shift"], sched["use_dynamic_shifting"]) == (3.0, False)


@pytest.mark.parametrize("model,case", CASES)
def test_reference_case_is_self_consistent(model: str, case: str) -> None:
    ref = np.load(REFERENCE / model / f"{case}.npz")
    assert ref["params"].shape == ref["prompt_text"].shape == ()
    params = json.loads(str(ref["params"]))
    h, w, n = params["height"] // 8, params["width"] // 8, params["num_inference_steps"]
    noise = np.random.default_rng(params["seed"]).standard_normal((1, 16, h, w), dtype=np.float32)
    assert np.array_equal(ref["initial_latents"], noise)
    assert ref["input_ids"].shape == ref["attention_mask"].shape == (1, params["max_sequence_length"])
    valid = int(ref["attention_mask"].sum())
    assert ref["prompt_embeds"].shape[0] == valid
    assert np.array_equal(ref["prompt_embeds"], ref["transformer_in_caption"])
    assert np.array_equal(ref["prompt_embeds"], ref["text_hidden_states"][-2])
    raw = np.linspace(1.0, 1.0 / n, n)
    assert np.allclose(ref["sigmas"], np.append(3 * raw / (1 + 2 * raw), 0.0), atol=1e-6)
    assert np.allclose(ref["transformer_timesteps"], (1000 - ref["timesteps"]) / 1000, atol=1e-7)
    pos = ref["transformer_out"][0, :, 0]
    g = params["guidance_scale"]
    pred = pos + g * (pos - ref["transformer_out"][1, :, 0]) if g > 0 else pos
    step0 = ref["initial_latents"][0] - (ref["sigmas"][1] - ref["sigmas"][0]) * pred
    assert np.allclose(ref["step_latents"][0, 0], step0, atol=1e-5)
    assert np.array_equal(ref["final_latents"], ref["step_latents"][-1])
    assert np.allclose(ref["vae_in"], ref["final_latents"] / 0.3611 + 0.1159, atol=1e-6)
    pixels = np.clip(ref["vae_out"][0] / 2 + 0.5, 0, 1).transpose(1, 2, 0)
    assert np.array_equal((pixels * 255).round().astype(np.uint8), ref["image"])
    assert ref["image"].shape == (params["height"], params["width"], 3)
    assert len(np.unique(ref["image"])) > 64, "reference image is nearly flat"


@pytest.mark.parametrize("model,case", CASES)
def test_reference_png_and_tokens(model: str, case: str) -> None:
    image_mod = pytest.importorskip("PIL.Image")
    tokenizers = pytest.importorskip("tokenizers")
    ref = np.load(REFERENCE / model / f"{case}.npz")
    png = np.asarray(image_mod.open(REFERENCE / model / f"{case}.png").convert("RGB"))
    assert np.array_equal(png, ref["image"])
    tok = tokenizers.Tokenizer.from_file(str(MODELS / model / "tokenizer" / "tokenizer.json"))
    pad = tok.token_to_id("<|endoftext|>")
    for prefix in ["", "negative_"] if "negative_prompt_text" in ref else [""]:
        ids = tok.encode(str(ref[f"{prefix}prompt_text"])).ids
        expected = np.array(ids + [pad] * (ref[f"{prefix}input_ids"].shape[1] - len(ids)), dtype=np.int64)
        assert np.array_equal(ref[f"{prefix}input_ids"][0], expected)
        assert int(ref[f"{prefix}attention_mask"].sum()) == len(ids)
