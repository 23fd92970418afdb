"""The FLUX.2 VAE (``AutoencoderKLFlux2``) as the klein pipeline decodes with it.

The transformer works on 2x2-patchified latents normalised by the VAE's batch-norm running statistics, so
decoding first undoes that normalisation (per patchified channel), then the patchify, and only then runs
``post_quant_conv`` and the shared AutoencoderKL decoder. There is no scaling or shift factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imgpack.architectures.flux2 import VAE_DEFAULTS, with_defaults
from imgpack.runtime.backend import mx, nn
from imgpack.runtime.common.autoencoder import Decoder, VAEConfig, pointwise
from imgpack.schemas.errors import ImgpackError

#: The pipeline's latent packing: 2x2 latent pixels per transformer token (fixed in diffusers' pipeline code).
PATCH = 2


@dataclass
class Flux2VAEConfig:
    decoder: VAEConfig  # with ``block_out_channels`` = the decoder's own widths
    #: ``len(block_out_channels) - 1`` halvings of the *encoder* widths, as the pipeline computes it.
    scale_factor: int
    batch_norm_eps: float

    @property
    def latent_channels(self) -> int:
        return self.decoder.latent_channels

    @property
    def packed_channels(self) -> int:
        return PATCH * PATCH * self.decoder.latent_channels

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "vae/config.json") -> Flux2VAEConfig:
        config = with_defaults(config, VAE_DEFAULTS)
        patch = config["patch_size"]
        if not isinstance(patch, list | tuple) or list(patch) != [PATCH, PATCH]:
            raise ImgpackError(f"{where}: patch_size {patch} is not supported (the pipeline packs 2x2)")
        encoder_channels = config["block_out_channels"]
        decoder_channels = config["decoder_block_out_channels"] or encoder_channels
        if not isinstance(encoder_channels, list) or not isinstance(decoder_channels, list):
            raise ImgpackError(f"{where}: field 'block_out_channels' must be a list of integers")
        if len(decoder_channels) != len(encoder_channels):
            raise ImgpackError(f"{where}: decoder_block_out_channels and block_out_channels differ in length")
        decoder = VAEConfig.from_dict({**config, "block_out_channels": decoder_channels}, where)
        try:
            eps = float(config["batch_norm_eps"])
        except (TypeError, ValueError):
            raise ImgpackError(f"{where}: bad field value batch_norm_eps {config['batch_norm_eps']!r}") from None
        return cls(decoder=decoder, scale_factor=2 ** (len(encoder_channels) - 1), batch_norm_eps=eps)


class LatentStatistics(nn.Module):
    """``bn``: the running mean and variance of the patchified latents (a BatchNorm2d never applied in forward)."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.running_mean = mx.zeros((channels,))
        self.running_var = mx.ones((channels,))

    def denormalize(self, latents: mx.array) -> mx.array:
        """(batch, channels, h, w) normalised -> raw: ``x * sqrt(var + eps) + mean`` per channel."""
        std = mx.sqrt(self.running_var + self.eps)[None, :, None, None]
        return latents * std + self.running_mean[None, :, None, None]


def unpatchify(latents: mx.array) -> mx.array:
    """(batch, 4c, h, w) -> (batch, c, 2h, 2w): packed channel ``c*4 + py*2 + px`` is pixel (2y+py, 2x+px)."""
    b, c4, h, w = latents.shape
    c = c4 // (PATCH * PATCH)
    x = latents.reshape(b, c, PATCH, PATCH, h, w).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c, h * PATCH, w * PATCH)


class Flux2VAEDecoder(nn.Module):
    """Packed, normalised latents (batch, 4 * latent_channels, h, w) -> images (batch, H, W, 3) in [-1, 1],
    H = 2h x the VAE scale factor."""

    def __init__(self, cfg: Flux2VAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.bn = LatentStatistics(cfg.packed_channels, cfg.batch_norm_eps)
        if cfg.decoder.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg.decoder)

    def latents_for_decoder(self, packed: mx.array) -> mx.array:
        """What diffusers hands ``vae.decode``: (batch, latent_channels, 2h, 2w), NCHW, float32."""
        return unpatchify(self.bn.denormalize(packed.astype(mx.float32)))

    def decode(self, latents: mx.array) -> mx.array:
        """``vae.decode``: (batch, latent_channels, H/8, W/8) NCHW -> (batch, H, W, 3)."""
        z = latents.transpose(0, 2, 3, 1).astype(self.decoder.conv_in.weight.dtype)
        if self.config.decoder.use_post_quant_conv:
            z = pointwise(self.post_quant_conv, z)
        return self.decoder(z)

    def __call__(self, packed: mx.array) -> mx.array:
        return self.decode(self.latents_for_decoder(packed))

    def param_name(self, key: str) -> str | None:
        """diffusers key -> parameter path; the encoder, ``quant_conv`` and the batch counter are not used."""
        if key.startswith(("encoder.", "quant_conv.")) or key == "bn.num_batches_tracked":
            return None
        if key.startswith("post_quant_conv.") and not self.config.decoder.use_post_quant_conv:
            return None
        return key.replace(".to_out.0.", ".to_out.")

    def checkpoint_key(self, param: str) -> str:
        return param.replace(".to_out.", ".to_out.0.")

