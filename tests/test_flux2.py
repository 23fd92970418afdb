"""FLUX.2 [klein] runtime parity with diffusers on the committed tiny models (reference data in tests/reference/).

As for Z-Image, each component is compared on the reference's own inputs so a failure points at the component at
fault: token ids exactly, prompt embeddings (all 512 rows), one transformer forward, the sigmas and the VAE decode
within 1e-4 (float32), and the whole pipeline's PNG within 1/255 on at least 99.9 % of pixels. ``flux2-tiny`` is
a distilled checkpoint (text encoder keys with ``model.``, an untied ``lm_head``, all BF16); ``flux2-base`` is a
base one (guidance; bare text encoder keys, sharded, mixed-dtype storage). The architecture tests also build the
real 4B and 9B configs, which go through exactly the same code.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx.core")

from fixtures_runtime import MODELS, load_reference  # noqa: E402

from imgpack.architectures import flux2 as flux2_arch  # noqa: E402
from imgpack.architectures import zimage as zimage_arch  # noqa: E402
from imgpack.runtime import cpu_pool  # noqa: E402
from imgpack.runtime.backend import mx, nn  # noqa: E402
from imgpack.runtime.common import vae_kernels  # noqa: E402
from imgpack.runtime.common.loader import ModelSource, flatten_params, to_mlx_shape  # noqa: E402
from imgpack.runtime.common.qwen3 import Qwen3Config, Qwen3TextEncoder  # noqa: E402
from imgpack.runtime.common.scheduler import compute_empirical_mu  # noqa: E402
from imgpack.runtime.common.tokenizer import render_chat  # noqa: E402
from imgpack.runtime.flux2.pipeline import (  # noqa: E402
    Flux2Model,
    GenerationCancelled,
    GenerationRequest,
    Image,
    Stage,
    Step,
    generate,
    initial_noise,
    run_to_image,
    schedule,
    transformer_time,
)
from imgpack.runtime.flux2.transformer import image_ids, text_ids  # noqa: E402
from imgpack.schemas.errors import ImgpackError, UsageError  # noqa: E402

TOL = 1e-4
CASES = [
    ("flux2-tiny", "square"),
    ("flux2-tiny", "nonsquare"),
    ("flux2-tiny", "unicode"),
    ("flux2-base", "cfg"),
    ("flux2-base", "tall"),
]
CASE_IDS = [f"{m}-{c}" for m, c in CASES]


def request_for(params: dict) -> GenerationRequest:
    return GenerationRequest(
        prompt=params["prompt"],
        width=params["width"],
        height=params["height"],
        steps=params["num_inference_steps"],
        seed=params["seed"],
        guidance=params["guidance_scale"],
    )


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    assert err <= TOL, f"{what}: max abs error {err:.3g} > {TOL}"


def assert_image_matches(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    within = float((diff <= 1).mean())
    assert within >= 0.999, f"only {within:.4%} of pixels within 1/255 (max diff {diff.max()})"


def packed_to_nchw(tokens: np.ndarray, h: int, w: int) -> np.ndarray:
    """(1, h*w, C) packed tokens -> (1, C, h, w), the inverse of diffusers' _pack_latents."""
    return tokens.transpose(0, 2, 1).reshape(1, -1, h, w)


@pytest.fixture(scope="module")
def flux2_store(tmp_path_factory: pytest.TempPathFactory):
    """A store with both FLUX.2 models (OCI flavour) and the tiny one in the ollama flavour."""
    from imgpack.packager.create import create_model
    from imgpack.store.store import Store

    store = Store.open(tmp_path_factory.mktemp("flux2") / "store")
    create_model(store, "flux2-tiny:latest", MODELS / "flux2-tiny")
    create_model(store, "flux2-base:latest", MODELS / "flux2-base")
    create_model(store, "flux2-tiny-ollama:latest", MODELS / "flux2-tiny", fmt="ollama")
    return store


@pytest.fixture(scope="module")
def models(flux2_store):
    cache: dict[str, Flux2Model] = {}

    def get(name: str) -> Flux2Model:
        if name not in cache:
            cache[name] = Flux2Model.open(flux2_store, f"{name}:latest")
        return cache[name]

    return get


