"""FLUX.2 [klein] text-to-image generation from a stored manifest, as a generator of progress events.

Shaped like the Z-Image pipeline (same request, events and lifecycle): ``Flux2Model.open(store, ref)`` reads
configs and the tokenizer and builds the networks without touching weights; components load blob by blob when
first needed. What differs is diffusers' ``Flux2KleinPipeline``: the prompt is templated with thinking disabled,
padded to 512 tokens and encoded as Qwen3 hidden states 9, 18 and 27 side by side (pads included); the latents
are 2x2-packed tokens whose portable seed noise is ``(1, in_channels, H/16, W/16)``; the schedule uses FLUX.2's
empirical shift; guidance is classifier-free ``neg + g * (cond - neg)`` and only for non-distilled checkpoints;
the VAE first undoes its batch-norm normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from imgpack.architectures import flux2 as arch
from imgpack.architectures.base import GenerationDefaults
from imgpack.architectures.flux2 import TEXT_ENCODER_OUT_LAYERS
from imgpack.runtime.backend import attention_bytes, compute_dtype, mx, nn
from imgpack.runtime.common.autoencoder import decode_bytes
from imgpack.runtime.common.loader import Component, ModelSource
from imgpack.runtime.common.pipeline import (
    GenerationCancelled,
    GenerationRequest,
    Image,
    Pipeline,
    Preview,
    Stage,
    Step,
    generate,
    initial_noise,
    load_tokenizer,
    run_to_image,
)
from imgpack.runtime.common.qwen3 import Qwen3Config, Qwen3TextEncoder
from imgpack.runtime.common.scheduler import FlowMatchConfig, FlowMatchEulerScheduler, compute_empirical_mu
from imgpack.runtime.common.tokenizer import MAX_SEQUENCE_LENGTH
from imgpack.runtime.flux2.autoencoder import PATCH, Flux2VAEConfig, Flux2VAEDecoder
from imgpack.runtime.flux2.transformer import Flux2Config, Flux2Transformer, image_ids, text_ids
from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.manifest import Layer
from imgpack.schemas.safetensors import DTYPE_SIZES

#: The distilled checkpoints' intended use (the model card's and diffusers' integration test's).
DISTILLED_STEPS = 4
DISTILLED_GUIDANCE = 1.0
#: The base checkpoints' recommended use: 50 steps of classifier-free guidance 4 against "".
BASE_STEPS = 50
BASE_GUIDANCE = 4.0
#: Every prompt is padded (or truncated) to this many tokens, and all of them reach the transformer.
TEXT_LENGTH = MAX_SEQUENCE_LENGTH
COMPONENTS = ("text_encoder", "transformer", "vae")
DISTILLED = GenerationDefaults(steps=DISTILLED_STEPS, guidance=DISTILLED_GUIDANCE, guidance_threshold=math.inf)
BASE = GenerationDefaults(steps=BASE_STEPS, guidance=BASE_GUIDANCE, guidance_threshold=1.0)


def trained_dtype(layers: dict[str, Layer]) -> str | None:
    """The dtype holding most of a component's bytes (matrices in bf16 with f32 norms count as bf16)."""
    totals: dict[str, int] = {}
    for layer in layers.values():
        if layer.dtype is None:
            continue
        size = math.prod(layer.shape or []) * DTYPE_SIZES.get(layer.dtype, 0)
        totals[layer.dtype] = totals.get(layer.dtype, 0) + size
    return max(totals, key=totals.__getitem__) if totals else None


