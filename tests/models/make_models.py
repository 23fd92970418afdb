# Builds the tiny random-weight Z-Image-Turbo pipelines committed under tests/models/.
#
# Reference environment (outside the repo, never needed by CI):
#   python 3.11.7, torch==2.13.0+cpu, diffusers==0.42.1, transformers==5.23.0, tokenizers==0.23.3,
#   safetensors==0.8.0, numpy==2.4.6, accelerate==1.15.0, huggingface_hub==2.4.0
#
#   /work/refenv/bin/python tests/models/make_models.py            # writes both models
#   /work/refenv/bin/python tests/models/make_models.py --check    # also loads them with ZImagePipeline
#
# Everything is built offline from fixed seeds; re-running rewrites byte-identical files.
"""Write tests/models/zimage-tiny and tests/models/zimage-sharded in the diffusers layout."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

HERE = Path(__file__).resolve().parent
DIFFUSERS_VERSION = "0.42.1"
TRANSFORMERS_VERSION = "5.23.0"

# Qwen's special tokens, appended after the learned BPE vocabulary as in the real tokenizer.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Behaves like Qwen3's template for plain user/assistant/system turns: with enable_thinking
# left on (as ZImagePipeline asks) the generation prompt is just "<|im_start|>assistant\n";
# with enable_thinking=false an empty think block follows it.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# A small English corpus written for this project, so the BPE learns merges for the words
# the reference prompts use while still splitting rarer words into several pieces.
CORPUS = """\
A red fox trots through the snow at the edge of a quiet pine forest. Its tail is bright against
the white ground, and the cold air is still. In the distance a lighthouse stands on the rocks,
its lamp turning slowly as the sky fades from orange to violet at dusk.
The painter mixes colours on a wooden palette: red, orange, yellow, green, blue and violet.
She paints the sea, the waves, the clouds and the long shadows of evening. A small boat rests
on the sand near the harbour, and gulls circle above the water.
Photographs can be sharp or blurry. A low quality picture is noisy, dark and full of artifacts;
a high quality photograph shows fine detail, soft light and natural colour.
In the mountains the snow falls for days. Children build a snowman in the garden, give him a red
scarf and a carrot nose, and laugh when a fox steals the carrot at night.
The city at night glows with neon signs. Rain falls on the street and the lights reflect in the
puddles. A cat sits in a window above a bakery that smells of fresh bread.
An old castle stands on a green hill under a cloudy sky. A river winds through the valley below,
past fields of golden wheat and a small stone bridge.
The astronaut floats above the blue planet. Stars shine in the black sky and the sun rises over
the curve of the earth, painting a thin line of light across the clouds.
A bowl of fruit on a wooden table: apples, pears, grapes and a lemon, lit by the morning sun
through a window. The shadows are soft and the colours are warm.
Numbers and dates: 1, 2, 3, 10, 42, 100, 2025. Questions? Answers! Quotes "like this" and 'that'.
The user asks the assistant for a picture; the assistant thinks, then answers the user. The user
asks again and the assistant draws a fox, a lighthouse, a castle and a boat for the user.
"""


@dataclass(frozen=True)
class Spec:
    """What differs between the two test models."""

    name: str
    seed: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_head_dim: int
    text_intermediate: int
    dim: int
    axes_dims: tuple[int, int, int]
    vae_channels: tuple[int, int, int, int]
    vae_groups: int
    transformer_dtype: torch.dtype
    text_dtype: torch.dtype
    vae_dtype: torch.dtype
    transformer_shards: int
    text_shards: int


TINY = Spec(
    name="zimage-tiny",
    seed=1234,
    text_hidden=64,
    text_layers=3,
    text_heads=4,
    text_kv_heads=2,
    text_head_dim=32,  # heads * head_dim != hidden, as in Qwen3-4B (32 * 128 != 2560)
    text_intermediate=160,
    dim=64,
    axes_dims=(8, 12, 12),
    vae_channels=(16, 32, 32, 32),
    vae_groups=8,
    transformer_dtype=torch.bfloat16,
    text_dtype=torch.bfloat16,
    vae_dtype=torch.bfloat16,
    transformer_shards=1,
    text_shards=1,
)

SHARDED = Spec(
    name="zimage-sharded",
    seed=5678,
    text_hidden=48,
    text_layers=4,
    text_heads=2,
    text_kv_heads=1,
    text_head_dim=32,
    text_intermediate=96,
    dim=96,
    axes_dims=(16, 16, 16),
    vae_channels=(8, 16, 16, 16),
    vae_groups=4,
    transformer_dtype=torch.float16,
    text_dtype=torch.float32,
    vae_dtype=torch.bfloat16,
    transformer_shards=3,
    text_shards=2,
)

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# tokenizer


def build_tokenizer() -> Tokenizer:
    """Train a byte-level BPE with Qwen2's normalizer and pre-tokenizer on CORPUS."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def write_tokenizer(tok: Tokenizer, out: Path) -> int:
    """Write tokenizer.json, vocab.json, merges.txt and tokenizer_config.json like Qwen's repo."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    merges = spec["model"]["merges"]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n")
    lines = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m for m in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n")
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t not in ("<think>", "</think>"),
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    write_json(out / "tokenizer_config.json", config)
    return tok.get_vocab_size()


# ---------------------------------------------------------------------------------------------
# weights


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter non-trivial random values so parity tests can fail.

    Matrices get N(0, 1/fan_in); pad tokens N(0, 1); vectors that were initialised to ones
    (norm weights) get 1 + 0.1 N(0, 1); every other vector (biases) 0.1 N(0, 1).
    """
    gen = torch.Generator().manual_seed(seed)
    params = dict(module.named_parameters())
    for name in sorted(params):
        p = params[name]
        shape = tuple(p.shape)
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if name.endswith("pad_token"):
            value = noise
        elif p.ndim >= 2:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod().item()))
            value = noise / fan_in**0.5
        elif torch.all(p == 1):
            value = 1.0 + 0.1 * noise
        else:
            value = 0.1 * noise
        with torch.no_grad():
            p.copy_(value)