def edit(store, src: str, dst: str, fn) -> str:
    """Store an edited copy of a manifest under a new tag; ``fn`` mutates the manifest document in place."""
    doc = json.loads(store.get_manifest(src).raw)
    fn(doc)
    store.put_manifest(dst, json.dumps(doc).encode())
    return dst


# -- parity, component by component ------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "case"), CASES, ids=CASE_IDS)
def test_token_ids_exact(models, model: str, case: str) -> None:
    ref = load_reference(model, case)
    tok = models(model).tokenizer
    prompts = [("", ref.params["prompt"])]
    if ref.params["do_classifier_free_guidance"]:
        prompts.append(("negative_", ""))  # diffusers' klein pipeline always guides against ""
    for prefix, prompt in prompts:
        assert tok.prompt_text(prompt, enable_thinking=False) == ref.text(f"{prefix}prompt_text")
        ids, mask = tok.encode_padded(prompt, 512, enable_thinking=False)
        assert ids == ref.data[f"{prefix}input_ids"][0].tolist()
        assert mask == ref.data[f"{prefix}attention_mask"][0].tolist()


@pytest.mark.parametrize(("model", "case"), CASES, ids=CASE_IDS)
def test_prompt_embedding(models, model: str, case: str) -> None:
    """All 512 rows, the padded ones included: the transformer sees them all."""
    ref = load_reference(model, case)
    m = models(model)
    assert_close(np.array(m.encode_prompt(ref.params["prompt"])), ref.data["prompt_embeds"], "prompt_embeds")
    if ref.params["do_classifier_free_guidance"]:
        assert_close(np.array(m.encode_prompt("")), ref.data["negative_prompt_embeds"], "negative_prompt_embeds")


@pytest.mark.parametrize(("model", "case"), CASES, ids=CASE_IDS)
def test_schedule(models, model: str, case: str) -> None:
    ref = load_reference(model, case)
    steps = ref.params["num_inference_steps"]
    _, _, h, w = ref.data["initial_latents"].shape
    assert compute_empirical_mu(h * w, steps) == float(ref.data["mu"])
    sched = schedule(models(model), steps, h * w)
    assert_close(sched.sigmas, ref.data["sigmas"], "sigmas")
    assert_close(sched.timesteps, ref.data["timesteps"], "timesteps")
    times = np.array([transformer_time(sched, i) for i in range(steps)], np.float32)
    np.testing.assert_array_equal(times, ref.data["transformer_timesteps"])


@pytest.mark.parametrize(
    ("tokens", "steps", "mu", "sigmas"),
    [  # computed by diffusers 0.42.1 with the real klein scheduler config
        (4096, 4, 2.291179894115571, [1.0, 0.9673840403556824, 0.908143937587738, 0.7671999335289001, 0.0]),
        (1024, 4, 2.0306897079499455, [1.0, 0.9580853581428528, 0.8839818835258484, 0.7174965739250183, 0.0]),
        (4096, 50, 2.0233511571292637, [1.0, 0.9973090887069702, 0.9945213794708252, 0.9916315674781799]),
        (5000, 4, 1.30301666, [1.0, 0.9169514775276184, 0.786342203617096, 0.5509238839149475, 0.0]),
    ],
)
def test_schedule_at_real_sizes(models, tokens: int, steps: int, mu: float, sigmas: list[float]) -> None:
    assert compute_empirical_mu(tokens, steps) == pytest.approx(mu, abs=1e-12)
    got = schedule(models("flux2-tiny"), steps, tokens).sigmas[: len(sigmas)]
    np.testing.assert_array_equal(got, np.array(sigmas, np.float32))


@pytest.mark.parametrize(("model", "case"), CASES, ids=CASE_IDS)
def test_position_ids(model: str, case: str) -> None:
    ref = load_reference(model, case)
    _, _, h, w = ref.data["initial_latents"].shape
    np.testing.assert_array_equal(text_ids(512), ref.data["transformer_in_txt_ids"][0])
    np.testing.assert_array_equal(image_ids(h, w), ref.data["transformer_in_img_ids"][0])


