"""Z-Image text-to-image generation from a stored manifest, as a generator of progress events.

``ZImageModel.open(store, ref)`` reads configs and the tokenizer from the manifest and builds the three networks
without touching weights; components load blob by blob when first needed (or all at once with ``load()``, as a
server would). ``generate(model, request)`` yields ``Stage``/``Step`` events and finally an ``Image``; it checks a
cancel event between steps, so an in-process server can stop a generation cleanly.
"""

from __future__ import annotations

import gc
import io
import os
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgpack.runtime.backend import ATTENTION_CHUNK, available_memory, compute_dtype, is_cpu, mx
from imgpack.runtime.common.autoencoder import VAEConfig, VAEDecoder
from imgpack.runtime.common.loader import GB, ModelSource, check_memory
from imgpack.runtime.common.qwen3 import Qwen3Config, Qwen3TextEncoder
from imgpack.runtime.common.scheduler import FlowMatchConfig, FlowMatchEulerScheduler
from imgpack.runtime.common.tokenizer import MAX_SEQUENCE_LENGTH, PromptTokenizer
from imgpack.runtime.zimage.transformer import SEQ_MULTIPLE, ZImageConfig, ZImageTransformer
from imgpack.schemas.errors import ImgpackError, UsageError
from imgpack.store.store import Store

#: Z-Image-Turbo is distilled for 8 steps without guidance; these are the defaults ``imgpack run`` uses.
DEFAULT_STEPS = 8
DEFAULT_GUIDANCE = 0.0
DEFAULT_SIZE = 1024


class GenerationCancelled(ImgpackError):
    """The caller's cancel event was set; raised between steps, never mid-step."""


@dataclass
class GenerationRequest:
    prompt: str
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    steps: int = DEFAULT_STEPS
    seed: int = 0
    guidance: float = DEFAULT_GUIDANCE
    negative: str = ""


@dataclass
class Stage:
    """A phase starts: 'load text_encoder', 'encode', 'load transformer', 'denoise', 'load vae', 'decode'."""

    name: str


@dataclass
class Step:
    index: int  # 1-based
    total: int
    seconds: float


@dataclass
class Preview:
    """The clean image the model predicts after ``step`` (asked for with ``generate(previews=...)``)."""

    step: int  # 1-based
    total: int
    pixels: np.ndarray  # (height, width, 3) uint8


@dataclass
class Image:
    pixels: np.ndarray  # (height, width, 3) uint8
    seed: int

    def png(self) -> bytes:
        return encode_png(self.pixels)


Event = Stage | Step | Preview | Image


