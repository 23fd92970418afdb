"""Z-Image text-to-image generation (``ZImagePipeline``): the Qwen3 prompt embedding, the single-stream DiT and
the FLUX VAE, driven by a flow-matching Euler schedule.

Everything generic (loading, memory, events, requests) is :class:`~imgpack.runtime.common.pipeline.Pipeline`'s;
this module says what Z-Image's networks are and how one generation runs. Portable seeds: the starting noise for
seed S is ``numpy.random.default_rng(S).standard_normal((1, 16, H // 8, W // 8), dtype=numpy.float32)``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterator

import numpy as np

from imgpack.architectures import zimage as arch
from imgpack.runtime.backend import ATTENTION_CHUNK, compute_dtype, mx
from imgpack.runtime.common.autoencoder import VAEConfig, VAEDecoder
from imgpack.runtime.common.loader import Component, ModelSource
from imgpack.runtime.common.pipeline import (
    Event,
    GenerationCancelled,
    GenerationRequest,
    Image,
    Pipeline,
    Preview,
    Stage,
    Step,
    encode_png,
    run_to_image,
    save_png,
    to_pixels,
)
from imgpack.runtime.common.qwen3 import Qwen3Config, Qwen3TextEncoder
from imgpack.runtime.common.scheduler import FlowMatchConfig, FlowMatchEulerScheduler
from imgpack.runtime.common.tokenizer import MAX_SEQUENCE_LENGTH, PromptTokenizer
from imgpack.runtime.zimage.transformer import SEQ_MULTIPLE, ZImageConfig, ZImageTransformer
from imgpack.schemas.errors import ImgpackError
from imgpack.store.store import Store


def initial_noise(seed: int, channels: int, height: int, width: int, vae_scale: int = 8) -> np.ndarray:
    """The portable starting latents for a seed: the same on every machine and backend."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, channels, height // vae_scale, width // vae_scale), dtype=np.float32)


