"""Benchmark: imgpack's MLX runtime against diffusers (torch, CPU float32) on the same medium random model.

    .venv/bin/python bench/runtime.py [--arch zimage|flux2] [--steps 3] [--sizes 256,512] [--diffusers-python PATH]

Writes a random model in the diffusers layout with numpy alone — Z-Image (transformer ~360 M parameters, a small
Qwen3 text encoder, the FLUX VAE shape) or, with ``--arch flux2``, a distilled FLUX.2 [klein] (transformer ~400 M
parameters, a 27-layer Qwen3 text encoder, the real FLUX.2 VAE); bf16 like the real checkpoints — packs it into a
temp store, then runs each
side in its own subprocess so peak RSS is measured cleanly: load time to the first denoising step, seconds per
step at each size, VAE decode time, peak RSS. Both start from the same seed noise, and the images are compared.
diffusers runs under a separate interpreter with torch and diffusers (``--diffusers-python PATH``, or
$IMGPACK_BENCH_DIFFUSERS_PYTHON), since torch never enters the project venv.

Each size runs in its own pair of processes, so the whole-image row is honest: process start to the PNG written
(imports, load, text encoding, all steps, decode, PNG encoding). ``--model real`` (Z-Image) uses Z-Image-Turbo's
real widths with fewer layers (see ``REAL_TRANSFORMER``).

Targets (issue 16): s/step <= 0.75x diffusers, VAE decode <= 0.8x, whole image <= 0.7x, load <= 0.5x, peak RSS
<= 1.3x the weights' float32 size.

A last table gives the floor: each size's step FLOPs (linear layers and attention's matmuls, from the config) at
the best sgemm rate MLX reaches here at the step's shapes, against both sides' s/step — how far from the floor
each side is, and whether a target is within the machine's reach at all. ``--floor-only --work DIR`` prints it
again for a finished run's results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_SOURCE = ROOT / "tests" / "models" / "zimage-tiny" / "tokenizer"
FLUX2_TOKENIZER_SOURCE = ROOT / "tests" / "models" / "flux2-tiny" / "tokenizer"  # Qwen3's template: thinking off
DEFAULT_DIFFUSERS_PYTHON = os.environ.get("IMGPACK_BENCH_DIFFUSERS_PYTHON", "")
PROMPT = "a red fox in the snow"
SEED = 42

TRANSFORMER = {
    "_class_name": "ZImageTransformer2DModel",
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 16,
    "dim": 1536,
    "n_layers": 8,
    "n_refiner_layers": 2,
    "n_heads": 12,
    "n_kv_heads": 12,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 1024,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
}
TEXT_ENCODER = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "attention_bias": False,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "num_attention_heads": 8,
    "num_hidden_layers": 6,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 0,  # taken from the tiny model's tokenizer
}
VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}
#: ``--model real``: Z-Image-Turbo's real widths (transformer dim 3840, 30 heads, FFN 10240, caption features 2560;
#: Qwen3-4B's hidden 2560, FFN 9728, 32/8 heads) and the real FLUX VAE, with the layer counts cut from 30 + 2 + 2
#: transformer blocks and 36 text-encoder layers so both sides fit in memory: every matmul and convolution has the
#: real model's shape, so per-layer speed is the real one; the VAE's share of the time is larger than the real
#: model's (4 transformer blocks instead of 34).
REAL_TRANSFORMER = {**TRANSFORMER, "dim": 3840, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 30,
                    "n_kv_heads": 30, "cap_feat_dim": 2560}
REAL_TEXT_ENCODER = {**TEXT_ENCODER, "hidden_size": 2560, "intermediate_size": 9728, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "num_hidden_layers": 2}
#: Z-Image configurations by ``--model``: (transformer, text encoder).
ZIMAGE_MODELS = {"medium": (TRANSFORMER, TEXT_ENCODER), "real": (REAL_TRANSFORMER, REAL_TEXT_ENCODER)}
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
             "use_dynamic_shifting": False}
MODEL_INDEX = {
    "_class_name": "ZImagePipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3Model"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

FLUX2_TRANSFORMER = {
    "_class_name": "Flux2Transformer2DModel",
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 2,
    "num_single_layers": 8,
    "attention_head_dim": 128,
    "num_attention_heads": 12,
    "joint_attention_dim": 3 * 512,  # three Qwen3 hidden states side by side
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32],
    "rope_theta": 2000,
    "eps": 1e-6,
    "guidance_embeds": False,
}
FLUX2_TEXT_ENCODER = {
    **TEXT_ENCODER,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 27,  # the pipeline reads hidden states 9, 18 and 27
}
FLUX2_VAE = {  # the real FLUX.2 VAE (AutoencoderKLFlux2's defaults)
    "_class_name": "AutoencoderKLFlux2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 32,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "use_post_quant_conv": True,
    "use_quant_conv": True,
    "batch_norm_eps": 1e-4,
    "batch_norm_momentum": 0.1,
    "patch_size": [2, 2],
}
FLUX2_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                   "use_dynamic_shifting": True, "time_shift_type": "exponential"}
FLUX2_MODEL_INDEX = {
    "_class_name": "Flux2KleinPipeline",
    "is_distilled": True,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3ForCausalLM"],
    "tokenizer": ["transformers", "Qwen2TokenizerFast"],
    "transformer": ["diffusers", "Flux2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}
#: What each side needs to know per architecture: the diffusers class, the seed-noise shape, the guidance to use.
ARCHS = {
    "zimage": {"pipeline": "ZImagePipeline", "channels": 16, "scale": 8, "guidance": 0.0},
    "flux2": {"pipeline": "Flux2KleinPipeline", "channels": 128, "scale": 16, "guidance": 1.0},
}


# -- the random model ------------------------------------------------------------------------------


def runtime_shapes(transformer: dict, text_encoder: dict) -> dict[str, dict[str, list[int]]]:
    """Checkpoint key -> torch-layout shape for each component, from the runtime's own module definitions."""
    from dataclasses import replace

    from imgpack.runtime.common.autoencoder import VAEConfig, VAEDecoder
    from imgpack.runtime.common.loader import flatten_params
    from imgpack.runtime.common.qwen3 import Qwen3Config, Qwen3TextEncoder
    from imgpack.runtime.zimage.transformer import ZImageConfig, ZImageTransformer

    te_cfg = Qwen3Config.from_dict(text_encoder)
    models = {
        # One extra layer so the blueprint (which drops the last layer) has them all.
        "text_encoder": Qwen3TextEncoder(replace(te_cfg, num_hidden_layers=te_cfg.num_hidden_layers + 1)),
        "transformer": ZImageTransformer(ZImageConfig.from_dict(transformer, {})),
        "vae": VAEDecoder(VAEConfig.from_dict(VAE)),
    }
    out: dict[str, dict[str, list[int]]] = {}
    for name, model in models.items():
        shapes = {}
        for param, array in flatten_params(model.parameters()).items():
            shape = list(array.shape)
            if len(shape) == 4:  # MLX (O, kh, kw, I) -> torch (O, I, kh, kw)
                shape = [shape[0], shape[3], shape[1], shape[2]]
            shapes[model.checkpoint_key(param)] = shape
        out[name] = shapes
    out["text_encoder"]["model.norm.weight"] = [text_encoder["hidden_size"]]
    out["vae"].update(vae_encoder_shapes())
    return out


