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

import gc
import math
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from imgpack.architectures.flux2 import ARCHITECTURE, TEXT_ENCODER_OUT_LAYERS
from imgpack.runtime.backend import ATTENTION_CHUNK, available_memory, compute_dtype, mx, nn
from imgpack.runtime.common.loader import GB, ModelSource, check_memory
from imgpack.runtime.common.qwen3 import Qwen3Config, Qwen3TextEncoder
from imgpack.runtime.common.scheduler import FlowMatchConfig, FlowMatchEulerScheduler, compute_empirical_mu
from imgpack.runtime.common.tokenizer import MAX_SEQUENCE_LENGTH, PromptTokenizer
from imgpack.runtime.flux2.autoencoder import PATCH, Flux2VAEConfig, Flux2VAEDecoder
from imgpack.runtime.flux2.transformer import Flux2Config, Flux2Transformer, image_ids, text_ids
from imgpack.runtime.zimage.pipeline import (
    Event,
    GenerationCancelled,
    GenerationRequest,
    Image,
    Stage,
    Step,
    initial_noise,
    to_pixels,
)
from imgpack.schemas.errors import ImgpackError, UsageError
from imgpack.schemas.manifest import Layer
from imgpack.schemas.tensorblob import DTYPE_SIZES
from imgpack.store.store import Store

#: The distilled checkpoints' intended use (the model card's and diffusers' integration test's).
DISTILLED_STEPS = 4
DISTILLED_GUIDANCE = 1.0
#: The base checkpoints' recommended use: 50 steps of classifier-free guidance 4 against "".
BASE_STEPS = 50
BASE_GUIDANCE = 4.0
#: Every prompt is padded (or truncated) to this many tokens, and all of them reach the transformer.
TEXT_LENGTH = MAX_SEQUENCE_LENGTH
COMPONENTS = ("text_encoder", "transformer", "vae")


def trained_dtype(layers: dict[str, Layer]) -> str | None:
    """The dtype holding most of a component's bytes (matrices in bf16 with f32 norms count as bf16)."""
    totals: dict[str, int] = {}
    for layer in layers.values():
        size = math.prod(layer.shape or []) * DTYPE_SIZES.get(layer.dtype, 0)
        totals[layer.dtype] = totals.get(layer.dtype, 0) + size
    return max(totals, key=totals.__getitem__) if totals else None


