"""The tensors a Z-Image pipeline (``ZImagePipeline``) needs, derived from its component configs.

Names and shapes follow diffusers' ``ZImageTransformer2DModel`` and ``AutoencoderKL`` and transformers'
``Qwen3Model`` state dicts, so a model that passes here loads in diffusers and in imgpack's runtime.
Each expectation is keyed by the layer name the manifest must carry (``transformer/layers.0...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The architecture name written in model_index.json's ``_class_name``.
ARCHITECTURE = "ZImagePipeline"
#: Width of Z-Image's timestep/adaLN conditioning vector (capped, not config-driven).
ADALN_EMBED_DIM = 256
#: Sinusoidal frequency width and hidden width of Z-Image's timestep MLP (fixed in the model code).
FREQUENCY_EMBEDDING_SIZE = 256
TIMESTEP_MID_SIZE = 1024
#: The component configs the derivation reads.
CONFIG_FILES = ("transformer/config.json", "text_encoder/config.json", "vae/config.json")


class ConfigProblem(Exception):
    """A component config lacks a field the derivation needs, or has a value of the wrong type."""

    def __init__(self, file: str, message: str) -> None:
        super().__init__(f"{file}: {message}")
        self.file = file


@dataclass
class Expectation:
    """Expected tensors: ``required`` must be present, ``optional`` may be; both map name -> shape."""

    required: dict[str, list[int]]
    optional: dict[str, list[int]]
    #: Name prefixes the text encoder may use instead of ``text_encoder/model.`` (``text_encoder/``).
    aliases: dict[str, str]
    #: Optional tensor groups whose absence is worth a warning (the VAE encoder).
    optional_groups: dict[str, str]


def _int(config: dict[str, Any], key: str, file: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigProblem(file, f"field {key!r} must be a non-negative integer, got {value!r}")
    return value


def _int_list(config: dict[str, Any], key: str, file: str, default: list[int] | None = None) -> list[int]:
    value = config.get(key, default)
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ConfigProblem(file, f"field {key!r} must be a non-empty list of positive integers, got {value!r}")
    return value


def _bool(config: dict[str, Any], key: str, file: str, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise ConfigProblem(file, f"field {key!r} must be true or false, got {value!r}")
    return value


def _linear(out: dict[str, list[int]], name: str, n_out: int, n_in: int, bias: bool = True) -> None:
    out[name + ".weight"] = [n_out, n_in]
    if bias:
        out[name + ".bias"] = [n_out]


def transformer_tensors(config: dict[str, Any], file: str = "transformer/config.json") -> dict[str, list[int]]:
    """State dict of ZImageTransformer2DModel: embedders, refiners, main layers, final layers."""
    dim = _int(config, "dim", file)
    n_heads = _int(config, "n_heads", file)
    n_kv_heads = _int(config, "n_kv_heads", file, n_heads)
    n_layers = _int(config, "n_layers", file)
    n_refiner = _int(config, "n_refiner_layers", file)
    in_channels = _int(config, "in_channels", file)
    cap_dim = _int(config, "cap_feat_dim", file)
    qk_norm = _bool(config, "qk_norm", file, True)
    patch_sizes = _int_list(config, "all_patch_size", file)
    f_patch_sizes = _int_list(config, "all_f_patch_size", file)
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
        _linear(out, f"all_x_embedder.{key}", dim, f * p * p * in_channels)
        _linear(out, f"all_final_layer.{key}.linear", p * p * f * in_channels, dim)
        _linear(out, f"all_final_layer.{key}.adaLN_modulation.1", dim, adaln)
    out["cap_embedder.0.weight"] = [cap_dim]
    _linear(out, "cap_embedder.1", dim, cap_dim)
    out["cap_pad_token"] = [1, dim]
    out["x_pad_token"] = [1, dim]
    _linear(out, "t_embedder.mlp.0", TIMESTEP_MID_SIZE, FREQUENCY_EMBEDDING_SIZE)
    _linear(out, "t_embedder.mlp.2", adaln, TIMESTEP_MID_SIZE)

    def block(prefix: str, modulation: bool) -> None:
        _linear(out, f"{prefix}.attention.to_q", n_heads * head_dim, dim, bias=False)
        _linear(out, f"{prefix}.attention.to_k", n_kv_heads * head_dim, dim, bias=False)
        _linear(out, f"{prefix}.attention.to_v", n_kv_heads * head_dim, dim, bias=False)
        _linear(out, f"{prefix}.attention.to_out.0", dim, n_heads * head_dim, bias=False)
        if qk_norm:
            out[f"{prefix}.attention.norm_q.weight"] = [head_dim]
            out[f"{prefix}.attention.norm_k.weight"] = [head_dim]
        _linear(out, f"{prefix}.feed_forward.w1", hidden, dim, bias=False)
        _linear(out, f"{prefix}.feed_forward.w2", dim, hidden, bias=False)
        _linear(out, f"{prefix}.feed_forward.w3", hidden, dim, bias=False)
        for norm in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
            out[f"{prefix}.{norm}.weight"] = [dim]
        if modulation:
            _linear(out, f"{prefix}.adaLN_modulation.0", 4 * dim, adaln)

    for i in range(n_refiner):
        block(f"noise_refiner.{i}", modulation=True)
        block(f"context_refiner.{i}", modulation=False)
    for i in range(n_layers):
        block(f"layers.{i}", modulation=True)
    return out


def qwen3_tensors(config: dict[str, Any], file: str = "text_encoder/config.json") -> tuple[dict, dict]:
    """(required, optional) state dict of a Qwen3 text encoder, keyed without the ``model.`` prefix."""
    hidden = _int(config, "hidden_size", file)
    n_layers = _int(config, "num_hidden_layers", file)
    n_heads = _int(config, "num_attention_heads", file)
    n_kv = _int(config, "num_key_value_heads", file, n_heads)
    intermediate = _int(config, "intermediate_size", file)
    vocab = _int(config, "vocab_size", file)
    if n_heads == 0:
        raise ConfigProblem(file, "num_attention_heads must be positive")
    head_dim = config.get("head_dim")
    head_dim = _int(config, "head_dim", file) if head_dim is not None else hidden // n_heads
    bias = _bool(config, "attention_bias", file, False)
    req: dict[str, list[int]] = {"embed_tokens.weight": [vocab, hidden], "norm.weight": [hidden]}
    for i in range(n_layers):
        p = f"layers.{i}"
        _linear(req, f"{p}.self_attn.q_proj", n_heads * head_dim, hidden, bias)
        _linear(req, f"{p}.self_attn.k_proj", n_kv * head_dim, hidden, bias)
        _linear(req, f"{p}.self_attn.v_proj", n_kv * head_dim, hidden, bias)
        _linear(req, f"{p}.self_attn.o_proj", hidden, n_heads * head_dim, bias)
        req[f"{p}.self_attn.q_norm.weight"] = [head_dim]
        req[f"{p}.self_attn.k_norm.weight"] = [head_dim]
        _linear(req, f"{p}.mlp.gate_proj", intermediate, hidden, bias=False)
        _linear(req, f"{p}.mlp.up_proj", intermediate, hidden, bias=False)
        _linear(req, f"{p}.mlp.down_proj", hidden, intermediate, bias=False)
        req[f"{p}.input_layernorm.weight"] = [hidden]
        req[f"{p}.post_attention_layernorm.weight"] = [hidden]
    optional = {"lm_head.weight": [vocab, hidden]}
    return req, optional


def _conv(out: dict[str, list[int]], name: str, n_out: int, n_in: int, k: int) -> None:
    out[name + ".weight"] = [n_out, n_in, k, k]
    out[name + ".bias"] = [n_out]


def _norm(out: dict[str, list[int]], name: str, channels: int) -> None:
    out[name + ".weight"] = [channels]
    out[name + ".bias"] = [channels]


def _resnet(out: dict[str, list[int]], prefix: str, c_in: int, c_out: int) -> None:
    _norm(out, f"{prefix}.norm1", c_in)
    _conv(out, f"{prefix}.conv1", c_out, c_in, 3)
    _norm(out, f"{prefix}.norm2", c_out)
    _conv(out, f"{prefix}.conv2", c_out, c_out, 3)
    if c_in != c_out:
        _conv(out, f"{prefix}.conv_shortcut", c_out, c_in, 1)


def _mid_block(out: dict[str, list[int]], prefix: str, channels: int, attention: bool) -> None:
    _resnet(out, f"{prefix}.resnets.0", channels, channels)
    _resnet(out, f"{prefix}.resnets.1", channels, channels)
    if attention:
        _norm(out, f"{prefix}.attentions.0.group_norm", channels)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            _linear(out, f"{prefix}.attentions.0.{proj}", channels, channels)


def vae_tensors(config: dict[str, Any], file: str = "vae/config.json") -> tuple[dict, dict]:
    """(decoder and post-quant tensors, encoder and quant tensors) of a diffusers AutoencoderKL."""
    channels = _int_list(config, "block_out_channels", file)
    layers = _int(config, "layers_per_block", file)
    latent = _int(config, "latent_channels", file)
    in_ch = _int(config, "in_channels", file, 3)
    out_ch = _int(config, "out_channels", file, 3)
    attention = _bool(config, "mid_block_add_attention", file, True)
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = config.get(key, [kind] * len(channels))
        if not isinstance(types, list) or len(types) != len(channels) or any(t != kind for t in types):
            raise ConfigProblem(file, f"field {key!r} must list {len(channels)} x {kind!r}, got {types!r}")
    decoder: dict[str, list[int]] = {}
    _conv(decoder, "decoder.conv_in", channels[-1], latent, 3)
    _mid_block(decoder, "decoder.mid_block", channels[-1], attention)
    reversed_channels = list(reversed(channels))
    c_out = reversed_channels[0]
    for i, c in enumerate(reversed_channels):
        c_prev, c_out = c_out, c
        for j in range(layers + 1):
            _resnet(decoder, f"decoder.up_blocks.{i}.resnets.{j}", c_prev if j == 0 else c_out, c_out)
        if i != len(channels) - 1:
            _conv(decoder, f"decoder.up_blocks.{i}.upsamplers.0.conv", c_out, c_out, 3)
    _norm(decoder, "decoder.conv_norm_out", channels[0])
    _conv(decoder, "decoder.conv_out", out_ch, channels[0], 3)
    if _bool(config, "use_post_quant_conv", file, True):
        _conv(decoder, "post_quant_conv", latent, latent, 1)

    encoder: dict[str, list[int]] = {}
    _conv(encoder, "encoder.conv_in", channels[0], in_ch, 3)
    c_out = channels[0]
    for i, c in enumerate(channels):
        c_prev, c_out = c_out, c
        for j in range(layers):
            _resnet(encoder, f"encoder.down_blocks.{i}.resnets.{j}", c_prev if j == 0 else c_out, c_out)
        if i != len(channels) - 1:
            _conv(encoder, f"encoder.down_blocks.{i}.downsamplers.0.conv", c_out, c_out, 3)
    _mid_block(encoder, "encoder.mid_block", channels[-1], attention)
    _norm(encoder, "encoder.conv_norm_out", channels[-1])
    _conv(encoder, "encoder.conv_out", 2 * latent, channels[-1], 3)
    if _bool(config, "use_quant_conv", file, True):
        _conv(encoder, "quant_conv", 2 * latent, 2 * latent, 1)
    return decoder, encoder


def expected_tensors(configs: dict[str, Any]) -> Expectation:
    """Everything a ZImagePipeline needs, from the parsed ``CONFIG_FILES`` (path -> JSON document)."""
    for file in CONFIG_FILES:
        if not isinstance(configs.get(file), dict):
            raise ConfigProblem(file, "must be a JSON object")
    required: dict[str, list[int]] = {}
    optional: dict[str, list[int]] = {}
    for key, shape in transformer_tensors(configs["transformer/config.json"]).items():
        required["transformer/" + key] = shape
    te_required, te_optional = qwen3_tensors(configs["text_encoder/config.json"])
    for key, shape in te_required.items():
        required["text_encoder/model." + key] = shape
    for key, shape in te_optional.items():
        optional["text_encoder/" + key] = shape
    decoder, encoder = vae_tensors(configs["vae/config.json"])
    for key, shape in decoder.items():
        required["vae/" + key] = shape
    for key, shape in encoder.items():
        optional["vae/" + key] = shape
    return Expectation(
        required=required,
        optional=optional,
        aliases={"text_encoder/": "text_encoder/model."},
        optional_groups={"vae/encoder.": "the VAE encoder (needed for image-to-image, not for generation)"},
    )


def canonical_name(name: str, expectation: Expectation) -> str:
    """Map an accepted alias (``text_encoder/layers.0...``) to the expected name (``text_encoder/model.layers...``)."""
    if name in expectation.required or name in expectation.optional:
        return name
    for alias, target in expectation.aliases.items():
        if name.startswith(alias) and not name.startswith(target):
            candidate = target + name[len(alias):]
            if candidate in expectation.required or candidate in expectation.optional:
                return candidate
    return name
