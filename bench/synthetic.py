"""A synthetic model with Z-Image-Turbo's shape of checkpoint, for benchmarks.

Real tensor names and the real tensor count (~1,150 across text_encoder, transformer and vae), smaller widths
so the whole model is about 1.2 GB, random bytes so nothing deduplicates or compresses by accident. Files are
streamed to disk (memory stays small) and sharded like the real repository, with index files.

    python bench/synthetic.py OUT_DIR [--scale 1.0] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
from pathlib import Path

import numpy as np

Shapes = dict[str, list[int]]


def text_encoder_shapes(hidden: int, inter: int, layers: int, vocab: int, head_dim: int = 128) -> Shapes:
    shapes: Shapes = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": [hidden],
            p + "post_attention_layernorm.weight": [hidden],
            p + "self_attn.q_proj.weight": [hidden, hidden],
            p + "self_attn.k_proj.weight": [hidden // 4, hidden],
            p + "self_attn.v_proj.weight": [hidden // 4, hidden],
            p + "self_attn.o_proj.weight": [hidden, hidden],
            p + "self_attn.q_norm.weight": [head_dim],
            p + "self_attn.k_norm.weight": [head_dim],
            p + "mlp.gate_proj.weight": [inter, hidden],
            p + "mlp.up_proj.weight": [inter, hidden],
            p + "mlp.down_proj.weight": [hidden, inter],
        })
    return shapes


def _dit_block(prefix: str, dim: int, ffn: int, head_dim: int, modulated: bool, adaln: int) -> Shapes:
    shapes: Shapes = {
        prefix + "attention.to_q.weight": [dim, dim],
        prefix + "attention.to_k.weight": [dim, dim],
        prefix + "attention.to_v.weight": [dim, dim],
        prefix + "attention.to_out.0.weight": [dim, dim],
        prefix + "attention.norm_q.weight": [head_dim],
        prefix + "attention.norm_k.weight": [head_dim],
        prefix + "attention_norm1.weight": [dim],
        prefix + "attention_norm2.weight": [dim],
        prefix + "ffn_norm1.weight": [dim],
        prefix + "ffn_norm2.weight": [dim],
        prefix + "feed_forward.w1.weight": [ffn, dim],
        prefix + "feed_forward.w2.weight": [dim, ffn],
        prefix + "feed_forward.w3.weight": [ffn, dim],
    }
    if modulated:
        shapes[prefix + "adaLN_modulation.0.weight"] = [4 * dim, adaln]
        shapes[prefix + "adaLN_modulation.0.bias"] = [4 * dim]
    return shapes


def transformer_shapes(dim: int, ffn: int, layers: int, refiners: int, cap_dim: int, head_dim: int = 128) -> Shapes:
    adaln = min(dim, 256)
    shapes: Shapes = {
        "x_pad_token": [1, dim],
        "cap_pad_token": [1, dim],
        "all_x_embedder.2-1.weight": [dim, 64],
        "all_x_embedder.2-1.bias": [dim],
        "cap_embedder.0.weight": [cap_dim],
        "cap_embedder.1.weight": [dim, cap_dim],
        "cap_embedder.1.bias": [dim],
        "t_embedder.mlp.0.weight": [1024, 256],
        "t_embedder.mlp.0.bias": [1024],
        "t_embedder.mlp.2.weight": [adaln, 1024],
        "t_embedder.mlp.2.bias": [adaln],
        "all_final_layer.2-1.linear.weight": [64, dim],
        "all_final_layer.2-1.linear.bias": [64],
        "all_final_layer.2-1.adaLN_modulation.1.weight": [dim, adaln],
        "all_final_layer.2-1.adaLN_modulation.1.bias": [dim],
    }
    for i in range(layers):
        shapes.update(_dit_block(f"layers.{i}.", dim, ffn, head_dim, True, adaln))
    for i in range(refiners):
        shapes.update(_dit_block(f"noise_refiner.{i}.", dim, ffn, head_dim, True, adaln))
        shapes.update(_dit_block(f"context_refiner.{i}.", dim, ffn, head_dim, False, adaln))
    return shapes


def _resnet(prefix: str, cin: int, cout: int) -> Shapes:
    shapes: Shapes = {
        prefix + "norm1.weight": [cin], prefix + "norm1.bias": [cin],
        prefix + "conv1.weight": [cout, cin, 3, 3], prefix + "conv1.bias": [cout],
        prefix + "norm2.weight": [cout], prefix + "norm2.bias": [cout],
        prefix + "conv2.weight": [cout, cout, 3, 3], prefix + "conv2.bias": [cout],
    }
    if cin != cout:
        shapes[prefix + "conv_shortcut.weight"] = [cout, cin, 1, 1]
        shapes[prefix + "conv_shortcut.bias"] = [cout]
    return shapes


def _mid(prefix: str, ch: int) -> Shapes:
    shapes = {**_resnet(prefix + "resnets.0.", ch, ch), **_resnet(prefix + "resnets.1.", ch, ch)}
    a = prefix + "attentions.0."
    shapes.update({a + "group_norm.weight": [ch], a + "group_norm.bias": [ch]})
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        shapes.update({a + proj + ".weight": [ch, ch], a + proj + ".bias": [ch]})
    return shapes


def vae_shapes(channels: list[int], latent: int = 16) -> Shapes:
    shapes: Shapes = {"encoder.conv_in.weight": [channels[0], 3, 3, 3], "encoder.conv_in.bias": [channels[0]]}
    cin = channels[0]
    for i, cout in enumerate(channels):
        for j in range(2):
            shapes.update(_resnet(f"encoder.down_blocks.{i}.resnets.{j}.", cin if j == 0 else cout, cout))
        cin = cout
        if i < len(channels) - 1:
            shapes[f"encoder.down_blocks.{i}.downsamplers.0.conv.weight"] = [cout, cout, 3, 3]
            shapes[f"encoder.down_blocks.{i}.downsamplers.0.conv.bias"] = [cout]
    top = channels[-1]
    shapes.update(_mid("encoder.mid_block.", top))
    shapes.update({"encoder.conv_norm_out.weight": [top], "encoder.conv_norm_out.bias": [top],
                   "encoder.conv_out.weight": [2 * latent, top, 3, 3], "encoder.conv_out.bias": [2 * latent],
                   "decoder.conv_in.weight": [top, latent, 3, 3], "decoder.conv_in.bias": [top]})
    shapes.update(_mid("decoder.mid_block.", top))
    cin = top
    for i, cout in enumerate(reversed(channels)):
        for j in range(3):
            shapes.update(_resnet(f"decoder.up_blocks.{i}.resnets.{j}.", cin if j == 0 else cout, cout))
        cin = cout
        if i < len(channels) - 1:
            shapes[f"decoder.up_blocks.{i}.upsamplers.0.conv.weight"] = [cout, cout, 3, 3]
            shapes[f"decoder.up_blocks.{i}.upsamplers.0.conv.bias"] = [cout]
    shapes.update({"decoder.conv_norm_out.weight": [channels[0]], "decoder.conv_norm_out.bias": [channels[0]],
                   "decoder.conv_out.weight": [3, channels[0], 3, 3], "decoder.conv_out.bias": [3]})
    return shapes


def write_safetensors(path: Path, shapes: Shapes, dtype: str, rng: np.random.Generator) -> int:
    """Stream a safetensors file of random data; returns its size."""
    itemsize = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        nbytes = math.prod(shapes[name]) * itemsize
        header[name] = {"dtype": dtype, "shape": shapes[name], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in sorted(shapes):
            remaining = math.prod(shapes[name]) * itemsize
            while remaining:
                n = min(remaining, 8 << 20)
                f.write(rng.bytes(n))
                remaining -= n
    return os.path.getsize(path)


def write_sharded(directory: Path, stem: str, shapes: Shapes, shards: int, dtype: str, rng: np.random.Generator,
                  shard_name: str | None = None) -> None:
    names = sorted(shapes)
    if shards == 1:
        write_safetensors(directory / f"{stem}.safetensors", shapes, dtype, rng)
        return
    per = math.ceil(len(names) / shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        fname = f"{shard_name or stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        total += write_safetensors(directory / fname, {n: shapes[n] for n in part}, dtype, rng)
        weight_map.update({n: fname for n in part})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_model(out: Path, scale: float = 1.0, seed: int = 0, components: tuple[str, ...] | None = None) -> Path:
    """Write the synthetic model to ``out``; ``components`` limits which weight folders get (re)written."""
    rng = np.random.default_rng(seed)
    hidden = int(768 * scale) // 128 * 128 or 128
    dim = hidden
    out.mkdir(parents=True, exist_ok=True)
    index = {
        "_class_name": "ZImagePipeline", "_diffusers_version": "0.36.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    for comp in ("scheduler", "text_encoder", "tokenizer", "transformer", "vae"):
        (out / comp).mkdir(exist_ok=True)
    (out / "scheduler/scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}))
    (out / "tokenizer/tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    (out / "tokenizer/merges.txt").write_text("#version: 0.2\n" + "\n".join(f"a{i} b{i}" for i in range(2000)))
    (out / "text_encoder/config.json").write_text(json.dumps(
        {"architectures": ["Qwen3ForCausalLM"], "hidden_size": hidden, "num_hidden_layers": 36}))
    (out / "transformer/config.json").write_text(json.dumps({"_class_name": "ZImageTransformer2DModel", "dim": dim}))
    (out / "vae/config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 16}))
    wanted = components or ("text_encoder", "transformer", "vae")
    if "text_encoder" in wanted:
        shapes = text_encoder_shapes(hidden, int(hidden * 8 / 3) // 64 * 64, 36, 32000)
        write_sharded(out / "text_encoder", "model", shapes, 2, "BF16", rng)
    if "transformer" in wanted:
        shapes = transformer_shapes(dim, int(dim * 8 / 3) // 64 * 64, 30, 2, hidden)
        write_sharded(out / "transformer", "diffusion_pytorch_model", shapes, 2, "BF16", rng)
    if "vae" in wanted:
        write_safetensors(out / "vae/diffusion_pytorch_model.safetensors", vae_shapes([64, 128, 256, 256]),
                          "F32", rng)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_model(args.out, args.scale, args.seed)
    files = [p for p in args.out.rglob("*") if p.is_file()]
    tensors = 0
    for p in files:
        if p.suffix == ".safetensors":
            with open(p, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                tensors += len(json.loads(f.read(n))) - 1
    print(f"{args.out}: {len(files)} files, {tensors} tensors, {sum(p.stat().st_size for p in files) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