@pytest.mark.parametrize(("model", "case"), CASES, ids=CASE_IDS)
def test_transformer_forward(models, model: str, case: str) -> None:
    """Step 0; with guidance the prompt and "" run as one batch of 2 (diffusers runs them one after the other)."""
    ref = load_reference(model, case)
    transformer = models(model).load_transformer()
    context = [ref.data["prompt_embeds"]]
    if ref.params["do_classifier_free_guidance"]:
        context.append(ref.data["negative_prompt_embeds"])
    out = transformer(
        mx.array(ref.data["transformer_in_hidden_states"]),
        mx.array(np.stack(context)),
        float(ref.data["transformer_in_timestep"][0]),
        ref.data["transformer_in_img_ids"][0],
        ref.data["transformer_in_txt_ids"][0],
    )
    assert_close(np.array(out), ref.data["transformer_out"], "transformer_out")


@pytest.mark.parametrize(("model", "case"), CASES, ids=CASE_IDS)
def test_vae_decode(models, model: str, case: str) -> None:
    ref = load_reference(model, case)
    vae = models(model).load_vae()
    _, _, h, w = ref.data["initial_latents"].shape
    packed = mx.array(packed_to_nchw(ref.data["final_latents"], h, w))
    assert_close(np.array(vae.latents_for_decoder(packed)), ref.data["vae_in"], "vae_in (de-normalised, unpatched)")
    out = np.array(vae.decode(mx.array(ref.data["vae_in"]))).transpose(0, 3, 1, 2)
    assert_close(out, ref.data["vae_out"], "vae_out")


