"""What every pipeline shares: the request, the events ``generate`` yields, images, and a base class that builds,
sizes, loads and frees components and plans memory, so an architecture only says what its networks are and how
one generation runs.

A pipeline is opened from a :class:`~imgpack.runtime.common.loader.ModelSource` (a stored manifest, or a
directory of layer files); its networks are built from the manifest's configs without memory and load blob by
blob when first needed. ``generate`` — one implementation for every architecture: text encoder, flow-matching
loop, VAE — yields :class:`Stage`, :class:`Step` and :class:`Preview` events and finally an :class:`Image`; it
checks a cancel event between steps. Architectures subclass :class:`Pipeline` (see ``runtime/zimage`` and
``runtime/flux2``), saying how prompts are encoded, latents packed and the flow predicted, and are found through
:func:`imgpack.runtime.open_pipeline`.
"""

from __future__ import annotations

import abc
import gc
import io
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from imgpack.architectures.base import Architecture
from imgpack.runtime.backend import available_memory, is_cpu, mx, nn, release_free_memory
from imgpack.runtime.common.loader import GB, Component, InsufficientMemory, ModelSource, ResidentForm
from imgpack.runtime.common.scheduler import FlowMatchEulerScheduler
from imgpack.runtime.common.tokenizer import PromptTokenizer
from imgpack.schemas.errors import ImgpackError, UsageError
from imgpack.store.atomic import atomic_file

#: Set to 0 to skip the memory check (it estimates; a machine with swap or a lean model may do with less).
MEMORY_CHECK_ENV = "IMGPACK_MEMORY_CHECK"


class GenerationCancelled(ImgpackError):
    """The caller's cancel event was set; raised between steps, never mid-step."""


@dataclass
class GenerationRequest:
    """One image to make; fields left None take the architecture's defaults."""

    prompt: str
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seed: int = 0
    guidance: float | None = None
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
    seconds: float = 0.0

    def png(self) -> bytes:
        return encode_png(self.pixels)


Event = Stage | Step | Preview | Image


