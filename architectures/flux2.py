"""The tensors a FLUX.2 [klein] pipeline (``Flux2KleinPipeline``) needs, derived from its component configs.

Names and shapes follow diffusers' ``Flux2Transformer2DModel`` and ``AutoencoderKLFlux2`` and transformers'
``Qwen3Model`` state dicts, so a model that passes here loads in diffusers and in imgpack's runtime. A key a
config omits takes diffusers' default, listed below; the runtime reads the same defaults, so both agree on any
config. Each expectation is keyed by the layer name the manifest must carry (``transformer/x_embedder.weight``).
"""

from __future__ import annotations

import math
from typing import Any

from imgpack.architectures import autoencoder, qwen3
from imgpack.architectures.base import (
    PIPELINE_CONFIG_FILES,
    Architecture,
    ConfigProblem,
    Expectation,
    GenerationDefaults,
    canonical_name,
    pipeline_expectation,
)

#: The architecture name written in model_index.json's ``_class_name``.
ARCHITECTURE = "Flux2KleinPipeline"
#: The component configs the derivation reads.
CONFIG_FILES = PIPELINE_CONFIG_FILES

#: ``Flux2Transformer2DModel.__init__`` defaults (FLUX.2 [dev]'s sizes; klein configs set every key).
TRANSFORMER_DEFAULTS: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 128,
    "out_channels": None,
    "num_layers": 8,
    "num_single_layers": 48,
    "attention_head_dim": 128,
    "num_attention_heads": 48,
    "joint_attention_dim": 15360,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32],
    "rope_theta": 2000,
    "eps": 1e-6,
    "guidance_embeds": True,
}
#: ``AutoencoderKLFlux2.__init__`` defaults (the real FLUX.2 VAE is exactly these).
VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "decoder_block_out_channels": None,
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 32,
    "norm_num_groups": 32,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "batch_norm_eps": 1e-4,
    "patch_size": [2, 2],
}
#: The hidden states of the text encoder the pipeline concatenates (``text_encoder_out_layers`` default).
TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)


