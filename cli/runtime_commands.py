"""``imgpack run`` and ``imgpack doctor``.

MLX is an optional extra, so nothing here imports it at module level: ``imgpack --help`` works without it, and
the handlers turn a missing runtime into a clear "pip install 'imgpack[runtime]'" error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from imgpack.architectures.base import GenerationDefaults, check_size, parse_size
from imgpack.schemas.errors import ImgpackError, UsageError

#: What any architecture accepts, checked before a model is opened; each model checks its own rules again.
GENERIC_SIZES = GenerationDefaults(steps=1, guidance=0.0, size_multiple=16, min_side=16, max_side=4096)
INSTALL_HINT = "pip install 'imgpack[runtime]'"


def check_run_args(args: argparse.Namespace) -> tuple[int, int, int, Path]:
    """Validate what ``imgpack run`` was given (in-process or --host alike); returns (width, height, seed, output)."""
    width, height = parse_size(args.size)
    check_size(width, height, GENERIC_SIZES, allow_any_side=getattr(args, "force", False))
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps: {args.steps} must be at least 1")
    if args.guidance is not None and args.guidance < 0:
        raise UsageError(f"--guidance: {args.guidance} must not be negative")
    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise UsageError(f"--seed: {args.seed} must be a non-negative integer below 2**64")
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    output = Path(args.output) if args.output else default_output(seed)
    if output.suffix.lower() != ".png":
        raise UsageError(f"-o: {output} must end in .png")
    if not output.parent.is_dir():
        raise ImgpackError(f"-o: directory {output.parent} does not exist")
    if output.is_dir():
        raise ImgpackError(f"-o: {output} is a directory")
    if not os.access(output.parent, os.W_OK):
        raise ImgpackError(f"-o: cannot write to directory {output.parent}")
    return width, height, seed, output


def _import_runtime() -> None:
    """Import MLX, turning a missing optional dependency into an install hint."""
    try:
        from imgpack.runtime import backend  # noqa: F401 - the import is the check
    except ImportError as e:
        raise ImgpackError(f"the MLX runtime is not available ({e}); install it with: {INSTALL_HINT}") from None


def default_output(seed: int) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path.cwd() / f"imgpack-{stamp}-{seed}.png"
    n = 1
    while path.exists():  # never overwrite an earlier image from the same second and seed
        path = Path.cwd() / f"imgpack-{stamp}-{seed}-{n}.png"
        n += 1
    return path


def open_image(path: Path) -> None:
    """Show the image with the desktop's viewer; a missing viewer is a warning, not a failure."""
    if sys.platform == "darwin":
        command = ["open", str(path)]
    elif os.name == "nt":
        os.startfile(str(path))  # type: ignore[attr-defined]
        return
    else:
        viewer = shutil.which("xdg-open")
        if viewer is None:
            print(f"imgpack: warning: no image viewer (xdg-open) found; the image is at {path}", file=sys.stderr)
            return
        command = [viewer, str(path)]
    subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _require_complete(store: Any, ref: str) -> None:
    """A partially pulled model cannot run: name the components it lacks, before anything loads."""
    from imgpack.schemas.errors import NotFoundError

    manifest = store.get_manifest(ref)
    entry = next((e for e in store.entries() if e.digest == manifest.digest and e.partial), None)
    if entry is None:
        return
    missing = sorted({t.component or "." for t in manifest.tensors if not store.has_blob(t.digest, t.size)})
    if missing:
        raise NotFoundError(f"{ref}: pulled in part ({entry.partial}); missing components: {', '.join(missing)};"
                            f" run 'imgpack pull {ref}' to fetch the rest")


def cmd_run(args: argparse.Namespace) -> int:
    width, height, seed, output = check_run_args(args)
    quiet = getattr(args, "quiet", False)
    verbose = args.verbose and not quiet
    as_json = getattr(args, "json", False)

    def say(message: str) -> None:
        if not quiet and not as_json:
            print(message, flush=True)

    def log(message: str) -> None:
        if verbose:
            print(f"  {message}", file=sys.stderr, flush=True)

    _import_runtime()
    from imgpack.cli.ui import emit_json
    from imgpack.runtime import backend, open_directory, open_pipeline
    from imgpack.runtime.common.pipeline import GenerationRequest, Image, Stage, Step, save_png
    from imgpack.store.store import Store

    if verbose:
        precision = "float32 (weights resident as the memory plan says)" if backend.is_cpu() else "the weights' dtype"
        log(f"mlx {getattr(backend.mx, '__version__', '?')} on {backend.device_name()}, computing in {precision}")
        log(f"BLAS: {backend.BLAS.describe()}; numpy's (the CPU kernels'): {numpy_blas_summary()}")
    if args.ref.startswith(("/", "./", "../", "~")) and Path(args.ref).expanduser().is_dir():
        model = open_directory(Path(args.ref).expanduser(), log=log, keep_loaded=False, force=args.force)
    else:
        store = Store.open(args.store)
        _require_complete(store, args.ref)
        model = open_pipeline(store, args.ref, log=log, keep_loaded=False, force=args.force)
    request = GenerationRequest(prompt=args.prompt, width=width, height=height, steps=args.steps, seed=seed,
                                guidance=args.guidance, negative=args.negative or "")
    request = model.resolve(request)
    model.plan_memory(request)
    log(f"{model.architecture.name}: {request.steps} steps, guidance {request.guidance}, seed {seed}")
    if as_json:
        emit_json({"event": "started", "operation": "run", "model": args.ref, "seed": seed, "steps": request.steps,
                   "width": request.width, "height": request.height})
    image = None
    for event in model.generate(request):
        if isinstance(event, Stage):
            log(event.name)
        elif isinstance(event, Step):
            say(f"Generating: step {event.index}/{event.total}")
            if as_json:
                emit_json({"event": "step", "step": event.index, "total": event.total,
                           "seconds": round(event.seconds, 3)})
            log(f"step {event.index} took {event.seconds:.2f}s")
        elif isinstance(event, Image):
            image = event
    assert image is not None
    save_png(image.pixels, output)
    say(f"Generated in {image.seconds:.1f} s with seed {seed}")
    say(f"Saved {output}")
    if as_json:
        emit_json({"event": "saved", "path": str(output), "seed": seed, "seconds": round(image.seconds, 3)})
    if args.open:
        open_image(output)
    return 0


