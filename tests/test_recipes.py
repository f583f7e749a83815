"""The paper recipes: configs against the papers' numbers, tiny builds, end-to-end CLI runs."""

import gzip
import importlib
import json
import os

import keras
import numpy as np
import pytest
from keras import ops
from PIL import Image

from keras_minsnr import builders
from keras_minsnr import run_config
from keras_minsnr import resume
from keras_minsnr.backbones import autoencoders
from keras_minsnr.cli import available_recipes
from keras_minsnr.cli import main
from keras_minsnr.data import DatasetInfo
from keras_minsnr.data import cache_latents

PAPER_RECIPES = (
    "cifar10_unet",
    "celeba64_vit_s",
    "imagenet64_vit_l4",
    "imagenet256_vit_b2",
    "imagenet256_vit_xl2",
    "sd15_captions",
)

# The numbers each recipe must carry, typed in from the sources its docstring names:
# (schedule, prediction_type, gamma, batch_size, backbone, learning_rate, (beta_1, beta_2),
#  weight_decay, label_dropout).
PAPER = ("cosine", 5.0, 1e-4, (0.99, 0.99), 0.03)
EXPECTED = {
    # DDPM CIFAR-10: batch 128; unconditional.
    "cifar10_unet": ("epsilon", 128, "unet_cifar10", 0.0),
    "celeba64_vit_s": ("epsilon", 128, "vit_l_4_in64", 0.0),
    # Official configs/in64/inference.sh: predict_xstart False; batch 256, label drop 0.15.
    "imagenet64_vit_l4": ("epsilon", 256, "vit_l_4_in64", 0.15),
    # Official in256 configs: predict_xstart True, batch 8 x 32.
    "imagenet256_vit_b2": ("sample", 256, "vit_b_2_in256", 0.15),
    "imagenet256_vit_xl2": ("sample", 256, "vit_xl_2_in256", 0.15),
}
# Tiny stand-ins for each backbone class (random init, seconds to build).
TINY = {
    "unet_cifar10": {"base_channels": 16, "num_groups": 8, "channel_multipliers": [1, 2],
                     "num_res_blocks": 1, "attention_resolutions": [16]},
    "vit_l_4_in64": {"hidden_size": 32, "depth": 1, "num_heads": 2},
    "vit_b_2_in256": {"hidden_size": 32, "depth": 1, "num_heads": 2},
    "vit_xl_2_in256": {"hidden_size": 32, "depth": 1, "num_heads": 2},
    "sd15_unet": {"tiny": True, "img_height": 64, "img_width": 64, "weights": None},
}


def _recipe(name):
    return importlib.import_module(f"recipes.{name}").RECIPE


def _sets(mapping, prefix=""):
    """``{"a": {"b": 1}}`` -> ``["--set", "a.b=1"]`` (JSON values)."""
    args = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            args += _sets(value, f"{prefix}{key}.")
        else:
            args += ["--set", f"{prefix}{key}={json.dumps(value)}"]
    return args


SHORT_RUN = {"steps": 2, "steps_per_epoch": 2, "num_samples": 2, "sample_steps": 2,
             "batch_size": 2}


def _state(run_dir):
    with open(os.path.join(run_dir, "checkpoints", "state.json")) as f:
        return json.load(f)


def test_every_paper_recipe_is_listed_and_resolves():
    assert set(PAPER_RECIPES) <= set(available_recipes())
    for name in available_recipes():  # every key and value passes the typed config
        assert run_config.resolve_config(_recipe(name))["description"], name
    for name in PAPER_RECIPES:
        module = importlib.import_module(f"recipes.{name}")
        config = run_config.resolve_config(module.RECIPE)
        assert config["paper_source"] and config["description"], name
        # The docstring says where the numbers come from and how to run it.
        assert "Hang et al. 2023" in module.__doc__ and "keras-minsnr train" in module.__doc__
        assert callable(module.run_recipe)
        assert config["weighting"] == "min_snr" and config["num_timesteps"] == 1000


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pixel_and_latent_recipes_carry_the_paper_settings(name):
    config = run_config.resolve_config(_recipe(name))
    schedule, gamma, lr, betas, wd = PAPER
    target, batch, backbone, drop = EXPECTED[name]
    assert (config["schedule"], config["gamma"], config["learning_rate"]) == (schedule, gamma, lr)
    assert (config["beta_1"], config["beta_2"], config["weight_decay"]) == (*betas, wd)
    assert config["ema_decay"] == 0.9999
    assert (config["prediction_type"], config["batch_size"], config["backbone"]) == (
        target, batch, backbone)
    assert config["label_dropout"] == drop


