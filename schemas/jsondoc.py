"""Parsing untrusted JSON (configs, manifests, indexes, headers) into a clear error, never a traceback."""

from __future__ import annotations

import json
from typing import Any

from imgpack.schemas.errors import ImgpackError


def parse_json(raw: bytes | str, where: str) -> Any:
    """``json.loads`` that names ``where`` on failure; a document nested too deeply for the parser (a hostile
    100,000-level ``[[[...]]]``) is bad input like any other."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ImgpackError(f"{where}: JSON nested too deeply to parse") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImgpackError(f"{where}: not valid JSON: {e}") from None


def parse_json_object(raw: bytes | str, where: str) -> dict[str, Any]:
    document = parse_json(raw, where)
    if not isinstance(document, dict):
        raise ImgpackError(f"{where}: must hold a JSON object, not a JSON {type(document).__name__}")
    return document