def vae_encoder_shapes() -> dict[str, list[int]]:
    """The encoder half diffusers' AutoencoderKL expects in the checkpoint (the runtime never reads it)."""
    ch, groups_out = VAE["block_out_channels"], 2 * VAE["latent_channels"]
    shapes: dict[str, list[int]] = {}

    def conv(name: str, o: int, i: int, k: int) -> None:
        shapes[name + ".weight"], shapes[name + ".bias"] = [o, i, k, k], [o]

    def norm(name: str, c: int) -> None:
        shapes[name + ".weight"], shapes[name + ".bias"] = [c], [c]

    def resnet(name: str, i: int, o: int) -> None:
        norm(name + ".norm1", i)
        conv(name + ".conv1", o, i, 3)
        norm(name + ".norm2", o)
        conv(name + ".conv2", o, o, 3)
        if i != o:
            conv(name + ".conv_shortcut", o, i, 1)

    conv("encoder.conv_in", ch[0], VAE["in_channels"], 3)
    for b, o in enumerate(ch):
        i = ch[max(b - 1, 0)]
        for r in range(VAE["layers_per_block"]):
            resnet(f"encoder.down_blocks.{b}.resnets.{r}", i if r == 0 else o, o)
        if b < len(ch) - 1:
            conv(f"encoder.down_blocks.{b}.downsamplers.0.conv", o, o, 3)
    resnet("encoder.mid_block.resnets.0", ch[-1], ch[-1])
    resnet("encoder.mid_block.resnets.1", ch[-1], ch[-1])
    norm("encoder.mid_block.attentions.0.group_norm", ch[-1])
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        shapes[f"encoder.mid_block.attentions.0.{proj}.weight"] = [ch[-1], ch[-1]]
        shapes[f"encoder.mid_block.attentions.0.{proj}.bias"] = [ch[-1]]
    norm("encoder.conv_norm_out", ch[-1])
    conv("encoder.conv_out", groups_out, ch[-1], 3)
    return shapes