def test_sd15_recipe_follows_diffengine_min_snr_config():
    config = run_config.resolve_config(_recipe("sd15_captions"))
    # diffengine stable_diffusion_v15_snr_pokemon_blip: SNRL2Loss(snr_gamma=5),
    # AdamW(lr=1e-5, weight_decay=1e-2), clip_grad max_norm 1.0, batch 4.
    assert (config["schedule"], config["prediction_type"], config["gamma"]) == (
        "scaled_linear", "epsilon", 5.0)
    assert (config["learning_rate"], config["weight_decay"], config["clipnorm"]) == (
        1e-5, 1e-2, 1.0)
    assert config["batch_size"] == 4 and config["backbone"] == "sd15_unet"
    for key in ("image_encoder_weights", "text_encoder_weights", "vocabulary"):
        assert config["encode"][key]
    assert config["backbone_args"]["weights"].endswith("kcv_diffusion_model.h5")


# Convolutional tiny backbones take minutes to build and call on a loaded 2-core CPU.
SLOW_BUILDS = ("cifar10_unet",)


# sd15_captions' backbone is built from the recipe, trained and sampled by
# test_sd15_captions_fine_tunes_a_tiny_sd_through_the_cli, which checks the same things.
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.large) if n in SLOW_BUILDS else n
    for n in PAPER_RECIPES if n != "sd15_captions"
])
def test_recipe_backbone_builds_tiny(name):
    recipe = _recipe(name)
    backbone_name = recipe["backbone"]
    config = run_config.resolve_config(
        recipe, {f"backbone_args.{k}": v for k, v in TINY[backbone_name].items()}
    )
    latent = name.startswith("imagenet256")
    side = {"cifar10_unet": 32, "imagenet256_vit_b2": 32, "imagenet256_vit_xl2": 32}.get(name, 64)
    classes = 1000 if name.startswith("imagenet") else None
    info = DatasetInfo(name="x", image_shape=(side, side, 4 if latent else 3),
                       num_classes=classes)
    model = builders.build_model(config, info)
    backbone = model.backbone
    assert tuple(backbone.image_shape) == info.image_shape
    assert backbone.num_classes == classes
    assert backbone.conditioning == ("class" if classes else None)
    inputs = {"x": np.zeros((1, *info.image_shape), "float32"),
              "t": np.array([999], "int32")}
    if classes:
        inputs["y"] = np.array([3], "int32")
    out = keras.ops.convert_to_numpy(backbone(inputs))
    assert out.shape == (1, *info.image_shape) and np.all(np.isfinite(out))
    if backbone_name.startswith("vit"):
        assert backbone.conditioning_mode == "in_context"  # the paper's ViT, not adaLN


def test_celeba_vit_is_vit_small_sized():
    config = run_config.resolve_config(_recipe("celeba64_vit_s"))
    args = config["backbone_args"]
    # U-ViT-S/4: patch 4 (from the vit_l_4_in64 preset), width 512, 13 blocks, 8 heads.
    assert (args["hidden_size"], args["depth"], args["num_heads"]) == (512, 13, 8)
    assert config["image_size"] == 64 and args["num_classes"] is None


@pytest.mark.large
def test_cifar10_unet_trains_two_steps_through_the_cli(tmp_path, capsys):
    import tensorflow_datasets as tfds

    run = str(tmp_path / "run")
    tiny = {"backbone_args": TINY["unet_cifar10"], **SHORT_RUN}
    with tfds.testing.mock_data(num_examples=8):
        code = main(["train", "cifar10_unet", "--output-dir", run, *_sets(tiny)])
    assert code == 0, capsys.readouterr().err
    assert _state(run)["step"] == 2
    for name in ("model.keras", "samples.png", "metrics.csv", "config.json"):
        assert os.path.exists(os.path.join(run, name))
    _, model = resume.load_run(run)
    # The labels were dropped: an unconditional 32x32x3 model.
    assert model.backbone.conditioning is None
    assert tuple(model.backbone.image_shape) == (32, 32, 3)


def _latent_cache(path, count=8, side=4, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (count, 8 * side, 8 * side, 3)).astype("float32")
    labels = rng.integers(0, classes, count).astype("int32")
    encode = lambda x: np.asarray(x)[:, ::8, ::8, :].repeat(2, axis=-1)[..., :4]  # noqa
    info = DatasetInfo(name="fake", image_shape=images.shape[1:], num_classes=classes)
    batches = [{"images": images[i:i + 4], "labels": labels[i:i + 4]}
               for i in range(0, count, 4)]
    cache_latents(batches, encode, path, info=info, verbose=0)
    return images, labels


def test_latent_recipe_trains_on_a_latent_cache(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    _latent_cache(cache)
    run = str(tmp_path / "run")
    tiny = {"data": cache, "backbone_args": TINY["vit_b_2_in256"], **SHORT_RUN}
    code = main(["train", "imagenet256_vit_b2", "--output-dir", run, *_sets(tiny)])
    assert code == 0, capsys.readouterr().err
    assert _state(run)["step"] == 2
    _, model = resume.load_run(run)
    assert tuple(model.backbone.image_shape) == (4, 4, 4)
    assert model.backbone.num_classes == 10 and model.prediction_type == "sample"


def _caption_folder(root, count=4, side=64):
    os.makedirs(root)
    rng = np.random.default_rng(2)
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        for i in range(count):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, f"{i}.png"))
            f.write(json.dumps({"file_name": f"{i}.png", "text": "hello " * (i + 1)}) + "\n")


