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

from keras_minsnr import training
from keras_minsnr.data import load_latent_cache

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
    return training.resolve_config(_recipe("sd15_captions"), overrides)


def _cached_latents(cache):
    ds, info = load_latent_cache(cache, batch_size=64, shuffle=False, drop_remainder=False)
    return np.concatenate([b["images"] for b in ds.as_numpy_iterator()]), info


@pytest.mark.large
def test_sd15_cache_is_kerascv_image_encoder_output(tmp_path, kerascv_vae):
    encoder, _, paths = kerascv_vae
    folder = str(tmp_path / "captions")
    files = _caption_folder(folder)
    config = _sd15_config(tmp_path, folder, paths)
    training.prepare_data(config)
    got, info = _cached_latents(config["data"])
    # KerasCV's ImageEncoder ends with mean x 0.18215: the space SD 1.5's UNet trained in.
    want = np.asarray(encoder.predict_on_batch(_pixels(files).astype("float32")), "float64")
    ratio = float(np.median(got / want))
    print(f"\ncached / KerasCV ImageEncoder: ratio {ratio:.5f}; std cached {got.std():.4f}, "
          f"KerasCV {want.std():.4f}")
    assert ratio == pytest.approx(1.0, rel=1e-3), f"cache = {ratio:.5f} x KerasCV's latents"
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert info.latent_scale == pytest.approx(0.18215)
