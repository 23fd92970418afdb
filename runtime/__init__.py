"""imgpack.runtime: run image models with MLX straight from where they are stored.

Importing this package imports nothing heavy, so ``imgpack --help`` works without the optional runtime extra.
The MLX modules all import ``mx``/``nn`` from :mod:`imgpack.runtime.backend`, which first loads a fast BLAS on
Linux. Each architecture is a subpackage (``zimage``, ``flux2``) over the shared parts in ``common``; which one
runs a model is :mod:`imgpack.architectures`' registry's answer for its ``model_index.json``. In-process use
(what the server does)::

    from imgpack.runtime import open_pipeline
    from imgpack.runtime.common.pipeline import GenerationRequest, Image, Step

    model = open_pipeline(store, "zimage:turbo")          # configs + tokenizer; weights load on first use
    for event in model.generate(GenerationRequest("a fox", 1024, 768, seed=7), cancel=threading.Event()):
        if isinstance(event, Step): ...                   # progress, one per denoising step
        elif isinstance(event, Image): png = event.png()  # the result, last
"""

from __future__ import annotations

import importlib
import os

#: How long OpenBLAS' idle threads spin before sleeping, as a power of two of CPU cycles (OpenBLAS' default 28 is
#: ~0.1 s). The runtime's CPU work alternates between MLX's sgemms (one OpenBLAS) and numpy's kernels (numpy's
#: own OpenBLAS, and worker threads): threads left spinning by one starve the other (MLX's matmuls measured
#: 20-30% slower right after numpy's). Set here, before either library starts its threads; a value the user set
#: is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imgpack.runtime.common.loader import ModelSource
    from imgpack.runtime.common.pipeline import Pipeline
    from imgpack.store.store import Store


def pipeline_for(source: ModelSource, log: Callable[[str], None] | None = None, keep_loaded: bool = True,
                 force: bool = False) -> Pipeline:
    """The pipeline that runs ``source``'s architecture (by ``model_index.json``'s class name)."""
    from imgpack import architectures
    from imgpack.schemas.config import architecture_of
    from imgpack.schemas.errors import ImgpackError

    name = architecture_of(source.model_index)
    found = architectures.find(name)
    if found is None:
        raise ImgpackError(f"{source.where}: model_index.json names {name!r}; imgpack runs"
                           f" {', '.join(architectures.known_names())}")
    module, _, cls = found.runtime.partition(":")
    pipeline_cls = getattr(importlib.import_module(module), cls)
    return pipeline_cls(source, log, keep_loaded, force)


def open_pipeline(store: Store, ref: str, log: Callable[[str], None] | None = None, keep_loaded: bool = True,
                  force: bool = False) -> Pipeline:
    """Open a stored model's pipeline; weights load on first use."""
    from imgpack.runtime.common.loader import ModelSource

    return pipeline_for(ModelSource.open(store, ref), log, keep_loaded, force)


def open_directory(path: str | Path, log: Callable[[str], None] | None = None, keep_loaded: bool = True,
                   force: bool = False) -> Pipeline:
    """Open a model laid out as title-named files (an ``oras pull`` directory, a Kubernetes image volume)."""
    from imgpack.runtime.common.loader import ModelSource

    return pipeline_for(ModelSource.from_directory(Path(path)), log, keep_loaded, force)


__all__ = ["open_directory", "open_pipeline", "pipeline_for"]
