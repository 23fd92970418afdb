"""imgpack.runtime: run Z-Image models with MLX straight from a stored manifest.

Importing this package imports nothing heavy, so ``imgpack --help`` works without the optional runtime extra.
The MLX modules all import ``mx``/``nn`` from :mod:`imgpack.runtime.backend`, which first loads a fast BLAS on
Linux. In-process use (what an HTTP server would call)::

    from imgpack.runtime.zimage.pipeline import GenerationRequest, Image, Step, ZImageModel, generate

    model = ZImageModel.open(store, "zimage:turbo")      # configs + tokenizer; weights load on first use
    model.load()                                          # or let generate() load lazily
    for event in generate(model, GenerationRequest("a fox", 1024, 768, seed=7), cancel=threading.Event()):
        if isinstance(event, Step): ...                   # progress, one per denoising step
        elif isinstance(event, Image): png = event.png()  # the result, last
"""
