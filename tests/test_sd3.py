"""KerasHub Stable Diffusion 3 behind the backbone contract.

A tiny SD3 (2-layer MMDiT, 4-level VAE of 32 filters, 2-layer CLIP-L/G, no T5) is
written as a KerasHub preset directory with `save_to_preset` and loaded back through the
real `from_preset` path; nothing is downloaded.
"""

import json
import os
import shutil

import keras
import numpy as np
import pytest
from keras import ops

import keras_minsnr as kms
from keras_minsnr import builders
from keras_minsnr import run_config
from keras_minsnr import resume
from keras_minsnr.backbones import sd3
from keras_minsnr.backbones.autoencoders import StableDiffusion3Autoencoder
from keras_minsnr.cli import main
from tests.test_recipes import _caption_folder as caption_folder

IMAGE_SIZE = 32  # pixels; latents are 4x4x16
SEQUENCE_LENGTH = 8  # CLIP tokens; the context has 2 x 8 rows (no T5) + 1 pooled row


def _shifted_times(T, shift):
    """Float64 closed form of SD3's training sigmas: shift·u / (1 + (shift − 1)·u)."""
    u = np.arange(1, T + 1, dtype=np.float64) / T
    return shift * u / (1.0 + (shift - 1.0) * u)


def test_timestep_matches_kerashub_scheduler_and_closed_form():
    from keras_hub.src.models.stable_diffusion_3.flow_match_euler_discrete_scheduler import (
        FlowMatchEulerDiscreteScheduler,
    )

    for T, shift in ((1000, 3.0), (1000, 1.0), (500, 2.5)):
        steps = np.arange(T)
        ours = ops.convert_to_numpy(sd3.flow_timestep(ops.convert_to_tensor(steps), T, shift))
        closed = T * _shifted_times(T, shift)
        np.testing.assert_allclose(ours, closed, rtol=2e-6, atol=1e-4)
        # KerasHub's scheduler: training timesteps 1..T, sigma = its shifted timestep / T,
        # fed to the MMDiT as sigma·T (`_sigma_to_timestep`).
        scheduler = FlowMatchEulerDiscreteScheduler(T, shift)
        sigma = scheduler._timestep_to_sigma(ops.arange(1, T + 1, dtype="float32"))
        theirs = ops.convert_to_numpy(scheduler._sigma_to_timestep(sigma))
        np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=1e-4)
        # The flow schedule the backbone trains with has the same times (t = 1 at T−1).
        schedule = kms.FlowMatchingSchedule(T, shift)
        np.testing.assert_allclose(schedule.time(steps), closed / T, rtol=1e-12)
        assert ours[-1] == pytest.approx(T)


def test_pack_context_round_trips():
    rng = np.random.default_rng(0)
    context, pooled = rng.normal(size=(2, 5, 6)), rng.normal(size=(2, 4))
    packed = sd3.pack_context(context, pooled)
    assert packed.shape == (2, 6, 6)
    np.testing.assert_array_equal(packed[:, 5, 4:], 0.0)
    back_context, back_pooled = sd3.unpack_context(packed, 6, 4)
    np.testing.assert_allclose(back_context, context, rtol=1e-6)
    np.testing.assert_allclose(back_pooled, pooled, rtol=1e-6)
    wide = sd3.pack_context(context[:, :, :3], pooled)  # pooled wider than the context
    assert wide.shape == (2, 6, 4)
    with pytest.raises(ValueError, match=r"context \(B, L, D\) and pooled \(B, P\)"):
        sd3.pack_context(context[0], pooled)


@pytest.fixture
def offline_kaggle(tmp_path, monkeypatch):
    """An empty kagglehub cache, and any download attempt fails the test."""
    import kagglehub

    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(kagglehub, "model_download", no_network)
    return tmp_path / "kagglehub"