def initial_noise(seed: int, channels: int, height: int, width: int, vae_scale: int = 8) -> np.ndarray:
    """The portable starting latents for a seed: the same on every machine and backend."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, channels, height // vae_scale, width // vae_scale), dtype=np.float32)


def to_pixels(image: mx.array) -> np.ndarray:
    """VAE output in [-1, 1] (1, H, W, 3) -> uint8 (H, W, 3), rounding like diffusers' image processor."""
    arr = np.array(image[0].astype(mx.float32))
    arr = np.clip(arr / 2 + 0.5, 0.0, 1.0)
    return np.round(arr * 255).astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def save_png(pixels: np.ndarray, path: Path) -> Path:
    """Write atomically: a temp file beside the target, renamed into place (never a half-written PNG)."""
    path = Path(path)
    data = encode_png(pixels)
    fd, tmp = tempfile.mkstemp(dir=path.parent or Path("."), prefix=f".{path.name}.", suffix=".png.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class ZImageModel:
    """A Z-Image model read from a store: configs, tokenizer and lazily loaded networks."""

    def __init__(
        self, source: ModelSource, log: Callable[[str], None] | None = None, keep_loaded: bool = True
    ) -> None:
        self.source = source
        #: False for one-shot use (``imgpack run``): each network is freed as soon as its part is done, so peak
        #: memory is the largest component rather than all three. A server keeps them (True).
        self.keep_loaded = keep_loaded
        self.log = log or (lambda _msg: None)
        index = source.read_json("model_index.json")
        pipeline_class = index.get("_class_name", "")
        if pipeline_class and "ZImage" not in str(pipeline_class):
            raise ImgpackError(f"{source.where}: model_index.json names {pipeline_class!r}; only ZImagePipeline runs")
        self.transformer_config = ZImageConfig.from_dict(
            source.read_json("transformer/config.json"),
            {k: v.shape or [] for k, v in source.tensors("transformer").items()},
        )
        self.text_config = Qwen3Config.from_dict(source.read_json("text_encoder/config.json"))
        self.vae_config = VAEConfig.from_dict(source.read_json("vae/config.json"))
        self.scheduler_config = FlowMatchConfig.from_dict(source.read_json("scheduler/scheduler_config.json"))
        if self.text_config.hidden_size != self.transformer_config.cap_feat_dim:
            raise ImgpackError(
                f"{source.where}: text_encoder hidden_size {self.text_config.hidden_size} != transformer"
                f" cap_feat_dim {self.transformer_config.cap_feat_dim}"
            )
        if self.vae_config.latent_channels != self.transformer_config.in_channels:
            raise ImgpackError(
                f"{source.where}: vae latent_channels {self.vae_config.latent_channels} != transformer"
                f" in_channels {self.transformer_config.in_channels}"
            )
        tok_config = source.read_json("tokenizer/tokenizer_config.json") if source.has_file(
            "tokenizer/tokenizer_config.json"
        ) else None
        template = None
        if source.has_file("tokenizer/chat_template.jinja"):
            template = source.read_file("tokenizer/chat_template.jinja").decode("utf-8")
        self.tokenizer = PromptTokenizer(source.read_file("tokenizer/tokenizer.json"), tok_config, template)
        dtypes = {t.dtype for t in source.tensors("transformer").values()}
        self.dtype = compute_dtype("BF16" if dtypes == {"BF16"} else None)
        self.text_encoder: Qwen3TextEncoder | None = None
        self.transformer: ZImageTransformer | None = None
        self.vae: VAEDecoder | None = None
        # Built (lazily initialised, no memory) only to map and size the weights.
        self._blueprints = {
            "text_encoder": Qwen3TextEncoder(self.text_config),
            "transformer": ZImageTransformer(self.transformer_config),
            "vae": VAEDecoder(self.vae_config),
        }
        self.keep_text_encoder = True
        for name, model in self._blueprints.items():
            source.plan(name, model, model.param_name)

    @classmethod
    def open(
        cls, store: Store, ref: str, log: Callable[[str], None] | None = None, keep_loaded: bool = True
    ) -> ZImageModel:
        return cls(ModelSource.open(store, ref), log, keep_loaded)

    # -- memory --------------------------------------------------------------------------------------

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype in (mx.bfloat16, mx.float16) else 4

    def weight_bytes(self) -> dict[str, int]:
        sizes = {}
        for name, model in self._blueprints.items():
            itemsize = 4 if name == "vae" and self.vae_config.force_upcast else self.itemsize
            sizes[name] = self.source.weight_bytes(name, model.param_name, itemsize)
        return sizes

    def activation_bytes(self, width: int, height: int, batch: int) -> int:
        """A generous bound on working memory for one step and for the decode."""
        cfg, vcfg = self.transformer_config, self.vae_config
        tokens = (height // (vcfg.scale_factor * cfg.patch_size)) * (width // (vcfg.scale_factor * cfg.patch_size))
        seq = tokens + MAX_SEQUENCE_LENGTH + 2 * SEQ_MULTIPLE
        size = self.itemsize
        # Scores are materialised a chunk of query rows at a time (backend.attention), never all S x S at once.
        attention = min(batch * cfg.n_heads * seq * seq, ATTENTION_CHUNK) * 4
        hidden = batch * seq * (8 * cfg.dim + 3 * cfg.ffn_dim) * size
        step = attention + hidden
        pixels = width * height
        # The widest full-resolution activations: about six tensors of the second block's width, in float32
        # (measured with the FLUX VAE's widths: 5.6-5.9 KB per output pixel above the weights).
        decode = pixels * vcfg.block_out_channels[min(1, len(vcfg.block_out_channels) - 1)] * 4 * 6
        return max(step, decode + ATTENTION_CHUNK * 4)

    def plan_memory(self, request: GenerationRequest, available: int | None = None) -> int:
        """Decide whether the text encoder stays loaded; raise (need X GB, have Y GB) if nothing fits."""
        have = available_memory() if available is None else available
        weights = self.weight_bytes()
        work = self.activation_bytes(request.width, request.height, 2 if request.guidance > 0 else 1)
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
        dtype = mx.float32 if name == "vae" and self.vae_config.force_upcast else self.dtype
        self.source.load(name, model, model.param_name, dtype)
        self.log(f"loaded {name} in {time.perf_counter() - start:.2f}s")
        return model

    def load_text_encoder(self) -> Qwen3TextEncoder:
        if self.text_encoder is None:
            self.text_encoder = self._load("text_encoder")
        return self.text_encoder

    def load_transformer(self) -> ZImageTransformer:
        if self.transformer is None:
            self.transformer = self._load("transformer")
        return self.transformer

    def load_vae(self) -> VAEDecoder:
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
        self._blueprints[name] = {
            "text_encoder": lambda: Qwen3TextEncoder(self.text_config),
            "transformer": lambda: ZImageTransformer(self.transformer_config),
            "vae": lambda: VAEDecoder(self.vae_config),
        }[name]()
        gc.collect()
        mx.clear_cache()

    def free_text_encoder(self) -> None:
        self.free("text_encoder")

    # -- pieces of a generation ----------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> mx.array:
        """(tokens, hidden) prompt embedding: hidden state [-2] of the templated prompt."""
        ids = self.tokenizer.encode(prompt)
        encoder = self.load_text_encoder()
        out = encoder(mx.array([ids], dtype=mx.int32))[0]
        mx.eval(out)
        return out


def check_request(request: GenerationRequest, model: ZImageModel | None = None) -> None:
    """Usage errors (exit 2) for sizes, steps and guidance the pipeline cannot honour."""
    multiple = 16 if model is None else model.vae_config.scale_factor * model.transformer_config.patch_size
    for what, value in (("width", request.width), ("height", request.height)):
        if value <= 0 or value % multiple:
            raise UsageError(f"--size: {what} {value} is not a positive multiple of {multiple}")
    if request.steps < 1:
        raise UsageError(f"--steps: {request.steps} must be at least 1")
    if request.guidance < 0:
        raise UsageError(f"--guidance: {request.guidance} must not be negative")
    if not request.prompt:
        raise UsageError("the prompt is empty")


def generate(
    model: ZImageModel,
    request: GenerationRequest,
    cancel: threading.Event | None = None,
    latents: np.ndarray | None = None,
    previews: Collection[int] = (),
) -> Iterator[Event]:
    """Run one text-to-image generation, yielding progress; the last event is the ``Image``.

    ``latents`` overrides the seed's noise (tests pass the reference latents). After each 1-based step listed in
    ``previews`` a ``Preview`` follows its ``Step``: the VAE decode of the clean latent predicted at that point
    (``x + sigma_next * flow``), which is what a streaming client shows while it waits. Each costs one decode, and
    loads the VAE early when it is not resident.
    """
    check_request(request, model)
    cfg, vcfg = model.transformer_config, model.vae_config
    use_cfg = request.guidance > 0

    def cancelled() -> None:
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled("generation cancelled")

    if model.text_encoder is None:
        yield Stage("load text_encoder")
        model.load_text_encoder()
    yield Stage("encode")
    captions = [model.encode_prompt(request.prompt)]
    if use_cfg:
        captions.append(model.encode_prompt(request.negative))
    if not (model.keep_loaded and model.keep_text_encoder):
        model.free("text_encoder")
    cancelled()

    if model.transformer is None:
        yield Stage("load transformer")
    transformer = model.load_transformer()
    if latents is None:
        latents = initial_noise(request.seed, cfg.in_channels, request.height, request.width, vcfg.scale_factor)
    expected = (1, cfg.in_channels, request.height // vcfg.scale_factor, request.width // vcfg.scale_factor)
    if tuple(latents.shape) != expected:
        raise ImgpackError(f"latents have shape {tuple(latents.shape)}, expected {expected}")
    x = mx.array(latents.astype(np.float32))[0]
    image_tokens = (x.shape[1] // cfg.patch_size) * (x.shape[2] // cfg.patch_size)
    scheduler = FlowMatchEulerScheduler(model.scheduler_config, request.steps, image_tokens)

    yield Stage("denoise")
    for i in range(scheduler.num_steps):
        cancelled()
        start = time.perf_counter()
        pred = transformer(x, scheduler.model_time(i), captions).astype(mx.float32)
        flow = pred[0] + request.guidance * (pred[0] - pred[1]) if use_cfg else pred[0]
        x = x + scheduler.step_size(i) * -flow
        mx.eval(x)
        yield Step(i + 1, scheduler.num_steps, time.perf_counter() - start)
        if i + 1 in previews:
            predicted = x + float(scheduler.sigmas[i + 1]) * flow
            preview = model.load_vae()(predicted[None])
            mx.eval(preview)
            yield Preview(i + 1, scheduler.num_steps, to_pixels(preview))
            del preview, predicted
    cancelled()
    del transformer
    if not model.keep_loaded:
        model.free("transformer")

    if model.vae is None:
        yield Stage("load vae")
    vae = model.load_vae()
    yield Stage("decode")
    image = vae(x[None])
    mx.eval(image)
    pixels = to_pixels(image)
    del image, vae
    if not model.keep_loaded:
        model.free("vae")
    yield Image(pixels, request.seed)


def run_to_image(model: ZImageModel, request: GenerationRequest, **kwargs: object) -> Image:
    """Drain ``generate`` and return its image (for callers that do not want progress)."""
    result = None
    for event in generate(model, request, **kwargs):  # type: ignore[arg-type]
        if isinstance(event, Image):
            result = event
    assert result is not None
    return result


__all__ = [
    "GenerationRequest",
    "GenerationCancelled",
    "Stage",
    "Step",
    "Preview",
    "Image",
    "ZImageModel",
    "generate",
    "run_to_image",
    "initial_noise",
    "save_png",
    "encode_png",
    "check_request",
    "is_cpu",
]