def flux2_shapes() -> dict[str, dict[str, list[int]]]:
    """Checkpoint key -> shape per component, from the architecture derivation the runtime and conformance use
    (the VAE encoder included, as diffusers loads it; the batch counter left at its default)."""
    from imgpack.architectures import flux2

    configs = {"transformer/config.json": FLUX2_TRANSFORMER, "text_encoder/config.json": FLUX2_TEXT_ENCODER,
               "vae/config.json": FLUX2_VAE}
    expectation = flux2.expected_tensors(configs)
    out: dict[str, dict[str, list[int]]] = {"text_encoder": {}, "transformer": {}, "vae": {}}
    for name, shape in {**expectation.required, **expectation.optional}.items():
        component, key = name.split("/", 1)
        if key not in ("lm_head.weight", "bn.num_batches_tracked"):  # tied embeddings; an integer buffer
            out[component][key] = shape
    return out


def random_tensor(rng: np.random.Generator, key: str, shape: list[int]) -> np.ndarray:
    """Weights scaled 1/sqrt(fan_in), norms 1, biases 0: activations stay finite through every block."""
    leaf = key.rsplit(".", 1)[-1]
    if ("norm" in key and leaf == "weight" and len(shape) == 1) or leaf == "running_var":
        return np.ones(shape, np.float32)
    if leaf in ("bias", "running_mean"):
        return np.zeros(shape, np.float32)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    scale = 0.02 if "embed_tokens" in key or "pad_token" in key else fan_in**-0.5
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)


def to_bf16_bytes(array: np.ndarray) -> bytes:
    bits = array.astype(np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).tobytes()