def test_uncached_preset_names_itself_and_how_to_place_it(offline_kaggle, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        sd3.resolve_preset("stable_diffusion_3_medium")
    message = str(error.value)
    assert "'stable_diffusion_3_medium'" in message and "not in the local cache" in message
    assert "kaggle://keras/stablediffusion3/keras/stable_diffusion_3_medium" in message
    assert "download_preset('stable_diffusion_3_medium'" in message
    assert "backbone_args.preset" in message
    assert str(offline_kaggle) in message
    # The backbone and the encoders fail the same way, before building anything.
    with pytest.raises(FileNotFoundError, match="stable_diffusion_3.5_medium"):
        sd3.StableDiffusion3MMDiT("stable_diffusion_3.5_medium")
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        StableDiffusion3Autoencoder("kaggle://keras/stablediffusion3/keras/x/1")
    with pytest.raises(ValueError, match="not_a_preset.*stable_diffusion_3_medium"):
        sd3.resolve_preset("not_a_preset")
    missing = str(tmp_path / "no" / "preset")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sd3.resolve_preset(missing)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        sd3.resolve_preset(str(tmp_path))


def test_cached_preset_name_resolves_to_the_kagglehub_folder(offline_kaggle):
    from kagglehub.cache import Cache
    from kagglehub.handle import parse_model_handle

    handle = "keras/stablediffusion3/keras/stable_diffusion_3_medium/5"
    folder = Cache().get_path(parse_model_handle(handle))
    os.makedirs(folder)
    for name in sd3.PRESET_FILES:
        open(os.path.join(folder, name), "w").close()
    assert sd3.resolve_preset("stable_diffusion_3_medium") == folder


# -- the tiny preset, through from_preset ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sd3") / "tiny_sd3")
    sd3.save_tiny_preset(path, image_size=IMAGE_SIZE, sequence_length=SEQUENCE_LENGTH)
    yield path
    sd3.clear_loaded_presets()


def _flow_weight_reference(t, strategy, gamma=5.0):
    """Float64 velocity-space weights t²·w₀(SNR), SNR = (1 − t)²/t²."""
    snr = (1.0 - t) ** 2 / t**2
    if strategy == "constant":
        return np.ones_like(t)
    if strategy == "snr":
        return t**2 * snr
    if strategy == "soft_min_snr":
        return t**2 * snr * gamma / (snr + gamma)
    assert strategy == "min_snr"
    return np.minimum((1.0 - t) ** 2, gamma * t**2)


def _flow_loss_reference(x0, noise, prediction, steps, T, shift, strategy="min_snr",
                         gamma=5.0):
    """Float64: mean_b(w(t) · mean((û − (ε − x₀))²)), t from the closed form."""
    t = _shifted_times(T, shift)[steps]
    weight = _flow_weight_reference(t, strategy, gamma)
    target = noise.astype(np.float64) - x0.astype(np.float64)
    mse = np.mean((prediction.astype(np.float64) - target) ** 2, axis=(1, 2, 3))
    return np.mean(weight * mse)


@pytest.mark.large
def test_tiny_preset_trains_one_min_snr_step_and_samples(tiny_preset, tmp_path):
    import keras_hub

    backbone = sd3.StableDiffusion3MMDiT(tiny_preset)
    encoders = StableDiffusion3Autoencoder(tiny_preset)
    hub = keras_hub.models.StableDiffusion3Backbone.from_preset(tiny_preset)
    assert backbone.image_shape == (4, 4, 16) and backbone.shift == 3.0
    assert backbone.context_shape == (2 * SEQUENCE_LENGTH + 1, 4096)

    # The text condition: KerasHub's own encoding of the captions, packed.
    captions = ["the cat", "a red bird"]
    preprocessor = keras_hub.models.StableDiffusion3TextToImagePreprocessor.from_preset(
        tiny_preset
    )
    ids = preprocessor.generate_preprocess(captions + [""])
    context, _, pooled, _ = hub.encode_text_step(ids, ids)
    context, pooled = ops.convert_to_numpy(context), ops.convert_to_numpy(pooled)
    y = encoders.encode_text(captions)
    np.testing.assert_allclose(y[:, :-1], context[:2], atol=1e-5)
    np.testing.assert_allclose(y[:, -1, : pooled.shape[1]], pooled[:2], atol=1e-5)
    null = encoders.encode_text([""])[0]
    assert np.abs(null[-1]).max() > 0  # the empty prompt has a pooled embedding

    # The adapter is KerasHub's MMDiT at KerasHub's timestep for each flow step.
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(2, 4, 4, 16)).astype("float32")
    noise = rng.normal(size=(2, 4, 4, 16)).astype("float32")
    steps = np.array([100, 900], dtype="int32")
    t = _shifted_times(1000, 3.0)[steps]
    x_t = ((1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise).astype("float32")
    ours = ops.convert_to_numpy(backbone({"x": x_t, "t": steps, "y": y}))
    theirs = ops.convert_to_numpy(hub.diffuser({
        "latent": x_t, "context": context[:2], "pooled_projection": pooled[:2],
        "timestep": (1000 * t).reshape(-1, 1).astype("float32"),
    }))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)

    # One Min-SNR-5 step: the logged loss is the float64 flow Min-SNR loss of the
    # prediction before the update.
    model = kms.DiffusionModel(
        backbone, backbone.flow_schedule(), prediction_type="flow", weighting="min_snr",
        gamma=5.0, ema_decay=0.0, null_context=null, clip_denoised=False, seed=0,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    # Every weighting reaches the SD3 velocity loss through the flow SNR.
    for strategy in ("constant", "snr", "soft_min_snr"):
        other = kms.DiffusionModel(backbone, backbone.flow_schedule(), prediction_type="flow",
                                   weighting=strategy, gamma=5.0, ema_decay=0.0)
        loss, _ = other.diffusion_loss_terms(x0, y, steps, noise)
        reference = _flow_loss_reference(x0, noise, ours, steps, 1000, 3.0, strategy)
        assert float(ops.convert_to_numpy(loss)) == pytest.approx(reference, rel=1e-4)
    expected = _flow_loss_reference(x0, noise, ours, steps, 1000, 3.0, "min_snr")
    before = [ops.convert_to_numpy(w) for w in backbone.trainable_weights]
    batch = {"images": x0, "context": y, "timesteps": steps, "noise": noise}
    history = model.fit(batch, batch_size=2, epochs=1, verbose=0)
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-4)
    # Only the MMDiT trains: its weights are all the model's trainable weights.
    assert len(model.trainable_weights) == len(hub.diffuser.trainable_weights)
    changed = [not np.allclose(a, ops.convert_to_numpy(b))
               for a, b in zip(before, backbone.trainable_weights)]
    assert sum(changed) > len(changed) // 2

    # The null condition of guidance is the empty prompt's context and pooled embedding.
    np.testing.assert_allclose(ops.convert_to_numpy(model.null_condition(1))[0], null)
    np.testing.assert_allclose(null[:-1], context[2], atol=1e-5)

    # Guided samples are latents that decode through the preset's VAE.
    latents = model.generate(context=y, num_steps=2, guidance_scale=4.0, seed=0)
    assert latents.shape == (2, 4, 4, 16) and np.all(np.isfinite(latents))
    images = encoders.decode(latents)
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and np.all(np.isfinite(images))
    expected_images = ops.convert_to_numpy(
        hub.vae.decode(latents / hub.vae.scale + hub.vae.shift)
    )
    np.testing.assert_allclose(images, expected_images, rtol=1e-4, atol=1e-5)
    # Images encode to SD3's latents: (posterior mean − shift) · scale.
    pixels = rng.uniform(-1, 1, size=(1, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")
    mean = ops.convert_to_numpy(hub.vae.encoder(pixels))[..., :16]
    np.testing.assert_allclose(
        encoders.encode_images(pixels), (mean - hub.vae.shift) * hub.vae.scale,
        rtol=1e-4, atol=1e-5,
    )

    # The .keras file round-trips without the preset.
    path = str(tmp_path / "sd3.keras")
    model.save(path)
    sd3.clear_loaded_presets()
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.backbone, sd3.StableDiffusion3MMDiT)
    assert loaded.backbone.get_config()["preset"] is None
    inputs = {"x": x_t, "t": steps, "y": y}
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded.backbone(inputs)),
        ops.convert_to_numpy(backbone(inputs)), rtol=1e-5, atol=1e-6,
    )