class Flux2Pipeline(Pipeline):
    """A FLUX.2 [klein] model: configs, tokenizer and lazily loaded networks."""

    architecture = arch.SPEC

    def __init__(self, source: ModelSource, log: Callable[[str], None] | None = None, keep_loaded: bool = True,
                 force: bool = False) -> None:
        self.require_architecture(source)
        self.source = source
        index = source.model_index
        #: Step-distilled checkpoints take no guidance (diffusers' default for a missing flag is False).
        self.is_distilled = bool(index.get("is_distilled", False))
        self.transformer_config = Flux2Config.from_dict(source.read_json("transformer/config.json"))
        self.text_config = Qwen3Config.from_dict(source.read_json("text_encoder/config.json"))
        self.vae_config = Flux2VAEConfig.from_dict(source.read_json("vae/config.json"))
        self.scheduler_config = FlowMatchConfig.from_dict(source.read_json("scheduler/scheduler_config.json"))
        self._check_configs()
        self.tokenizer = load_tokenizer(source)
        super().__init__(source, log, keep_loaded, force)

    def build_components(self) -> dict[str, Component]:
        self.dtype = compute_dtype(trained_dtype(self.source.tensors("transformer")))
        return {
            "text_encoder": Component(self.source, "text_encoder",
                                      lambda: Qwen3TextEncoder(self.text_config, TEXT_ENCODER_OUT_LAYERS), self.dtype),
            "transformer": Component(self.source, "transformer", lambda: Flux2Transformer(self.transformer_config),
                                     self.dtype),
            "vae": Component(self.source, "vae", lambda: Flux2VAEDecoder(self.vae_config), self.dtype,
                             upcast=self.vae_config.decoder.force_upcast),
        }

    def _check_configs(self) -> None:
        """The cross-component sizes the pipeline relies on, named before anything loads."""
        where, cfg, text, vae = self.source.where, self.transformer_config, self.text_config, self.vae_config
        joint = len(TEXT_ENCODER_OUT_LAYERS) * text.hidden_size
        if cfg.joint_attention_dim != joint:
            raise ImgpackError(
                f"{where}: transformer joint_attention_dim {cfg.joint_attention_dim} != {len(TEXT_ENCODER_OUT_LAYERS)}"
                f" x text_encoder hidden_size {text.hidden_size} (the pipeline concatenates hidden states"
                f" {', '.join(map(str, TEXT_ENCODER_OUT_LAYERS))})"
            )
        if cfg.in_channels != vae.packed_channels:
            raise ImgpackError(
                f"{where}: transformer in_channels {cfg.in_channels} != {PATCH * PATCH} x vae latent_channels"
                f" {vae.latent_channels} (2x2-packed latents)"
            )

    # -- defaults and sizes ----------------------------------------------------------------------------

    @property
    def defaults(self) -> GenerationDefaults:
        return DISTILLED if self.is_distilled else BASE

    @property
    def default_steps(self) -> int:
        return self.defaults.steps

    @property
    def default_guidance(self) -> float:
        return self.defaults.guidance

    @property
    def pixel_multiple(self) -> int:
        """Width and height must be multiples of this: VAE downscaling times the 2x2 packing."""
        return self.vae_config.scale_factor * PATCH

    def size_multiple(self) -> int:
        return self.pixel_multiple

    def load_text_encoder(self) -> Qwen3TextEncoder:
        return self.component("text_encoder")  # type: ignore[return-value]

    def load_transformer(self) -> Flux2Transformer:
        return self.component("transformer")  # type: ignore[return-value]

    def load_vae(self) -> Flux2VAEDecoder:
        return self.component("vae")  # type: ignore[return-value]

    # -- memory --------------------------------------------------------------------------------------

    def step_working_bytes(self, width: int, height: int, batch: int) -> int:
        cfg = self.transformer_config
        seq = (height // self.pixel_multiple) * (width // self.pixel_multiple) + TEXT_LENGTH
        attention = attention_bytes(batch, cfg.num_attention_heads, seq, seq)
        # A single-stream block's live tensors: the fused projection (3D + 2M), q/k/v after RoPE, the MLP halves,
        # the [attention | mlp] concatenation and the residual. Measured: 24 D per token (M = 3D, 2.8k tokens).
        hidden = batch * seq * 28 * cfg.dim * self.itemsize
        return attention + hidden

    def decode_working_bytes(self, width: int, height: int) -> int:
        return decode_bytes(self.vae_config.decoder, width, height)

    # -- a generation: what is FLUX.2's in the shared loop --------------------------------------------

    def encode_prompt(self, prompt: str) -> mx.array:
        """(512, 3 x hidden) prompt embedding: hidden states 9, 18, 27 of the padded, templated prompt."""
        ids, mask = self.tokenizer.encode_padded(prompt, TEXT_LENGTH, enable_thinking=False)
        encoder = self.load_text_encoder()
        out = encoder(mx.array([ids], dtype=mx.int32), mx.array([mask], dtype=mx.int32))[0]
        mx.eval(out)
        return out

    def encode_prompts(self, prompts: list[str]) -> mx.array:
        """(prompts, 512, 3 x hidden): every prompt is padded to the same length. The guidance prompt is
        ``request.negative`` (diffusers always uses "", the default)."""
        return mx.stack([self.encode_prompt(p) for p in prompts])

    def before_generation(self, request: GenerationRequest) -> None:
        if request.guidance is not None and request.guidance > 1 and self.is_distilled:
            self.log(f"guidance {request.guidance} is ignored: the model is step-distilled")

    def _grid(self, request: GenerationRequest) -> tuple[int, int]:
        assert request.width and request.height
        return request.height // self.pixel_multiple, request.width // self.pixel_multiple

    def start_latents(self, request: GenerationRequest, latents: np.ndarray | None
                      ) -> tuple[mx.array, FlowMatchEulerScheduler]:
        """(1, h*w, C) packed tokens in raster order, from (1, C, H/16, W/16) noise as diffusers' ``latents=``."""
        assert request.width and request.height and request.steps
        cfg = self.transformer_config
        h, w = self._grid(request)
        if latents is None:
            latents = initial_noise(request.seed, cfg.in_channels, request.height, request.width, self.pixel_multiple)
        if tuple(latents.shape) != (1, cfg.in_channels, h, w):
            raise ImgpackError(f"latents have shape {tuple(latents.shape)}, expected {(1, cfg.in_channels, h, w)}")
        x = mx.array(latents.astype(np.float32)).reshape(1, cfg.in_channels, h * w).transpose(0, 2, 1)
        return x, schedule(self, request.steps, h * w)

    def velocity(self, transformer: nn.Module, x: mx.array, context: mx.array, scheduler: FlowMatchEulerScheduler,
                 step: int, request: GenerationRequest, guided: bool) -> mx.array:
        """The predicted flow; guided, ``neg + g * (cond - neg)`` over the (prompt, negative) batch rows."""
        h, w = self._grid(request)
        time_input = transformer_time(scheduler, step)
        pred = transformer(x, context, time_input, image_ids(h, w), text_ids(TEXT_LENGTH)).astype(mx.float32)
        return pred[1:] + request.guidance * (pred[:1] - pred[1:]) if guided else pred

    def vae_input(self, x: mx.array, request: GenerationRequest) -> mx.array:
        """Unpack (1, h*w, C) tokens to the (1, C, h, w) latent the VAE takes."""
        h, w = self._grid(request)
        return x.transpose(0, 2, 1).reshape(1, self.transformer_config.in_channels, h, w)


#: The name the FLUX.2 tests know the pipeline by.
Flux2Model = Flux2Pipeline


def schedule(model: Flux2Pipeline, steps: int, image_tokens: int) -> FlowMatchEulerScheduler:
    """The klein pipeline's sigmas: numpy's ``linspace(1, 1/N, N)`` shifted by the empirical mu."""
    ramp = np.linspace(1.0, 1.0 / steps, steps)
    mu = compute_empirical_mu(image_tokens, steps)
    return FlowMatchEulerScheduler(model.scheduler_config, steps, image_tokens, ramp=ramp, mu=mu)


def transformer_time(scheduler: FlowMatchEulerScheduler, i: int) -> float:
    """The transformer's time input at step i: ``timestep / 1000`` in float32 (sigma, up to rounding)."""
    return float(np.float32(scheduler.timesteps[i]) / np.float32(1000.0))


__all__ = [
    "BASE_GUIDANCE",
    "BASE_STEPS",
    "DISTILLED_GUIDANCE",
    "DISTILLED_STEPS",
    "Flux2Model",
    "Flux2Pipeline",
    "GenerationCancelled",
    "GenerationRequest",
    "Image",
    "Preview",
    "Stage",
    "Step",
    "generate",
    "initial_noise",
    "run_to_image",
    "schedule",
    "transformer_time",
]
