# Builds the tiny random-weight FLUX.2 [klein] pipelines under tests/models/flux2-* and their diffusers
# reference data under tests/reference/flux2-*.
#
# Reference environment (outside the repo, never needed by CI): the one make_models.py names
#   python 3.11.7, torch==2.13.0+cpu, diffusers==0.42.1, transformers==5.23.0, tokenizers==0.23.3,
#   safetensors==0.8.0, numpy==2.4.6, pillow==13.0.0
#
#   /work/refenv/bin/python tests/models/make_flux2.py
#
# Offline and deterministic: re-running rewrites byte-identical files. Every reference value is captured from
# diffusers' own Flux2KleinPipeline in float32 through hooks; the script re-derives them from the documented
# formulas and refuses to write data that disagrees.
"""Write tests/models/flux2-{tiny,base} and tests/reference/flux2-{tiny,base}/*.npz."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
REFERENCE = HERE.parent / "reference"
sys.path.insert(0, str(HERE))

import make_models as zm  # noqa: E402  (tokenizer, randomisation and shard writing are shared)
from make_reference import save_npz  # noqa: E402

# Qwen3's chat template (the parts a single user turn reaches), with its enable_thinking switch.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}"
    "{%- endif %}"
    "{%- if (message.role == 'user') or (message.role == 'system') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# FLUX.2 [klein]'s scheduler config (FLUX.1-dev's, which diffusers' conversion script copies).
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": zm.DIFFUSERS_VERSION,
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
OUT_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers default
MAX_SEQUENCE_LENGTH = 512  # its max_sequence_length default

DtypeRule = Callable[[str, torch.Tensor], torch.dtype]


def uniform(dtype: torch.dtype) -> DtypeRule:
    return lambda _name, _tensor: dtype


def mixed(matrices: torch.dtype) -> DtypeRule:
    """Matrices (and conv kernels) in ``matrices``, vectors (norms, biases, statistics) in float32."""
    return lambda _name, tensor: matrices if tensor.ndim >= 2 else torch.float32


@dataclass(frozen=True)
class Spec:
    name: str
    seed: int
    distilled: bool
    text: dict
    #: Keys as Qwen3ForCausalLM saves them (``model.`` prefix) or as a bare Qwen3Model does (no prefix).
    text_prefixed: bool
    text_dtype: DtypeRule
    text_shards: int
    transformer: dict
    transformer_dtype: DtypeRule
    transformer_shards: int
    vae: dict
    vae_dtype: DtypeRule
    notes: list[str] = field(default_factory=list)


TINY = Spec(
    name="flux2-tiny",
    seed=2024,
    distilled=True,
    # 27 layers: hidden state 27 is the last one, so it is the final-normed output (as transformers returns it).
    text={"hidden_size": 16, "num_hidden_layers": 27, "num_attention_heads": 2, "num_key_value_heads": 1,
          "head_dim": 16, "intermediate_size": 48, "tie_word_embeddings": False},
    text_prefixed=True,
    text_dtype=uniform(torch.bfloat16),
    text_shards=1,
    transformer={"num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                 "joint_attention_dim": 48, "mlp_ratio": 3.0, "axes_dims_rope": [4, 4, 4, 4]},
    transformer_dtype=uniform(torch.bfloat16),
    transformer_shards=1,
    vae={"block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8},
    vae_dtype=uniform(torch.bfloat16),
)

BASE = Spec(
    name="flux2-base",
    seed=4048,
    distilled=False,
    # 29 layers: hidden state 27 is a raw layer output; layers 27, 28 and the final norm go unused.
    text={"hidden_size": 24, "num_hidden_layers": 29, "num_attention_heads": 3, "num_key_value_heads": 1,
          "head_dim": 16, "intermediate_size": 40, "tie_word_embeddings": True},
    text_prefixed=False,
    text_dtype=uniform(torch.float16),
    text_shards=2,
    transformer={"num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 3,
                 "joint_attention_dim": 72, "mlp_ratio": 2.5, "axes_dims_rope": [2, 6, 4, 4]},
    transformer_dtype=mixed(torch.bfloat16),
    transformer_shards=3,
    vae={"block_out_channels": [8, 16, 16, 16], "decoder_block_out_channels": [8, 16, 24, 24],
         "layers_per_block": 2, "norm_num_groups": 4},
    vae_dtype=mixed(torch.float16),
)
SPECS = (TINY, BASE)


@dataclass(frozen=True)
class Case:
    model: str
    name: str
    prompt: str
    width: int
    height: int
    seed: int
    steps: int
    guidance: float


FOX = "a red fox in the snow"
UNICODE = "Ein Fuchs im Schnee — 雪の中の狐 🦊, café crème"
CASES = [
    Case("flux2-tiny", "square", FOX, 64, 64, 42, 4, 1.0),
    Case("flux2-tiny", "nonsquare", FOX, 96, 64, 7, 4, 1.0),
    Case("flux2-tiny", "unicode", UNICODE, 64, 48, 5, 3, 1.0),
    Case("flux2-base", "cfg", "a lighthouse at dusk", 64, 64, 3, 5, 4.0),
    Case("flux2-base", "tall", FOX, 48, 80, 11, 3, 1.0),
]


# ---------------------------------------------------------------------------------------------
# models


def storage(module: torch.nn.Module, rule: DtypeRule) -> dict[str, torch.Tensor]:
    """The state dict (parameters and buffers) in the on-disk dtypes; integer buffers keep theirs."""
    out = {}
    for name, tensor in sorted(module.state_dict().items()):
        dtype = rule(name, tensor) if tensor.is_floating_point() else tensor.dtype
        out[name] = tensor.detach().to(dtype).contiguous().clone()
    return out


def text_encoder_config(spec: Spec, vocab_size: int, tok) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": tok.token_to_id("<|endoftext|>"),
        "eos_token_id": tok.token_to_id("<|im_end|>"),
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 40960,
        "max_window_layers": spec.text["num_hidden_layers"],
        "model_type": "qwen3",
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "torch_dtype": "bfloat16",
        "transformers_version": zm.TRANSFORMERS_VERSION,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
        **spec.text,
    }


def transformer_config(spec: Spec) -> dict:
    return {
        "_class_name": "Flux2Transformer2DModel",
        "_diffusers_version": zm.DIFFUSERS_VERSION,
        "eps": 1e-06,
        "guidance_embeds": False,
        "in_channels": 128,
        "out_channels": None,
        "patch_size": 1,
        "rope_theta": 2000,
        "timestep_guidance_channels": 256,
        **spec.transformer,
    }


def vae_config(spec: Spec) -> dict:
    n = len(spec.vae["block_out_channels"])
    return {
        "_class_name": "AutoencoderKLFlux2",
        "_diffusers_version": zm.DIFFUSERS_VERSION,
        "act_fn": "silu",
        "batch_norm_eps": 0.0001,
        "batch_norm_momentum": 0.1,
        "decoder_block_out_channels": None,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "force_upcast": True,  # carried by the hub config; diffusers 0.42.1 ignores it
        "in_channels": 3,
        "latent_channels": 32,
        "mid_block_add_attention": True,
        "out_channels": 3,
        "patch_size": [2, 2],
        "sample_size": 1024,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "use_post_quant_conv": True,
        "use_quant_conv": True,
        **spec.vae,
    }


def model_index(spec: Spec) -> dict:
    return {
        "_class_name": "Flux2KleinPipeline",
        "_diffusers_version": zm.DIFFUSERS_VERSION,
        "is_distilled": spec.distilled,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"],
        "tokenizer": ["transformers", "Qwen2TokenizerFast"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
    }


def build(spec: Spec) -> Path:
    """Write one complete pipeline directory from scratch."""
    import transformers
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    out = HERE / spec.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    zm.write_json(out / "model_index.json", model_index(spec))
    zm.write_json(out / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)

    tok = zm.build_tokenizer()
    tok_len = zm.write_tokenizer(tok, out / "tokenizer")
    tok_config_path = out / "tokenizer" / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    tok_config["chat_template"] = QWEN3_TEMPLATE
    zm.write_json(tok_config_path, tok_config)
    vocab_size = (tok_len + 63) // 64 * 64

    te_cfg = text_encoder_config(spec, vocab_size, tok)
    zm.write_json(out / "text_encoder" / "config.json", te_cfg)
    torch.manual_seed(spec.seed)
    text_encoder = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**te_cfg)).float()
    zm.randomize(text_encoder, spec.seed + 1)
    saved = text_encoder if spec.text_prefixed else text_encoder.model  # the bare layout has no lm_head either
    zm.write_weights(storage(saved, spec.text_dtype), out / "text_encoder", "model", "safetensors", spec.text_shards)

    tr_cfg = transformer_config(spec)
    zm.write_json(out / "transformer" / "config.json", tr_cfg)
    transformer = Flux2Transformer2DModel(**{k: v for k, v in tr_cfg.items() if not k.startswith("_")})
    zm.randomize(transformer, spec.seed + 2)
    zm.write_weights(storage(transformer, spec.transformer_dtype), out / "transformer", "diffusion_pytorch_model",
                     "safetensors", spec.transformer_shards)

    v_cfg = vae_config(spec)
    zm.write_json(out / "vae" / "config.json", v_cfg)
    known = {k: v for k, v in v_cfg.items() if not k.startswith("_") and k != "force_upcast"}
    vae = AutoencoderKLFlux2(**known)
    zm.randomize(vae, spec.seed + 3)
    gen = torch.Generator().manual_seed(spec.seed + 4)
    with torch.no_grad():  # statistics a trained VAE would have: non-zero means, variances around 1
        vae.bn.running_mean.copy_(0.5 * torch.randn(vae.bn.running_mean.shape, generator=gen))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=gen))
        vae.bn.num_batches_tracked.fill_(1000)
    zm.write_weights(storage(vae, spec.vae_dtype), out / "vae", "diffusion_pytorch_model", "safetensors", 1)
    return out


# ---------------------------------------------------------------------------------------------
# reference data


def f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """Written out again (not imported) so the script checks diffusers against the documented formula."""
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return a2 * image_seq_len + b2
    m_200, m_10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return a * num_steps + (m_200 - 200.0 * a)


class Recorder:
    """Hooks on the pipeline's components that keep what the pipeline hands them."""

    def __init__(self, pipe) -> None:
        self.text_calls: list[dict] = []
        self.transformer_calls: list[dict] = []
        self.vae_calls: list[dict] = []
        self.step_latents: list[np.ndarray] = []
        self.handles = [
            pipe.text_encoder.register_forward_hook(self._text, with_kwargs=True),
            pipe.transformer.register_forward_hook(self._transformer, with_kwargs=True),
        ]
        self._vae = pipe.vae
        self._vae_decode = pipe.vae.decode
        pipe.vae.decode = self._decode

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self._vae.decode = self._vae_decode

    def _text(self, module, args, kwargs, output) -> None:
        self.text_calls.append({
            "input_ids": kwargs["input_ids"].numpy(),
            "attention_mask": kwargs["attention_mask"].numpy(),
            "hidden_states": [f32(h) for h in output.hidden_states],
        })

    def _transformer(self, module, args, kwargs, output) -> None:
        self.transformer_calls.append({
            "hidden_states": f32(kwargs["hidden_states"]),
            "encoder_hidden_states": f32(kwargs["encoder_hidden_states"]),
            "timestep": f32(kwargs["timestep"]),
            "img_ids": kwargs["img_ids"].numpy(),
            "txt_ids": kwargs["txt_ids"].numpy(),
            "out": f32(output[0]),
        })

    def _decode(self, z, *args, **kwargs):
        result = self._vae_decode(z, *args, **kwargs)
        self.vae_calls.append({"z": f32(z), "sample": f32(result[0])})
        return result

    def on_step_end(self, pipe, i, t, callback_kwargs):
        self.step_latents.append(f32(callback_kwargs["latents"]))
        return callback_kwargs