def test_latent_shape_and_bad_arguments_are_checked(tiny_preset, tmp_path):
    backbone = sd3.StableDiffusion3MMDiT(tiny_preset, latent_shape=(8, 8))
    assert backbone.image_shape == (8, 8, 16)
    # Each adapter trains its own copy, never the preset's MMDiT that others share.
    same_size = sd3.StableDiffusion3MMDiT(tiny_preset)
    shared = sd3.load_preset(tiny_preset)[0].diffuser
    assert same_size.mmdit is not shared and backbone.mmdit is not shared
    for ours, theirs in zip(same_size.mmdit.weights, shared.weights):
        np.testing.assert_array_equal(ops.convert_to_numpy(ours), ops.convert_to_numpy(theirs))
        if keras.backend.backend() == "jax":
            # Not the same buffer: fit() donates the copy's buffers, which would delete
            # the shared preset's weights (the next adapter built from it then fails).
            assert (ours.value.unsafe_buffer_pointer()
                    != theirs.value.unsafe_buffer_pointer()), ours.path
    with pytest.raises(ValueError, match=r"latent_shape .*divisible by the patch size 2"):
        sd3.StableDiffusion3MMDiT(tiny_preset, latent_shape=(5, 5))
    with pytest.raises(ValueError, match="latent_shape must be"):
        sd3.StableDiffusion3MMDiT(tiny_preset, latent_shape=(8, 8, 4))
    with pytest.raises(ValueError, match="shift must be"):
        sd3.StableDiffusion3MMDiT(tiny_preset, shift=0.0)
    with pytest.raises(ValueError, match="exactly one of"):
        sd3.StableDiffusion3MMDiT()
    # KerasHub's save_to_preset of the SD3 preprocessor leaves a CLIP preprocessor.json.
    broken = str(tmp_path / "broken")
    shutil.copytree(tiny_preset, broken)
    sd3.load_preset(tiny_preset)[1].clip_l_preprocessor.save_to_preset(broken)
    with pytest.raises(ValueError, match="not a Stable Diffusion 3 preprocessor.*save_preset"):
        sd3.load_preset(broken)
    y = np.zeros((1, 5, 4096), "float32")
    with pytest.raises(ValueError, match=r"expected \(batch, 17, 4096\)"):
        backbone({"x": np.zeros((1, 8, 8, 16), "float32"), "t": np.zeros(1, "int32"), "y": y})