def with_defaults(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The config as diffusers sees it: missing (or null) keys take the class default."""
    return {**defaults, **{k: v for k, v in config.items() if v is not None or defaults.get(k) is None}}


def _positive(config: dict[str, Any], key: str, file: str) -> int:
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigProblem(file, f"field {key!r} must be a positive integer, got {value!r}")
    return value


def _count(config: dict[str, Any], key: str, file: str) -> int:
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigProblem(file, f"field {key!r} must be a non-negative integer, got {value!r}")
    return value


def transformer_tensors(config: dict[str, Any], file: str = "transformer/config.json") -> dict[str, list[int]]:
    """State dict of Flux2Transformer2DModel (every Linear bias-free, LayerNorms without parameters)."""
    cfg = with_defaults(config, TRANSFORMER_DEFAULTS)
    heads = _positive(cfg, "num_attention_heads", file)
    head_dim = _positive(cfg, "attention_head_dim", file)
    in_channels = _positive(cfg, "in_channels", file)
    out_channels = cfg["out_channels"] or in_channels
    patch = _positive(cfg, "patch_size", file)
    joint = _positive(cfg, "joint_attention_dim", file)
    t_channels = _positive(cfg, "timestep_guidance_channels", file)
    n_double = _count(cfg, "num_layers", file)
    n_single = _count(cfg, "num_single_layers", file)
    ratio = cfg["mlp_ratio"]
    if not isinstance(ratio, int | float) or isinstance(ratio, bool) or ratio <= 0:
        raise ConfigProblem(file, f"field 'mlp_ratio' must be a positive number, got {ratio!r}")
    if not isinstance(cfg["guidance_embeds"], bool):
        raise ConfigProblem(file, f"field 'guidance_embeds' must be true or false, got {cfg['guidance_embeds']!r}")
    dim = heads * head_dim
    mlp = int(dim * ratio)
    out: dict[str, list[int]] = {}
    embedders = ["timestep_embedder"] + (["guidance_embedder"] if cfg["guidance_embeds"] else [])
    for embedder in embedders:
        out[f"time_guidance_embed.{embedder}.linear_1.weight"] = [dim, t_channels]
        out[f"time_guidance_embed.{embedder}.linear_2.weight"] = [dim, dim]
    out["double_stream_modulation_img.linear.weight"] = [6 * dim, dim]
    out["double_stream_modulation_txt.linear.weight"] = [6 * dim, dim]
    out["single_stream_modulation.linear.weight"] = [3 * dim, dim]
    out["x_embedder.weight"] = [dim, in_channels]
    out["context_embedder.weight"] = [dim, joint]
    for i in range(n_double):
        p = f"transformer_blocks.{i}"
        for proj in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            out[f"{p}.attn.{proj}.weight"] = [dim, dim]
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            out[f"{p}.attn.{norm}.weight"] = [head_dim]
        for ff in ("ff", "ff_context"):
            out[f"{p}.{ff}.linear_in.weight"] = [2 * mlp, dim]
            out[f"{p}.{ff}.linear_out.weight"] = [dim, mlp]
    for i in range(n_single):
        p = f"single_transformer_blocks.{i}.attn"
        out[f"{p}.to_qkv_mlp_proj.weight"] = [3 * dim + 2 * mlp, dim]
        out[f"{p}.norm_q.weight"] = [head_dim]
        out[f"{p}.norm_k.weight"] = [head_dim]
        out[f"{p}.to_out.weight"] = [dim, dim + mlp]
    out["norm_out.linear.weight"] = [2 * dim, dim]
    out["proj_out.weight"] = [patch * patch * out_channels, dim]
    return out


def vae_tensors(config: dict[str, Any], file: str = "vae/config.json") -> tuple[dict, dict]:
    """(decoder, post-quant conv and batch-norm statistics; encoder, quant conv and the batch counter)."""
    cfg = with_defaults(config, VAE_DEFAULTS)
    patch = cfg["patch_size"]
    if not isinstance(patch, list) or not all(isinstance(p, int) and p > 0 for p in patch):
        raise ConfigProblem(file, f"field 'patch_size' must be a list of positive integers, got {patch!r}")
    decoder_cfg = {**cfg, "block_out_channels": cfg["decoder_block_out_channels"] or cfg["block_out_channels"]}
    decoder, _ = autoencoder.vae_tensors(decoder_cfg, file)
    _, encoder = autoencoder.vae_tensors(cfg, file)
    channels = math.prod(patch) * _positive(cfg, "latent_channels", file)
    decoder["bn.running_mean"] = [channels]
    decoder["bn.running_var"] = [channels]
    encoder["bn.num_batches_tracked"] = []
    return decoder, encoder


def expected_tensors(configs: dict[str, Any]) -> Expectation:
    """Everything a Flux2KleinPipeline needs, from the parsed ``CONFIG_FILES`` (path -> JSON document)."""
    return pipeline_expectation(configs, transformer_tensors, qwen3.qwen3_tensors, vae_tensors, "image editing")


SPEC = Architecture(
    name="flux2-klein",
    class_names=(ARCHITECTURE,),
    config_files=CONFIG_FILES,
    expected_tensors=expected_tensors,
    # The distilled checkpoints' use; a base (non-distilled) model says so in model_index.json and gets 50 steps
    # of guidance 4 (the runtime reads the flag).
    defaults=GenerationDefaults(steps=4, guidance=1.0, guidance_threshold=1.0),
    runtime="imgpack.runtime.flux2.pipeline:Flux2Pipeline",
    noise_shape=lambda h, w: (1, 128, h // 16, w // 16),
    description="FLUX.2 [klein] 4B/9B: a double+single-stream DiT with a Qwen3 text encoder and the FLUX.2 VAE",
)

__all__ = [
    "ARCHITECTURE",
    "SPEC",
    "CONFIG_FILES",
    "TEXT_ENCODER_OUT_LAYERS",
    "TRANSFORMER_DEFAULTS",
    "VAE_DEFAULTS",
    "ConfigProblem",
    "Expectation",
    "canonical_name",
    "expected_tensors",
    "transformer_tensors",
    "vae_tensors",
    "with_defaults",
]
