"""The AutoencoderKL decoder (the FLUX VAE Z-Image uses): latents -> RGB, built from ``vae/config.json``.

Only the decoder half is built; encoder tensors in the manifest are never read. Works in NHWC, as MLX
convolutions do; PyTorch conv weights are transposed on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imgpack.runtime.backend import attention, attention_bytes, mx, nn, release_free_memory, silu
from imgpack.runtime.common import vae_kernels
from imgpack.schemas.errors import ImgpackError


@dataclass
class VAEConfig:
    latent_channels: int
    out_channels: int
    block_out_channels: list[int]
    layers_per_block: int
    norm_num_groups: int
    scaling_factor: float
    shift_factor: float
    mid_block_add_attention: bool = True
    use_post_quant_conv: bool = True
    #: diffusers decodes in float32 even for bf16 pipelines when this is set (the FLUX VAE sets it).
    force_upcast: bool = True

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "vae/config.json") -> VAEConfig:
        if config.get("act_fn", "silu") != "silu":
            raise ImgpackError(f"{where}: act_fn {config['act_fn']!r} is not supported (only silu)")
        if config.get("norm_type", "group") != "group":
            raise ImgpackError(f"{where}: norm_type {config['norm_type']!r} is not supported (only group)")
        blocks = config.get("up_block_types") or []
        if any(b != "UpDecoderBlock2D" for b in blocks):
            raise ImgpackError(f"{where}: up_block_types {blocks} are not supported (only UpDecoderBlock2D)")
        try:
            channels = [int(c) for c in config["block_out_channels"]]
            if blocks and len(blocks) != len(channels):
                raise ImgpackError(f"{where}: up_block_types and block_out_channels differ in length")
            return cls(
                latent_channels=int(config.get("latent_channels", 4)),
                out_channels=int(config.get("out_channels", 3)),
                block_out_channels=channels,
                layers_per_block=int(config.get("layers_per_block", 1)),
                norm_num_groups=int(config.get("norm_num_groups", 32)),
                scaling_factor=float(config.get("scaling_factor", 0.18215)),
                shift_factor=float(config.get("shift_factor") or 0.0),
                mid_block_add_attention=bool(config.get("mid_block_add_attention", True)),
                use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
                force_upcast=bool(config.get("force_upcast", True)),
            )
        except KeyError as e:
            raise ImgpackError(f"{where}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ImgpackError(f"{where}: bad field value: {e}") from None


#: Above this many input elements a 3x3 convolution runs in row bands, so MLX's im2col buffer (9x its input)
#: stays near 9 x 4 M floats instead of 9 x the whole activation (gigabytes at 1024x1024).
BAND_ELEMENTS = 4 * 1024 * 1024


class GroupNorm(nn.Module):
    """GroupNorm over NHWC with PyTorch's channel grouping; two-pass statistics in float32 (accurate over the
    millions of elements a group spans at full resolution)."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.groups = groups
        self.eps = eps
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        if vae_kernels.fast_conv(x, self.weight):
            return vae_kernels.group_norm_silu(x, self.weight, self.bias, self.groups, self.eps, silu=False)
        b, h, w, c = x.shape
        g = x.astype(mx.float32).reshape(b, h * w, self.groups, c // self.groups)
        mean = g.mean(axis=(1, 3), keepdims=True)
        var = mx.square(g - mean).mean(axis=(1, 3), keepdims=True)
        normed = ((g - mean) * mx.rsqrt(var + self.eps)).reshape(b, h, w, c).astype(x.dtype)
        return normed * self.weight + self.bias


def group_norm(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(channels, groups)


def pointwise(conv: nn.Conv2d, x: mx.array) -> mx.array:
    """A 1x1 ``nn.Conv2d``; a plain matmul on CPU."""
    if vae_kernels.fast_conv(x, conv.weight):
        return vae_kernels.conv1x1(x, conv.weight, conv.get("bias"))
    return conv(x)


class Conv3x3(nn.Module):
    """3x3 stride-1 'same' convolution; large inputs are convolved band by band (evaluated as they go)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        scale = (in_ch * 9) ** -0.5
        self.weight = mx.random.uniform(-scale, scale, (out_ch, 3, 3, in_ch))
        self.bias = mx.zeros((out_ch,))

    def __call__(self, x: mx.array, residual: mx.array | None = None, norm: GroupNorm | None = None,
                 into_residual: bool = False) -> mx.array:
        """The convolution of ``silu(norm(x))`` (of ``x`` without ``norm``), plus ``residual`` (the output's
        shape) when given. On CPU the norm and SiLU are applied band by band as the convolution reads its input,
        so the normalised activation is never stored whole; with ``into_residual`` (the caller holds the only
        reference to ``residual``) the sum is written over the residual's buffer instead of a new one."""
        if vae_kernels.fast_conv(x, self.weight, *(() if norm is None else (norm.weight,))):
            pre = None if norm is None else vae_kernels.prenorm(x, norm.weight, norm.bias, norm.groups, norm.eps)
            return vae_kernels.conv3x3_auto(x, self.weight, self.bias, residual, pre, into_residual)
        out = self._banded(x if norm is None else silu(norm(x)))
        return out if residual is None else residual + out

    def _banded(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        rows = max(1, BAND_ELEMENTS // (b * w * c))
        if rows >= h:
            return mx.conv2d(x, self.weight, padding=1) + self.bias
        mx.eval(x)
        bands = []
        for top in range(0, h, rows):
            bottom = min(h, top + rows)
            band = x[:, max(top - 1, 0) : min(bottom + 1, h)]
            band = mx.pad(band, [(0, 0), (int(top == 0), int(bottom == h)), (0, 0), (0, 0)])
            out = mx.conv2d(band, self.weight, padding=(0, 1)) + self.bias
            mx.eval(out)
            bands.append(out)
        return mx.concatenate(bands, axis=1)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = Conv3x3(in_ch, out_ch)
        self.norm2 = group_norm(out_ch, groups)
        self.conv2 = Conv3x3(out_ch, out_ch)
        if in_ch != out_ch:
            self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1)
        self.has_shortcut = in_ch != out_ch
        #: With ``donate`` on CPU, the output is then a view of the first part of the input's larger buffer.
        self.shrinks = out_ch < in_ch

    def __call__(self, x: mx.array, donate: bool = False) -> mx.array:
        """``donate``: the caller gives ``x`` up (holds no other use of it), so on CPU the block's output is written
        over ``x``'s buffer: one full activation less at the peak (the shortcut's output lies over its input too)."""
        if not donate or not vae_kernels.fast_conv(x, self.conv1.weight):
            skip = pointwise(self.conv_shortcut, x) if self.has_shortcut else x
            h = self.conv1(x, norm=self.norm1)
            # A shortcut's output is this block's own: the sum overwrites it (a full activation less at the peak).
            return self.conv2(h, residual=skip, norm=self.norm2, into_residual=self.has_shortcut)
        h = self.conv1(x, norm=self.norm1)
        if self.has_shortcut:
            conv = self.conv_shortcut
            over = vae_kernels.conv1x1_over_input(x, conv.weight, conv.get("bias"))
            x = pointwise(conv, x) if over is None else over  # None: x's memory is not writable here
        return self.conv2(h, residual=x, norm=self.norm2, into_residual=True)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        y = self.group_norm(x).reshape(b, 1, h * w, c)
        q, k, v = self.to_q(y), self.to_k(y), self.to_v(y)
        out = attention(q, k, v, scale=c**-0.5)
        return x + self.to_out(out).reshape(b, h, w, c)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv3x3(channels, channels)

    def __call__(self, x: mx.array) -> mx.array:
        if vae_kernels.fast_conv(x, self.conv.weight):
            return vae_kernels.upsample_conv3x3(x, self.conv.weight, self.conv.bias)
        b, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, h * 2, w * 2, c)
        return self.conv(x)


class UpBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, n_resnets: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n_resnets)]
        self.upsamplers = [Upsample(out_ch)] if upsample else []

    @property
    def layers(self) -> list[nn.Module]:
        """The block's layers in order, each taking and returning one activation."""
        return [*self.resnets, *self.upsamplers]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = [ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)]
        self.attentions = [AttentionBlock(channels, groups)] if attention else []

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        channels = list(reversed(cfg.block_out_channels))
        groups = cfg.norm_num_groups
        self.conv_in = Conv3x3(cfg.latent_channels, channels[0])
        self.mid_block = MidBlock(channels[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = [
            UpBlock(
                channels[max(i - 1, 0)], ch, cfg.layers_per_block + 1, groups, upsample=i < len(channels) - 1
            )
            for i, ch in enumerate(channels)
        ]
        self.conv_norm_out = group_norm(channels[-1], groups)
        self.conv_out = Conv3x3(channels[-1], cfg.out_channels)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            # Layer by layer rather than ``block(x)``, which would keep the block's input alive here through all
            # its layers: at 1024x1024 the last block's input is a 1 GiB activation no layer after the first needs.
            # The decoder owns each activation, so its ResNet blocks write their outputs over their inputs. A
            # channel-shrinking block's output then keeps its input's larger buffer: copied out before the
            # upsample, whose input stays alive beside an output 4x its size.
            in_larger_buffer = False
            for layer in block.layers:
                if isinstance(layer, ResnetBlock):
                    fast = vae_kernels.fast_conv(x, layer.conv1.weight)
                    x = layer(x, donate=True)
                    in_larger_buffer = in_larger_buffer or (fast and layer.shrinks)
                    continue
                if in_larger_buffer:
                    x, in_larger_buffer = vae_kernels.compacted(x), False
                x = layer(x)
            mx.eval(x)  # keep the graph, and so the live activations, to one block
            release_free_memory()
        return self.conv_out(x, norm=self.conv_norm_out)


def decode_bytes(cfg: VAEConfig, width: int, height: int) -> int:
    """A generous bound on the decoder's working memory for one width x height image, beyond its weights.

    The widest full-resolution activations have the second block's width, in float32. With the CPU kernels the
    peak holds about two of them (the last upsample's input beside its output; a full-resolution block's input
    beside its first convolution's output, the rest written in place), plus fixed band buffers: measured with
    the FLUX VAE's widths, 1.5 KB per output pixel at 512x512 and 1024x1024. MLX's own kernels keep about six
    (5.6-5.9 KB per pixel). The mid block's attention over the latent pixels comes on top."""
    pixels = width * height
    wide = cfg.block_out_channels[min(1, len(cfg.block_out_channels) - 1)]
    fast = vae_kernels.fast_conv(mx.zeros((1,), dtype=mx.float32))
    activations = pixels * wide * 4 * (2 if fast else 6)
    bands = (vae_kernels.BAND_FLOATS + vae_kernels.WINOGRAD_BAND_FLOATS) * 4 if fast else 0
    latent = pixels // cfg.scale_factor**2
    return activations + bands + attention_bytes(1, 1, latent, latent)


class VAEDecoder(nn.Module):
    """Latents (batch, channels, h, w) as the transformer makes them -> images (batch, H, W, 3) in [-1, 1]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.decoder = Decoder(cfg)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def __call__(self, latents: mx.array) -> mx.array:
        cfg = self.config
        dtype = self.decoder.conv_in.weight.dtype
        z = (latents / cfg.scaling_factor + cfg.shift_factor).transpose(0, 2, 3, 1).astype(dtype)
        if cfg.use_post_quant_conv:
            z = pointwise(self.post_quant_conv, z)
        return self.decoder(z)

    def param_name(self, key: str) -> str | None:
        if key.startswith(("encoder.", "quant_conv.")):
            return None
        if key.startswith("post_quant_conv.") and not self.config.use_post_quant_conv:
            return None
        return key.replace(".to_out.0.", ".to_out.")

    def checkpoint_key(self, param: str) -> str:
        return param.replace(".to_out.", ".to_out.0.")