def initial_noise(seed: int, channels: int, height: int, width: int) -> np.ndarray:
    """The portable seed noise: drawn directly in the packed (1, 128, H/16, W/16) shape diffusers prepares."""
    return np.random.default_rng(seed).standard_normal((1, channels, height // 16, width // 16), dtype=np.float32)


def run_case(pipe, case: Case) -> dict[str, np.ndarray]:
    channels = pipe.transformer.config.in_channels
    noise = initial_noise(case.seed, channels, case.height, case.width)
    rec = Recorder(pipe)
    try:
        image = pipe(
            prompt=case.prompt,
            height=case.height,
            width=case.width,
            num_inference_steps=case.steps,
            guidance_scale=case.guidance,
            latents=torch.from_numpy(noise.copy()),
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            text_encoder_out_layers=OUT_LAYERS,
            output_type="pil",
            callback_on_step_end=rec.on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        ).images[0]
    finally:
        rec.close()
    cfg = pipe.do_classifier_free_guidance
    per_step = 2 if cfg else 1
    assert len(rec.text_calls) == per_step and len(rec.transformer_calls) == per_step * case.steps
    assert len(rec.vae_calls) == 1

    out: dict[str, np.ndarray] = {}
    labels = [("", case.prompt)] + ([("negative_", "")] if cfg else [])
    for (prefix, text), call, tr in zip(labels, rec.text_calls, rec.transformer_calls[:per_step], strict=True):
        templated = pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        out[f"{prefix}prompt_text"] = np.array(templated)
        out[f"{prefix}input_ids"] = call["input_ids"].astype(np.int64)
        out[f"{prefix}attention_mask"] = call["attention_mask"].astype(np.int64)
        embeds = np.concatenate([call["hidden_states"][k][0] for k in OUT_LAYERS], axis=-1)
        assert np.array_equal(tr["encoder_hidden_states"][0], embeds), "prompt_embeds != hidden states 9|18|27"
        out[f"{prefix}prompt_embeds"] = embeds
    out["sigmas"] = f32(pipe.scheduler.sigmas)
    out["timesteps"] = f32(pipe.scheduler.timesteps)
    out["mu"] = np.array(compute_empirical_mu(noise.shape[2] * noise.shape[3], case.steps))
    out["initial_latents"] = noise
    first = rec.transformer_calls[:per_step]
    out["transformer_in_hidden_states"] = first[0]["hidden_states"]
    out["transformer_in_timestep"] = first[0]["timestep"]
    out["transformer_in_img_ids"] = first[0]["img_ids"].astype(np.int64)
    out["transformer_in_txt_ids"] = first[0]["txt_ids"].astype(np.int64)
    out["transformer_out"] = np.concatenate([c["out"] for c in first])
    out["transformer_timesteps"] = np.concatenate([c["timestep"] for c in rec.transformer_calls[::per_step]])
    out["step_latents"] = np.stack(rec.step_latents)
    out["final_latents"] = rec.step_latents[-1]
    out["vae_in"] = rec.vae_calls[0]["z"]
    out["vae_out"] = rec.vae_calls[0]["sample"]
    out["image"] = np.asarray(image, dtype=np.uint8)
    out["params"] = np.array(json.dumps({
        "prompt": case.prompt,
        "width": case.width,
        "height": case.height,
        "seed": case.seed,
        "num_inference_steps": case.steps,
        "guidance_scale": case.guidance,
        "is_distilled": bool(pipe.config.is_distilled),
        "do_classifier_free_guidance": bool(cfg),
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "text_encoder_out_layers": list(OUT_LAYERS),
    }, sort_keys=True, ensure_ascii=False))
    check_case(pipe, case, out, cfg)
    return out


def check_case(pipe, case: Case, out: dict[str, np.ndarray], cfg: bool) -> None:
    """Re-derive the captured values from the documented formulas (see tests/models/FLUX2.md)."""
    h, w = case.height // 16, case.width // 16
    c = pipe.transformer.config.in_channels
    # text: right-padded to 512 with <|endoftext|>, the empty think block present
    for prefix in ("", "negative_") if cfg else ("",):
        assert out[f"{prefix}prompt_text"].item().endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        mask = out[f"{prefix}attention_mask"][0]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any() and mask.shape == (MAX_SEQUENCE_LENGTH,)
        assert (out[f"{prefix}input_ids"][0, n:] == pipe.tokenizer.pad_token_id).all()
    # ids: text (0, 0, 0, l); image (0, y, x, 0) in raster order
    txt = out["transformer_in_txt_ids"][0]
    assert np.array_equal(txt[:, 3], np.arange(MAX_SEQUENCE_LENGTH)) and not txt[:, :3].any()
    img = out["transformer_in_img_ids"][0]
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    assert np.array_equal(img[:, 1], rows.ravel()) and np.array_equal(img[:, 2], cols.ravel())
    assert not img[:, 0].any() and not img[:, 3].any()
    # latents: the seed noise packed (B, C, h, w) -> (B, h*w, C)
    packed = out["initial_latents"].reshape(1, c, h * w).transpose(0, 2, 1)
    assert np.array_equal(out["transformer_in_hidden_states"], packed)
    # schedule: linspace(1, 1/N, N) shifted by exp(mu) / (exp(mu) + 1/s - 1); timestep / 1000 to the transformer
    ramp = np.linspace(1.0, 1.0 / case.steps, case.steps).astype(np.float32)
    mu = float(out["mu"])
    shifted = (math.exp(mu) / (math.exp(mu) + (1 / ramp - 1))).astype(np.float32)
    assert np.array_equal(out["sigmas"], np.append(shifted, np.float32(0)))
    assert np.array_equal(out["timesteps"], shifted * np.float32(1000))
    assert np.array_equal(out["transformer_timesteps"], out["timesteps"] / np.float32(1000))
    # the first Euler step, with CFG neg + g * (cond - neg) on the base model
    v = out["transformer_out"][:1]
    if cfg:
        v = out["transformer_out"][1:] + case.guidance * (v - out["transformer_out"][1:])
    x1 = out["transformer_in_hidden_states"] + (out["sigmas"][1] - out["sigmas"][0]) * v
    assert np.allclose(out["step_latents"][0], x1, atol=1e-6)
    # decode: unpack, batch-norm de-normalisation, unpatchify
    bn = pipe.vae.bn
    lat = out["final_latents"].transpose(0, 2, 1).reshape(1, c, h, w)
    lat = lat * np.sqrt(f32(bn.running_var) + pipe.vae.config.batch_norm_eps)[None, :, None, None]
    lat = lat + f32(bn.running_mean)[None, :, None, None]
    lat = lat.reshape(1, c // 4, 2, 2, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(1, c // 4, 2 * h, 2 * w)
    assert np.allclose(out["vae_in"], lat, atol=1e-6)
    pixels = np.clip(out["vae_out"][0] / 2 + 0.5, 0, 1).transpose(1, 2, 0)
    assert np.array_equal((pixels * 255).round().astype(np.uint8), out["image"])
    assert out["image"].shape == (case.height, case.width, 3)
    assert len(np.unique(out["image"])) > 32, "reference image is nearly flat"


def check_distilled_ignores_guidance(pipe, case: Case, want: np.ndarray) -> None:
    """diffusers only warns about guidance on a distilled checkpoint; the image must not change."""
    noise = initial_noise(case.seed, pipe.transformer.config.in_channels, case.height, case.width)
    image = pipe(prompt=case.prompt, height=case.height, width=case.width, num_inference_steps=case.steps,
                 guidance_scale=4.0, latents=torch.from_numpy(noise.copy()), output_type="pil").images[0]
    assert np.array_equal(np.asarray(image), want)


# ---------------------------------------------------------------------------------------------


def write_checksums(paths: list[Path], base: Path, target: Path) -> None:
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(base).as_posix()}" for p in sorted(paths)]
    target.write_text("\n".join(lines) + "\n")


def main() -> None:
    from diffusers import Flux2KleinPipeline

    torch.use_deterministic_algorithms(True)
    roots = []
    for spec in SPECS:
        root = build(spec)
        zm.check_nontrivial(root)
        roots.append(root)
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        print(f"{spec.name}: {size} bytes, tree sha256 {zm.tree_digest(root)}")
    write_checksums([p for r in roots for p in r.rglob("*") if p.is_file()], HERE, HERE / "flux2.SHA256SUMS")

    torch.set_grad_enabled(False)
    pipes = {}
    for case in CASES:
        if case.model not in pipes:
            pipe = Flux2KleinPipeline.from_pretrained(str(HERE / case.model), torch_dtype=torch.float32)
            pipe.to(torch.float32)
            pipe.set_progress_bar_config(disable=True)
            pipes[case.model] = pipe
        arrays = run_case(pipes[case.model], case)
        if case.model == "flux2-tiny" and case.name == "square":
            check_distilled_ignores_guidance(pipes[case.model], case, arrays["image"])
        target = REFERENCE / case.model / f"{case.name}.npz"
        save_npz(target, arrays)
        Image.fromarray(arrays["image"]).save(target.with_suffix(".png"), optimize=False)
        print(f"{target.relative_to(REFERENCE.parent)}: {target.stat().st_size} bytes")
    # Like make_reference.py: one SHA256SUMS over every reference archive and image, Z-Image's included.
    write_checksums([p for p in REFERENCE.rglob("*") if p.suffix in (".npz", ".png")], REFERENCE,
                    REFERENCE / "SHA256SUMS")


if __name__ == "__main__":
    main()