def numpy_blas_summary() -> str:
    """numpy's OpenBLAS kernels (the CPU kernels' sgemm), and who chose them."""
    from imgpack.runtime.cpu_pool import numpy_blas_core

    core = numpy_blas_core()
    if core is None:
        return "not an OpenBLAS (the CPU kernels run their sgemms in the caller, with its threads)"
    forced = os.environ.get("OPENBLAS_CORETYPE")
    return f"{core} kernels" + (f" (OPENBLAS_CORETYPE={forced})" if forced else "")


def cmd_doctor(args: argparse.Namespace) -> int:
    print(f"{'python':<15}{platform.python_version()} ({sys.executable})")
    import importlib.metadata

    for dist in ("mlx", "mlx-cpu", "mlx-metal", "mlx-cuda-12", "mlx-cuda-13", "tokenizers", "pillow", "cmeel-openblas"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            if dist.startswith("mlx-"):
                continue  # only the backends that are installed
            version = "not installed"
        print(f"{dist:<15}{version}")
    try:
        from imgpack.runtime import backend
    except ImportError as e:
        raise ImgpackError(f"the MLX runtime is not available ({e}); install it with: {INSTALL_HINT}") from None
    print(f"{'device':<15}{backend.device_name()}")
    print(f"{'accelerators':<15}{backend.accelerators()}")
    print(f"{'BLAS':<15}{backend.BLAS.describe()}")
    for note in backend.BLAS.notes if backend.BLAS.library else []:
        print(f"{'':<15}{note}")
    print(f"{'numpy BLAS':<15}{numpy_blas_summary()}")
    print(f"{'memory':<15}{backend.available_memory() / 1024**3:.1f} GB available")
    gflops = backend.measure_matmul_gflops(args.matmul_size)
    print(f"{'matmul':<15}{gflops:.1f} GFLOP/s (float32 {args.matmul_size}x{args.matmul_size})")
    if backend.is_cpu() and platform.system() == "Linux" and not backend.BLAS.library:
        print("warning: MLX uses its slow reference BLAS; install an OpenBLAS that runs on this CPU"
              f" ({INSTALL_HINT}, or Debian/Ubuntu: apt-get install libopenblas0-pthread)")
    return 0


def cmd_run_any(args: argparse.Namespace) -> int:
    """``imgpack run``: in this process, or with ``--host`` on a running server."""
    if args.host:
        from imgpack.cli.server_commands import run_remote

        return run_remote(args)
    return cmd_run(args)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("run", parents=[common], help="generate an image from a stored model with MLX",
                       description="Generate an image from a stored model with MLX (or on a server with --host).")
    p.add_argument("ref", metavar="REF", help="a stored model (pull it first), or a directory of layer files (an"
                   " oras pull, a Kubernetes image volume)")
    p.add_argument("prompt", metavar="PROMPT", help="what to draw")
    p.add_argument("-o", "--output", metavar="FILE", help="PNG to write (default: imgpack-<time>-<seed>.png here)")
    p.add_argument("--size", default="1024x1024", metavar="WxH", help="image size, multiples of 16 (default 1024x1024)")
    p.add_argument("--steps", type=int, metavar="N", help="denoising steps (default: the architecture's, 8 for"
                   " Z-Image-Turbo)")
    p.add_argument("--seed", type=int, metavar="S", help="noise seed; the same seed gives the same image everywhere")
    p.add_argument("--negative", metavar="TEXT", help="negative prompt (used only with --guidance > 0)")
    p.add_argument("--guidance", type=float, metavar="G", help="guidance scale (default: the architecture's; 0 for"
                   " Z-Image-Turbo)")
    p.add_argument("--open", action="store_true", help="show the image when done")
    p.add_argument("-v", "--verbose", action="store_true", help="report device, BLAS, memory and timings")
    p.add_argument("--host", metavar="HOST[:PORT]", help="generate on a running 'imgpack serve' instead of in this"
                   " process")
    p.add_argument("--force", action="store_true", help="run even when the memory check says it will not fit"
                   " (also IMGPACK_MEMORY_CHECK=0), and allow sizes outside the architecture's range")
    p.set_defaults(func=cmd_run_any)

    p = sub.add_parser("doctor", parents=[common], help="check the MLX runtime: versions, device, BLAS and matmul"
                       " speed", description="Check the MLX runtime: versions, device, BLAS and matmul speed.")
    p.add_argument("--matmul-size", type=int, default=2048, metavar="N", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_doctor)
