# Writes the diffusers reference data for the MLX runtime's parity tests into tests/reference/.
#
# Reference environment (outside the repo, never needed by CI):
#   python 3.11.7, torch==2.13.0+cpu, diffusers==0.42.1, transformers==5.23.0, tokenizers==0.23.3,
#   safetensors==0.8.0, numpy==2.4.6, pillow==13.0.0
#
#   /work/refenv/bin/python tests/models/make_reference.py
#
# Every value is captured from diffusers' own ZImagePipeline in float32 through hooks around
# its components; nothing here re-implements the pipeline.
"""Run ZImagePipeline on the committed tiny models and save every intermediate as .npz."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
REFERENCE = HERE.parent / "reference"


@dataclass(frozen=True)
class Case:
    model: str
    name: str
    prompt: str
    width: int
    height: int
    seed: int
    steps: int
    guidance: float
    negative: str | None = None


FOX = "a red fox in the snow"
CASES = [
    Case("zimage-tiny", "square", FOX, 64, 64, 42, 8, 0.0),
    Case("zimage-tiny", "nonsquare", FOX, 96, 64, 7, 8, 0.0),
    Case("zimage-tiny", "cfg", "a lighthouse at dusk", 64, 64, 3, 4, 3.0, "blurry, low quality"),
    Case("zimage-sharded", "square", FOX, 64, 64, 42, 8, 0.0),
]
MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline.__call__ default


def initial_noise(seed: int, height: int, width: int) -> np.ndarray:
    """The initial latents every case uses, reproducible without torch."""
    return np.random.default_rng(seed).standard_normal((1, 16, height // 8, width // 8), dtype=np.float32)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez-compatible archive with fixed timestamps, so re-runs give identical bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            array = np.asarray(arrays[key])  # not ascontiguousarray: it turns 0-d strings into 1-d
            np.lib.format.write_array(buf, array if array.flags.c_contiguous else array.copy(), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


class Recorder:
    """Hooks on the pipeline's components that keep what the pipeline hands them."""

    def __init__(self, pipe) -> None:
        self.text_calls: list[dict] = []
        self.transformer_calls: list[dict] = []
        self.vae_calls: list[dict] = []
        self.step_latents: list[np.ndarray] = []
        self.handles = [
            pipe.text_encoder.register_forward_hook(self._text, with_kwargs=True),
            pipe.transformer.register_forward_hook(self._transformer, with_kwargs=True),
        ]
        self._vae = pipe.vae
        self._vae_decode = pipe.vae.decode
        pipe.vae.decode = self._decode

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self._vae.decode = self._vae_decode

    def _text(self, module, args, kwargs, output) -> None:
        self.text_calls.append(
            {
                "input_ids": kwargs["input_ids"].cpu().numpy(),
                "attention_mask": kwargs["attention_mask"].cpu().numpy(),
                "hidden_states": [f32(h) for h in output.hidden_states],
                "last_hidden_state": f32(output.last_hidden_state),
            }
        )

    def _transformer(self, module, args, kwargs, output) -> None:
        x, t, cap = args[:3]
        self.transformer_calls.append(
            {
                "x": np.stack([f32(xi) for xi in x]),
                "t": f32(t),
                "cap": [f32(c) for c in cap],
                "out": np.stack([f32(o) for o in output[0]]),
            }
        )

    def _decode(self, z, *args, **kwargs):
        result = self._vae_decode(z, *args, **kwargs)
        sample = result[0] if isinstance(result, tuple) else result.sample
        self.vae_calls.append({"z": f32(z), "sample": f32(sample)})
        return result

    def on_step_end(self, pipe, i, t, callback_kwargs):
        self.step_latents.append(f32(callback_kwargs["latents"]))
        return callback_kwargs


def run_case(pipe, case: Case) -> dict[str, np.ndarray]:
    noise = initial_noise(case.seed, case.height, case.width)
    rec = Recorder(pipe)
    try:
        image = pipe(
            prompt=case.prompt,
            negative_prompt=case.negative,
            height=case.height,
            width=case.width,
            num_inference_steps=case.steps,
            guidance_scale=case.guidance,
            latents=torch.from_numpy(noise.copy()),
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            output_type="pil",
            callback_on_step_end=rec.on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        ).images[0]
    finally:
        rec.close()

    cfg = case.guidance > 0
    assert len(rec.text_calls) == (2 if cfg else 1), len(rec.text_calls)
    assert len(rec.transformer_calls) == case.steps
    assert len(rec.vae_calls) == 1
    tok = pipe.tokenizer

    out: dict[str, np.ndarray] = {}
    labels = [("", case.prompt)] + ([("negative_", case.negative or "")] if cfg else [])
    for (prefix, text), call in zip(labels, rec.text_calls, strict=True):
        templated = tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        mask = call["attention_mask"].astype(bool)
        hidden = np.stack(call["hidden_states"])[:, 0][:, mask[0]]
        out[f"{prefix}prompt_text"] = np.array(templated)
        out[f"{prefix}input_ids"] = call["input_ids"].astype(np.int64)
        out[f"{prefix}attention_mask"] = call["attention_mask"].astype(np.int64)
        out[f"{prefix}text_hidden_states"] = hidden
        out[f"{prefix}prompt_embeds"] = hidden[-2]

    # the scheduler keeps the schedule of the run that just finished
    out["sigmas"] = f32(pipe.scheduler.sigmas)
    out["timesteps"] = f32(pipe.scheduler.timesteps)
    out["initial_latents"] = noise

    first = rec.transformer_calls[0]
    out["transformer_in_latents"] = first["x"]
    out["transformer_in_timestep"] = first["t"]
    out["transformer_in_caption"] = first["cap"][0]
    if cfg:
        out["transformer_in_negative_caption"] = first["cap"][1]
    out["transformer_out"] = first["out"]
    out["transformer_timesteps"] = np.concatenate([c["t"][:1] for c in rec.transformer_calls])
    out["step_latents"] = np.stack(rec.step_latents)
    out["final_latents"] = rec.step_latents[-1]
    out["vae_in"] = rec.vae_calls[0]["z"]
    out["vae_out"] = rec.vae_calls[0]["sample"]
    out["image"] = np.asarray(image, dtype=np.uint8)
    out["params"] = np.array(
        json.dumps(
            {
                "prompt": case.prompt,
                "negative_prompt": case.negative,
                "width": case.width,
                "height": case.height,
                "seed": case.seed,
                "num_inference_steps": case.steps,
                "guidance_scale": case.guidance,
                "max_sequence_length": MAX_SEQUENCE_LENGTH,
            },
            sort_keys=True,
        )
    )
    check_case(pipe, case, out, rec)
    return out