class Flux2Model:
    """A FLUX.2 [klein] model read from a store: configs, tokenizer and lazily loaded networks."""

    def __init__(
        self, source: ModelSource, log: Callable[[str], None] | None = None, keep_loaded: bool = True
    ) -> None:
        self.source = source
        #: False for one-shot use (``imgpack run``): each network is freed as soon as its part is done.
        self.keep_loaded = keep_loaded
        self.log = log or (lambda _msg: None)
        index = source.read_json("model_index.json")
        if index.get("_class_name") != ARCHITECTURE:
            raise ImgpackError(
                f"{source.where}: model_index.json names {index.get('_class_name')!r}; this runs {ARCHITECTURE}"
            )
        #: Step-distilled checkpoints take no guidance (diffusers' default for a missing flag is False).
        self.is_distilled = bool(index.get("is_distilled", False))
        self.transformer_config = Flux2Config.from_dict(source.read_json("transformer/config.json"))
        self.text_config = Qwen3Config.from_dict(source.read_json("text_encoder/config.json"))
        self.vae_config = Flux2VAEConfig.from_dict(source.read_json("vae/config.json"))
        self.scheduler_config = FlowMatchConfig.from_dict(source.read_json("scheduler/scheduler_config.json"))
        self._check_configs()
        tok_config = None
        if source.has_file("tokenizer/tokenizer_config.json"):
            tok_config = source.read_json("tokenizer/tokenizer_config.json")
        template = None
        if source.has_file("tokenizer/chat_template.jinja"):
            template = source.read_file("tokenizer/chat_template.jinja").decode("utf-8")
        self.tokenizer = PromptTokenizer(source.read_file("tokenizer/tokenizer.json"), tok_config, template)
        self.dtype = compute_dtype(trained_dtype(source.tensors("transformer")))
        self.text_encoder: Qwen3TextEncoder | None = None
        self.transformer: Flux2Transformer | None = None
        self.vae: Flux2VAEDecoder | None = None
        # Built (lazily initialised, no memory) only to map and size the weights.
        self._blueprints: dict[str, nn.Module] = {name: self._build(name) for name in COMPONENTS}
        self.keep_text_encoder = True
        for name, model in self._blueprints.items():
            source.plan(name, model, model.param_name)

    @classmethod
    def open(
        cls, store: Store, ref: str, log: Callable[[str], None] | None = None, keep_loaded: bool = True
    ) -> Flux2Model:
        return cls(ModelSource.open(store, ref), log, keep_loaded)

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

    def _build(self, name: str) -> nn.Module:
        if name == "text_encoder":
            return Qwen3TextEncoder(self.text_config, TEXT_ENCODER_OUT_LAYERS)
        if name == "transformer":
            return Flux2Transformer(self.transformer_config)
        return Flux2VAEDecoder(self.vae_config)

    # -- defaults and sizes ----------------------------------------------------------------------------

    @property
    def default_steps(self) -> int:
        return DISTILLED_STEPS if self.is_distilled else BASE_STEPS

    @property
    def default_guidance(self) -> float:
        return DISTILLED_GUIDANCE if self.is_distilled else BASE_GUIDANCE

    def uses_guidance(self, guidance: float) -> bool:
        """diffusers' ``do_classifier_free_guidance``: scale above 1 on a non-distilled checkpoint."""
        return guidance > 1 and not self.is_distilled

    @property
    def pixel_multiple(self) -> int:
        """Width and height must be multiples of this: VAE downscaling times the 2x2 packing."""
        return self.vae_config.scale_factor * PATCH

    # -- memory --------------------------------------------------------------------------------------

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype in (mx.bfloat16, mx.float16) else 4

    def _component_dtype(self, name: str) -> mx.Dtype:
        return mx.float32 if name == "vae" and self.vae_config.decoder.force_upcast else self.dtype

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of the tensors each component loads, at the dtype it computes in (from the manifest alone)."""
        sizes = {}
        for name, model in self._blueprints.items():
            itemsize = 4 if self._component_dtype(name) == mx.float32 else 2
            sizes[name] = self.source.weight_bytes(name, model.param_name, itemsize)
        return sizes

    def activation_bytes(self, width: int, height: int, batch: int) -> int:
        """A generous bound on working memory for one step and for the decode."""
        cfg = self.transformer_config
        seq = (height // self.pixel_multiple) * (width // self.pixel_multiple) + TEXT_LENGTH
        # Scores are materialised a chunk of query rows at a time (backend.attention), never all S x S at once.
        attention = min(batch * cfg.num_attention_heads * seq * seq, ATTENTION_CHUNK) * 4
        # A single-stream block's live tensors: the fused projection (3D + 2M), q/k/v after RoPE, the MLP halves,
        # the [attention | mlp] concatenation and the residual. Measured: 24 D per token (M = 3D, 2.8k tokens).
        hidden = batch * seq * 28 * cfg.dim * self.itemsize
        step = attention + hidden
        # The widest full-resolution decoder activations: about six tensors of the second block's width, in
        # float32 (measured with the FLUX VAE's widths, which FLUX.2's shares).
        channels = self.vae_config.decoder.block_out_channels
        decode = width * height * channels[min(1, len(channels) - 1)] * 4 * 6
        return max(step, decode + ATTENTION_CHUNK * 4)

    def plan_memory(self, request: GenerationRequest, available: int | None = None) -> int:
        """Decide whether the text encoder stays loaded; raise (need X GB, have Y GB) if nothing fits."""
        have = available_memory() if available is None else available
        weights = self.weight_bytes()
        work = self.activation_bytes(request.width, request.height, 2 if self.uses_guidance(request.guidance) else 1)
        everything = sum(weights.values()) + work
        self.log(
            f"memory: weights {sum(weights.values()) / GB:.2f} GB"
            f" (text encoder {weights['text_encoder'] / GB:.2f}, transformer {weights['transformer'] / GB:.2f},"
            f" vae {weights['vae'] / GB:.2f}), working ~{work / GB:.2f} GB, available {have / GB:.2f} GB"
        )
        what = f"model {self.source.where} at {request.width}x{request.height}"
        if not self.keep_loaded:
            one_at_a_time = max(weights["text_encoder"], weights["transformer"] + work, weights["vae"] + work)
            check_memory(one_at_a_time, have, what)
            self.log(f"loading one component at a time: peak ~{one_at_a_time / GB:.2f} GB")
            return one_at_a_time
        sequential = max(weights["text_encoder"], weights["transformer"] + weights["vae"] + work)
        if not have or everything <= have:
            self.keep_text_encoder = True
            return everything
        check_memory(sequential, have, what)
        self.keep_text_encoder = False
        self.log("memory is tight: the text encoder is freed after encoding the prompt")
        return sequential

    # -- loading -------------------------------------------------------------------------------------

    def _load(self, name: str):  # noqa: ANN202 - returns the component's own type
        start = time.perf_counter()
        model = self._blueprints[name]
        self.source.load(name, model, model.param_name, self._component_dtype(name))
        self.log(f"loaded {name} in {time.perf_counter() - start:.2f}s")
        return model

    def load_text_encoder(self) -> Qwen3TextEncoder:
        if self.text_encoder is None:
            self.text_encoder = self._load("text_encoder")
        return self.text_encoder

    def load_transformer(self) -> Flux2Transformer:
        if self.transformer is None:
            self.transformer = self._load("transformer")
        return self.transformer

    def load_vae(self) -> Flux2VAEDecoder:
        if self.vae is None:
            self.vae = self._load("vae")
        return self.vae

    def load(self) -> None:
        """Load every component now (a server does this once; ``generate`` otherwise loads on demand)."""
        self.load_text_encoder()
        self.load_transformer()
        self.load_vae()

    def free(self, name: str) -> None:
        """Drop a loaded network (it reloads from the store on next use) and return its memory."""
        setattr(self, name, None)
        self._blueprints[name] = self._build(name)
        gc.collect()
        mx.clear_cache()

    def free_text_encoder(self) -> None:
        self.free("text_encoder")

    # -- pieces of a generation ----------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> mx.array:
        """(512, 3 x hidden) prompt embedding: hidden states 9, 18, 27 of the padded, templated prompt."""
        ids, mask = self.tokenizer.encode_padded(prompt, TEXT_LENGTH, enable_thinking=False)
        encoder = self.load_text_encoder()
        out = encoder(mx.array([ids], dtype=mx.int32), mx.array([mask], dtype=mx.int32))[0]
        mx.eval(out)
        return out


def check_request(request: GenerationRequest, model: Flux2Model | None = None) -> None:
    """Usage errors (exit 2) for sizes, steps and guidance the pipeline cannot honour."""
    multiple = 16 if model is None else model.pixel_multiple
    for what, value in (("width", request.width), ("height", request.height)):
        if value <= 0 or value % multiple:
            raise UsageError(f"--size: {what} {value} is not a positive multiple of {multiple}")
    if request.steps < 1:
        raise UsageError(f"--steps: {request.steps} must be at least 1")
    if request.guidance < 0:
        raise UsageError(f"--guidance: {request.guidance} must not be negative")
    if not request.prompt:
        raise UsageError("the prompt is empty")


def schedule(model: Flux2Model, steps: int, image_tokens: int) -> FlowMatchEulerScheduler:
    """The klein pipeline's sigmas: numpy's ``linspace(1, 1/N, N)`` shifted by the empirical mu."""
    ramp = np.linspace(1.0, 1.0 / steps, steps)
    mu = compute_empirical_mu(image_tokens, steps)
    return FlowMatchEulerScheduler(model.scheduler_config, steps, image_tokens, ramp=ramp, mu=mu)


def transformer_time(scheduler: FlowMatchEulerScheduler, i: int) -> float:
    """The transformer's time input at step i: ``timestep / 1000`` in float32 (sigma, up to rounding)."""
    return float(np.float32(scheduler.timesteps[i]) / np.float32(1000.0))


