"""MLX runtime parity with diffusers on the committed tiny models (reference data in tests/reference/).

Each component is compared on the reference's own inputs, so a failure points at the component at fault:
token ids exactly, the prompt embedding, one transformer forward, the sigmas and the VAE decode within 1e-4
(float32), and the whole pipeline's PNG within 1/255 on at least 99.9 % of pixels.
"""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

pytest.importorskip("mlx.core")

from fixtures_runtime import REFERENCE_CASES, Reference, load_reference, rekey_blob  # noqa: E402

from imgpack.runtime.backend import mx  # noqa: E402
from imgpack.runtime.common.scheduler import FlowMatchEulerScheduler  # noqa: E402
from imgpack.runtime.zimage.pipeline import (  # noqa: E402
    GenerationCancelled,
    GenerationRequest,
    Image,
    Stage,
    Step,
    ZImageModel,
    generate,
    initial_noise,
    run_to_image,
)
from imgpack.schemas.errors import ImgpackError  # noqa: E402

TOL = 1e-4
CASE_IDS = [f"{m}-{c}" for m, c in REFERENCE_CASES]


def request_for(ref: Reference) -> GenerationRequest:
    p = ref.params
    return GenerationRequest(
        prompt=p["prompt"],
        width=p["width"],
        height=p["height"],
        steps=p["num_inference_steps"],
        seed=p["seed"],
        guidance=p["guidance_scale"],
        negative=p["negative_prompt"] or "",
    )


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    assert err <= TOL, f"{what}: max abs error {err:.3g} > {TOL}"


