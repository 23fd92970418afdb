"""Changing how tensors are stored while packing: quantize (``--quantize``) or cast (``--dtype``) at import.

``create`` and ``convert`` decide per tensor, with the spec's rules (:func:`imgpack.schemas.quantized.
should_quantize`), whether it is quantized, cast or kept; a kept tensor is the same blob as before, so a converted
model shares its VAE, configs and every unchanged tensor with its source. Transforming needs MLX (its own
quantization packing, and an exact bf16 rounding); each worker thread computes on its own MLX stream, so both
cores quantize while memory stays one tensor per worker.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from imgpack.schemas import spec
from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.quantized import QuantType, quant_type, should_quantize
from imgpack.schemas.safetensors import encode_header

FLOAT_DTYPES = ("F32", "F16", "BF16")
DTYPE_NAMES = {"bf16": "BF16", "f16": "F16", "f32": "F32", "bfloat16": "BF16", "float16": "F16", "float32": "F32"}
INSTALL_HINT = "pip install 'imgpack[runtime]'"


@dataclass(frozen=True)
class Transform:
    """What to do to one tensor: quantize to ``quant``, or cast to ``dtype``."""

    quant: QuantType | None = None
    dtype: str | None = None

    def describe(self) -> str:
        return self.quant.name if self.quant else f"cast to {self.dtype}"


@dataclass(frozen=True)
class StoragePolicy:
    """``--quantize`` and ``--dtype`` as given; ``for_tensor`` decides each tensor."""

    quant: QuantType | None = None
    dtype: str | None = None

    @classmethod
    def parse(cls, quantize: str | None, dtype: str | None) -> StoragePolicy:
        q = quant_type(quantize) if quantize else None
        d = None
        if dtype:
            d = DTYPE_NAMES.get(dtype.lower())
            if d is None:
                raise ImgpackError(f"--dtype: {dtype!r} is not one of bf16, f16, f32")
        if q is not None or d is not None:
            _require_mlx()
        return cls(q, d)

    @property
    def active(self) -> bool:
        return self.quant is not None or self.dtype is not None

    def for_tensor(self, component: str, key: str, dtype: str, shape: list[int]) -> Transform | None:
        if dtype not in FLOAT_DTYPES:
            return None
        if self.quant is not None and should_quantize(component, key, shape, self.quant):
            return Transform(quant=self.quant)
        if self.dtype is not None and dtype != self.dtype:
            return Transform(dtype=self.dtype)
        return None

    def config_record(self, quantized: int, cast: int) -> dict[str, object]:
        """What the config blob records about the storage (``quantization`` / ``castTo``)."""
        out: dict[str, object] = {}
        if self.quant is not None and quantized:
            out["quantization"] = {"type": self.quant.name, "bits": self.quant.bits,
                                   "groupSize": self.quant.group_size, "mode": self.quant.mode,
                                   "tensors": quantized}
        if self.dtype is not None and cast:
            out["castTo"] = {"dtype": self.dtype, "tensors": cast}
        return out


def _require_mlx() -> None:
    try:
        from imgpack.runtime import backend  # noqa: F401 - the import is the check
    except ImportError as e:
        raise ImgpackError(f"--quantize and --dtype use MLX ({e}); install it with: {INSTALL_HINT}") from None


_streams = threading.local()


def _stream():  # noqa: ANN202 - an mx.Stream
    """This thread's own MLX stream: two packing threads never share one."""
    from imgpack.runtime.backend import mx

    stream = getattr(_streams, "stream", None)
    if stream is None:
        stream = mx.new_stream(mx.cpu)
        _streams.stream = stream
    return stream


def _to_mlx(data: bytes | memoryview, dtype: str, shape: list[int]):  # noqa: ANN202 - an mx.array
    from imgpack.runtime.backend import mx

    if dtype == "BF16":
        return mx.array(np.frombuffer(data, dtype="<u2").reshape(shape)).view(mx.bfloat16)
    return mx.array(np.frombuffer(data, dtype={"F32": "<f4", "F16": "<f2"}[dtype]).reshape(shape))


def transform_tensor(name: str, data: bytes | memoryview, dtype: str, shape: list[int], transform: Transform
                     ) -> tuple[list[bytes | memoryview], str, list[int], dict[str, str]]:
    """The blob parts of a transformed tensor, and its descriptor's (dtype, shape, annotations)."""
    from imgpack.runtime.backend import mx
    from imgpack.runtime.common.quantized import blob_parts, quantize

    with mx.stream(_stream()):
        array = _to_mlx(data, dtype, shape)
        if transform.quant is not None:
            qt = quantize(array, transform.quant)
            parts = blob_parts(name, qt)
            return parts, dtype, list(shape), {spec.QUANTIZATION_ANNOTATION: qt.layout.annotation()}
        assert transform.dtype is not None
        target = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32}[transform.dtype]
        cast = array.astype(target)
        mx.eval(cast)
        raw = np.array(cast.view(mx.uint16) if target == mx.bfloat16 else cast)
        return [encode_header(transform.dtype, shape), memoryview(raw.tobytes())], transform.dtype, list(shape), {}