# -- the recipe ----------------------------------------------------------------------


def test_sd3_recipe_resolves_with_flow_settings():
    from recipes.sd3_captions import RECIPE

    config = run_config.resolve_config(RECIPE)
    assert (config["schedule"], config["prediction_type"], config["flow_shift"]) == (
        "flow", "flow", 3.0)
    assert (config["weighting"], config["gamma"]) == ("min_snr", 5.0)
    assert config["timestep_sampling"] == "logit_normal" and config["sampler"] == "euler"
    assert config["backbone"] == "sd3_mmdit" and config["encode"]["version"] == "sd3"


def test_sd3_run_builds_the_backbone_for_its_flow_schedule(tiny_preset):
    from keras_minsnr.data import DatasetInfo
    from recipes.sd3_captions import RECIPE

    info = DatasetInfo(name="cache", image_shape=(8, 8, 16))
    config = run_config.resolve_config(RECIPE, {"backbone_args.preset": tiny_preset})
    model = builders.build_model(config, info)
    assert model.backbone.image_shape == (8, 8, 16)
    assert (model.schedule.shift, model.backbone.shift) == (3.0, 3.0)
    # A backbone embedding other times than the run's schedule is refused.
    config = run_config.resolve_config(
        RECIPE, {"backbone_args.preset": tiny_preset, "backbone_args.shift": 2.0})
    with pytest.raises(ValueError, match="embeds the times of .*flow_shift=2.0"):
        builders.build_model(config, info)


