"""diffusers' ``AutoencoderKL`` state dict (the FLUX VAE family), derived from ``vae/config.json``."""

from __future__ import annotations

from typing import Any

from imgpack.architectures.base import ConfigProblem, bool_field, conv, int_field, int_list_field, linear, norm


def _resnet(out: dict[str, list[int]], prefix: str, c_in: int, c_out: int) -> None:
    norm(out, f"{prefix}.norm1", c_in)
    conv(out, f"{prefix}.conv1", c_out, c_in, 3)
    norm(out, f"{prefix}.norm2", c_out)
    conv(out, f"{prefix}.conv2", c_out, c_out, 3)
    if c_in != c_out:
        conv(out, f"{prefix}.conv_shortcut", c_out, c_in, 1)


def _mid_block(out: dict[str, list[int]], prefix: str, channels: int, attention: bool) -> None:
    _resnet(out, f"{prefix}.resnets.0", channels, channels)
    _resnet(out, f"{prefix}.resnets.1", channels, channels)
    if attention:
        norm(out, f"{prefix}.attentions.0.group_norm", channels)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            linear(out, f"{prefix}.attentions.0.{proj}", channels, channels)


def vae_tensors(config: dict[str, Any], file: str = "vae/config.json") -> tuple[dict, dict]:
    """(decoder and post-quant tensors, encoder and quant tensors) of a diffusers AutoencoderKL."""
    channels = int_list_field(config, "block_out_channels", file)
    layers = int_field(config, "layers_per_block", file)
    latent = int_field(config, "latent_channels", file)
    in_ch = int_field(config, "in_channels", file, 3)
    out_ch = int_field(config, "out_channels", file, 3)
    attention = bool_field(config, "mid_block_add_attention", file, True)
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = config.get(key, [kind] * len(channels))
        if not isinstance(types, list) or len(types) != len(channels) or any(t != kind for t in types):
            raise ConfigProblem(file, f"field {key!r} must list {len(channels)} x {kind!r}, got {types!r}")
    decoder: dict[str, list[int]] = {}
    conv(decoder, "decoder.conv_in", channels[-1], latent, 3)
    _mid_block(decoder, "decoder.mid_block", channels[-1], attention)
    reversed_channels = list(reversed(channels))
    c_out = reversed_channels[0]
    for i, c in enumerate(reversed_channels):
        c_prev, c_out = c_out, c
        for j in range(layers + 1):
            _resnet(decoder, f"decoder.up_blocks.{i}.resnets.{j}", c_prev if j == 0 else c_out, c_out)
        if i != len(channels) - 1:
            conv(decoder, f"decoder.up_blocks.{i}.upsamplers.0.conv", c_out, c_out, 3)
    norm(decoder, "decoder.conv_norm_out", channels[0])
    conv(decoder, "decoder.conv_out", out_ch, channels[0], 3)
    if bool_field(config, "use_post_quant_conv", file, True):
        conv(decoder, "post_quant_conv", latent, latent, 1)

    encoder: dict[str, list[int]] = {}
    conv(encoder, "encoder.conv_in", channels[0], in_ch, 3)
    c_out = channels[0]
    for i, c in enumerate(channels):
        c_prev, c_out = c_out, c
        for j in range(layers):
            _resnet(encoder, f"encoder.down_blocks.{i}.resnets.{j}", c_prev if j == 0 else c_out, c_out)
        if i != len(channels) - 1:
            conv(encoder, f"encoder.down_blocks.{i}.downsamplers.0.conv", c_out, c_out, 3)
    _mid_block(encoder, "encoder.mid_block", channels[-1], attention)
    norm(encoder, "encoder.conv_norm_out", channels[-1])
    conv(encoder, "encoder.conv_out", 2 * latent, channels[-1], 3)
    if bool_field(config, "use_quant_conv", file, True):
        conv(encoder, "quant_conv", 2 * latent, 2 * latent, 1)
    return decoder, encoder