@pytest.mark.parametrize(("model", "case"), CASES, ids=CASE_IDS)
def test_seed_noise_is_portable(model: str, case: str) -> None:
    """Seed S is numpy's default_rng(S) in the packed (1, 128, H/16, W/16) shape diffusers prepares."""
    p = load_reference(model, case).params
    noise = initial_noise(p["seed"], 128, p["height"], p["width"], 16)
    assert noise.shape == (1, 128, p["height"] // 16, p["width"] // 16)
    np.testing.assert_array_equal(noise, load_reference(model, case).data["initial_latents"])


@pytest.mark.parametrize(("model", "case"), CASES, ids=CASE_IDS)
def test_full_pipeline_image(models, model: str, case: str) -> None:
    ref = load_reference(model, case)
    request = request_for(ref.params)
    events = list(generate(models(model), request))
    steps = [e for e in events if isinstance(e, Step)]
    assert [(s.index, s.total) for s in steps] == [(i + 1, request.steps) for i in range(request.steps)]
    stages = [e.name for e in events if isinstance(e, Stage) and not e.name.startswith("load ")]
    assert stages == ["encode", "denoise", "decode"]
    image = events[-1]
    assert isinstance(image, Image) and image.pixels.shape == (request.height, request.width, 3)
    assert_image_matches(image.pixels, ref.data["image"])


def test_latents_argument_is_diffusers_latents(models) -> None:
    """``latents=`` takes what diffusers' ``latents=`` takes: the unpacked (1, 128, H/16, W/16) noise."""
    ref = load_reference("flux2-base", "cfg")
    request = request_for(ref.params)
    request.seed = 12345  # ignored when latents are given
    image = run_to_image(models("flux2-base"), request, latents=ref.data["initial_latents"])
    assert_image_matches(image.pixels, ref.data["image"])


# -- guidance ----------------------------------------------------------------------------------------------


def test_guidance_only_for_base_models(models) -> None:
    tiny, base = models("flux2-tiny"), models("flux2-base")
    assert tiny.is_distilled and not base.is_distilled
    assert not tiny.uses_guidance(4.0) and base.uses_guidance(4.0) and not base.uses_guidance(1.0)
    assert (tiny.default_steps, tiny.default_guidance) == (4, 1.0)
    assert (base.default_steps, base.default_guidance) == (50, 4.0)


def test_distilled_model_ignores_guidance(models) -> None:
    """As diffusers: a guidance scale on a step-distilled checkpoint only logs; the image is unchanged (the
    fixture script checked the same in diffusers)."""
    ref = load_reference("flux2-tiny", "square")
    request = request_for(ref.params)
    request.guidance = 4.0
    assert_image_matches(run_to_image(models("flux2-tiny"), request).pixels, ref.data["image"])


# -- storage layouts ---------------------------------------------------------------------------------------


def test_text_encoder_key_layouts(flux2_store) -> None:
    tiny = {t.name for t in flux2_store.get_manifest("flux2-tiny:latest").tensors}
    base = {t.name for t in flux2_store.get_manifest("flux2-base:latest").tensors}
    assert "text_encoder/model.embed_tokens.weight" in tiny and "text_encoder/lm_head.weight" in tiny
    assert "text_encoder/embed_tokens.weight" in base and not any(n.startswith("text_encoder/model.") for n in base)
    layers = flux2_store.get_manifest("flux2-base:latest").tensors
    dtypes = {t.dtype for t in layers if t.name.startswith("transformer/")}
    assert dtypes == {"BF16", "F32"}  # mixed storage: matrices bf16, vectors f32


def test_text_encoder_without_model_prefix(flux2_store) -> None:
    def strip_prefix(doc: dict) -> None:
        for layer in doc["layers"]:
            name = layer.get("name", "")
            if name.startswith("text_encoder/model."):
                layer["name"] = "text_encoder/" + name[len("text_encoder/model.") :]

    ref = load_reference("flux2-tiny", "square")
    stripped = edit(flux2_store, "flux2-tiny:latest", "flux2-noprefix:latest", strip_prefix)
    got = np.array(Flux2Model.open(flux2_store, stripped).encode_prompt(ref.params["prompt"]))
    assert_close(got, ref.data["prompt_embeds"], "prompt_embeds, bare keys")


def test_ollama_flavour_generates_same_image(flux2_store) -> None:
    assert flux2_store.get_manifest("flux2-tiny-ollama:latest").flavour == "ollama"
    ref = load_reference("flux2-tiny", "square")
    image = run_to_image(Flux2Model.open(flux2_store, "flux2-tiny-ollama:latest"), request_for(ref.params))
    assert_image_matches(image.pixels, ref.data["image"])


def test_unused_tensors_may_be_absent(flux2_store) -> None:
    """Text encoder layers past hidden state 27, its final norm (base: layer 27 is read raw) and the VAE
    encoder are never loaded, so a manifest without them still generates the same image."""

    def drop(doc: dict) -> None:
        unused = re.compile(r"text_encoder/(layers\.(27|28)\.|norm\.weight)|vae/(encoder\.|quant_conv\.|bn\.num)")
        doc["layers"] = [layer for layer in doc["layers"] if not unused.match(layer.get("name", ""))]

    ref = load_reference("flux2-base", "tall")
    stripped = edit(flux2_store, "flux2-base:latest", "flux2-stripped:latest", drop)
    assert len(flux2_store.get_manifest(stripped).tensors) < len(flux2_store.get_manifest("flux2-base:latest").tensors)
    image = run_to_image(Flux2Model.open(flux2_store, stripped), request_for(ref.params))
    assert_image_matches(image.pixels, ref.data["image"])


# -- bad input is refused, naming it ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "victim"),
    [
        ("flux2-tiny", "transformer/single_transformer_blocks.1.attn.to_qkv_mlp_proj.weight"),
        ("flux2-tiny", "transformer/transformer_blocks.0.attn.to_out.0.weight"),  # renamed inside the runtime
        ("flux2-tiny", "text_encoder/model.layers.26.mlp.down_proj.weight"),  # the deepest layer read
        ("flux2-tiny", "text_encoder/model.norm.weight"),  # read: hidden state 27 is the last, normed one
        ("flux2-base", "text_encoder/layers.3.self_attn.q_norm.weight"),  # named as the manifest spells it
        ("flux2-base", "vae/bn.running_var"),
        ("flux2-base", "vae/post_quant_conv.weight"),
    ],
)
def test_missing_tensor_is_named(flux2_store, model: str, victim: str) -> None:
    def drop(doc: dict) -> None:
        doc["layers"] = [layer for layer in doc["layers"] if layer.get("name") != victim]

    ref = edit(flux2_store, f"{model}:latest", "flux2-missing:latest", drop)
    with pytest.raises(ImgpackError, match=f"lacks tensor '{re.escape(victim)}', needed by the"):
        Flux2Model.open(flux2_store, ref)