class ZImagePipeline(Pipeline):
    """A Z-Image model: configs, tokenizer and three lazily loaded networks."""

    architecture = arch.SPEC

    def __init__(self, source: ModelSource, log: Callable[[str], None] | None = None, keep_loaded: bool = True,
                 force: bool = False) -> None:
        self.require_architecture(source)
        self.source = source
        self.transformer_config = ZImageConfig.from_dict(source.read_json("transformer/config.json"))
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
            template = source.read_file("tokenizer/chat_template.jinja").decode("utf-8", "replace")
        self.tokenizer = PromptTokenizer(source.read_file("tokenizer/tokenizer.json"), tok_config, template)
        super().__init__(source, log, keep_loaded, force)

    @classmethod
    def open(cls, store: Store, ref: str, log: Callable[[str], None] | None = None,
             keep_loaded: bool = True, force: bool = False) -> ZImagePipeline:
        return cls(ModelSource.open(store, ref), log, keep_loaded, force)

    def build_components(self) -> dict[str, Component]:
        dtypes = {t.dtype for t in self.source.tensors("transformer").values()}
        self.dtype = compute_dtype("BF16" if dtypes <= {"BF16", "U32"} else None)
        return {
            "text_encoder": Component(self.source, "text_encoder", lambda: Qwen3TextEncoder(self.text_config),
                                      self.dtype),
            "transformer": Component(self.source, "transformer", lambda: ZImageTransformer(self.transformer_config),
                                     self.dtype),
            "vae": Component(self.source, "vae", lambda: VAEDecoder(self.vae_config), self.dtype,
                             upcast=self.vae_config.force_upcast),
        }

    def size_multiple(self) -> int:
        return self.vae_config.scale_factor * self.transformer_config.patch_size

    # -- the networks, as attributes (what the tests and callers read) --------------------------------

    text_encoder = Pipeline.network("text_encoder")
    transformer = Pipeline.network("transformer")
    vae = Pipeline.network("vae")

    def load_text_encoder(self) -> Qwen3TextEncoder:
        return self.component("text_encoder")  # type: ignore[return-value]

    def load_transformer(self) -> ZImageTransformer:
        return self.component("transformer")  # type: ignore[return-value]

    def load_vae(self) -> VAEDecoder:
        return self.component("vae")  # type: ignore[return-value]

    # -- memory --------------------------------------------------------------------------------------

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype in (mx.bfloat16, mx.float16) else 4

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

    # -- a generation --------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> mx.array:
        """(tokens, hidden) prompt embedding: hidden state [-2] of the templated prompt."""
        ids = self.tokenizer.encode(prompt)
        out = self.load_text_encoder()(mx.array([ids], dtype=mx.int32))[0]
        mx.eval(out)
        return out

    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None,
                 latents: np.ndarray | None = None, previews: Collection[int] = ()) -> Iterator[Event]:
        """Run one text-to-image generation, yielding progress; the last event is the ``Image``.

        ``latents`` overrides the seed's noise (tests pass the reference latents). After each 1-based step listed
        in ``previews`` a ``Preview`` follows its ``Step``: the VAE decode of the clean latent predicted at that
        point (``x + sigma_next * flow``), which is what a streaming client shows while it waits.
        """
        request = self.resolve(request)
        assert request.width and request.height and request.steps and request.guidance is not None
        started = time.perf_counter()
        cfg, vcfg = self.transformer_config, self.vae_config
        use_cfg = request.guidance > 0

        if self.text_encoder is None:
            yield Stage("load text_encoder")
            self.load_text_encoder()
        yield Stage("encode")
        captions = [self.encode_prompt(request.prompt)]
        if use_cfg:
            captions.append(self.encode_prompt(request.negative))
        self.done_with("text_encoder")
        self.check_cancel(cancel)

        if self.transformer is None:
            yield Stage("load transformer")
        transformer = self.load_transformer()
        if latents is None:
            latents = initial_noise(request.seed, cfg.in_channels, request.height, request.width, vcfg.scale_factor)
        expected = (1, cfg.in_channels, request.height // vcfg.scale_factor, request.width // vcfg.scale_factor)
        if tuple(latents.shape) != expected:
            raise ImgpackError(f"latents have shape {tuple(latents.shape)}, expected {expected}")
        x = mx.array(latents.astype(np.float32))[0]
        image_tokens = (x.shape[1] // cfg.patch_size) * (x.shape[2] // cfg.patch_size)
        scheduler = FlowMatchEulerScheduler(self.scheduler_config, request.steps, image_tokens)

        yield Stage("denoise")
        for i in range(scheduler.num_steps):
            self.check_cancel(cancel)
            start = time.perf_counter()
            pred = transformer(x, scheduler.model_time(i), captions).astype(mx.float32)
            flow = pred[0] + request.guidance * (pred[0] - pred[1]) if use_cfg else pred[0]
            x = x + scheduler.step_size(i) * -flow
            mx.eval(x)
            yield Step(i + 1, scheduler.num_steps, time.perf_counter() - start)
            if i + 1 in previews:
                predicted = x + float(scheduler.sigmas[i + 1]) * flow
                preview = self.load_vae()(predicted[None])
                mx.eval(preview)
                yield Preview(i + 1, scheduler.num_steps, to_pixels(preview))
                del preview, predicted
        self.check_cancel(cancel)
        del transformer
        self.done_with("transformer")

        if self.vae is None:
            yield Stage("load vae")
        vae = self.load_vae()
        yield Stage("decode")
        image = vae(x[None])
        mx.eval(image)
        pixels = to_pixels(image)
        del image, vae
        self.done_with("vae")
        yield Image(pixels, request.seed, time.perf_counter() - started)


#: The name callers and tests know the Z-Image pipeline by.
ZImageModel = ZImagePipeline


def generate(model: Pipeline, request: GenerationRequest, cancel: threading.Event | None = None,
             latents: np.ndarray | None = None, previews: Collection[int] = ()) -> Iterator[Event]:
    """``model.generate(...)``, as a function."""
    return model.generate(request, cancel=cancel, latents=latents, previews=previews)


__all__ = [
    "GenerationCancelled",
    "GenerationRequest",
    "Image",
    "Preview",
    "Stage",
    "Step",
    "ZImageModel",
    "ZImagePipeline",
    "encode_png",
    "generate",
    "initial_noise",
    "run_to_image",
    "save_png",
]
