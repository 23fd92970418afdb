"""The HTTP API's request checking and error shapes, kept free of HTTP and MLX so they are easy to test.

Every rejection is an ``ApiError`` that renders as OpenAI's ``{"error": {message, type, param, code}}`` body,
so the official ``openai`` client raises its usual ``BadRequestError``/``NotFoundError`` with our message.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass
from typing import Any

from imgpack.architectures.base import GenerationDefaults, check_size
from imgpack.architectures.base import parse_size as parse_size_text
from imgpack.schemas.errors import UsageError
from imgpack.schemas.reference import Reference

DEFAULT_HOST = "127.0.0.1"  # loopback unless told otherwise
DEFAULT_PORT = 8420
DEFAULT_SIZE = "1024x1024"
MAX_SIDE = 2048
SIZE_MULTIPLE = 16
#: What a request may ask for before its model is known (each model checks its own rules again).
SERVER_SIZES = GenerationDefaults(steps=1, guidance=0.0, size_multiple=SIZE_MULTIPLE, min_side=SIZE_MULTIPLE,
                                  max_side=MAX_SIDE)
MAX_N = 10  # OpenAI's own limit for n
MAX_STEPS = 100
MAX_PROMPT_CHARS = 32000
MAX_SEED = 2**63 - 1
DEFAULT_KEEP_ALIVE = 300.0
FOREVER = math.inf

#: OpenAI request fields that have no meaning for a local diffusion model; accepted and ignored so stock clients
#: that always send them keep working.
IGNORED_FIELDS = frozenset({"user", "quality", "style", "moderation"})
KNOWN_FIELDS = frozenset({
    "model", "prompt", "size", "n", "response_format", "stream", "seed", "steps", "negative_prompt", "guidance",
    "keep_alive", "output_format", "output_compression", "partial_images", "background",
}) | IGNORED_FIELDS
OUTPUT_FORMATS = ("png", "jpeg", "webp")
MAX_PARTIAL_IMAGES = 3  # OpenAI's limit

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class ApiError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI-style error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,  # noqa: A002 - OpenAI's field name
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(field: str, message: str, code: str = "invalid_value") -> ApiError:
    """A 400 naming the field at fault, in the message and in ``param``."""
    return ApiError(400, f"{field}: {message}", param=field, code=code)


@dataclass(frozen=True)
class ImageJobSpec:
    """One validated ``POST /v1/images/generations`` request."""

    model: str
    reference: Reference
    prompt: str
    width: int
    height: int
    n: int = 1
    response_format: str = "b64_json"
    stream: bool = False
    seed: int = 0
    steps: int | None = None  # None: the model's architecture's default
    guidance: float = 0.0
    negative_prompt: str = ""
    keep_alive: float | None = None  # seconds; None = the server's default; inf = never unload
    output_format: str = "png"
    output_compression: int = 100
    partial_images: int = 0

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def preview_steps(self, steps: int | None = None) -> tuple[int, ...]:
        """The steps after which a partial image is sent: ``partial_images`` evenly spaced ones before the last
        (fewer when there are not that many steps, as OpenAI allows). ``steps`` is the resolved step count."""
        steps = steps or self.steps or 0
        if not self.partial_images or steps < 2:
            return ()
        k = self.partial_images
        return tuple(sorted({min(steps - 1, max(1, round(steps * (i + 1) / (k + 1)))) for i in range(k)}))


def parse_model(value: Any, field: str = "model") -> Reference:
    """A model is a reference into the store, never a path: anything ``Reference.parse`` rejects is a 400."""
    if value is None or value == "":
        raise bad(field, "required (a model reference from GET /v1/models)", "missing_required_parameter")
    if not isinstance(value, str):
        raise bad(field, f"must be a string, got {type(value).__name__}")
    try:
        return Reference.parse(value)
    except UsageError as e:
        raise bad(field, str(e), "invalid_model") from None


def parse_size(value: Any) -> tuple[int, int]:
    if value is None or value == "auto":
        value = DEFAULT_SIZE
    try:
        width, height = parse_size_text(value, "size")
        check_size(width, height, SERVER_SIZES, "size")
    except UsageError as e:
        raise bad("size", str(e).removeprefix("size: ")) from None
    return width, height


def parse_keep_alive(value: Any, field: str = "keep_alive") -> float | None:
    """Seconds as a number or a duration like "90s", "5m", "1h30m"; a negative value keeps the model forever."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise bad(field, "must be a number of seconds or a duration such as \"5m\"")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            negative = text.startswith("-")
            body = text[1:] if negative else text
            parts = _DURATION_PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise bad(field, f"{value!r} is not a duration (examples: 30, \"90s\", \"5m\", \"1h\", -1)") from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts) * (-1 if negative else 1)
    else:
        raise bad(field, "must be a number of seconds or a duration such as \"5m\"")
    if math.isnan(seconds):
        raise bad(field, "must not be NaN")
    return FOREVER if seconds < 0 else seconds


