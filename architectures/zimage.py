"""The tensors a Z-Image pipeline (``ZImagePipeline``) needs, derived from its component configs.

Names and shapes follow diffusers' ``ZImageTransformer2DModel`` and ``AutoencoderKL`` and transformers'
``Qwen3Model`` state dicts, so a model that passes here loads in diffusers and in imgpack's runtime.
Each expectation is keyed by the layer name the manifest must carry (``transformer/layers.0...``).
"""

from __future__ import annotations

from typing import Any

from imgpack.architectures.autoencoder import vae_tensors
from imgpack.architectures.base import (
    PIPELINE_CONFIG_FILES,
    Architecture,
    ConfigProblem,
    Expectation,
    GenerationDefaults,
    bool_field,
    canonical_name,
    int_field,
    int_list_field,
    linear,
    pipeline_expectation,
)
from imgpack.architectures.qwen3 import qwen3_tensors

#: The architecture name written in model_index.json's ``_class_name``.
ARCHITECTURE = "ZImagePipeline"
#: Width of Z-Image's timestep/adaLN conditioning vector (capped, not config-driven).
ADALN_EMBED_DIM = 256
#: Sinusoidal frequency width and hidden width of Z-Image's timestep MLP (fixed in the model code).
FREQUENCY_EMBEDDING_SIZE = 256
TIMESTEP_MID_SIZE = 1024
#: The component configs the derivation reads.
CONFIG_FILES = PIPELINE_CONFIG_FILES


def transformer_tensors(config: dict[str, Any], file: str = "transformer/config.json") -> dict[str, list[int]]:
    """State dict of ZImageTransformer2DModel: embedders, refiners, main layers, final layers."""
    dim = int_field(config, "dim", file)
    n_heads = int_field(config, "n_heads", file)
    n_kv_heads = int_field(config, "n_kv_heads", file, n_heads)
    n_layers = int_field(config, "n_layers", file)
    n_refiner = int_field(config, "n_refiner_layers", file)
    in_channels = int_field(config, "in_channels", file)
    cap_dim = int_field(config, "cap_feat_dim", file)
    qk_norm = bool_field(config, "qk_norm", file, True)
    patch_sizes = int_list_field(config, "all_patch_size", file)
    f_patch_sizes = int_list_field(config, "all_f_patch_size", file)
    if n_heads == 0 or dim % n_heads:
        raise ConfigProblem(file, f"dim {dim} is not divisible by n_heads {n_heads}")
    if len(patch_sizes) != len(f_patch_sizes):
        raise ConfigProblem(file, "all_patch_size and all_f_patch_size must have the same length")
    head_dim = dim // n_heads
    adaln = min(dim, ADALN_EMBED_DIM)
    hidden = int(dim / 3 * 8)
    out: dict[str, list[int]] = {}
    for p, f in zip(patch_sizes, f_patch_sizes, strict=True):
        key = f"{p}-{f}"
        linear(out, f"all_x_embedder.{key}", dim, f * p * p * in_channels)
        linear(out, f"all_final_layer.{key}.linear", p * p * f * in_channels, dim)
        linear(out, f"all_final_layer.{key}.adaLN_modulation.1", dim, adaln)
    out["cap_embedder.0.weight"] = [cap_dim]
    linear(out, "cap_embedder.1", dim, cap_dim)
    out["cap_pad_token"] = [1, dim]
    out["x_pad_token"] = [1, dim]
    linear(out, "t_embedder.mlp.0", TIMESTEP_MID_SIZE, FREQUENCY_EMBEDDING_SIZE)
    linear(out, "t_embedder.mlp.2", adaln, TIMESTEP_MID_SIZE)

    def block(prefix: str, modulation: bool) -> None:
        linear(out, f"{prefix}.attention.to_q", n_heads * head_dim, dim, bias=False)
        linear(out, f"{prefix}.attention.to_k", n_kv_heads * head_dim, dim, bias=False)
        linear(out, f"{prefix}.attention.to_v", n_kv_heads * head_dim, dim, bias=False)
        linear(out, f"{prefix}.attention.to_out.0", dim, n_heads * head_dim, bias=False)
        if qk_norm:
            out[f"{prefix}.attention.norm_q.weight"] = [head_dim]
            out[f"{prefix}.attention.norm_k.weight"] = [head_dim]
        linear(out, f"{prefix}.feed_forward.w1", hidden, dim, bias=False)
        linear(out, f"{prefix}.feed_forward.w2", dim, hidden, bias=False)
        linear(out, f"{prefix}.feed_forward.w3", hidden, dim, bias=False)
        for norm in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
            out[f"{prefix}.{norm}.weight"] = [dim]
        if modulation:
            linear(out, f"{prefix}.adaLN_modulation.0", 4 * dim, adaln)

    for i in range(n_refiner):
        block(f"noise_refiner.{i}", modulation=True)
        block(f"context_refiner.{i}", modulation=False)
    for i in range(n_layers):
        block(f"layers.{i}", modulation=True)
    return out


def expected_tensors(configs: dict[str, Any]) -> Expectation:
    """Everything a ZImagePipeline needs, from the parsed ``CONFIG_FILES`` (path -> JSON document)."""
    return pipeline_expectation(configs, transformer_tensors, qwen3_tensors, vae_tensors, "image-to-image")


SPEC = Architecture(
    name="zimage",
    class_names=(ARCHITECTURE,),
    config_files=CONFIG_FILES,
    expected_tensors=expected_tensors,
    defaults=GenerationDefaults(steps=8, guidance=0.0),
    runtime="imgpack.runtime.zimage.pipeline:ZImagePipeline",
    noise_shape=lambda h, w: (1, 16, h // 8, w // 8),
    description="Z-Image-Turbo: a 6 B single-stream DiT with a Qwen3-4B text encoder and the FLUX VAE",
)

__all__ = ["ARCHITECTURE", "CONFIG_FILES", "SPEC", "ConfigProblem", "Expectation", "canonical_name",
           "expected_tensors", "qwen3_tensors", "transformer_tensors", "vae_tensors"]