def test_sd3_recipe_with_an_uncached_preset_fails_before_encoding(tmp_path, capsys,
                                                                 offline_kaggle):
    folder = str(tmp_path / "captions")
    caption_folder(folder, count=2, side=IMAGE_SIZE)
    code = main(["train", "sd3_captions", "--output-dir", str(tmp_path / "run"),
                 "--set", f"data={tmp_path / 'cache'}", "--set", f"encode.source={folder}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "stable_diffusion_3_medium" in err and "not in the local cache" in err
    assert not os.path.exists(tmp_path / "cache" / "manifest.json")


@pytest.mark.large
def test_sd3_recipe_fine_tunes_the_tiny_preset_through_the_cli(tiny_preset, tmp_path, capsys):
    folder, cache, run = (str(tmp_path / n) for n in ("captions", "cache", "run"))
    caption_folder(folder, side=IMAGE_SIZE)
    code = main([
        "train", "sd3_captions", "--output-dir", run, "--set", f"data={cache}",
        "--set", f"encode.source={folder}", "--set", f"encode.source_args.image_size={IMAGE_SIZE}",
        "--set", f"backbone_args.preset={tiny_preset}", "--set", "steps=2",
        "--set", "steps_per_epoch=2", "--set", "batch_size=2", "--set", "num_samples=2",
        "--set", "sample_steps=2", "--set", "label_dropout=0.5",
    ])
    assert code == 0, capsys.readouterr().err
    with open(os.path.join(cache, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["latent_shape"] == [4, 4, 16] and manifest["vae"] == "sd3_vae"
    vae = sd3.load_preset(tiny_preset)[0].vae  # the preset's convention, recorded
    assert (manifest["scale"], manifest["shift"]) == pytest.approx((vae.scale, vae.shift))
    assert manifest["context_shape"] == [2 * SEQUENCE_LENGTH + 1, 4096]
    with open(os.path.join(run, "checkpoints", "state.json")) as f:
        assert json.load(f)["step"] == 2
    _, model = resume.load_run(run)
    assert isinstance(model.backbone, sd3.StableDiffusion3MMDiT)
    assert model.schedule.shift == 3.0 and model.prediction_type == "flow"
    empty = StableDiffusion3Autoencoder(tiny_preset).encode_text([""])[0]
    np.testing.assert_allclose(ops.convert_to_numpy(model.null_context), empty, atol=1e-6)
    assert os.path.exists(os.path.join(run, "samples.png"))


def test_lora_default_targets_are_the_joint_blocks_attention_and_mlp(tiny_preset):
    from keras_minsnr import lora

    backbone = sd3.StableDiffusion3MMDiT(tiny_preset)
    # The tiny MMDiT has 2 joint blocks; the last block's text stream stops after qkv
    # (SD3's context_pre_only), so it has no output projection and no MLP.
    expected = [
        f"mmdit/joint_blocks/{i}/{stream}/{name}"
        for i in range(2)
        for stream in ("context_block", "x_block")
        for name in ("attention_qkv", "attention_proj", "mlp/dense1", "mlp/dense2")
        if not (i == 1 and stream == "context_block" and name != "attention_qkv")
    ]
    assert sorted(lora.target_layers(backbone)) == sorted(expected)
    modulation = lora.target_layers(backbone, ["modulation"])
    assert sorted(modulation) == sorted(
        [f"mmdit/joint_blocks/{i}/{s}/ada_layer_norm/dense" for i in range(2)
         for s in ("context_block", "x_block")] + ["mmdit/output_ada_layer_norm/dense"]
    )