def write_safetensors(path: Path, shapes: dict[str, list[int]], rng: np.random.Generator) -> int:
    """Stream random bf16 tensors into one safetensors file; returns the parameter count."""
    header: dict[str, dict] = {}
    offset = 0
    for key in sorted(shapes):
        nbytes = int(np.prod(shapes[key])) * 2
        header[key] = {"dtype": "BF16", "shape": shapes[key], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for key in sorted(shapes):
            f.write(to_bf16_bytes(random_tensor(rng, key, shapes[key])))
    return sum(int(np.prod(s)) for s in shapes.values())


def make_model(directory: Path, arch: str = "zimage", model: str = "medium") -> dict[str, int]:
    """Write the random model (``model``: medium or real, Z-Image only); returns parameter counts per component."""
    flux2 = arch == "flux2"
    tokenizer = FLUX2_TOKENIZER_SOURCE if flux2 else TOKENIZER_SOURCE
    tiny_te = json.loads((tokenizer.parent / "text_encoder" / "config.json").read_text())
    transformer, text_encoder = (FLUX2_TRANSFORMER, FLUX2_TEXT_ENCODER) if flux2 else ZIMAGE_MODELS[model]
    text_encoder["vocab_size"] = tiny_te["vocab_size"]
    rng = np.random.default_rng(0)
    counts = {}
    shapes = flux2_shapes() if flux2 else runtime_shapes(transformer, text_encoder)
    vae = FLUX2_VAE if flux2 else VAE
    files = {
        "text_encoder": ("model.safetensors", text_encoder, "config.json"),
        "transformer": ("diffusion_pytorch_model.safetensors", transformer, "config.json"),
        "vae": ("diffusion_pytorch_model.safetensors", vae, "config.json"),
    }
    for component, (weights, config, config_name) in files.items():
        (directory / component).mkdir(parents=True)
        (directory / component / config_name).write_text(json.dumps(config, indent=2))
        counts[component] = write_safetensors(directory / component / weights, shapes[component], rng)
    (directory / "scheduler").mkdir()
    scheduler = FLUX2_SCHEDULER if flux2 else SCHEDULER
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    shutil.copytree(tokenizer, directory / "tokenizer")
    (directory / "model_index.json").write_text(json.dumps(FLUX2_MODEL_INDEX if flux2 else MODEL_INDEX, indent=2))
    return counts


# -- the two sides -----------------------------------------------------------------------------------

DIFFUSERS_WORKER = textwrap.dedent(
    """
    import json, resource, sys, time
    import numpy as np, torch
    import diffusers
    from PIL import Image
    t0 = time.perf_counter()
    model_dir, sizes, steps, seed, prompt, out_dir = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), \\
        int(sys.argv[4]), sys.argv[5], sys.argv[6]
    arch, spawned = json.loads(sys.argv[7]), float(sys.argv[8])
    pipe = getattr(diffusers, arch["pipeline"]).from_pretrained(model_dir, torch_dtype=torch.float32)
    marks = {}
    forward_starts = []
    forward = pipe.transformer.forward
    def timed_forward(*a, **k):
        forward_starts.append(time.perf_counter())
        return forward(*a, **k)
    pipe.transformer.forward = timed_forward
    decode = pipe.vae.decode
    def timed_decode(*a, **k):
        s = time.perf_counter(); out = decode(*a, **k); marks["decode"] = time.perf_counter() - s; return out
    pipe.vae.decode = timed_decode
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "sizes": {}}
    for size in sizes:
        stamps = []
        forward_starts.clear()
        def on_step(p, i, t, kw):
            stamps.append(time.perf_counter()); return kw
        latents = torch.from_numpy(np.random.default_rng(seed).standard_normal(
            (1, arch["channels"], size // arch["scale"], size // arch["scale"]), dtype=np.float32))
        image = pipe(prompt=prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=arch["guidance"],
                     latents=latents, callback_on_step_end=on_step, output_type="np").images[0]
        if "load_to_first_step" not in results:
            results["load_to_first_step"] = forward_starts[0] - t0
        step_times = [end - begin for begin, end in zip(forward_starts, stamps)]
        pixels = np.round(image * 255).astype(np.uint8)
        Image.fromarray(pixels).save(f"{out_dir}/diffusers-{size}.png")
        results["sizes"][str(size)] = {"step_times": step_times, "decode": marks["decode"],
                                       "to_png": time.time() - spawned}
        np.save(f"{out_dir}/diffusers-{size}.npy", pixels)
    results["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(results))
    """
)


def mlx_worker(store_dir: str, sizes: list[int], steps: int, out_dir: str, arch: str = "zimage",
               spawned: float = 0.0) -> None:
    """Runs in a fresh interpreter: the same measurements as the diffusers worker, through imgpack's API.
    ``spawned`` is the wall-clock time the parent started this process (for the whole-image row)."""
    import resource

    from imgpack.runtime import backend
    from imgpack.runtime.common.pipeline import save_png
    from imgpack.runtime.flux2.pipeline import Flux2Model
    from imgpack.runtime.flux2.pipeline import generate as flux2_generate
    from imgpack.runtime.zimage.pipeline import GenerationRequest, Image, Stage, Step, ZImageModel, generate
    from imgpack.store.store import Store

    t0 = time.perf_counter()  # after imports, as in the diffusers worker: model loading only

    # One-shot mode, as `imgpack run` uses: each network is freed once its part is done.
    model_class, generate = (Flux2Model, flux2_generate) if arch == "flux2" else (ZImageModel, generate)
    model = model_class.open(Store.open(store_dir), "bench:latest", keep_loaded=False)
    results: dict = {"blas": backend.BLAS.describe(), "sizes": {}}
    for size in sizes:
        request = GenerationRequest(PROMPT, size, size, steps=steps, seed=SEED, guidance=ARCHS[arch]["guidance"])
        model.plan_memory(request)
        step_times, decode_start, decode = [], 0.0, 0.0
        for event in generate(model, request):
            if isinstance(event, Stage) and event.name == "denoise" and "load_to_first_step" not in results:
                results["load_to_first_step"] = time.perf_counter() - t0
            elif isinstance(event, Step):
                step_times.append(event.seconds)
            elif isinstance(event, Stage) and event.name == "decode":
                decode_start = time.perf_counter()
            elif isinstance(event, Image):
                decode = time.perf_counter() - decode_start
                save_png(event.pixels, Path(out_dir) / f"mlx-{size}.png")
                to_png = time.time() - spawned
                np.save(f"{out_dir}/mlx-{size}.npy", event.pixels)
        results["sizes"][str(size)] = {"step_times": step_times, "decode": decode, "to_png": to_png}
    results["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(results))


def run_worker(command: list[str], what: str, env: dict[str, str] | None = None) -> dict:
    start = time.perf_counter()
    load = os.getloadavg()[0]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"bench: the {what} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"bench: the {what} run printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    result = json.loads(line[len("RESULT ") :])
    result["wall"] = time.perf_counter() - start
    result["load_average"] = max(load, os.getloadavg()[0])
    return result


def best_of(runs: list[dict]) -> dict:
    """Merge rounds: each timing at its best (least disturbed by other load), peak RSS at its worst."""
    best = dict(runs[0])
    best["load_to_first_step"] = min(r["load_to_first_step"] for r in runs)
    best["peak_rss"] = max(r["peak_rss"] for r in runs)
    best["load_average"] = max(r["load_average"] for r in runs)
    best["sizes"] = {
        size: {
            "step_times": [
                min(steps) for steps in zip(*(r["sizes"][size]["step_times"] for r in runs), strict=True)
            ],
            "decode": min(r["sizes"][size]["decode"] for r in runs),
            "to_png": min(r["sizes"][size]["to_png"] for r in runs),
        }
        for size in runs[0]["sizes"]
    }
    return best


def merge_sizes(per_size: list[dict]) -> dict:
    """One process per size (so each whole-image time starts at a process start): merge their results."""
    merged = dict(per_size[0])
    merged["load_to_first_step"] = min(r["load_to_first_step"] for r in per_size)
    merged["peak_rss"] = max(r["peak_rss"] for r in per_size)
    merged["load_average"] = max(r["load_average"] for r in per_size)
    merged["sizes"] = {k: {**v, "peak_rss": r["peak_rss"]} for r in per_size for k, v in r["sizes"].items()}
    return merged


def steady_step(times: list[float]) -> float:
    """Fastest step after the first (which pays one-off warm-up): the least disturbed by other load on the
    machine, for both sides alike."""
    return min(times[1:] if len(times) > 1 else times)


# -- the machine's floor ---------------------------------------------------------------------------------


def widths(arch: str, model: str) -> tuple[int, int]:
    """The bench transformer's (model width, feed-forward width)."""
    if arch == "flux2":
        dim = FLUX2_TRANSFORMER["attention_head_dim"] * FLUX2_TRANSFORMER["num_attention_heads"]
        return dim, int(dim * FLUX2_TRANSFORMER["mlp_ratio"])
    dim = ZIMAGE_MODELS[model][0]["dim"]
    return dim, int(dim / 3 * 8)


def step_flops(arch: str, model: str, size: int, text_tokens: int = 32) -> dict[str, float]:
    """Multiply-add FLOPs of one denoising step (one transformer forward, batch 1): linear layers and attention's
    two matmuls, from the bench model's config (adaLN, norms and embedders are under 0.1% and left out)."""
    dim, hidden = widths(arch, model)
    if arch == "flux2":
        cfg, mlp = FLUX2_TRANSFORMER, hidden
        tokens = (size // ARCHS[arch]["scale"]) ** 2 + 512  # Flux2KleinPipeline pads the prompt to 512 tokens
        double = 2 * (4 * dim * dim + 3 * dim * mlp)  # per token, both streams' projections and SwiGLU
        single = dim * (3 * dim + 2 * mlp) + (dim + mlp) * dim
        linear = 2 * tokens * (cfg["num_layers"] * double / 2 + cfg["num_single_layers"] * single)
        attention = 4 * tokens * tokens * dim * (cfg["num_layers"] + cfg["num_single_layers"])
        return {"linear": linear, "attention": attention, "tokens": tokens}
    cfg, ffn = ZIMAGE_MODELS[model][0], hidden
    image = (size // 16) ** 2
    per_token = 2 * (4 * dim * dim + 3 * dim * ffn)
    unified = image + text_tokens
    linear = per_token * (cfg["n_layers"] * unified + cfg["n_refiner_layers"] * (image + text_tokens))
    attention = 4 * dim * (cfg["n_layers"] * unified**2 + cfg["n_refiner_layers"] * (image**2 + text_tokens**2))
    return {"linear": linear, "attention": attention, "tokens": unified}


def sgemm_rate(tokens: int, dim: int, hidden: int, repeats: int = 5) -> float:
    """Best float32 GFLOP/s of MLX's sgemm here at a step's linear shapes (tokens x dim -> hidden -> dim)."""
    from imgpack.runtime.backend import mx

    best = 0.0
    for k, n in ((dim, dim), (dim, hidden), (hidden, dim)):
        a, w = mx.random.normal((tokens, k)), mx.random.normal((n, k))
        mx.eval(a, w, a @ w.T)
        for _ in range(repeats):
            start = time.perf_counter()
            mx.eval(a @ w.T)
            best = max(best, 2 * tokens * k * n / (time.perf_counter() - start) / 1e9)
    return best


def floor_report(arch: str, model: str, sizes: list[int], results: dict) -> None:
    """What two cores can do at best: each size's step FLOPs at the best sgemm rate measured now, against the
    s/step both sides reached in ``results`` (this run's, or a ``--work`` directory's)."""
    dim, hidden = widths(arch, model)
    print()
    print("the floor: a step's multiply-add FLOPs at the best sgemm rate measured here (MLX, float32, the step's"
          " linear shapes), every other operation free")
    print(f"{'size':<10}{'GFLOP/step':>11}{'GFLOP/s':>9}{'floor s':>9}{'imgpack s':>11}{'diffusers s':>13}"
          f"{'floor / diffusers':>19}")
    for size in sizes:
        flops = step_flops(arch, model, size)
        rate = sgemm_rate(int(flops["tokens"]), dim, hidden)
        total = (flops["linear"] + flops["attention"]) / 1e9
        floor = total / rate
        ours = steady_step(results["imgpack"]["sizes"][str(size)]["step_times"])
        theirs = steady_step(results["diffusers"]["sizes"][str(size)]["step_times"])
        print(f"{f'{size}x{size}':<10}{total:>11.0f}{rate:>9.0f}{floor:>9.2f}{ours:>11.2f}{theirs:>13.2f}"
              f"{floor / theirs:>18.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="zimage", help="which architecture to run")
    parser.add_argument("--model", choices=sorted(ZIMAGE_MODELS), default="medium",
                        help="Z-Image only: the medium model, or real widths with fewer layers (see REAL_TRANSFORMER)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--diffusers-python", default=DEFAULT_DIFFUSERS_PYTHON)
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternate the two sides this many times and keep each side's best timings")
    parser.add_argument("--work", help="working directory (default: a temp dir, removed afterwards)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--spawned", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--floor-only", action="store_true",
                        help="only print the floor table against the results.json a previous run left in --work")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker == "mlx":
        mlx_worker(args.store, sizes, args.steps, args.out, args.arch, args.spawned)
        return
    if args.floor_only:
        if not args.work or not (Path(args.work) / "results.json").exists():
            sys.exit("bench: --floor-only needs --work DIR holding a previous run's results.json")
        floor_report(args.arch, args.model, sizes, json.loads((Path(args.work) / "results.json").read_text()))
        return
    if not args.diffusers_python or not Path(args.diffusers_python).exists():
        sys.exit(f"bench: no diffusers interpreter{f' at {args.diffusers_python}' if args.diffusers_python else ''};"
                 " pass --diffusers-python PATH or set IMGPACK_BENCH_DIFFUSERS_PYTHON to a Python with torch and"
                 " diffusers (pip install torch==2.13.0 diffusers==0.42.1 transformers in its own venv)")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="imgpack-bench-"))
    try:
        model_dir, store_dir = work / "model", work / "store"
        if not (model_dir / "model_index.json").exists():
            print("writing the random model ...", flush=True)
            shutil.rmtree(model_dir, ignore_errors=True)
            make_model(model_dir, args.arch, args.model)
        from imgpack.packager.create import create_model
        from imgpack.store.store import Store

        create_model(Store.open(store_dir), "bench:latest", model_dir)
        manifest = Store.open(store_dir).get_manifest("bench:latest")
        f32_bytes = sum(int(np.prod(t.shape)) * 4 for t in manifest.tensors)
        params = {c: sum(int(np.prod(t.shape)) for t in manifest.tensors if t.name.startswith(c + "/"))
                  for c in ("text_encoder", "transformer", "vae")}
        print("parameters: " + ", ".join(f"{k} {v / 1e6:.0f} M" for k, v in params.items())
              + f"; weights at float32 {f32_bytes / 2**30:.2f} GiB", flush=True)

        # The side that can run imgpack's fast BLAS may need LD_PRELOAD on some hosts; torch never gets it.
        torch_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        per_size_refs, per_size_mine = [], []
        for size in sizes:  # one process per size and side: each whole-image time starts at a process start
            refs, mine = [], []
            for round_no in range(1, args.rounds + 1):
                print(f"{size}x{size} round {round_no}/{args.rounds}: diffusers ...", flush=True)
                refs.append(run_worker([args.diffusers_python, "-c", DIFFUSERS_WORKER, str(model_dir),
                                        json.dumps([size]), str(args.steps), str(SEED), PROMPT, str(work),
                                        json.dumps(ARCHS[args.arch]), repr(time.time())], "diffusers", torch_env))
                print(f"{size}x{size} round {round_no}/{args.rounds}: imgpack (MLX) ...", flush=True)
                mine.append(run_worker([sys.executable, __file__, "--worker", "mlx", "--store", str(store_dir),
                                        "--sizes", str(size), "--steps", str(args.steps), "--out", str(work),
                                        "--arch", args.arch, "--spawned", repr(time.time())], "MLX"))
            per_size_refs.append(best_of(refs))
            per_size_mine.append(best_of(mine))
        ref, ours = merge_sizes(per_size_refs), merge_sizes(per_size_mine)
        (work / "results.json").write_text(json.dumps({"imgpack": ours, "diffusers": ref}, indent=1))
        report(ours, ref, sizes, f32_bytes, work, args.steps)
        floor_report(args.arch, args.model, sizes, {"imgpack": ours, "diffusers": ref})
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def report(ours: dict, ref: dict, sizes: list[int], f32_bytes: int, work: Path, steps: int) -> None:
    print()
    print(f"MLX BLAS: {ours['blas']}")
    print(f"torch {ref['torch']} with {ref['threads']} threads; load average up to"
          f" {max(ours['load_average'], ref['load_average']):.1f} during the runs on {os.cpu_count()} CPUs"
          " (other load on the machine skews both sides)")
    rows = [("load to first step (s)", ours["load_to_first_step"], ref["load_to_first_step"], 0.5)]
    for size in sizes:
        o, r = ours["sizes"][str(size)], ref["sizes"][str(size)]
        rows.append((f"s/step at {size}x{size}", steady_step(o["step_times"]), steady_step(r["step_times"]), 0.75))
        rows.append((f"VAE decode at {size}x{size} (s)", o["decode"], r["decode"], 0.8))
        rows.append((f"whole image {size}x{size} (s)", o["to_png"], r["to_png"], 0.7))
    print(f"whole image = process start to PNG written: imports, load, text encoding, {steps} steps, decode")
    print(f"{'metric':<32}{'imgpack':>10}{'diffusers':>11}{'ratio':>8}  target")
    for name, mine, theirs, target in rows:
        ratio = mine / theirs if theirs else float("inf")
        verdict = "" if target is None else (f"<= {target}x " + ("ok" if ratio <= target else "MISSED"))
        print(f"{name:<32}{mine:>10.3f}{theirs:>11.3f}{ratio:>7.2f}x  {verdict}")
    for size in sizes:  # each size ran in its own process: its peak is that size's
        mine, theirs = ours["sizes"][str(size)]["peak_rss"], ref["sizes"][str(size)]["peak_rss"]
        print(f"{f'peak RSS at {size}x{size} (GiB)':<32}{mine / 2**30:>10.3f}{theirs / 2**30:>11.3f}"
              f"{mine / theirs:>7.2f}x")
        rss_ratio = mine / f32_bytes
        print(f"{'  / the f32 weights':<32}{rss_ratio:>10.2f}{theirs / f32_bytes:>11.2f}{'':>8}  "
              f"<= 1.3 {'ok' if rss_ratio <= 1.3 else 'MISSED'}")
    for size in sizes:
        a = np.load(work / f"mlx-{size}.npy").astype(np.int16)
        b = np.load(work / f"diffusers-{size}.npy").astype(np.int16)
        diff = np.abs(a - b)
        within = float((diff <= 1).mean())
        print(f"image agreement at {size}: {within:.4%} of pixels within 1/255, max diff {diff.max()}")


if __name__ == "__main__":
    main()