def generate(
    model: Flux2Model,
    request: GenerationRequest,
    cancel: threading.Event | None = None,
    latents: np.ndarray | None = None,
) -> Iterator[Event]:
    """Run one text-to-image generation, yielding progress; the last event is the ``Image``.

    ``latents`` overrides the seed's noise: (1, in_channels, H/16, W/16), as diffusers' ``latents=``.
    ``request.negative`` is the guidance prompt (diffusers always uses "", the default).
    """
    check_request(request, model)
    cfg = model.transformer_config
    use_cfg = model.uses_guidance(request.guidance)
    if request.guidance > 1 and model.is_distilled:
        model.log(f"guidance {request.guidance} is ignored: the model is step-distilled")

    def cancelled() -> None:
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled("generation cancelled")

    if model.text_encoder is None:
        yield Stage("load text_encoder")
        model.load_text_encoder()
    yield Stage("encode")
    prompts = [request.prompt] + ([request.negative] if use_cfg else [])
    context = mx.stack([model.encode_prompt(p) for p in prompts])
    if not (model.keep_loaded and model.keep_text_encoder):
        model.free("text_encoder")
    cancelled()

    if model.transformer is None:
        yield Stage("load transformer")
    transformer = model.load_transformer()
    multiple = model.pixel_multiple
    h, w = request.height // multiple, request.width // multiple
    if latents is None:
        latents = initial_noise(request.seed, cfg.in_channels, request.height, request.width, multiple)
    if tuple(latents.shape) != (1, cfg.in_channels, h, w):
        raise ImgpackError(f"latents have shape {tuple(latents.shape)}, expected {(1, cfg.in_channels, h, w)}")
    # Pack: (1, C, h, w) -> (1, h*w, C), tokens in raster order.
    x = mx.array(latents.astype(np.float32)).reshape(1, cfg.in_channels, h * w).transpose(0, 2, 1)
    scheduler = schedule(model, request.steps, h * w)
    img, txt = image_ids(h, w), text_ids(TEXT_LENGTH)

    yield Stage("denoise")
    for i in range(scheduler.num_steps):
        cancelled()
        start = time.perf_counter()
        pred = transformer(x, context, transformer_time(scheduler, i), img, txt).astype(mx.float32)
        flow = pred[1:] + request.guidance * (pred[:1] - pred[1:]) if use_cfg else pred
        x = x + scheduler.step_size(i) * flow
        mx.eval(x)
        yield Step(i + 1, scheduler.num_steps, time.perf_counter() - start)
    cancelled()
    del transformer
    if not model.keep_loaded:
        model.free("transformer")

    if model.vae is None:
        yield Stage("load vae")
    vae = model.load_vae()
    yield Stage("decode")
    image = vae(x.transpose(0, 2, 1).reshape(1, cfg.in_channels, h, w))
    mx.eval(image)
    pixels = to_pixels(image)
    del image, vae
    if not model.keep_loaded:
        model.free("vae")
    yield Image(pixels, request.seed)


def run_to_image(model: Flux2Model, request: GenerationRequest, **kwargs: object) -> Image:
    """Drain ``generate`` and return its image (for callers that do not want progress)."""
    result = None
    for event in generate(model, request, **kwargs):  # type: ignore[arg-type]
        if isinstance(event, Image):
            result = event
    assert result is not None
    return result


__all__ = [
    "BASE_GUIDANCE",
    "BASE_STEPS",
    "DISTILLED_GUIDANCE",
    "DISTILLED_STEPS",
    "Flux2Model",
    "GenerationCancelled",
    "GenerationRequest",
    "Image",
    "Stage",
    "Step",
    "check_request",
    "generate",
    "initial_noise",
    "run_to_image",
    "schedule",
    "transformer_time",
]