def _int(body: dict[str, Any], field: str, default: int, low: int, high: int) -> int:
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise bad(field, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise bad(field, f"{value} is out of range; allowed {low} to {high}", "out_of_range")
    return value


def _str(body: dict[str, Any], field: str, default: str) -> str:
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, str):
        raise bad(field, f"must be a string, got {type(value).__name__}")
    return value


def parse_generation(body: Any) -> ImageJobSpec:
    """Check a generation request body; the first problem found becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise bad(unknown[0], "unrecognized request argument", "unknown_parameter")
    reference = parse_model(body.get("model"))
    prompt = body.get("prompt")
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise bad("prompt", "required and must not be empty", "missing_required_parameter")
    if not isinstance(prompt, str):
        raise bad("prompt", f"must be a string, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise bad("prompt", f"{len(prompt)} characters is over the {MAX_PROMPT_CHARS} limit", "out_of_range")
    width, height = parse_size(body.get("size"))
    n = _int(body, "n", 1, 1, MAX_N)
    response_format = _str(body, "response_format", "b64_json")
    if response_format not in ("b64_json", "url"):
        raise bad("response_format", f"{response_format!r} is not one of 'b64_json', 'url'")
    output_format = _str(body, "output_format", "png")
    if output_format not in OUTPUT_FORMATS:
        raise bad("output_format", f"{output_format!r} is not one of {', '.join(map(repr, OUTPUT_FORMATS))}")
    output_compression = _int(body, "output_compression", 100, 0, 100)
    partial_images = _int(body, "partial_images", 0, 0, MAX_PARTIAL_IMAGES)
    background = _str(body, "background", "auto")
    if background not in ("auto", "opaque"):
        raise bad("background", f"{background!r} is not supported; the models draw opaque images ('auto', 'opaque')")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream", f"must be true or false, got {stream!r}")
    seed = _int(body, "seed", -1, 0, MAX_SEED - MAX_N)
    if seed < 0:
        seed = secrets.randbits(32)
    steps = None if body.get("steps") is None else _int(body, "steps", 1, 1, MAX_STEPS)
    guidance = body.get("guidance", 0.0)
    if guidance is None:
        guidance = 0.0
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise bad("guidance", f"must be a finite number, got {guidance!r}")
    if not 0 <= guidance <= 100:
        raise bad("guidance", f"{guidance} is out of range; allowed 0 to 100", "out_of_range")
    negative = _str(body, "negative_prompt", "")
    if len(negative) > MAX_PROMPT_CHARS:
        raise bad("negative_prompt", f"{len(negative)} characters is over the {MAX_PROMPT_CHARS} limit", "out_of_range")
    if partial_images and n > 1:
        raise bad("partial_images", "partial images are streamed for one image at a time; use n=1")
    return ImageJobSpec(
        model=body["model"], reference=reference, prompt=prompt, width=width, height=height, n=n,
        response_format=response_format, stream=stream, seed=seed, steps=steps, guidance=float(guidance),
        negative_prompt=negative, keep_alive=parse_keep_alive(body.get("keep_alive")), output_format=output_format,
        output_compression=output_compression, partial_images=partial_images,
    )