def initial_noise(seed: int, channels: int, height: int, width: int, scale: int = 8) -> np.ndarray:
    """The portable starting latents for a seed, ``(1, channels, height / scale, width / scale)``: the same on every
    machine and backend, and what diffusers reproduces when given them as ``latents``."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, channels, height // scale, width // scale), dtype=np.float32)


def load_tokenizer(source: ModelSource) -> PromptTokenizer:
    """The prompt tokenizer from ``tokenizer/``: tokenizer.json, its config and a chat template if shipped."""
    config = source.read_json("tokenizer/tokenizer_config.json") if source.has_file(
        "tokenizer/tokenizer_config.json") else None
    template = None
    if source.has_file("tokenizer/chat_template.jinja"):
        template = source.read_file("tokenizer/chat_template.jinja").decode("utf-8", "replace")
    return PromptTokenizer(source.read_file("tokenizer/tokenizer.json"), config, template)


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
    with atomic_file(path) as f:
        f.write(encode_png(pixels))
    return Path(path)


@dataclass
class MemoryPlan:
    """What the plan assumed, for ``run -v`` and the refusal message."""

    weights: dict[str, int]
    #: Working memory of one denoising step and of the decode (each beyond the weights).
    step_working: int
    decode_working: int
    expanded_layer: int
    peak: int
    available: int
    forms: dict[str, str] = field(default_factory=dict)
    keep_text_encoder: bool = True

    def describe(self) -> str:
        parts = ", ".join(f"{name} {size / GB:.2f} ({self.forms.get(name, '?')})"
                          for name, size in self.weights.items())
        return (f"weights {sum(self.weights.values()) / GB:.2f} GB ({parts}), one expanded layer"
                f" {self.expanded_layer / GB:.2f} GB, working ~{self.step_working / GB:.2f} GB a step and"
                f" ~{self.decode_working / GB:.2f} GB the decode; peak ~{self.peak / GB:.2f}"
                f" GB of {self.available / GB:.2f} GB available")


def memory_check_enabled(force: bool) -> bool:
    return not force and os.environ.get(MEMORY_CHECK_ENV, "1") != "0"


class Pipeline(abc.ABC):
    """A model opened from a source: configs, tokenizer and lazily loaded networks, and one ``generate``.

    Subclasses set ``architecture``, declare their components in ``build_components`` and implement
    ``step_working_bytes``, ``decode_working_bytes`` and the four steps of a generation: ``encode_prompts``,
    ``start_latents``, ``velocity`` and ``vae_input``.
    """

    architecture: Architecture
    #: Component names in the order a generation needs them; the text encoder is the one that can be freed early.
    TEXT_ENCODER = "text_encoder"
    #: The decoder: in one-shot use it is loaded, and works, only once the denoising networks are freed.
    VAE = "vae"

    def __init__(self, source: ModelSource, log: Callable[[str], None] | None = None, keep_loaded: bool = True,
                 force: bool = False) -> None:
        self.source = source
        #: False for one-shot use (``imgpack run``): each network is freed as soon as its part is done, so peak
        #: memory is the largest component rather than all of them. A server keeps them (True).
        self.keep_loaded = keep_loaded
        self.force = force
        self.log = log or (lambda _msg: None)
        self.keep_text_encoder = True
        self.components: dict[str, Component] = self.build_components()
        self._loaded: dict[str, nn.Module] = {}
        self.forms = ResidentForm.choose(self.components, self._fits_expanded())

    @classmethod
    def require_architecture(cls, source: ModelSource) -> None:
        """Refuse a model of another pipeline class before reading its configs."""
        from imgpack.schemas.config import architecture_of

        name = architecture_of(source.model_index)
        if name not in cls.architecture.class_names:
            raise ImgpackError(f"{source.where}: model_index.json names {name!r}; this runs"
                               f" {', '.join(cls.architecture.class_names)}")

    @classmethod
    def open(cls, store: Any, ref: str, log: Callable[[str], None] | None = None, keep_loaded: bool = True,
             force: bool = False) -> Any:
        """The pipeline of a stored model (``store`` is an :class:`imgpack.store.store.Store`)."""
        return cls(ModelSource.open(store, ref), log, keep_loaded, force)

    # -- to be provided --------------------------------------------------------------------------------

    @abc.abstractmethod
    def build_components(self) -> dict[str, Component]:
        """The networks, by name, each built from its config (no weights yet)."""

    @abc.abstractmethod
    def step_working_bytes(self, width: int, height: int, batch: int) -> int:
        """A generous bound on one denoising step's working memory at this size and batch, beyond the weights."""

    @abc.abstractmethod
    def decode_working_bytes(self, width: int, height: int) -> int:
        """A generous bound on the VAE decode's working memory for one image of this size, beyond its weights."""

    def activation_bytes(self, width: int, height: int, batch: int) -> int:
        """A bound on working memory for one step and for the decode at this size and batch: the larger (what a
        server holding every network needs beside the weights)."""
        return max(self.step_working_bytes(width, height, batch), self.decode_working_bytes(width, height))

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Any:
        """The transformer's conditioning for ``[prompt]`` or ``[prompt, negative]`` (guided)."""

    @abc.abstractmethod
    def start_latents(self, request: GenerationRequest, latents: np.ndarray | None
                      ) -> tuple[mx.array, FlowMatchEulerScheduler]:
        """The starting latent in the transformer's layout (from ``latents``, else the seed's noise) and the
        schedule for this request."""

    @abc.abstractmethod
    def velocity(self, transformer: nn.Module, x: mx.array, context: Any, scheduler: FlowMatchEulerScheduler,
                 step: int, request: GenerationRequest, guided: bool) -> mx.array:
        """The direction of ``step``: the next latent is ``x + scheduler.step_size(step) * velocity`` and the clean
        latent it points at ``x - sigma_next * velocity``; ``guided`` says ``context`` has a negative row too."""

    @abc.abstractmethod
    def vae_input(self, x: mx.array, request: GenerationRequest) -> mx.array:
        """A latent in the transformer's layout as the VAE decoder takes it."""

    def before_generation(self, request: GenerationRequest) -> None:  # noqa: B027 - optional, empty by default
        """A hook for notes about a resolved request (nothing by default)."""

    # -- requests ----------------------------------------------------------------------------------------

    @property
    def defaults(self):  # noqa: ANN201 - GenerationDefaults
        return self.architecture.defaults

    def size_multiple(self) -> int:
        return self.defaults.size_multiple

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """The request with the architecture's defaults filled in, checked (usage errors, exit 2)."""
        d = self.defaults
        resolved = replace(
            request,
            width=request.width or d.width,
            height=request.height or d.height,
            steps=request.steps or d.steps,
            guidance=d.guidance if request.guidance is None else request.guidance,
        )
        multiple = self.size_multiple()
        for what, value in (("width", resolved.width), ("height", resolved.height)):
            assert value is not None
            if value <= 0 or value % multiple:
                raise UsageError(f"--size: {what} {value} is not a positive multiple of {multiple}")
            if not d.min_side <= value <= d.max_side and not self.force:
                raise UsageError(f"--size: {what} {value} is outside {d.min_side}..{d.max_side} for"
                                 f" {self.architecture.name}")
        if resolved.steps is not None and resolved.steps < 1:
            raise UsageError(f"--steps: {resolved.steps} must be at least 1")
        if resolved.guidance is not None and resolved.guidance < 0:
            raise UsageError(f"--guidance: {resolved.guidance} must not be negative")
        if not request.prompt:
            raise UsageError("the prompt is empty")
        return resolved

    # -- memory ------------------------------------------------------------------------------------------

    def _fits_expanded(self) -> bool:
        """Whether float32 copies of every weight fit: then expanding at load (fastest on CPU) is the plan."""
        if not is_cpu():
            return False
        have = available_memory()
        expanded = sum(c.expanded_bytes() for c in self.components.values())
        biggest = max((c.expanded_bytes() for c in self.components.values()), default=0)
        need = expanded if self.keep_loaded else biggest
        return not have or need * 1.25 < have

    def weight_bytes(self) -> dict[str, int]:
        return {name: c.resident_bytes(self.forms[name]) for name, c in self.components.items()}

    def expanded_layer_bytes(self) -> int:
        """The largest weight one call expands (stored-form layers on CPU): added once to the plan."""
        if not is_cpu():
            return 0
        return max((c.largest_expansion(self.forms[name]) for name, c in self.components.items()), default=0)

    def plan_memory(self, request: GenerationRequest, available: int | None = None, previews: bool = False) -> int:
        """Decide whether the text encoder stays loaded; raise (need X GB, have Y GB) if nothing fits.
        ``previews``: the generation will decode previews between steps (the VAE loaded beside the transformer)."""
        request = self.resolve(request)
        assert request.width and request.height
        have = available_memory() if available is None else available
        weights = self.weight_bytes()
        batch = 2 if self.uses_guidance(request.guidance or 0.0) else 1
        step = self.step_working_bytes(request.width, request.height, batch)
        decode = self.decode_working_bytes(request.width, request.height)
        work = max(step, decode)
        expanded = self.expanded_layer_bytes()
        what = f"model {self.source.where} at {request.width}x{request.height}"
        text = weights.get(self.TEXT_ENCODER, 0)
        others = {k: v for k, v in weights.items() if k != self.TEXT_ENCODER}
        if not self.keep_loaded:
            # Each network alone, with its own working memory: the steps' beside the transformer, the decode's
            # beside the VAE (loaded once the transformer is freed), unless previews put both side by side.
            vae = others.get(self.VAE, 0)
            alone = [v + (decode if k == self.VAE else step) + expanded for k, v in others.items()]
            together = [sum(others.values()) + work + expanded] if previews and vae else []
            peak = max([text + expanded, *alone, *together])
            mode = "one component at a time" + (", the VAE beside the transformer for previews" if together else "")
        else:
            everything = sum(weights.values()) + work + expanded
            sequential = max(text + expanded, sum(others.values()) + work + expanded)
            if not have or everything <= have:
                self.keep_text_encoder, peak, mode = True, everything, "all components resident"
            else:
                self.keep_text_encoder, peak = False, sequential
                mode = "all resident but the text encoder, freed after encoding"
        plan = MemoryPlan(weights, step, decode, expanded, peak, have, {k: str(v) for k, v in self.forms.items()},
                          self.keep_text_encoder)
        self.log(f"memory: {plan.describe()} ({mode})")
        if have and peak > have:
            message = (f"{what} needs about {peak / GB:.1f} GB of memory but only {have / GB:.1f} GB is available"
                       f" ({plan.describe()}); free memory, choose a smaller --size, use a quantized model"
                       f" (imgpack convert --quantize int8), or pass --force ({MEMORY_CHECK_ENV}=0) to try anyway")
            if memory_check_enabled(self.force):
                raise InsufficientMemory(message)
            self.log("memory check overridden: " + message)
        return peak

    # -- components --------------------------------------------------------------------------------------

    def loaded(self, name: str) -> nn.Module | None:
        return self._loaded.get(name)

    @staticmethod
    def network(name: str) -> property:
        """An attribute for a component: the loaded network or None; setting one replaces it (None frees it)."""

        def get(self: Pipeline) -> Any:
            return self._loaded.get(name)

        def put(self: Pipeline, module: Any) -> None:
            if module is None:
                self.free(name)
            else:
                self._loaded[name] = module

        return property(get, put, doc=f"the loaded {name}, or None")

    def component(self, name: str) -> nn.Module:
        """The loaded network ``name``, loading it blob by blob on first use."""
        module = self._loaded.get(name)
        if module is None:
            start = time.perf_counter()
            module = self.components[name].load(self.forms[name])
            self._loaded[name] = module
            self.log(f"loaded {name} in {time.perf_counter() - start:.2f}s ({self.forms[name]})")
        return module

    def load(self) -> None:
        """Load every component now (a server does this once; ``generate`` otherwise loads on demand)."""
        for name in self.components:
            self.component(name)

    def free(self, name: str) -> None:
        """Drop a loaded network (it reloads from the store on next use) and return its memory."""
        if self._loaded.pop(name, None) is not None:
            gc.collect()
            mx.clear_cache()

    def done_with(self, name: str) -> None:
        """A generation no longer needs ``name``: freed in one-shot mode (and the text encoder when planned)."""
        if not self.keep_loaded or (name == self.TEXT_ENCODER and not self.keep_text_encoder):
            self.free(name)

    def check_cancel(self, cancel: threading.Event | None) -> None:
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled("generation cancelled")

    # -- one generation ----------------------------------------------------------------------------------

    text_encoder = network("text_encoder")
    transformer = network("transformer")
    vae = network("vae")

    @property
    def itemsize(self) -> int:
        """Bytes per activation element in the compute dtype."""
        return 2 if getattr(self, "dtype", mx.float32) in (mx.bfloat16, mx.float16) else 4

    def uses_guidance(self, guidance: float) -> bool:
        """Classifier-free guidance runs (a second, negative prompt) only above the architecture's threshold."""
        return guidance > self.defaults.guidance_threshold

    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None,
                 latents: np.ndarray | None = None, previews: Collection[int] = ()) -> Iterator[Event]:
        """Run one text-to-image generation, yielding progress; the last event is the ``Image``.

        ``latents`` overrides the seed's noise (tests pass diffusers' reference latents). After each 1-based step
        listed in ``previews`` a ``Preview`` follows its ``Step``: the VAE decode of the clean latent predicted at
        that point, which is what a streaming client shows while it waits.
        """
        try:
            yield from self._events(request, cancel, latents, previews)
        finally:
            release_free_memory()

    def _events(self, request: GenerationRequest, cancel: threading.Event | None, latents: np.ndarray | None,
                previews: Collection[int]) -> Iterator[Event]:
        request = self.resolve(request)
        assert request.width and request.height and request.steps and request.guidance is not None
        started = time.perf_counter()
        guided = self.uses_guidance(request.guidance)
        self.before_generation(request)

        if self.text_encoder is None:
            yield Stage("load text_encoder")
            self.component("text_encoder")
        yield Stage("encode")
        context = self.encode_prompts([request.prompt, request.negative] if guided else [request.prompt])
        self.done_with("text_encoder")
        self.check_cancel(cancel)

        if self.transformer is None:
            yield Stage("load transformer")
        transformer = self.component("transformer")
        x, scheduler = self.start_latents(request, latents)

        yield Stage("denoise")
        for i in range(scheduler.num_steps):
            self.check_cancel(cancel)
            start = time.perf_counter()
            velocity = self.velocity(transformer, x, context, scheduler, i, request, guided)
            x = x + scheduler.step_size(i) * velocity
            mx.eval(x)
            yield Step(i + 1, scheduler.num_steps, time.perf_counter() - start)
            if i + 1 in previews:
                predicted = x - float(scheduler.sigmas[i + 1]) * velocity
                preview = self.component("vae")(self.vae_input(predicted, request))
                mx.eval(preview)
                yield Preview(i + 1, scheduler.num_steps, to_pixels(preview))
                del preview, predicted
        self.check_cancel(cancel)
        del transformer
        self.done_with("transformer")

        if self.vae is None:
            yield Stage("load vae")
        vae = self.component("vae")
        yield Stage("decode")
        image = vae(self.vae_input(x, request))
        mx.eval(image)
        pixels = to_pixels(image)
        del image, vae
        self.done_with("vae")
        yield Image(pixels, request.seed, time.perf_counter() - started)


def generate(model: Pipeline, request: GenerationRequest, cancel: threading.Event | None = None,
             latents: np.ndarray | None = None, previews: Collection[int] = ()) -> Iterator[Event]:
    """``model.generate(...)``, as a function."""
    return model.generate(request, cancel=cancel, latents=latents, previews=previews)


def run_to_image(model: Pipeline, request: GenerationRequest, **kwargs: Any) -> Image:
    """Drain ``generate`` and return its image (for callers that do not want progress)."""
    result = None
    for event in model.generate(request, **kwargs):
        if isinstance(event, Image):
            result = event
    assert result is not None
    return result


__all__ = [
    "Event",
    "GenerationCancelled",
    "GenerationRequest",
    "Image",
    "MemoryPlan",
    "Pipeline",
    "Preview",
    "Stage",
    "Step",
    "encode_png",
    "generate",
    "initial_noise",
    "load_tokenizer",
    "run_to_image",
    "save_png",
    "to_pixels",
]