def test_wrong_shape_is_named(flux2_store) -> None:
    victim = "transformer/context_embedder.weight"  # (32, 48)

    def shrink(doc: dict) -> None:
        for layer in doc["layers"]:
            if layer.get("name") == victim:
                layer["shape"] = [layer["shape"][0], layer["shape"][1] // 2]

    ref = edit(flux2_store, "flux2-tiny:latest", "flux2-badshape:latest", shrink)
    with pytest.raises(ImgpackError, match=r"'transformer/context_embedder\.weight' has shape \[32, 24\], but the"
                                           r" transformer config needs \[32, 48\]"):
        Flux2Model.open(flux2_store, ref)


def test_inconsistent_configs_are_named(flux2_store) -> None:
    def widen(doc: dict) -> None:
        for layer in doc["layers"]:
            if layer.get("name") == "transformer/config.json":
                config = json.loads(flux2_store.read_blob(layer["digest"]))
                config["joint_attention_dim"] = 40
                layer["digest"], layer["size"] = flux2_store.put_bytes(json.dumps(config).encode())

    ref = edit(flux2_store, "flux2-tiny:latest", "flux2-badconfig:latest", widen)
    with pytest.raises(ImgpackError, match=r"joint_attention_dim 40 != 3 x text_encoder hidden_size 16"):
        Flux2Model.open(flux2_store, ref)


def test_other_pipelines_are_refused(tmp_path) -> None:
    from imgpack.packager.create import create_model
    from imgpack.store.store import Store

    store = Store.open(tmp_path / "store")
    create_model(store, "zimage:latest", MODELS / "zimage-tiny")
    with pytest.raises(ImgpackError, match=r"names 'ZImagePipeline'; this runs Flux2KleinPipeline"):
        Flux2Model.open(store, "zimage:latest")


def test_size_not_multiple_of_16_is_usage_error(models) -> None:
    with pytest.raises(UsageError, match="width 72 is not a positive multiple of 16") as info:
        list(generate(models("flux2-tiny"), GenerationRequest("x", 72, 64, steps=1)))
    assert info.value.exit_code == 2


def test_latents_of_the_wrong_shape_are_refused(models) -> None:
    with pytest.raises(ImgpackError, match=r"latents have shape \(1, 32, 8, 8\), expected \(1, 128, 4, 4\)"):
        list(generate(models("flux2-tiny"), GenerationRequest("x", 64, 64, steps=1), latents=np.zeros((1, 32, 8, 8))))


# -- lifecycle -----------------------------------------------------------------------------------------------


def test_cancel_between_steps(models) -> None:
    cancel = threading.Event()
    seen = []
    with pytest.raises(GenerationCancelled):
        for event in generate(models("flux2-tiny"), GenerationRequest("a fox", 64, 64, steps=4), cancel=cancel):
            seen.append(event)
            if isinstance(event, Step) and event.index == 2:
                cancel.set()
    assert [e.index for e in seen if isinstance(e, Step)] == [1, 2]


def test_one_shot_mode_frees_each_network(flux2_store) -> None:
    model = Flux2Model.open(flux2_store, "flux2-base:latest", keep_loaded=False)
    ref = load_reference("flux2-base", "cfg")
    image = run_to_image(model, request_for(ref.params))
    assert model.text_encoder is None and model.transformer is None and model.vae is None
    assert_image_matches(image.pixels, ref.data["image"])


def test_tight_memory_frees_text_encoder(flux2_store) -> None:
    model = Flux2Model.open(flux2_store, "flux2-tiny:latest")
    weights = model.weight_bytes()
    request = request_for(load_reference("flux2-tiny", "square").params)
    model.plan_memory(request, available=sum(weights.values()) + model.activation_bytes(64, 64, 1) - 1)
    assert not model.keep_text_encoder
    image = run_to_image(model, request)
    assert model.text_encoder is None
    assert_image_matches(image.pixels, load_reference("flux2-tiny", "square").data["image"])


def test_memory_estimate_counts_only_loaded_tensors(models) -> None:
    model = models("flux2-base")
    weights = model.weight_bytes()
    manifest = model.source.manifest
    unused = re.compile(r"text_encoder/(layers\.(27|28)\.|norm\.)|vae/(encoder\.|quant_conv\.|bn\.num)")
    expected = dict.fromkeys(("text_encoder", "transformer", "vae"), 0)
    for t in manifest.tensors:
        if not unused.match(t.name):
            expected[t.name.split("/")[0]] += int(np.prod(t.shape)) * 4  # float32 on CPU
    assert weights == expected
    with pytest.raises(ImgpackError, match=r"needs about \d+\.\d GB of memory but only 0\.0 GB is available"):
        model.plan_memory(GenerationRequest("x", 64, 64), available=1000)


# -- the module parameters are exactly the tensors the architecture derives -----------------------------------


@dataclass
class ConfigLayer:
    name: str
    shape: list[int]
    dtype: str = "BF16"
    size: int = 0
    quantization: str | None = None


class ConfigOnlySource(ModelSource):
    """A model known only by its configs: tensor layers with the shapes the architecture derives, no blobs. Lets
    the real 4B/9B configs go through the runtime's construction, planning and memory estimates."""

    def __init__(self, files: dict[str, dict], tensors: dict[str, list[int]], tokenizer: bytes) -> None:
        self.where = "configs"
        self.partial = None
        self._info = {}
        self._index = None
        self.files = {name: json.dumps(doc).encode() for name, doc in files.items()}
        self.files["tokenizer/tokenizer.json"] = tokenizer
        self.layers = [ConfigLayer(name, shape, size=math.prod(shape) * 2 + 128) for name, shape in tensors.items()]

    def has_file(self, name: str) -> bool:
        return name in self.files

    def read_file(self, name: str) -> bytes:
        return self.files[name]

    def tensors(self, component: str) -> dict[str, ConfigLayer]:  # type: ignore[override]
        prefix = component + "/"
        return {layer.name[len(prefix) :]: layer for layer in self.layers if layer.name.startswith(prefix)}


def read_configs(model_dir: Path) -> dict[str, dict]:
    names = ("model_index.json", "scheduler/scheduler_config.json", *flux2_arch.CONFIG_FILES)
    return {name: json.loads((model_dir / name).read_text()) for name in names}


REAL_TRANSFORMER_4B = {
    "patch_size": 1, "in_channels": 128, "out_channels": None, "num_layers": 5, "num_single_layers": 20,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 7680,
    "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000,
    "eps": 1e-6, "guidance_embeds": False,
}  # fmt: skip
REAL_TRANSFORMER_9B = {**REAL_TRANSFORMER_4B, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
                       "joint_attention_dim": 12288}
QWEN3_4B = {
    "hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "intermediate_size": 9728, "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
    "tie_word_embeddings": True, "attention_bias": False, "hidden_act": "silu",
}  # fmt: skip
QWEN3_8B = {**QWEN3_4B, "hidden_size": 4096, "intermediate_size": 12288, "tie_word_embeddings": False}
FLUX2_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 32,
             "norm_num_groups": 32, "force_upcast": True}  # every other key: the AutoencoderKLFlux2 defaults


