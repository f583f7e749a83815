"""The seam between the latent cache and the real pretrained autoencoders (issue 22).

Every test here has the real third-party component on one side: KerasCV's own
`ImageEncoder` / `Decoder` (random weights, saved to a file the run names) and KerasHub's
SD3 VAE (a tiny preset through `from_preset`). No stand-in VAE.
"""

import gzip
import json
import os

import keras
import numpy as np
import pytest
from PIL import Image

from keras_minsnr import run_config
from keras_minsnr.backbones import autoencoders
from keras_minsnr.cli import main
from keras_minsnr.data import load_latent_cache
from keras_minsnr.data.preparation import prepare_data

IMAGE_SIZE = 64  # pixels: 8x8x4 SD latents


def _recipe(name):
    import importlib

    return importlib.import_module(f"recipes.{name}").RECIPE


def _caption_folder(root, count=4, side=IMAGE_SIZE, seed=2):
    """Smooth random pictures (a VAE sees images, not white noise) with captions."""
    os.makedirs(root)
    rng = np.random.default_rng(seed)
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        for i in range(count):
            coarse = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
            pixels = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BILINEAR))
            Image.fromarray(pixels).save(os.path.join(root, f"{i}.png"))
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}) + "\n")
    return [os.path.join(root, f"{i}.png") for i in range(count)]


def _pixels(files):
    """The files as the pipelines read them: [-1, 1], float64 (PIL, independent of tf)."""
    return np.stack([np.asarray(Image.open(f), "float64") / 127.5 - 1.0 for f in files])


def _tiny_vocabulary(tmp_path):
    path = str(tmp_path / "tiny_bpe.txt.gz")
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: tiny\np i\nc t\n")
    return path


@pytest.fixture(scope="module")
def kerascv_vae(tmp_path_factory):
    """KerasCV's real SD VAE encoder and decoder with random weights, saved as files."""
    from keras_cv.src.models.stable_diffusion.decoder import Decoder
    from keras_cv.src.models.stable_diffusion.image_encoder import ImageEncoder

    folder = tmp_path_factory.mktemp("kerascv_vae")
    keras.utils.set_random_seed(1)
    encoder = ImageEncoder(download_weights=False)
    decoder = Decoder(IMAGE_SIZE, IMAGE_SIZE, download_weights=False)
    paths = {"encoder": str(folder / "vae_encoder.weights.h5"),
             "decoder": str(folder / "kcv_decoder.weights.h5")}
    encoder.save_weights(paths["encoder"])
    decoder.save_weights(paths["decoder"])
    return encoder, decoder, paths


def _sd15_config(tmp_path, folder, paths, **more):
    overrides = {
        "data": str(tmp_path / "cache"),
        "encode.source": folder,
        "encode.source_args": {"image_size": IMAGE_SIZE},
        "encode.image_encoder_weights": paths["encoder"],
        "encode.decoder_weights": paths["decoder"],
        "encode.text_encoder_weights": None,  # KerasCV's CLIP, random weights
        "encode.vocabulary": _tiny_vocabulary(tmp_path),
        "backbone_args.weights": None,
        **more,
    }
    return run_config.resolve_config(_recipe("sd15_captions"), overrides)


def _cached_latents(cache):
    ds, info = load_latent_cache(cache, batch_size=64, shuffle=False, drop_remainder=False)
    return np.concatenate([b["images"] for b in ds.as_numpy_iterator()]), info


