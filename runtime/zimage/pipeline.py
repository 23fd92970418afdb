"""Z-Image text-to-image generation (``ZImagePipeline``): the Qwen3 prompt embedding, the single-stream DiT and
the FLUX VAE, driven by a flow-matching Euler schedule.

Everything generic (loading, memory, events, requests, the generation loop) is
:class:`~imgpack.runtime.common.pipeline.Pipeline`'s; this module says what Z-Image's networks are, how its prompts
are encoded and what its transformer predicts. Portable seeds: the starting noise for
seed S is ``numpy.random.default_rng(S).standard_normal((1, 16, H // 8, W // 8), dtype=numpy.float32)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from imgpack.architectures import zimage as arch
from imgpack.runtime.backend import attention_bytes, compute_dtype, mx, nn
from imgpack.runtime.common.autoencoder import VAEConfig, VAEDecoder, decode_bytes
from imgpack.runtime.common.loader import Component, ModelSource
from imgpack.runtime.common.pipeline import (
    GenerationCancelled,
    GenerationRequest,
    Image,
    Pipeline,
    Preview,
    Stage,
    Step,
    encode_png,
    generate,
    initial_noise,
    load_tokenizer,
    run_to_image,
    save_png,
)
from imgpack.runtime.common.qwen3 import Qwen3Config, Qwen3TextEncoder
from imgpack.runtime.common.scheduler import FlowMatchConfig, FlowMatchEulerScheduler
from imgpack.runtime.common.tokenizer import MAX_SEQUENCE_LENGTH
from imgpack.runtime.zimage.transformer import SEQ_MULTIPLE, ZImageConfig, ZImageTransformer
from imgpack.schemas.errors import ImgpackError


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
        self.tokenizer = load_tokenizer(source)
        super().__init__(source, log, keep_loaded, force)

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

    def load_text_encoder(self) -> Qwen3TextEncoder:
        return self.component("text_encoder")  # type: ignore[return-value]

    def load_transformer(self) -> ZImageTransformer:
        return self.component("transformer")  # type: ignore[return-value]

    def load_vae(self) -> VAEDecoder:
        return self.component("vae")  # type: ignore[return-value]

    # -- memory --------------------------------------------------------------------------------------

    def step_working_bytes(self, width: int, height: int, batch: int) -> int:
        cfg, vcfg = self.transformer_config, self.vae_config
        tokens = (height // (vcfg.scale_factor * cfg.patch_size)) * (width // (vcfg.scale_factor * cfg.patch_size))
        seq = tokens + MAX_SEQUENCE_LENGTH + 2 * SEQ_MULTIPLE
        size = self.itemsize
        attention = attention_bytes(batch, cfg.n_heads, seq, seq)
        hidden = batch * seq * (8 * cfg.dim + 3 * cfg.ffn_dim) * size
        return attention + hidden

    def decode_working_bytes(self, width: int, height: int) -> int:
        return decode_bytes(self.vae_config, width, height)

    # -- a generation: what is Z-Image's in the shared loop ------------------------------------------

    def encode_prompt(self, prompt: str) -> mx.array:
        """(tokens, hidden) prompt embedding: hidden state [-2] of the templated prompt."""
        ids = self.tokenizer.encode(prompt)
        out = self.load_text_encoder()(mx.array([ids], dtype=mx.int32))[0]
        mx.eval(out)
        return out

    def encode_prompts(self, prompts: list[str]) -> list[mx.array]:
        """One caption per prompt, each its own length (the transformer pads them itself)."""
        return [self.encode_prompt(p) for p in prompts]

    def start_latents(self, request: GenerationRequest, latents: np.ndarray | None
                      ) -> tuple[mx.array, FlowMatchEulerScheduler]:
        """(C, H/8, W/8) latents and a schedule shifted for the image's token count."""
        assert request.width and request.height and request.steps
        cfg, scale = self.transformer_config, self.vae_config.scale_factor
        if latents is None:
            latents = initial_noise(request.seed, cfg.in_channels, request.height, request.width, scale)
        expected = (1, cfg.in_channels, request.height // scale, request.width // scale)
        if tuple(latents.shape) != expected:
            raise ImgpackError(f"latents have shape {tuple(latents.shape)}, expected {expected}")
        x = mx.array(latents.astype(np.float32))[0]
        image_tokens = (x.shape[1] // cfg.patch_size) * (x.shape[2] // cfg.patch_size)
        return x, FlowMatchEulerScheduler(self.scheduler_config, request.steps, image_tokens)

    def velocity(self, transformer: nn.Module, x: mx.array, context: list[mx.array],
                 scheduler: FlowMatchEulerScheduler, step: int, request: GenerationRequest, guided: bool) -> mx.array:
        """Z-Image predicts the negated flow (diffusers' pipeline steps along ``-noise_pred``); guidance is
        ``cond + g * (cond - neg)``."""
        pred = transformer(x, scheduler.model_time(step), context).astype(mx.float32)
        flow = pred[0] + request.guidance * (pred[0] - pred[1]) if guided else pred[0]
        return -flow

    def vae_input(self, x: mx.array, request: GenerationRequest) -> mx.array:
        return x[None]


#: The name callers and tests know the Z-Image pipeline by.
ZImageModel = ZImagePipeline


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
