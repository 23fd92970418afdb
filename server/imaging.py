"""Encoding generated pixels as the file format a client asked for (OpenAI's ``output_format``/``output_compression``).

As in OpenAI's API, ``output_compression`` (0-100, default 100) applies to JPEG and WebP, where it is the encoder's
quality (100 = best); PNG is lossless and always written with PIL's defaults, byte for byte what ``imgpack run``
writes.
"""

from __future__ import annotations

import io

import numpy as np

FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
DEFAULT_COMPRESSION = 100


def encode(pixels: np.ndarray, output_format: str = "png", compression: int = DEFAULT_COMPRESSION) -> bytes:
    """(height, width, 3) uint8 pixels -> the bytes of one image file."""
    from PIL import Image

    image = Image.fromarray(pixels, "RGB")
    buf = io.BytesIO()
    if output_format == "png":
        image.save(buf, format="PNG")
    elif output_format == "jpeg":
        image.save(buf, format="JPEG", quality=max(1, compression))
    elif output_format == "webp":
        image.save(buf, format="WEBP", quality=compression, lossless=False)
    else:
        raise ValueError(f"unknown output format {output_format!r}")
    return buf.getvalue()