@pytest.mark.large
def test_sd15_cache_is_kerascv_image_encoder_output(tmp_path, kerascv_vae):
    encoder, _, paths = kerascv_vae
    folder = str(tmp_path / "captions")
    files = _caption_folder(folder)
    config = _sd15_config(tmp_path, folder, paths)
    prepare_data(config)
    got, info = _cached_latents(config["data"])
    # KerasCV's ImageEncoder ends with mean x 0.18215: the space SD 1.5's UNet trained in.
    pixels = _pixels(files).astype("float32")
    want = np.asarray(encoder.predict_on_batch(pixels), "float64")
    ratio = float(np.median(got / want))
    print(f"\ncached / KerasCV ImageEncoder: ratio {ratio:.5f}; std cached {got.std():.4f}, "
          f"KerasCV {want.std():.4f}")
    assert ratio == pytest.approx(1.0, rel=1e-3), f"cache = {ratio:.5f} x KerasCV's latents"
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert (info.vae, info.latent_scale, info.latent_shift) == ("sd_vae", 0.18215, 0.0)
    with open(os.path.join(config["data"], "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["version"] == 2 and manifest["vae"] == "sd_vae"
    assert manifest["context_shape"] == [77, 768]


@pytest.mark.large
def test_sd_decode_of_the_cache_is_kerascv_decoder_of_its_encoder(tmp_path, kerascv_vae):
    encoder, decoder, paths = kerascv_vae
    folder = str(tmp_path / "images" / "a")
    files = _caption_folder(folder, count=2)
    os.remove(os.path.join(folder, "metadata.jsonl"))  # a class folder: no text encoder
    vae = autoencoders.StableDiffusionAutoencoder(
        "v1", image_encoder_weights=paths["encoder"], decoder_weights=paths["decoder"],
        text=False)
    pixels = _pixels(files).astype("float32")
    want = np.asarray(decoder.predict_on_batch(encoder.predict_on_batch(pixels)))
    got = vae.decode(vae.encode_images(pixels))
    assert got.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_the_imagenet256_recipes_encode_alike():
    """Both ImageNet-256 recipes name the same VAE and encode settings, so the seam test
    below, run on one of them, covers the other."""
    b2, xl2 = (run_config.resolve_config(_recipe(name))
               for name in ("imagenet256_vit_b2", "imagenet256_vit_xl2"))
    assert b2["encode"] == xl2["encode"] and b2["data"] == xl2["data"]
    assert b2["encode"].get("version", "v1") == "v1"


@pytest.mark.large
def test_imagenet256_cache_is_kerascv_image_encoder_output(tmp_path, kerascv_vae, monkeypatch):
    recipe = "imagenet256_vit_xl2"
    encoder, _, paths = kerascv_vae
    built = []
    real = autoencoders.from_encode_config
    monkeypatch.setattr(autoencoders, "from_encode_config",
                        lambda *args, **kwargs: built.append(1) or real(*args, **kwargs))
    folder = str(tmp_path / "images")
    files = _caption_folder(os.path.join(folder, "a"), count=2, seed=3)
    os.remove(os.path.join(folder, "a", "metadata.jsonl"))
    config = run_config.resolve_config(_recipe(recipe), {
        "data": str(tmp_path / "cache"), "encode.source": folder,
        "encode.source_args": {"image_size": IMAGE_SIZE},
        "encode.image_encoder_weights": paths["encoder"],
    })
    prepare_data(config)
    prepare_data(config)  # the cache is reused: encoded once
    assert len(built) == 1
    got, info = _cached_latents(config["data"])
    want = np.asarray(encoder.predict_on_batch(_pixels(files).astype("float32")))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert info.vae == "sd_vae" and info.num_classes == 1


# -- SD3: KerasHub's VAE -----------------------------------------------------------------

from tests.test_sd3 import IMAGE_SIZE as SD3_IMAGE_SIZE  # noqa: E402
from tests.test_sd3 import tiny_preset  # noqa: E402,F401  (the fixture)


@pytest.mark.large
def test_sd3_cache_is_kerashub_encode_image_step_and_decodes_like_it(tmp_path, tiny_preset):  # noqa: F811
    import keras_hub
    from keras import ops

    folder = str(tmp_path / "captions")
    files = _caption_folder(folder, count=2, side=SD3_IMAGE_SIZE)
    config = run_config.resolve_config(_recipe("sd3_captions"), {
        "data": str(tmp_path / "cache"), "encode.source": folder,
        "encode.source_args": {"image_size": SD3_IMAGE_SIZE},
        "backbone_args.preset": tiny_preset,
    })
    prepare_data(config)
    got, info = _cached_latents(config["data"])
    hub = keras_hub.models.StableDiffusion3Backbone.from_preset(tiny_preset)
    want = ops.convert_to_numpy(hub.encode_image_step(_pixels(files).astype("float32")))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert info.vae == "sd3_vae"
    assert (info.latent_scale, info.latent_shift) == pytest.approx((hub.vae.scale, hub.vae.shift))
    decoded = autoencoders.StableDiffusion3Autoencoder(tiny_preset).decode(got)
    expected = ops.convert_to_numpy(hub.decode_step(ops.convert_to_tensor(got)))
    np.testing.assert_allclose(decoded, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


# -- bad input: one line, exit 2, nothing written ----------------------------------------


def _error_line(err):
    """The one ``keras-minsnr: error:`` line of a failed command (asserted to be one)."""
    lines = [line for line in err.splitlines() if line.startswith("keras-minsnr: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _plain_cache(path, vae=None):
    """A version-2 cache of 2 latents (a plain callable), its manifest naming ``vae``."""
    from keras_minsnr.data import cache_latents

    images = np.zeros((2, 16, 16, 3), "float32")
    labels = np.zeros((2,), "int32")
    cache_latents([{"images": images, "labels": labels}],
                  lambda x: np.asarray(x)[:, ::4, ::4, :].repeat(2, -1)[..., :4], path,
                  verbose=0)
    manifest_path = os.path.join(path, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["vae"] = vae
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    return manifest_path


def test_old_format_cache_is_refused_with_how_to_re_encode(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    manifest_path = _plain_cache(cache)
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["version"] = 1  # what the code before issue 22 wrote
    for key in ("vae", "shift"):
        del manifest[key]
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    run = str(tmp_path / "run")
    code = main(["train", "imagenet256_vit_b2", "--output-dir", run, "--set", f"data={cache}"])
    err = _error_line(capsys.readouterr().err)
    assert code == 2 and "format version 1" in err and "re-encode" in err
    assert "0.18215" in err and cache in err
    assert not os.path.exists(run)
    with pytest.raises(ValueError, match="format version 1"):
        load_latent_cache(cache, batch_size=2)


def test_cache_of_another_vae_is_refused(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    _plain_cache(cache, vae="sd3_vae")
    before = sorted(os.listdir(cache))
    run = str(tmp_path / "run")
    code = main(["train", "imagenet256_vit_b2", "--output-dir", run, "--set", f"data={cache}"])
    err = _error_line(capsys.readouterr().err)
    assert code == 2
    assert "'sd3_vae'" in err and "'sd_vae'" in err and "re-encode" in err
    assert not os.path.exists(run) and sorted(os.listdir(cache)) == before


def test_resolution_that_is_not_a_multiple_of_8_is_refused(tmp_path, capsys):
    folder = str(tmp_path / "images")
    _caption_folder(os.path.join(folder, "a"), count=1, side=16)
    cache, run = str(tmp_path / "cache"), str(tmp_path / "run")
    code = main(["train", "imagenet256_vit_b2", "--output-dir", run, "--set", f"data={cache}",
                 "--set", f"encode.source={folder}", "--set", "encode.source_args.image_size=60"])
    err = _error_line(capsys.readouterr().err)
    assert code == 2
    assert "60x60" in err and "multiples of 8" in err
    assert not os.path.exists(run) and not os.path.exists(cache)
    with pytest.raises(ValueError, match="12x16 .* multiples of 8"):
        autoencoders.check_image_shape((12, 16, 3))


# -- --allow-download --------------------------------------------------------------------


def test_allow_download_flag_reaches_the_autoencoder_and_the_backbone(tmp_path, capsys):
    from keras_minsnr import cli
    from keras_minsnr.data.preparation import resolve_encode_config

    parser = cli.build_parser()
    args = parser.parse_args(["train", "sd15_captions", "--output-dir", str(tmp_path),
                              "--allow-download"])
    config = cli._config_from_args(args)
    assert config["encode"]["allow_download"] is True
    assert config["backbone_args"]["allow_download"] is True
    assert resolve_encode_config(config)["allow_download"] is True
    vae = autoencoders.from_encode_config(
        {**config["encode"], "vocabulary": _tiny_vocabulary(tmp_path)}, check=False)
    assert vae.allow_download is True
    # A backbone without downloads is left alone; a run without the flag downloads nothing.
    args = parser.parse_args(["train", "imagenet256_vit_b2", "--output-dir", str(tmp_path),
                              "--allow-download"])
    config = cli._config_from_args(args)
    assert "allow_download" not in config["backbone_args"]
    assert config["encode"]["allow_download"] is True
    args = parser.parse_args(["train", "sd15_captions", "--output-dir", str(tmp_path)])
    assert "allow_download" not in cli._config_from_args(args)["encode"]
    assert parser.parse_args(["sample", "run", "--allow-download"]).allow_download
    # The message for a missing file names the flag a command-line user can pass.
    code = main(["train", "sd15_captions", "--output-dir", str(tmp_path / "run"),
                 "--set", f"data={tmp_path / 'cache'}", "--set", f"encode.source={tmp_path}"])
    assert code == 2 and "--allow-download" in capsys.readouterr().err


def test_cpu_default_notes_follow_the_config_checks(tmp_path, capsys, monkeypatch):
    """The notes saying which CPU defaults keras_minsnr set are for a run that starts: a
    refused config prints its error alone; an accepted one prints the notes."""
    import keras_minsnr
    from keras_minsnr import tf_onednn
    from keras_minsnr import training

    monkeypatch.setattr(keras_minsnr, "ONEDNN_SET", True)
    cache = str(tmp_path / "cache")
    _plain_cache(cache, vae="sd3_vae")
    code = main(["train", "imagenet256_vit_b2", "--output-dir", str(tmp_path / "run"),
                 "--set", f"data={cache}"])
    err = capsys.readouterr().err
    assert code == 2 and "'sd3_vae'" in err
    assert tf_onednn.announcement() not in err
    monkeypatch.setattr(training, "train", lambda config, output_dir, **kwargs: None)
    code = main(["train", "digits", "--output-dir", str(tmp_path / "digits")])
    assert code == 0 and tf_onednn.announcement() in capsys.readouterr().err