def real_configs(size: str) -> dict[str, dict]:
    configs = read_configs(MODELS / "flux2-tiny")
    configs["transformer/config.json"] = REAL_TRANSFORMER_4B if size == "4B" else REAL_TRANSFORMER_9B
    configs["text_encoder/config.json"] = QWEN3_4B if size == "4B" else QWEN3_8B
    configs["vae/config.json"] = FLUX2_VAE
    return configs


def config_only_model(configs: dict[str, dict]) -> Flux2Model:
    expectation = flux2_arch.expected_tensors(configs)
    tensors = {**expectation.required, **{k: v for k, v in expectation.optional.items() if "lm_head" not in k}}
    if not configs["text_encoder/config.json"].get("tie_word_embeddings", True):
        tensors["text_encoder/lm_head.weight"] = expectation.optional["text_encoder/lm_head.weight"]
    tokenizer = (MODELS / "flux2-tiny" / "tokenizer" / "tokenizer.json").read_bytes()
    return Flux2Model(ConfigOnlySource(configs, tensors, tokenizer))


def assert_module_is_architecture(
    module: nn.Module, component: str, expectation, unused: Callable[[str], bool]
) -> None:
    """Every module parameter is reached by exactly one expected tensor of its shape (in MLX layout), the key map
    round-trips, and the expected tensors the module does not load are exactly the documented unused ones."""
    params = {name: tuple(array.shape) for name, array in flatten_params(module.parameters()).items()}
    reached: dict[str, str] = {}
    skipped = []
    for name, shape in {**expectation.optional, **expectation.required}.items():
        if not name.startswith(component + "/"):
            continue
        key = name[len(component) + 1 :]
        param = module.param_name(key)
        if param is None:
            skipped.append(key)
            continue
        assert param in params, f"{name} maps to {param!r}, which the {component} module does not have"
        assert param not in reached, f"{name} and {reached.get(param)} both map to {param!r}"
        want = to_mlx_shape(shape) if len(shape) == 4 else tuple(shape)
        assert params[param] == want, f"{name}: module shape {params[param]}, architecture {want}"
        assert module.checkpoint_key(param) == key, f"checkpoint_key({param!r}) is not {key!r}"
        reached[param] = name
    assert set(params) == set(reached), f"module parameters no tensor maps to: {sorted(set(params) - set(reached))}"
    assert [key for key in skipped if not unused(key)] == [], "tensors the module unexpectedly does not load"