def storage_state(module: torch.nn.Module, dtype: torch.dtype, skip: tuple[str, ...] = ()) -> dict:
    """The module's parameters cast to the on-disk dtype, contiguous and in name order."""
    state = {}
    for name, tensor in sorted(module.state_dict().items()):
        if name in skip:
            continue
        state[name] = tensor.detach().to(dtype).contiguous().clone()
    return state


def write_weights(state: dict, out: Path, stem: str, suffix: str, shards: int) -> list[str]:
    """Write one safetensors file, or `shards` files plus a diffusers/transformers index."""
    out.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        name = f"{stem}.{suffix}"
        save_file(state, str(out / name), metadata={"format": "pt"})
        return [name]
    names = list(state)
    sizes = [state[n].numel() * state[n].element_size() for n in names]
    total = sum(sizes)
    target = total / shards
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc = 0
    for n, size in zip(names, sizes, strict=True):
        index = min(shards - 1, int(acc // target))
        groups[index].append(n)
        acc += size
    if any(not g for g in groups):
        raise SystemExit(f"{out}: cannot split {len(names)} tensors into {shards} non-empty shards")
    files = []
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        file = f"{stem}-{i:05d}-of-{shards:05d}.{suffix}"
        save_file({n: state[n] for n in group}, str(out / file), metadata={"format": "pt"})
        files.append(file)
        weight_map.update({n: file for n in group})
    write_json(
        out / f"{stem}.{suffix}.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )
    return files + [f"{stem}.{suffix}.index.json"]


# ---------------------------------------------------------------------------------------------
# components


def transformer_config(spec: Spec, cap_feat_dim: int) -> dict:
    return {
        "_class_name": "ZImageTransformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "all_f_patch_size": [1],
        "all_patch_size": [2],
        "axes_dims": list(spec.axes_dims),
        "axes_lens": [1536, 512, 512],
        "cap_feat_dim": cap_feat_dim,
        "dim": spec.dim,
        "in_channels": 16,
        "n_heads": 2,
        "n_kv_heads": 2,
        "n_layers": 2,
        "n_refiner_layers": 1,
        "norm_eps": 1e-05,
        "qk_norm": True,
        "rope_theta": 256.0,
        "t_scale": 1000.0,
    }


def text_encoder_config(spec: Spec, vocab_size: int, tok: Tokenizer) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": tok.token_to_id("<|endoftext|>"),
        "eos_token_id": tok.token_to_id("<|endoftext|>"),
        "head_dim": spec.text_head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.text_hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.text_intermediate,
        "max_position_embeddings": 40960,
        "max_window_layers": spec.text_layers,
        "model_type": "qwen3",
        "num_attention_heads": spec.text_heads,
        "num_hidden_layers": spec.text_layers,
        "num_key_value_heads": spec.text_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": DTYPE_NAMES[spec.text_dtype],
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def vae_config(spec: Spec) -> dict:
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": list(spec.vae_channels),
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 16,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": 2,
        "mid_block_add_attention": True,
        "norm_num_groups": spec.vae_groups,
        "out_channels": 3,
        "sample_size": 1024,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
    }


SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
}


def model_index() -> dict:
    return {
        "_class_name": "ZImagePipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def build(spec: Spec) -> Path:
    """Write one complete pipeline directory from scratch."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = HERE / spec.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_json(out / "model_index.json", model_index())
    write_json(out / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)

    tok = build_tokenizer()
    tok_len = write_tokenizer(tok, out / "tokenizer")
    vocab_size = (tok_len + 63) // 64 * 64  # padded past the tokenizer, like Qwen's 151936

    te_cfg = text_encoder_config(spec, vocab_size, tok)
    write_json(out / "text_encoder" / "config.json", te_cfg)
    torch.manual_seed(spec.seed)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(**te_cfg)).float()
    randomize(text_encoder, spec.seed + 1)
    te_state = storage_state(text_encoder, spec.text_dtype, skip=("lm_head.weight",))
    write_weights(te_state, out / "text_encoder", "model", "safetensors", spec.text_shards)

    tr_cfg = transformer_config(spec, spec.text_hidden)
    write_json(out / "transformer" / "config.json", tr_cfg)
    transformer = ZImageTransformer2DModel(**{k: v for k, v in tr_cfg.items() if not k.startswith("_")})
    randomize(transformer, spec.seed + 2)
    write_weights(
        storage_state(transformer, spec.transformer_dtype),
        out / "transformer",
        "diffusion_pytorch_model",
        "safetensors",
        spec.transformer_shards,
    )

    v_cfg = vae_config(spec)
    write_json(out / "vae" / "config.json", v_cfg)
    vae = AutoencoderKL(**{k: v for k, v in v_cfg.items() if not k.startswith("_")})
    randomize(vae, spec.seed + 3)
    write_weights(storage_state(vae, spec.vae_dtype), out / "vae", "diffusion_pytorch_model", "safetensors", 1)
    return out


def check_nontrivial(root: Path) -> None:
    """Refuse to finish if any stored tensor is constant (all zeros, all ones, ...)."""
    from safetensors import safe_open

    for path in sorted(root.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key).float()
                if t.numel() > 1 and float(t.std()) == 0.0:
                    raise SystemExit(f"{path}: tensor {key} is constant")


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def write_checksums(roots: list[Path], target: Path) -> None:
    """SHA256SUMS over every file of the given trees, checked by test_model_fixtures.py."""
    lines = []
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            lines.append(f"{digest}  {path.relative_to(target.parent).as_posix()}")
    target.write_text("\n".join(lines) + "\n")


def smoke_check(root: Path) -> None:
    """Load with ZImagePipeline as a user would and generate one small image."""
    from diffusers import ZImagePipeline

    for dtype in (None, torch.float32):
        kwargs = {} if dtype is None else {"torch_dtype": dtype}
        pipe = ZImagePipeline.from_pretrained(str(root), **kwargs)
        pipe.set_progress_bar_config(disable=True)
        image = pipe(
            "a red fox in the snow",
            height=64,
            width=64,
            num_inference_steps=8,
            guidance_scale=0.0,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
        print(f"  {root.name} dtype={dtype}: image {image.size} {image.mode}, extrema {image.getextrema()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="load each model with ZImagePipeline")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    roots = []
    for spec in (TINY, SHARDED):
        root = build(spec)
        roots.append(root)
        check_nontrivial(root)
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        print(f"{spec.name}: {size} bytes, tree sha256 {tree_digest(root)}")
        if args.check:
            smoke_check(root)
    write_checksums(roots, HERE / "SHA256SUMS")


if __name__ == "__main__":
    main()