def _tiny_sd_autoencoder(tmp_path):
    """KerasCV's real SD VAE encoder (random weights, from a file as a run names it) with
    a small stand-in text encoder (the VAE's scale is what this pairing is about)."""
    from keras_cv.src.models.stable_diffusion.image_encoder import ImageEncoder

    from keras_minsnr.backbones.autoencoders import StableDiffusionAutoencoder

    vocabulary = str(tmp_path / "tiny_bpe.txt.gz")
    with gzip.open(vocabulary, "wt", encoding="utf-8") as f:
        f.write("#version: tiny\nh e\nl l\nhe ll\nhell o</w>")
    weights = str(tmp_path / "vae_encoder.weights.h5")
    ImageEncoder(download_weights=False).save_weights(weights)
    tokens = keras.Input((77,), dtype="int32", name="tokens")
    positions = keras.Input((77,), dtype="int32", name="positions")
    text = keras.layers.Add()([keras.layers.Embedding(600, 768)(tokens),
                               keras.layers.Embedding(77, 768)(positions)])
    return StableDiffusionAutoencoder(
        "v1", vocabulary=vocabulary, image_encoder_weights=weights,
        text_encoder=keras.Model([tokens, positions], text),
    )


@pytest.mark.large
def test_sd15_captions_fine_tunes_a_tiny_sd_through_the_cli(tmp_path, monkeypatch, capsys):
    folder, cache, run = (str(tmp_path / n) for n in ("captions", "cache", "run"))
    _caption_folder(folder)
    encoders = _tiny_sd_autoencoder(tmp_path)
    monkeypatch.setattr(autoencoders, "from_encode_config", lambda *args, **kw: encoders)
    tiny = {"data": cache, "encode": {"source": folder, "source_args": {"image_size": 64}},
            "backbone_args": TINY["sd15_unet"], **SHORT_RUN}
    code = main(["train", "sd15_captions", "--output-dir", run, *_sets(tiny)])
    assert code == 0, capsys.readouterr().err
    assert _state(run)["step"] == 2
    with open(os.path.join(cache, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["latent_shape"] == [8, 8, 4] and manifest["context_shape"] == [77, 768]
    assert manifest["count"] == 4
    _, model = resume.load_run(run)
    assert model.backbone.conditioning == "context" and model.schedule.name == "scaled_linear"
    assert tuple(model.backbone.image_shape) == (8, 8, 4)
    assert model.backbone.num_classes is None
    # The null condition is the empty caption's embedding, cached and saved with the model.
    empty = np.asarray(encoders.encode_text([""]))[0]
    assert np.abs(empty).max() > 0
    np.testing.assert_allclose(ops.convert_to_numpy(model.null_context), empty, atol=1e-6)
    assert os.path.exists(os.path.join(run, "samples.png"))


def test_missing_sd_weights_name_the_file_and_kerascv_url(tmp_path, capsys):
    folder = str(tmp_path / "captions")
    _caption_folder(folder, count=2)
    base = ["train", "sd15_captions", "--output-dir", str(tmp_path / "run"),
            "--set", f"data={tmp_path / 'cache'}", "--set", f"encode.source={folder}",
            "--set", "encode.source_args.image_size=64"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "weights/sd15/kcv_diffusion_model.h5" in err
    assert "huggingface.co/fchollet/stable-diffusion" in err
    missing_vae = str(tmp_path / "nowhere" / "vae_encoder.h5")
    base[3] = str(tmp_path / "run2")
    assert main(base + ["--set", "backbone_args.weights=null",
                        "--set", f"encode.image_encoder_weights={missing_vae}"]) == 2
    err = capsys.readouterr().err
    assert missing_vae in err and "vae_encoder.h5" in err and "https://" in err
    assert not os.path.exists(tmp_path / "cache" / "manifest.json")


def test_unprepared_data_says_where_to_place_the_files(tmp_path, capsys):
    empty = str(tmp_path / "tfds")
    code = main(["train", "cifar10_unet", "--output-dir", str(tmp_path / "run"),
                 "--set", f"data_args.data_dir={empty}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "not prepared" in err and empty in err and "tfds build cifar10" in err
    # A latent recipe without a cache and without raw data names both ways to get one.
    code = main(["train", "sd15_captions", "--output-dir", str(tmp_path / "run2"),
                 "--set", f"data={tmp_path / 'nocache'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "No latent cache" in err and "encode.source" in err and "cache_latents" in err


def test_unknown_encode_key_lists_the_valid_ones(tmp_path):
    # Found when the config is resolved, before anything is written or encoded.
    with pytest.raises(ValueError, match="encode key.*'vae'.*image_encoder_weights"):
        run_config.resolve_config(_recipe("imagenet256_vit_b2"),
                                {"data": str(tmp_path), "encode.vae": "x"})