def text_encoder_unused(layers_built: int, norm_read: bool) -> Callable[[str], bool]:
    """lm_head, layers deeper than the deepest hidden state read, and the final norm unless it is read."""

    def unused(key: str) -> bool:
        if key.startswith("model.layers."):
            return int(key.split(".")[2]) >= layers_built
        return key.startswith("lm_head.") or (key == "model.norm.weight" and not norm_read)

    return unused


def prefixed(*prefixes: str) -> Callable[[str], bool]:
    return lambda key: key.startswith(prefixes)


@pytest.mark.parametrize("which", ["flux2-tiny", "flux2-base", "4B", "9B"])
def test_flux2_modules_are_the_architecture(which: str) -> None:
    configs = read_configs(MODELS / which) if which.startswith("flux2-") else real_configs(which)
    model = config_only_model(configs)
    layers = configs["text_encoder/config.json"]["num_hidden_layers"]
    unused = {  # what FLUX.2 [klein] never reads: hidden states past 27, the encoder half of the VAE
        "transformer": prefixed("time_guidance_embed.guidance_embedder."),
        "text_encoder": text_encoder_unused(27, norm_read=layers == 27),
        "vae": prefixed("encoder.", "quant_conv.", "bn.num_batches_tracked"),
    }
    expectation = flux2_arch.expected_tensors(configs)
    for component in ("text_encoder", "transformer", "vae"):
        assert_module_is_architecture(model.components[component].blueprint, component, expectation,
                                      unused[component])


@pytest.mark.parametrize("model_dir", ["flux2-tiny", "flux2-base"])
def test_flux2_architecture_matches_committed_weights(model_dir: str) -> None:
    """The derivation agrees with what diffusers itself saved (read from the safetensors headers)."""
    import struct

    expectation = flux2_arch.expected_tensors(read_configs(MODELS / model_dir))
    stored = {}
    for path in (MODELS / model_dir).glob("*/*.safetensors"):
        raw = path.read_bytes()
        header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
        header.pop("__metadata__", None)
        stored.update({f"{path.parent.name}/{k}": v["shape"] for k, v in header.items()})
    canonical = {flux2_arch.canonical_name(name, expectation): shape for name, shape in stored.items()}
    assert set(expectation.required) <= set(canonical)
    every = {**expectation.optional, **expectation.required}
    assert canonical == {name: every.get(name) for name in canonical}


@pytest.mark.parametrize("model_dir", ["zimage-tiny", "zimage-sharded"])
def test_zimage_modules_are_the_architecture(model_dir: str) -> None:
    from imgpack.runtime.common.autoencoder import VAEConfig, VAEDecoder
    from imgpack.runtime.zimage.transformer import ZImageConfig, ZImageTransformer

    configs = read_configs(MODELS / model_dir)
    expectation = zimage_arch.expected_tensors(configs)
    tr_cfg = ZImageConfig.from_dict(configs["transformer/config.json"], {})
    text_cfg = Qwen3Config.from_dict(configs["text_encoder/config.json"])
    modules = {  # Z-Image reads hidden state [-2]: all text encoder layers but the last, no final norm
        "transformer": (ZImageTransformer(tr_cfg), prefixed()),
        "text_encoder": (Qwen3TextEncoder(text_cfg), text_encoder_unused(text_cfg.num_hidden_layers - 1, False)),
        "vae": (VAEDecoder(VAEConfig.from_dict(configs["vae/config.json"])), prefixed("encoder.", "quant_conv.")),
    }
    for component, (module, unused) in modules.items():
        assert_module_is_architecture(module, component, expectation, unused)


