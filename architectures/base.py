"""What every architecture module shares: the expectation type, config-field readers, state-dict builders.

An architecture's tensor rules are a pure function from its component configs to the tensor names and shapes a
model must carry. The runtime builds its networks from the same configs; a test checks that the two agree, so
conformance, ``verify`` and the loader can never disagree about what a model needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


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


#: The configs a text-to-image pipeline of a transformer, a text encoder and a VAE is derived from.
PIPELINE_CONFIG_FILES = ("transformer/config.json", "text_encoder/config.json", "vae/config.json")

TensorsOf = Callable[[dict[str, Any]], dict[str, list[int]]]
SplitTensorsOf = Callable[[dict[str, Any]], tuple[dict[str, list[int]], dict[str, list[int]]]]


def pipeline_expectation(configs: dict[str, Any], transformer: TensorsOf, text_encoder: SplitTensorsOf,
                         vae: SplitTensorsOf, encoder_use: str) -> Expectation:
    """What a transformer + text encoder + VAE pipeline must hold, from its parsed ``PIPELINE_CONFIG_FILES``.

    ``text_encoder`` and ``vae`` give (required, optional) state dicts: the text encoder's optional tensors are
    the ones generation never reads (an LM head), the VAE's its encoder, which ``encoder_use`` says is for what.
    """
    for file in PIPELINE_CONFIG_FILES:
        if not isinstance(configs.get(file), dict):
            raise ConfigProblem(file, "must be a JSON object")
    required: dict[str, list[int]] = {}
    optional: dict[str, list[int]] = {}
    for key, shape in transformer(configs["transformer/config.json"]).items():
        required["transformer/" + key] = shape
    te_required, te_optional = text_encoder(configs["text_encoder/config.json"])
    for key, shape in te_required.items():
        required["text_encoder/model." + key] = shape
    for key, shape in te_optional.items():
        optional["text_encoder/" + key] = shape
    decoder, encoder = vae(configs["vae/config.json"])
    for key, shape in decoder.items():
        required["vae/" + key] = shape
    for key, shape in encoder.items():
        optional["vae/" + key] = shape
    return Expectation(
        required=required,
        optional=optional,
        aliases={"text_encoder/": "text_encoder/model."},
        optional_groups={"vae/encoder.": f"the VAE encoder (needed for {encoder_use}, not for generation)"},
    )


def int_field(config: dict[str, Any], key: str, file: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigProblem(file, f"field {key!r} must be a non-negative integer, got {value!r}")
    return value


def int_list_field(config: dict[str, Any], key: str, file: str, default: list[int] | None = None) -> list[int]:
    value = config.get(key, default)
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ConfigProblem(file, f"field {key!r} must be a non-empty list of positive integers, got {value!r}")
    return value


def bool_field(config: dict[str, Any], key: str, file: str, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise ConfigProblem(file, f"field {key!r} must be true or false, got {value!r}")
    return value


def linear(out: dict[str, list[int]], name: str, n_out: int, n_in: int, bias: bool = True) -> None:
    out[name + ".weight"] = [n_out, n_in]
    if bias:
        out[name + ".bias"] = [n_out]


def conv(out: dict[str, list[int]], name: str, n_out: int, n_in: int, k: int) -> None:
    out[name + ".weight"] = [n_out, n_in, k, k]
    out[name + ".bias"] = [n_out]


def norm(out: dict[str, list[int]], name: str, channels: int) -> None:
    out[name + ".weight"] = [channels]
    out[name + ".bias"] = [channels]




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


@dataclass(frozen=True)
class GenerationDefaults:
    """What ``run`` and the server use when a request does not say, and the sizes an architecture accepts."""

    steps: int
    guidance: float
    width: int = 1024
    height: int = 1024
    #: Sides must be multiples of this (the VAE's scale factor times the transformer's patch size).
    size_multiple: int = 16
    min_side: int = 16
    max_side: int = 2048
    #: Classifier-free guidance runs (a second, negative batch row) only when guidance exceeds this.
    guidance_threshold: float = 0.0


@dataclass(frozen=True)
class Architecture:
    """One pipeline family: how to recognise it, its tensor rules, its defaults, and where its runtime lives."""

    name: str
    #: ``model_index.json`` ``_class_name`` values (ollama's rewrite keeps them in ``architecture``).
    class_names: tuple[str, ...]
    config_files: tuple[str, ...]
    expected_tensors: Callable[[dict[str, Any]], Expectation]
    defaults: GenerationDefaults
    #: ``module:Class`` of the runtime pipeline, imported only when a model of this family runs.
    runtime: str
    #: The starting-noise shape for a seed, as a function of (height, width): documented portable seeds.
    noise_shape: Callable[[int, int], tuple[int, ...]] = field(default=lambda h, w: (1, 16, h // 8, w // 8))
    description: str = ""


_SIZE_TEXT = __import__("re").compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")


def parse_size(text: str, what: str = "--size") -> tuple[int, int]:
    """``WxH`` -> (width, height): the one parser of image sizes (CLI, server, page). Raises UsageError."""
    from imgpack.schemas.errors import UsageError

    match = _SIZE_TEXT.match(text) if isinstance(text, str) else None
    if not match:
        raise UsageError(f"{what}: {text!r} is not WIDTHxHEIGHT (for example 1024x768)")
    return int(match.group(1)), int(match.group(2))


def check_size(width: int, height: int, defaults: GenerationDefaults, what: str = "--size",
               allow_any_side: bool = False) -> None:
    """The one rule for what sizes an architecture accepts: multiples of its patch grid, within its range."""
    from imgpack.schemas.errors import UsageError

    for side, value in (("width", width), ("height", height)):
        if value <= 0 or value % defaults.size_multiple:
            raise UsageError(f"{what}: {side} {value} is not a positive multiple of {defaults.size_multiple}")
        if not allow_any_side and not defaults.min_side <= value <= defaults.max_side:
            raise UsageError(f"{what}: {side} {value} is outside {defaults.min_side}..{defaults.max_side}")
