"""Benchmark ``imgpack create`` against ``cp -r`` and ``sha256sum`` of the same model, in one run.

    python bench/pack.py [--workdir DIR] [--scale 1.0] [--repeat 2]

Makes (or reuses) the Z-Image-shaped synthetic model from bench/synthetic.py (~1,150 tensors, ~1.1 GB), warms
the page cache so every contender reads from memory, then times each command in a subprocess (best of
--repeat) and reads its peak RSS from wait4(). Targets: create <= 1.5x cp -r, re-create of an unchanged
directory <= 0.2x cp -r, peak RSS <= 300 MB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import make_model  # noqa: E402


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; returns (wall seconds, peak RSS in MB).

    Peak RSS comes from GNU time when present: wait4's ru_maxrss would also count the Python parent's pages
    that the forked child held before exec.
    """
    gnu_time = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    with tempfile.NamedTemporaryFile("r") as rss_file:
        wrapped = [gnu_time, "-f", "%M", "-o", rss_file.name, *cmd] if gnu_time else cmd
        start = time.perf_counter()
        proc = subprocess.run(wrapped, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"command failed: {' '.join(cmd)}")
        text = rss_file.read().strip().splitlines()
    rss = float(text[-1]) / 1024 if gnu_time and text else float("nan")
    return wall, rss


def warm(directory: Path) -> int:
    total = 0
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while chunk := f.read(16 << 20):
                    total += len(chunk)
    return total


def _fresh(target: Path) -> None:
    """Remove the previous run's output and flush dirty pages, so each run starts from the same state."""
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(["sync"], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description="imgpack create vs cp -r vs sha256sum")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the model and stores")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="imgpack-bench-pack-"))
    model = work / "model"
    if not (model / "model_index.json").exists():
        print(f"writing synthetic model to {model} ...", flush=True)
        make_model(model, args.scale)
    files = [str(p) for p in sorted(model.rglob("*")) if p.is_file()]
    size = warm(model)
    n_tensors = sum(1 for _ in model.rglob("*.safetensors"))
    imgpack = [sys.executable, "-m", "imgpack.cli.main"]
    print(f"model: {size / 1e9:.2f} GB in {len(files)} files ({n_tensors} safetensors files)")

    store = work / "store"
    contenders = {
        "cp -r": (lambda: _fresh(work / "copy"), ["cp", "-r", str(model), str(work / "copy")]),
        "sha256sum (all files)": (lambda: None, ["sha256sum", *files]),
        "imgpack create (empty store)": (lambda: _fresh(store),
                                         [*imgpack, "--store", str(store), "create", "bench:fresh", str(model)]),
        "imgpack create (unchanged dir)": (lambda: None,
                                           [*imgpack, "--store", str(store), "create", "bench:fresh", str(model)]),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(args.repeat):  # interleaved, so page-cache and writeback state hit every contender alike
        for name, (prepare, cmd) in contenders.items():
            prepare()
            results[name].append(timed(cmd))
    best: dict[str, tuple[float, float]] = {}
    for name, runs in results.items():
        wall, rss = min(r[0] for r in runs), max(r[1] for r in runs)
        best[name] = (wall, rss)
        print(f"  {name:<34} {wall:7.2f} s   {size / wall / 1e6:7.0f} MB/s   peak RSS {rss:6.0f} MB", flush=True)
    cp = best["cp -r"][0]
    sha = best["sha256sum (all files)"][0]
    create, create_rss = best["imgpack create (empty store)"]
    recreate, recreate_rss = best["imgpack create (unchanged dir)"]
    shutil.rmtree(work / "copy", ignore_errors=True)
    print()
    print(f"create / cp -r          = {create / cp:5.2f}x   (target <= 1.5x)")
    print(f"re-create / cp -r       = {recreate / cp:5.2f}x   (target <= 0.2x)")
    print(f"create / sha256sum      = {create / sha:5.2f}x")
    print(f"peak RSS create         = {create_rss:5.0f} MB  (target <= 300 MB); re-create {recreate_rss:.0f} MB")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