@pytest.mark.parametrize(
    ("size", "transformer_gb", "text_encoder_gb"),
    # float32 bytes of what loads: the transformer whole, Qwen3 up to layer 27 (27 of 36 layers + embeddings).
    [("4B", 15.5, 12.5), ("9B", 36.3, 23.4)],
)
def test_real_configs_plan_and_size(size: str, transformer_gb: float, text_encoder_gb: float) -> None:
    model = config_only_model(real_configs(size))
    assert model.pixel_multiple == 16 and model.transformer_config.in_channels == 128
    expanded = {name: c.expanded_bytes() for name, c in model.components.items()}  # float32 on CPU
    assert expanded["transformer"] / 1e9 == pytest.approx(transformer_gb, rel=0.01)
    assert expanded["text_encoder"] / 1e9 == pytest.approx(text_encoder_gb, rel=0.01)
    assert 0.15e9 < expanded["vae"] < 0.25e9  # the decoder, in float32 (force_upcast)
    # Kept as stored (bf16 linear weights, expanded per call): about half the transformer and text encoder bytes.
    stored = {name: c.resident_bytes("stored") for name, c in model.components.items()}
    assert stored["transformer"] * 2 == pytest.approx(expanded["transformer"], rel=0.001)
    assert stored["vae"] == expanded["vae"]
    # This 24 GB machine cannot hold both networks in float32, so the plan keeps them as stored.
    assert model.weight_bytes() == {name: c.resident_bytes(model.forms[name]) for name, c in model.components.items()}


@pytest.mark.parametrize(("size", "planned"), [
    ("4B", {(False, 512): 9.0, (False, 1024): 10.1, (True, 512): 16.5, (True, 1024): 18.2}),
    ("9B", {(False, 512): 20.1, (False, 1024): 21.5, (True, 512): 33.3, (True, 1024): 35.0}),
])
def test_real_configs_memory_plan(monkeypatch: pytest.MonkeyPatch, size: str,
                                  planned: dict[tuple[bool, int], float]) -> None:
    """The plan the README quotes for the real 4B/9B configs kept as stored (bf16 linear weights) on a 2-core CPU:
    `run` (each network alone, with its own working memory) and `serve` (all resident), in GB."""
    if not vae_kernels.fast_conv(mx.zeros((1,))):
        pytest.skip("the figures are the CPU kernels' (MLX's own decode is planned at six activations)")
    monkeypatch.setenv(cpu_pool.THREADS_ENV, "2")  # attention's score blocks in flight: one set per worker
    for (keep_loaded, side), gb in planned.items():
        model = config_only_model(real_configs(size))
        model.keep_loaded = keep_loaded
        model.forms = {"text_encoder": "stored", "transformer": "stored", "vae": "float32"}
        peak = model.plan_memory(GenerationRequest("x", side, side), available=0)
        assert peak / 1e9 == pytest.approx(gb, abs=0.05), (keep_loaded, side)


# -- shared pieces -------------------------------------------------------------------------------------------


def test_chat_template_with_thinking_disabled() -> None:
    qwen3 = (MODELS / "flux2-tiny" / "tokenizer" / "tokenizer_config.json").read_text()
    template = json.loads(qwen3)["chat_template"]
    think = "<|im_start|>user\na fox<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert render_chat("a fox", template, enable_thinking=False) == think
    assert render_chat("a fox", template, enable_thinking=True) == think[: -len("<think>\n\n</think>\n\n")]
    plain = "{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}"  # ChatML without the switch
    assert render_chat("a fox", plain, enable_thinking=False).endswith("<|im_start|>assistant\n")


def test_qwen3_refuses_hidden_states_it_does_not_have() -> None:
    cfg = Qwen3Config.from_dict(json.loads((MODELS / "flux2-tiny" / "text_encoder" / "config.json").read_text()))
    assert len(Qwen3TextEncoder(cfg, (9, 18, 27)).layers) == 27
    assert len(Qwen3TextEncoder(cfg).layers) == 26  # Z-Image's [-2]
    with pytest.raises(ImgpackError, match="num_hidden_layers 27 gives no hidden state 28"):
        Qwen3TextEncoder(cfg, (9, 28))
