"""Fixtures for the MLX runtime tests: a store holding the committed tiny models, and manifest surgery helpers.

The runtime reads models only through a store, so every test starts from ``create_model`` output, never from
the model directories.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
MODELS = TESTS / "models"
REFERENCE = TESTS / "reference"

#: (model directory, case) pairs with reference data under tests/reference/.
REFERENCE_CASES = [
    ("zimage-tiny", "square"),
    ("zimage-tiny", "nonsquare"),
    ("zimage-tiny", "cfg"),
    ("zimage-sharded", "square"),
]


@dataclass
class Reference:
    """One diffusers run: its parameters and every captured intermediate value."""

    model: str
    case: str
    data: dict[str, np.ndarray]
    params: dict

    @property
    def png(self) -> Path:
        return REFERENCE / self.model / f"{self.case}.png"

    def text(self, key: str) -> str:
        return str(self.data[key].reshape(-1)[0])


def load_reference(model: str, case: str) -> Reference:
    with np.load(REFERENCE / model / f"{case}.npz") as npz:
        data = {k: npz[k] for k in npz.files}
    params = json.loads(str(data["params"].reshape(-1)[0]))
    return Reference(model, case, data, params)


@pytest.fixture(scope="session")
def runtime_store(tmp_path_factory: pytest.TempPathFactory):
    """A store with both tiny models in the OCI flavour (``zimage-tiny``, ``zimage-sharded``) and the tiny model
    in the ollama flavour (``zimage-tiny-ollama``)."""
    from imgpack.packager.create import create_model
    from imgpack.store.store import Store

    store = Store.open(tmp_path_factory.mktemp("runtime") / "store")
    create_model(store, "zimage-tiny:latest", MODELS / "zimage-tiny")
    create_model(store, "zimage-sharded:latest", MODELS / "zimage-sharded")
    create_model(store, "zimage-tiny-ollama:latest", MODELS / "zimage-tiny", fmt="ollama")
    return store


@pytest.fixture
def edit_manifest(runtime_store):
    """Store an edited copy of a model's manifest under a new tag: ``edit(src, dst, fn)`` where ``fn`` mutates
    the manifest document in place. Returns the new reference."""

    def edit(src: str, dst: str, fn) -> str:
        doc = json.loads(runtime_store.get_manifest(src).raw)
        fn(doc)
        runtime_store.put_manifest(dst, json.dumps(doc).encode())
        return dst

    return edit


def rekey_blob(blob: bytes, key: str) -> bytes:
    """Rewrite a tensor blob so its single tensor is keyed ``key`` instead of ``data`` (as ollama's newer
    blobs are), keeping the header padded to a multiple of 8."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    ((_, info),) = header.items()
    text = json.dumps({key: info}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n :]