def check_case(pipe, case: Case, out: dict[str, np.ndarray], rec: Recorder) -> None:
    """Cross-check the captured values against each other so the README's claims hold."""
    cfg = case.guidance > 0
    # caption features handed to the transformer are exactly hidden_states[-2] of the valid tokens
    assert np.array_equal(out["transformer_in_caption"], out["prompt_embeds"])
    if cfg:
        assert np.array_equal(out["transformer_in_negative_caption"], out["negative_prompt_embeds"])
    # step-0 inputs: the initial noise, with a frame axis; timestep (1000 - t) / 1000
    batch = 2 if cfg else 1
    assert out["transformer_in_latents"].shape == (batch, 16, 1, case.height // 8, case.width // 8)
    for b in range(batch):
        assert np.array_equal(out["transformer_in_latents"][b, :, 0], out["initial_latents"][0])
    expected_t = (1000.0 - out["timesteps"]) / 1000.0
    assert np.allclose(out["transformer_timesteps"], expected_t.astype(np.float32), rtol=0, atol=1e-7)
    # sigmas: linspace(1, 1/n, n), static shift 3, terminal 0; timesteps = 1000 * sigma
    raw = np.linspace(1.0, 1.0 / case.steps, case.steps)
    shifted = 3.0 * raw / (1.0 + 2.0 * raw)
    assert np.allclose(out["sigmas"][:-1], shifted, atol=1e-6) and out["sigmas"][-1] == 0.0
    assert np.allclose(out["timesteps"], out["sigmas"][:-1] * 1000.0, atol=1e-3)
    # Euler step: x1 = x0 + (s1 - s0) * noise_pred with noise_pred = -(model output), CFG pos + g(pos - neg)
    pos = out["transformer_out"][0, :, 0]
    pred = pos + case.guidance * (pos - out["transformer_out"][1, :, 0]) if cfg else pos
    x1 = out["initial_latents"][0] + (out["sigmas"][1] - out["sigmas"][0]) * (-pred)
    assert np.allclose(out["step_latents"][0, 0], x1, atol=1e-5), np.abs(out["step_latents"][0, 0] - x1).max()
    # the VAE sees latents / scaling_factor + shift_factor
    vc = pipe.vae.config
    assert np.allclose(out["vae_in"], out["final_latents"] / vc.scaling_factor + vc.shift_factor, atol=1e-6)
    # image = round(clamp(vae_out / 2 + 0.5, 0, 1) * 255), HWC
    img = np.clip(out["vae_out"][0] / 2 + 0.5, 0, 1).transpose(1, 2, 0)
    assert np.array_equal((img * 255).round().astype(np.uint8), out["image"])
    # batch-of-2 CFG forward equals two batch-of-1 forwards (no cross-talk between prompts)
    if cfg:
        x = torch.from_numpy(out["transformer_in_latents"])
        t = torch.from_numpy(out["transformer_in_timestep"])
        with torch.no_grad():
            for b, key in enumerate(["transformer_in_caption", "transformer_in_negative_caption"]):
                single = pipe.transformer([x[b]], t[b : b + 1], [torch.from_numpy(out[key])], return_dict=False)[0]
                assert np.allclose(single[0].numpy(), out["transformer_out"][b], atol=1e-5)
    # the text encoder's last hidden state is the final RMSNorm of the last layer's output
    assert len(rec.text_calls[0]["hidden_states"]) == pipe.text_encoder.config.num_hidden_layers + 1


def main() -> None:
    from diffusers import ZImagePipeline

    torch.use_deterministic_algorithms(True)
    torch.set_grad_enabled(False)
    pipes = {}
    summary = []
    for case in CASES:
        if case.model not in pipes:
            pipe = ZImagePipeline.from_pretrained(str(HERE / case.model), dtype=torch.float32)
            pipe.to(torch.float32)
            pipe.set_progress_bar_config(disable=True)
            pipes[case.model] = pipe
        arrays = run_case(pipes[case.model], case)
        target = REFERENCE / case.model / f"{case.name}.npz"
        save_npz(target, arrays)
        Image.fromarray(arrays["image"]).save(target.with_suffix(".png"), optimize=False)
        summary.append((target, arrays))
        print(f"{target.relative_to(REFERENCE.parent)}: {target.stat().st_size} bytes")
        for key in sorted(arrays):
            a = arrays[key]
            print(f"  {key:34s} {str(a.dtype):8s} {a.shape}")
    lines = []
    for path in sorted(p for p in REFERENCE.rglob("*") if p.is_file() and p.suffix in (".npz", ".png")):
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(REFERENCE).as_posix()}")
    (REFERENCE / "SHA256SUMS").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