def assert_image_matches(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 255  # sanity
    within = float((diff <= 1).mean())
    assert within >= 0.999, f"only {within:.4%} of pixels within 1/255 (max diff {diff.max()})"


@pytest.fixture(scope="module")
def models(runtime_store):
    """One loaded model per stored reference, shared by the module's tests."""
    cache: dict[str, ZImageModel] = {}

    def get(name: str) -> ZImageModel:
        if name not in cache:
            cache[name] = ZImageModel.open(runtime_store, f"{name}:latest")
        return cache[name]

    return get


@pytest.mark.parametrize(("model", "case"), REFERENCE_CASES, ids=CASE_IDS)
def test_token_ids_exact(models, model: str, case: str) -> None:
    ref = load_reference(model, case)
    tok = models(model).tokenizer
    for prefix in ("", "negative_") if ref.params["guidance_scale"] > 0 else ("",):
        prompt = ref.params["negative_prompt" if prefix else "prompt"]
        assert tok.prompt_text(prompt) == ref.text(f"{prefix}prompt_text")
        valid = int(ref.data[f"{prefix}attention_mask"].sum())
        assert tok.encode(prompt) == ref.data[f"{prefix}input_ids"][0, :valid].tolist()


@pytest.mark.parametrize(("model", "case"), REFERENCE_CASES, ids=CASE_IDS)
def test_prompt_embedding(models, model: str, case: str) -> None:
    ref = load_reference(model, case)
    m = models(model)
    assert_close(np.array(m.encode_prompt(ref.params["prompt"])), ref.data["prompt_embeds"], "prompt_embeds")
    if ref.params["guidance_scale"] > 0:
        got = np.array(m.encode_prompt(ref.params["negative_prompt"]))
        assert_close(got, ref.data["negative_prompt_embeds"], "negative_prompt_embeds")


@pytest.mark.parametrize(("model", "case"), REFERENCE_CASES, ids=CASE_IDS)
def test_scheduler_sigmas_and_times(models, model: str, case: str) -> None:
    ref = load_reference(model, case)
    steps = ref.params["num_inference_steps"]
    sched = FlowMatchEulerScheduler(models(model).scheduler_config, steps, image_seq_len=16)
    assert_close(sched.sigmas, ref.data["sigmas"], "sigmas")
    assert_close(sched.timesteps, ref.data["timesteps"], "timesteps")
    times = np.array([sched.model_time(i) for i in range(steps)], np.float32)
    np.testing.assert_array_equal(times, ref.data["transformer_timesteps"])


def test_eight_step_schedule_values(models) -> None:
    sched = FlowMatchEulerScheduler(models("zimage-tiny").scheduler_config, 8, image_seq_len=4096)
    want = [1, 0.954545, 0.9, 0.833333, 0.75, 0.642857, 0.5, 0.3, 0]
    np.testing.assert_allclose(sched.sigmas, want, atol=1e-6)


@pytest.mark.parametrize(("model", "case"), REFERENCE_CASES, ids=CASE_IDS)
def test_transformer_forward(models, model: str, case: str) -> None:
    ref = load_reference(model, case)
    transformer = models(model).load_transformer()
    captions = [mx.array(ref.data["transformer_in_caption"])]
    if "transformer_in_negative_caption" in ref.data:
        captions.append(mx.array(ref.data["transformer_in_negative_caption"]))
    latents = mx.array(ref.data["transformer_in_latents"][0, :, 0])
    out = transformer(latents, float(ref.data["transformer_in_timestep"][0]), captions)
    assert_close(np.array(out), ref.data["transformer_out"][:, :, 0], "transformer_out")


@pytest.mark.parametrize(("model", "case"), REFERENCE_CASES, ids=CASE_IDS)
def test_vae_decode(models, model: str, case: str) -> None:
    ref = load_reference(model, case)
    vae = models(model).load_vae()
    out = np.array(vae(mx.array(ref.data["final_latents"]))).transpose(0, 3, 1, 2)
    assert_close(out, ref.data["vae_out"], "vae_out")


@pytest.mark.parametrize(("model", "case"), REFERENCE_CASES, ids=CASE_IDS)
def test_seed_noise_is_portable(model: str, case: str) -> None:
    ref = load_reference(model, case)
    p = ref.params
    noise = initial_noise(p["seed"], 16, p["height"], p["width"])
    np.testing.assert_array_equal(noise, ref.data["initial_latents"])


@pytest.mark.parametrize(("model", "case"), REFERENCE_CASES, ids=CASE_IDS)
def test_full_pipeline_image(models, model: str, case: str) -> None:
    """The whole generation from the seed: step latents track diffusers, the PNG matches to 1/255."""
    ref = load_reference(model, case)
    request = request_for(ref)
    events = list(generate(models(model), request))
    steps = [e for e in events if isinstance(e, Step)]
    assert [(s.index, s.total) for s in steps] == [(i + 1, request.steps) for i in range(request.steps)]
    image = events[-1]
    assert isinstance(image, Image)
    assert image.pixels.shape == (request.height, request.width, 3)
    assert_image_matches(image.pixels, ref.data["image"])


def test_ollama_flavour_generates_same_image(runtime_store) -> None:
    manifest = runtime_store.get_manifest("zimage-tiny-ollama:latest")
    assert manifest.flavour == "ollama"
    ref = load_reference("zimage-tiny", "square")
    image = run_to_image(ZImageModel.open(runtime_store, "zimage-tiny-ollama:latest"), request_for(ref))
    assert_image_matches(image.pixels, ref.data["image"])


def test_blobs_keyed_by_tensor_name_load(runtime_store, edit_manifest) -> None:
    """ollama's later blobs key the single tensor by its own name, not 'data'; both must load."""
    rekeyed = {}

    def rekey(doc: dict) -> None:
        for layer in doc["layers"]:
            if layer["mediaType"].endswith(".tensor") and layer["name"].startswith(("transformer/", "vae/")):
                blob = rekey_blob(runtime_store.read_blob(layer["digest"]), layer["name"])
                layer["digest"], layer["size"] = runtime_store.put_bytes(blob)
                rekeyed[layer["name"]] = layer["digest"]

    edit_manifest("zimage-tiny:latest", "rekeyed:latest", rekey)
    assert len(rekeyed) > 10
    head = runtime_store.read_blob(next(iter(rekeyed.values())))[:200]
    assert b'"data"' not in head
    ref = load_reference("zimage-tiny", "square")
    image = run_to_image(ZImageModel.open(runtime_store, "rekeyed:latest"), request_for(ref))
    assert_image_matches(image.pixels, ref.data["image"])


def test_text_encoder_keys_without_model_prefix(runtime_store, edit_manifest) -> None:
    def strip_prefix(doc: dict) -> None:
        for layer in doc["layers"]:
            name = layer.get("name", "")
            if layer["mediaType"].endswith(".tensor") and name.startswith("text_encoder/model."):
                layer["name"] = "text_encoder/" + name[len("text_encoder/model.") :]
                if "annotations" in layer:
                    layer["annotations"]["org.opencontainers.image.title"] = layer["name"]

    edit_manifest("zimage-tiny:latest", "noprefix:latest", strip_prefix)
    names = [t.name for t in runtime_store.get_manifest("noprefix:latest").tensors]
    assert "text_encoder/embed_tokens.weight" in names
    ref = load_reference("zimage-tiny", "square")
    got = np.array(ZImageModel.open(runtime_store, "noprefix:latest").encode_prompt(ref.params["prompt"]))
    assert_close(got, ref.data["prompt_embeds"], "prompt_embeds without model. prefix")


@pytest.mark.parametrize(
    "victim",
    [
        "transformer/layers.1.feed_forward.w2.weight",
        "transformer/cap_embedder.1.weight",  # renamed inside the runtime; named as the manifest spells it
        "transformer/all_final_layer.2-1.adaLN_modulation.1.bias",
        "text_encoder/model.layers.1.self_attn.k_norm.weight",
        "vae/decoder.mid_block.attentions.0.to_out.0.weight",
    ],
)
def test_missing_tensor_is_named(runtime_store, edit_manifest, victim: str) -> None:
    def drop(doc: dict) -> None:
        doc["layers"] = [layer for layer in doc["layers"] if layer.get("name") != victim]

    ref = edit_manifest("zimage-tiny:latest", "missing:latest", drop)
    with pytest.raises(ImgpackError, match=f"lacks tensor '{re.escape(victim)}', needed by the"):
        ZImageModel.open(runtime_store, ref)


def test_wrong_shape_is_named(runtime_store, edit_manifest) -> None:
    victim = "transformer/cap_embedder.1.weight"

    def shrink(doc: dict) -> None:
        for layer in doc["layers"]:
            if layer.get("name") == victim:
                layer["shape"] = [layer["shape"][0] // 2, layer["shape"][1]]

    edit_manifest("zimage-tiny:latest", "badshape:latest", shrink)
    with pytest.raises(ImgpackError, match=r"'transformer/cap_embedder\.1\.weight' has shape \[32, 64\]"):
        ZImageModel.open(runtime_store, "badshape:latest")


def test_unexpected_tensor_is_named(runtime_store, edit_manifest) -> None:
    def rename(doc: dict) -> None:
        for layer in doc["layers"]:
            if layer.get("name") == "transformer/x_pad_token":
                layer["name"] = "transformer/layers.7.extra"

    edit_manifest("zimage-tiny:latest", "unexpected:latest", rename)
    with pytest.raises(ImgpackError, match=r"'transformer/layers\.7\.extra' does not belong"):
        ZImageModel.open(runtime_store, "unexpected:latest")


def test_memory_estimate_refuses_clearly(models) -> None:
    model = models("zimage-tiny")
    weights = model.weight_bytes()
    # The tiny model's f32 weights, computed independently from the manifest's dtype/shape entries.
    manifest = model.source.manifest
    unused = (".layers.2.", "model.norm.weight")  # the last of 3 layers and the final norm feed hidden state [-1]
    te = sum(
        int(np.prod(t.shape)) * 4
        for t in manifest.tensors
        if t.name.startswith("text_encoder/") and not any(u in t.name for u in unused)
    )
    assert weights["text_encoder"] == te
    with pytest.raises(ImgpackError, match=r"needs about \d+\.\d GB of memory but only 0\.0 GB is available"):
        model.plan_memory(GenerationRequest("x", 64, 64), available=1000)
    need = model.plan_memory(GenerationRequest("x", 64, 64), available=10 * 1024**3)
    assert need >= sum(weights.values()) and model.keep_text_encoder


def test_parallel_load_gives_the_weights_of_a_serial_one(runtime_store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors load on the CPU workers: every parameter is the one a load in the calling thread gives."""
    from imgpack.runtime import cpu_pool
    from imgpack.runtime.common.loader import flatten_params

    def weights(threads: str) -> dict[str, np.ndarray]:
        monkeypatch.setenv(cpu_pool.THREADS_ENV, threads)
        model = ZImageModel.open(runtime_store, "zimage-tiny:latest", keep_loaded=False)
        return {k: np.array(v) for k, v in flatten_params(model.load_transformer().parameters()).items()}

    serial, parallel = weights("1"), weights("2")
    assert serial.keys() == parallel.keys() and len(serial) > 20
    for name, value in serial.items():
        assert np.array_equal(value, parallel[name]), name


def test_one_shot_plan_counts_each_network_with_its_own_working_memory(runtime_store) -> None:
    """`imgpack run` frees each network before the next loads: the steps' working memory is planned beside the
    transformer, the decode's beside the VAE; with previews the VAE decodes beside the transformer."""
    model = ZImageModel.open(runtime_store, "zimage-tiny:latest", keep_loaded=False)
    request = GenerationRequest("x", 256, 256)
    weights, expanded = model.weight_bytes(), model.expanded_layer_bytes()
    step, decode = model.step_working_bytes(256, 256, 1), model.decode_working_bytes(256, 256)
    assert model.activation_bytes(256, 256, 1) == max(step, decode)
    alone = max(weights["text_encoder"], weights["transformer"] + step, weights["vae"] + decode) + expanded
    assert model.plan_memory(request, available=0) == alone
    together = weights["transformer"] + weights["vae"] + max(step, decode) + expanded
    assert together > alone
    assert model.plan_memory(request, available=0, previews=True) == together
    model.plan_memory(request, available=alone)  # fits exactly
    with pytest.raises(ImgpackError, match="needs about"):
        model.plan_memory(request, available=together - 1, previews=True)


def test_tight_memory_frees_text_encoder(runtime_store) -> None:
    model = ZImageModel.open(runtime_store, "zimage-tiny:latest")
    weights = model.weight_bytes()
    request = GenerationRequest("a red fox in the snow", 64, 64, steps=8, seed=42)
    work = model.activation_bytes(64, 64, 1)
    model.plan_memory(request, available=sum(weights.values()) + work - 1)
    assert not model.keep_text_encoder
    image = run_to_image(model, request)
    assert model.text_encoder is None
    assert_image_matches(image.pixels, load_reference("zimage-tiny", "square").data["image"])


def test_cancel_between_steps(models) -> None:
    cancel = threading.Event()
    seen = []
    with pytest.raises(GenerationCancelled):
        for event in generate(models("zimage-tiny"), GenerationRequest("a fox", 64, 64, steps=8), cancel=cancel):
            seen.append(event)
            if isinstance(event, Step) and event.index == 2:
                cancel.set()
    assert [e.index for e in seen if isinstance(e, Step)] == [1, 2]
    assert any(isinstance(e, Stage) and e.name == "denoise" for e in seen)


def test_size_not_multiple_of_16_is_usage_error(models) -> None:
    from imgpack.schemas.errors import UsageError

    with pytest.raises(UsageError, match="height 72 is not a positive multiple of 16") as info:
        list(generate(models("zimage-tiny"), GenerationRequest("x", 64, 72)))
    assert info.value.exit_code == 2


def test_png_bytes_decode_to_pixels(models) -> None:
    from io import BytesIO

    from PIL import Image as PILImage

    image = run_to_image(models("zimage-tiny"), GenerationRequest("a fox", 48, 32, steps=2, seed=1))
    decoded = np.array(PILImage.open(BytesIO(image.png())))
    np.testing.assert_array_equal(decoded, image.pixels)
    assert decoded.shape == (32, 48, 3)


def test_one_shot_mode_frees_each_network(runtime_store) -> None:
    """``imgpack run`` mode: every network is dropped after its part, and the image is unchanged."""
    model = ZImageModel.open(runtime_store, "zimage-tiny:latest", keep_loaded=False)
    ref = load_reference("zimage-tiny", "square")
    image = run_to_image(model, request_for(ref))
    assert model.text_encoder is None and model.transformer is None and model.vae is None
    assert_image_matches(image.pixels, ref.data["image"])
    # It can run again: components reload from the store.
    again = run_to_image(model, request_for(ref))
    np.testing.assert_array_equal(again.pixels, image.pixels)


def test_banded_convolution_equals_whole(monkeypatch) -> None:
    """Large VAE activations are convolved in row bands; the bands must stitch to the exact same result."""
    import imgpack.runtime.common.autoencoder as vae

    conv = vae.Conv3x3(6, 5)
    conv.bias = mx.random.normal((5,), key=mx.random.key(1))
    x = mx.random.normal((1, 23, 9, 6), key=mx.random.key(2))
    whole = np.array(conv(x))
    for rows in (1, 2, 7):
        monkeypatch.setattr(vae, "BAND_ELEMENTS", rows * 9 * 6)
        np.testing.assert_allclose(np.array(conv(x)), whole, atol=1e-5)


def test_chat_template_rendering() -> None:
    from imgpack.runtime.common.tokenizer import render_chat

    chatml = "<|im_start|>user\na fox<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat("a fox", None) == chatml
    assert render_chat("a fox", "{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}") == chatml
    other = "[INST] {{ messages[0]['content'] }} [/INST]"
    try:
        import jinja2  # noqa: F401
    except ImportError:
        with pytest.raises(ImgpackError, match="not ChatML and jinja2 is not installed"):
            render_chat("a fox", other)
    else:
        assert render_chat("a fox", other) == "[INST] a fox [/INST]"


def test_cpu_kernels_match_mlx_ops(monkeypatch) -> None:
    """The numpy attention (blocks of query rows, a key mask, token-major inputs, one thread or several) and
    SiLU equal MLX's own ops."""
    from imgpack.runtime import backend, cpu_pool

    key = mx.random.key(7)
    q, k, v = (mx.random.normal((2, 37, 3, 16), key=mx.random.split(key, 3)[i]) for i in range(3))
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # (batch, heads, tokens, dim) views, as the models pass
    mask = mx.array(np.arange(37)[None, None, None, :] < np.array([37, 29])[:, None, None, None])
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    for block, threads in ((backend.ATTENTION_BLOCK_FLOATS, ""), (37 * 8, ""), (1, "1")):
        monkeypatch.setattr(backend, "ATTENTION_BLOCK_FLOATS", block)
        monkeypatch.setenv(cpu_pool.THREADS_ENV, threads)
        got = backend.attention(q, k, v, 0.25, mask)
        assert got.shape == (2, 3, 37, 16)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)
        # The heads merge back without a copy: the result is a view of a token-major buffer.
        assert np.asarray(got.transpose(0, 2, 1, 3)).flags.c_contiguous
    x = mx.random.normal((5, 300), key=key) * 4
    want_silu = np.array(x * mx.sigmoid(x))
    np.testing.assert_allclose(np.array(backend.silu(x * 1.0)), want_silu, atol=1e-5)


def test_blob_disagreeing_with_manifest_is_named(runtime_store, edit_manifest) -> None:
    """A manifest whose descriptor points at a blob holding another shape: refused at load, tensor named."""

    def swap(doc: dict) -> None:
        by_name = {layer.get("name"): layer for layer in doc["layers"]}
        donor = by_name["transformer/all_x_embedder.2-1.weight"]  # (64, 64): bigger than the victim
        victim = by_name["transformer/t_embedder.mlp.0.bias"]  # (1024,)
        victim["digest"], victim["size"] = donor["digest"], donor["size"]

    ref = edit_manifest("zimage-tiny:latest", "swapped:latest", swap)
    model = ZImageModel.open(runtime_store, ref)
    with pytest.raises(ImgpackError, match=r"'transformer/t_embedder\.mlp\.0\.bias': blob holds shape \[64, 64\]"):
        model.load_transformer()


def test_threaded_load_only_where_mlx_evaluates_from_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from imgpack.runtime.common import loader

    for version, expected in (("0.31.1", False), ("0.31.2", True), ("0.32.4", True), ("1.0.0", True), ("dev", False)):
        monkeypatch.setattr(loader.mx, "__version__", version, raising=False)
        assert loader._threaded_eval() is expected, version
