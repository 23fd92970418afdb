"""Benchmark: one model in each storage form — what each costs to load, to step and in memory, and what it does
to the image.

    .venv/bin/python bench/forms.py [--forms f32,bf16,int8,int4] [--size 512] [--steps 3]
    .venv/bin/python bench/forms.py --real-size [--forms int8,bf16] [--work DIR]

The medium case is bench/runtime.py's random Z-Image (transformer ~360 M parameters, written in bf16), created
into a store once per form: ``f32`` (``--dtype f32``), ``bf16`` (as written), and ``--quantize`` ``int8``,
``int4``, ``mxfp8``, ``nvfp4``. Each form runs in its own interpreter (peak RSS measured cleanly) from the same
seed noise; PSNR is against the f32 form's image. On CPU a quantized or bf16 model stays resident as stored and
each layer expands to float32 for its matmul (``IMGPACK_RESIDENT=stored`` for bf16, which would otherwise expand at
load when it fits), so the rows show the memory-saving path.

``--real-size`` writes a random model at Z-Image-Turbo's real dimensions (transformer dim 3840, 30 layers + 2+2
refiners, ~6.15 B parameters in float32 like the real checkpoint; a Qwen3-4B text encoder in bf16; the FLUX VAE),
creates it with ``--quantize int8`` and with ``--dtype bf16`` (timing ``create`` and its peak RSS), and runs one
step at 512x512 from each. It needs ~33 GB of disk for the source and ~20 GB for the largest store (the stores
are made and dropped one at a time).

Targets: int8 real-size peak RSS <= 10 GB, bf16 <= 16 GB; int8 s/step <= 1.3x f32 on the medium model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_runtime", HERE / "runtime.py")
assert _spec and _spec.loader
medium = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(medium)

PROMPT, SEED = medium.PROMPT, medium.SEED
GB = 1e9
#: form -> the create options that make it (a cast is a no-op for tensors already in that dtype).
FORMS = {
    "f32": ["--dtype", "f32"],
    "bf16": ["--dtype", "bf16"],
    "int8": ["--quantize", "int8"],
    "int4": ["--quantize", "int4"],
    "mxfp8": ["--quantize", "mxfp8"],
    "nvfp4": ["--quantize", "nvfp4"],
}

# Z-Image-Turbo's published configs (transformer, Qwen3-4B text encoder); the VAE is the medium model's FLUX VAE.
REAL_TRANSFORMER = {
    **medium.TRANSFORMER,
    "dim": 3840, "n_layers": 30, "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "cap_feat_dim": 2560,
}
REAL_TEXT_ENCODER = {
    **medium.TEXT_ENCODER,
    "hidden_size": 2560, "intermediate_size": 9728, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_hidden_layers": 36, "vocab_size": 151936,
}


# -- the real-size model --------------------------------------------------------------------------------------


def real_shapes() -> dict[str, dict[str, list[int]]]:
    """Checkpoint key -> shape per component, from the architecture derivation conformance and the runtime use."""
    from imgpack.architectures import zimage

    configs = {"transformer/config.json": REAL_TRANSFORMER, "text_encoder/config.json": REAL_TEXT_ENCODER,
               "vae/config.json": medium.VAE}
    expectation = zimage.expected_tensors(configs)
    out: dict[str, dict[str, list[int]]] = {"text_encoder": {}, "transformer": {}, "vae": {}}
    for name, shape in {**expectation.required, **expectation.optional}.items():
        component, key = name.split("/", 1)
        if key != "lm_head.weight":  # tied to the embeddings
            out[component][key] = shape
    return out


def write_random(path: Path, shapes: dict[str, list[int]], dtype: str, rng: np.random.Generator) -> int:
    """Stream random tensors (scaled like bench/runtime.py's, so activations stay finite) into one file."""
    itemsize = {"F32": 4, "BF16": 2}[dtype]
    header: dict[str, dict] = {}
    offset = 0
    for key in sorted(shapes):
        nbytes = math.prod(shapes[key]) * itemsize
        header[key] = {"dtype": dtype, "shape": shapes[key], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for key in sorted(shapes):
            array = medium.random_tensor(rng, key, shapes[key])
            f.write(array.tobytes() if dtype == "F32" else medium.to_bf16_bytes(array))
    return offset


def write_sharded(directory: Path, stem: str, shapes: dict[str, list[int]], shards: int, dtype: str,
                  rng: np.random.Generator) -> None:
    """Shards with an index file, as the real repository has them."""
    names = sorted(shapes)
    per = math.ceil(len(names) / shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        total += write_random(directory / file, {n: shapes[n] for n in part}, dtype, rng)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_real_model(directory: Path) -> dict[str, int]:
    """Write the real-size random model; returns parameter counts per component."""
    rng = np.random.default_rng(0)
    shapes = real_shapes()
    configs = {"text_encoder": REAL_TEXT_ENCODER, "transformer": REAL_TRANSFORMER, "vae": medium.VAE}
    for component, config in configs.items():
        (directory / component).mkdir(parents=True)
        (directory / component / "config.json").write_text(json.dumps(config, indent=2))
    write_sharded(directory / "transformer", "diffusion_pytorch_model", shapes["transformer"], 3, "F32", rng)
    write_sharded(directory / "text_encoder", "model", shapes["text_encoder"], 3, "BF16", rng)
    write_random(directory / "vae" / "diffusion_pytorch_model.safetensors", shapes["vae"], "BF16", rng)
    (directory / "scheduler").mkdir()
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(medium.SCHEDULER, indent=2))
    shutil.copytree(medium.TOKENIZER_SOURCE, directory / "tokenizer")
    (directory / "model_index.json").write_text(json.dumps(medium.MODEL_INDEX, indent=2))
    return {c: sum(math.prod(s) for s in shapes[c].values()) for c in shapes}


# -- workers (each in a fresh interpreter) -----------------------------------------------------------------------


def create_worker(store: str, ref: str, source: str, options: list[str]) -> None:
    """``imgpack create`` in-process, so its own peak RSS is what is reported."""
    import resource

    from imgpack.cli.main import main as cli

    start = time.perf_counter()
    code = cli(["--store", store, "-q", "create", ref, source, *options])
    if code:
        sys.exit(code)
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - start,
                                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def run_worker(store: str, ref: str, size: int, steps: int, out: str) -> None:
    """One generation through the public API, one-shot as ``imgpack run`` does it."""
    import resource

    from imgpack.runtime import open_pipeline
    from imgpack.runtime.common.pipeline import GenerationRequest, Image, Stage, Step
    from imgpack.store.store import Store

    loads: dict[str, float] = {}
    forms: dict[str, str] = {}

    def log(message: str) -> None:
        if message.startswith("loaded "):  # "loaded NAME in 1.23s (FORM)"
            _, name, _, seconds, form = message.split(" ", 4)
            loads[name], forms[name] = float(seconds.rstrip("s")), form.strip("()")

    start = time.perf_counter()
    model = open_pipeline(Store.open(store), ref, log=log, keep_loaded=False)
    request = GenerationRequest(PROMPT, size, size, steps=steps, seed=SEED)
    peak_plan = model.plan_memory(request)
    step_times: list[float] = []
    first_step = 0.0
    for event in model.generate(request):
        if isinstance(event, Stage) and event.name == "denoise" and not first_step:
            first_step = time.perf_counter() - start
        elif isinstance(event, Step):
            step_times.append(event.seconds)
        elif isinstance(event, Image):
            np.save(out, event.pixels)
    print("RESULT " + json.dumps({
        "loads": loads, "forms": forms, "first_step": first_step, "step_times": step_times,
        "wall": time.perf_counter() - start, "planned_peak": peak_plan,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


def in_subprocess(args: list[str], what: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"bench: {what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"bench: {what} printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(line[len("RESULT ") :])


# -- the two cases ------------------------------------------------------------------------------------------------


def store_bytes(store: Path, ref: str) -> int:
    from imgpack.store.store import Store

    manifest = Store.open(store).get_manifest(ref)
    return sum(layer.size for layer in manifest.layers)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def resident_env(form: str) -> dict[str, str]:
    return {"IMGPACK_RESIDENT": "stored"} if form != "f32" else {}


def medium_case(work: Path, forms: list[str], size: int, steps: int) -> None:
    source, store = work / "model", work / "store"
    if not (source / "model_index.json").exists():
        print("writing the medium random model ...", flush=True)
        shutil.rmtree(source, ignore_errors=True)
        medium.make_model(source, "zimage")
    rows = {}
    for form in ["f32", *[f for f in forms if f != "f32"]]:
        ref = f"bench:{form}"
        print(f"{form}: create ...", flush=True)
        made = in_subprocess(["--worker", "create", "--store", str(store), "--ref", ref, "--source", str(source),
                              "--", *FORMS[form]], f"create {form}")
        print(f"{form}: run ...", flush=True)
        ran = in_subprocess(["--worker", "run", "--store", str(store), "--ref", ref, "--size", str(size),
                             "--steps", str(steps), "--out", str(work / f"{form}.npy")], f"run {form}",
                            resident_env(form))
        rows[form] = {"create": made, "run": ran, "bytes": store_bytes(store, ref)}
    reference = np.load(work / "f32.npy")
    print()
    print(f"medium Z-Image, {size}x{size}, {steps} steps; load average {os.getloadavg()[0]:.1f} on"
          f" {os.cpu_count()} CPUs")
    print(f"{'form':<7}{'stored GB':>10}{'load s':>8}{'s/step':>8}{'vs f32':>8}{'peak RSS GB':>13}"
          f"{'PSNR dB':>9}  resident")
    f32_step = medium.steady_step(rows["f32"]["run"]["step_times"])
    for form, row in rows.items():
        run = row["run"]
        step = medium.steady_step(run["step_times"])
        quality = psnr(np.load(work / f"{form}.npy"), reference)
        resident = ", ".join(f"{k} {v}" for k, v in run["forms"].items())
        print(f"{form:<7}{row['bytes'] / GB:>10.2f}{sum(run['loads'].values()):>8.2f}{step:>8.2f}"
              f"{step / f32_step:>7.2f}x{run['peak_rss'] / GB:>13.2f}{quality:>9.1f}  {resident}")
    if "int8" in rows:
        ratio = medium.steady_step(rows["int8"]["run"]["step_times"]) / f32_step
        print(f"int8 s/step / f32 s/step = {ratio:.2f}x (target <= 1.3x: {'ok' if ratio <= 1.3 else 'MISSED'})")


def real_size_case(work: Path, forms: list[str], size: int) -> None:
    source, store = work / "real-model", work / "real-store"
    if not (source / "model_index.json").exists():
        print("writing the real-size random model (~33 GB) ...", flush=True)
        shutil.rmtree(source, ignore_errors=True)
        start = time.perf_counter()
        counts = make_real_model(source)
        print("parameters: " + ", ".join(f"{k} {v / 1e9:.2f} B" for k, v in counts.items())
              + f" (written in {time.perf_counter() - start:.0f}s)", flush=True)
    targets = {"int8": 10.0, "bf16": 16.0}
    saved = work / "real-results.json"  # each form's measurements, so a rerun measures only what is missing
    results = json.loads(saved.read_text()) if saved.exists() else {}
    for form in forms:
        if form in results:
            continue
        shutil.rmtree(store, ignore_errors=True)
        print(f"{form}: create {' '.join(FORMS[form])} ...", flush=True)
        made = in_subprocess(["--worker", "create", "--store", str(store), "--ref", f"real:{form}",
                              "--source", str(source), "--", *FORMS[form]], f"create {form}")
        stored = store_bytes(store, f"real:{form}")
        print(f"{form}: run 1 step at {size}x{size} ...", flush=True)
        ran = in_subprocess(["--worker", "run", "--store", str(store), "--ref", f"real:{form}", "--size", str(size),
                             "--steps", "1", "--out", str(work / f"real-{form}.npy")], f"run {form}",
                            resident_env(form))
        results[form] = {"create": made, "stored": stored, "run": ran}
        saved.write_text(json.dumps(results, indent=2))
        shutil.rmtree(store, ignore_errors=True)
    print()
    print(f"real-size Z-Image-Turbo shape, 1 step at {size}x{size}; {os.cpu_count()} CPUs,"
          f" {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GB:.1f} GB RAM")
    print(f"{'form':<6}{'create s':>9}{'create RSS GB':>14}{'stored GB':>10}{'load s':>8}{'s/step':>8}"
          f"{'run s':>8}{'peak RSS GB':>13}  target")
    for form in forms:
        made, stored, ran = results[form]["create"], results[form]["stored"], results[form]["run"]
        target = targets.get(form)
        peak = ran["peak_rss"] / GB
        verdict = "" if target is None else f"<= {target:.0f} GB " + ("ok" if peak <= target else "MISSED")
        print(f"{form:<6}{made['seconds']:>9.0f}{made['peak_rss'] / GB:>14.2f}{stored / GB:>10.2f}"
              f"{sum(ran['loads'].values()):>8.1f}{ran['step_times'][0]:>8.1f}{ran['wall']:>8.0f}{peak:>13.2f}"
              f"  {verdict}")
        print(f"{'':<6}planned peak {ran['planned_peak'] / GB:.2f} GB; loads "
              + ", ".join(f"{k} {v:.1f}s ({ran['forms'][k]})" for k, v in ran["loads"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forms", help="comma-separated, from " + ", ".join(FORMS)
                        + " (default: f32,bf16,int8,int4; with --real-size: int8,bf16)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="denoising steps in the medium case")
    parser.add_argument("--real-size", action="store_true", help="the real-dimension model instead of the medium")
    parser.add_argument("--work", help="working directory, kept (default: a temp dir, removed afterwards)")
    parser.add_argument("--worker", choices=["create", "run"], help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--ref", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("options", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "create":
        create_worker(args.store, args.ref, args.source, args.options)
        return
    if args.worker == "run":
        run_worker(args.store, args.ref, args.size, args.steps, args.out)
        return
    forms = (args.forms or ("int8,bf16" if args.real_size else "f32,bf16,int8,int4")).split(",")
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        parser.error(f"--forms: unknown {', '.join(unknown)}; choose from {', '.join(FORMS)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="imgpack-forms-"))
    try:
        if args.real_size:
            real_size_case(work, forms, args.size)
        else:
            medium_case(work, forms, args.size, args.steps)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
