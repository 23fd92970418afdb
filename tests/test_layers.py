"""Dependencies point one way: each package imports only from packages below it (ARCHITECTURE.md's layers).

Read from the source with ``ast`` — every import, including the lazy ones inside functions — so a cycle or an
upward import cannot hide behind a function-level ``import``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Lower rank = lower layer. Packages of one rank never import each other.
RANK = {
    "schemas": 0,
    "architectures": 1, "store": 1, "signing": 1,
    "registry": 2,
    "conformance": 3, "runtime": 3,
    "packager": 4,
    "server": 5,
    "cli": 6,
}
#: Deliberate exceptions, each with its reason.
ALLOWED = {
    # create --quantize packs with MLX's own quantizer, loaded only when quantizing.
    ("packager", "runtime"),
}


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imgpack subpackage, line) for every absolute ``imgpack.*`` import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "imgpack" and len(parts) > 1:
                found.append((parts[1], node.lineno))
    return found


def sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "vectors" not in p.relative_to(ROOT).parts)


def test_every_package_has_a_rank() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in ("tests", "bench")}
    assert packages == set(RANK)


@pytest.mark.parametrize("package", sorted(RANK))
def test_imports_point_down(package: str) -> None:
    upward = []
    for path in sources(package):
        for target, line in imports_of(path):
            assert target in RANK, f"{path.relative_to(ROOT)}:{line} imports unknown imgpack.{target}"
            if target != package and RANK[target] >= RANK[package] and (package, target) not in ALLOWED:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports imgpack.{target}")
    assert not upward, f"{package} (rank {RANK[package]}) imports from its level or above:\n" + "\n".join(upward)


def test_the_runtime_never_imports_the_packager() -> None:
    """A machine that only runs models needs no create-time code (and the reverse exception stays one-way)."""
    for path in sources("runtime"):
        assert "packager" not in {t for t, _ in imports_of(path)}, path
