"""Shared fixtures: temp stores, the committed tiny models, and a CLI runner.

Area-specific fixtures live in fixtures_<area>.py modules, registered below so every test module sees them.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
MODELS = TESTS / "models"
TINY = MODELS / "zimage-tiny"
SHARDED = MODELS / "zimage-sharded"

sys.path.insert(0, str(TESTS))
pytest_plugins = [
    name
    for name in ("fixtures_registry", "fixtures_runtime", "fixtures_server")
    if importlib.util.find_spec(name) is not None
]


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_dir: Path):
    from imgpack.store.store import Store

    return Store.open(store_dir)


@pytest.fixture
def tiny_model() -> Path:
    return TINY


@pytest.fixture
def sharded_model() -> Path:
    return SHARDED


@pytest.fixture
def model_copy(tmp_path: Path):
    """A writable copy of a committed model, for tests that corrupt or edit it."""

    def make(source: Path = TINY, name: str = "model") -> Path:
        target = tmp_path / name
        shutil.copytree(source, target)
        return target

    return make


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys, store_dir: Path):
    """Run ``imgpack`` in-process against the test's store; returns exit code and captured output."""
    from imgpack.cli.main import main

    def run(*argv: str, store: Path | None = None) -> CliResult:
        capsys.readouterr()
        code = main(["--store", str(store or store_dir), *argv])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
