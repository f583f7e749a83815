"""diffusers-format SD 1.x folders → KerasCV weight files, checked against diffusers itself.

The folder `tests/data/diffusers_sd_tiny/` and the reference outputs in
`diffusers_sd_tiny.npz` were written by the real diffusers / transformers
(`tests/data/make_diffusers_sd_fixture.py`); here KerasCV's own blocks at the same widths
load the converted files and must compute the same outputs.
"""

import os
import shutil

import h5py
import keras
import numpy as np
import pytest

from keras_minsnr import cli
from keras_minsnr.backbones import diffusers_conversion as dc
from keras_minsnr.backbones import kerascv_sd
from keras_minsnr.backbones import stable_diffusion as sd
from keras_minsnr.backbones.layers import sinusoidal_embedding

DATA = os.path.join(os.path.dirname(__file__), "data")
FOLDER = os.path.join(DATA, "diffusers_sd_tiny")
VAE_WIDTHS = (32, 32, 32, 32)
# KerasCV's blocks against diffusers set to KerasCV's GELU / epsilon constants: float
# precision. Against diffusers as it ships, the gap those constants leave on this fixture.
TOLERANCE = 1e-4
SHIPPED_TOLERANCE = 3e-3


@pytest.fixture(scope="module")
def ref():
    with np.load(os.path.join(DATA, "diffusers_sd_tiny.npz")) as data:
        return dict(data)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("kerascv")
    assert cli.main(["convert-diffusers", FOLDER, str(out)]) == 0
    return {c: str(out / dc.output_filename("v1", c)) for c in dc.COMPONENTS}


def _gap(ours, theirs):
    """Largest difference relative to the reference's scale (its standard deviation)."""
    return float(np.max(np.abs(keras.ops.convert_to_numpy(ours) - theirs)) / np.std(theirs))


def test_cli_writes_kerascvs_file_names(converted):
    assert sorted(os.path.basename(p) for p in converted.values()) == [
        "kcv_decoder.h5", "kcv_diffusion_model.h5", "kcv_encoder.h5", "vae_encoder.h5"]


def test_unet_matches_diffusers(converted, ref):
    core = kerascv_sd._SDUNetCore((32, 32, 32), 2, "v1", 32)
    core.load_weights(converted["diffusion_model"])
    # The timestep features as StableDiffusionUNet computes them (KerasCV's 320).
    t_features = sinusoidal_embedding(ref["unet_t"], kerascv_sd.TIMESTEP_FEATURES)
    out = core([ref["unet_x"], t_features, ref["unet_context"]])
    assert _gap(out, ref["unet_out"]) < TOLERANCE
    assert _gap(out, ref["unet_out_as_shipped"]) < SHIPPED_TOLERANCE


def test_vae_encoder_matches_diffusers(converted, ref):
    encoder = dc.kerascv_image_encoder(VAE_WIDTHS)
    encoder.load_weights(converted["image_encoder"])
    latents = encoder(ref["vae_images"])  # KerasCV's ImageEncoder: posterior mean x 0.18215
    assert _gap(latents, 0.18215 * ref["vae_posterior_mean"]) < TOLERANCE
    assert _gap(latents, 0.18215 * ref["vae_posterior_mean_as_shipped"]) < SHIPPED_TOLERANCE
    # What StableDiffusionAutoencoder keeps: the 8 posterior channels before KerasCV's slice.
    moments = keras.Model(encoder.inputs, encoder.layers[-2].output)(ref["vae_images"])
    assert _gap(moments, ref["vae_moments"]) < TOLERANCE


def test_vae_decoder_matches_diffusers(converted, ref):
    decoder = dc.kerascv_decoder(32, 32, VAE_WIDTHS)
    decoder.load_weights(converted["decoder"])
    # KerasCV's Decoder takes latents x 0.18215; diffusers decodes latents / scaling_factor.
    images = decoder(ref["vae_scaled_latents"])
    assert _gap(images, ref["vae_decoded"]) < TOLERANCE
    assert _gap(images, ref["vae_decoded_as_shipped"]) < SHIPPED_TOLERANCE


def test_text_encoder_matches_transformers_clip(converted, ref):
    encoder = dc.kerascv_text_encoder(1000, 32, 2, 2, "quick_gelu")
    encoder.load_weights(converted["text_encoder"])
    positions = np.tile(np.arange(77, dtype="int32"), (2, 1))
    hidden = encoder({"tokens": ref["text_tokens"], "positions": positions})
    assert _gap(hidden, ref["text_hidden"]) < TOLERANCE


def test_sd2_layout_linear_projections(tmp_path, ref):
    """SD 2.x UNets project in and out of their transformers with nn.Linear (2-D weights,
    `use_linear_projection`), which KerasCV's v2 blocks take as Dense layers. The fixture's
    1x1 convolutions stored as 2-D weights are that layout, computing the same function
    (a 1x1 convolution is a linear map over channels), so diffusers' outputs still hold."""
    from safetensors.numpy import load_file

    folder = tmp_path / "sd2"
    shutil.copytree(FOLDER, folder, ignore=shutil.ignore_patterns("vae", "text_encoder"))
    config_path = folder / "unet" / "config.json"
    config_path.write_text(config_path.read_text().replace(
        '"use_linear_projection": false', '"use_linear_projection": true'))

    def to_linear(tensors):
        for key in [k for k in tensors if k.endswith(("proj_in.weight", "proj_out.weight"))]:
            tensors[key] = tensors[key][:, :, 0, 0]

    _rewrite(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), to_linear)
    assert load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))[
        "mid_block.attentions.0.proj_in.weight"].ndim == 2
    paths = dc.convert_diffusers(folder, tmp_path / "out", components=("diffusion_model",))
    assert os.path.basename(paths["diffusion_model"]) == "diffusion_model_v2_1.h5"
    core = kerascv_sd._SDUNetCore((32, 32, 32), 2, "v2", 32)
    core.load_weights(paths["diffusion_model"])
    t_features = sinusoidal_embedding(ref["unet_t"], kerascv_sd.TIMESTEP_FEATURES)
    out = core([ref["unet_x"], t_features, ref["unet_context"]])
    assert _gap(out, ref["unet_out"]) < TOLERANCE


def _legacy_shapes(model):
    return [[tuple(w.shape) for w in layer.trainable_weights + layer.non_trainable_weights]
            for layer in model.layers if layer.weights]


@pytest.mark.large
def test_builders_have_kerascvs_layout_at_its_widths():
    """At KerasCV's own widths the VAE builders are KerasCV's models layer for layer, so
    the files written for them load into KerasCV's ImageEncoder / Decoder. (The text
    encoder builder is KerasCV's TextEncoder code with its sizes as arguments; building the
    85M-parameter original here costs a minute of CI for no more information.)"""
    from keras_cv.src.models.stable_diffusion.decoder import Decoder
    from keras_cv.src.models.stable_diffusion.image_encoder import ImageEncoder

    pairs = [(dc.kerascv_image_encoder(), ImageEncoder(download_weights=False)),
             (dc.kerascv_decoder(64, 64), Decoder(64, 64, download_weights=False))]
    for ours, theirs in pairs:
        assert _legacy_shapes(ours) == _legacy_shapes(theirs)


def _rewrite(path, edit):
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file

    tensors = load_file(path)
    edit(tensors)
    os.chmod(path, 0o644)
    save_file(tensors, path)


def test_missing_and_misshaped_tensors_listed_nothing_written(tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(FOLDER, bad)

    def unet(t):
        del t["mid_block.attentions.0.proj_in.weight"]
        t["conv_out.weight"] = t["conv_out.weight"][:3]

    _rewrite(str(bad / "unet" / "diffusion_pytorch_model.safetensors"), unet)
    _rewrite(str(bad / "vae" / "diffusion_pytorch_model.safetensors"),
             lambda t: t.pop("decoder.mid_block.attentions.0.to_q.weight"))
    out = tmp_path / "out"
    assert cli.main(["convert-diffusers", str(bad), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("keras-minsnr: error:")
    assert "unet: mid_block.attentions.0.proj_in.weight is missing" in err
    assert "unet: conv_out.weight has shape (3, 32, 3, 3), expected (4, 32, 3, 3)" in err
    assert "vae: decoder.mid_block.attentions.0.to_q.weight is missing" in err
    assert not out.exists()


def test_config_kerascv_cannot_take_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(FOLDER, bad)
    config_path = bad / "vae" / "config.json"
    config_path.write_text(config_path.read_text().replace('"scaling_factor": 0.18215',
                                                           '"scaling_factor": 0.13025'))
    assert cli.main(["convert-diffusers", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "scaling_factor=0.13025" in err and "0.18215" in err
    assert not (tmp_path / "out").exists()


def test_existing_files_kept_unless_overwrite(converted, capsys):
    out = os.path.dirname(converted["decoder"])
    before = os.stat(converted["decoder"]).st_mtime_ns
    assert cli.main(["convert-diffusers", FOLDER, out]) == 2
    assert "already exist" in capsys.readouterr().err
    assert os.stat(converted["decoder"]).st_mtime_ns == before


def _arrays(path):
    with h5py.File(path, "r") as f:
        return [np.asarray(f[name][key]) for name in f.attrs["layer_names"]
                for key in f[name].attrs["weight_names"]]


def test_weights_dir_is_converted_once_and_cached(converted, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    path = sd.resolve_weights(FOLDER, "v1", "image_encoder")
    assert path.startswith(str(tmp_path)) and path.endswith("vae_encoder.h5")
    for ours, cli_written in zip(_arrays(path), _arrays(converted["image_encoder"]),
                                 strict=True):
        np.testing.assert_array_equal(ours, cli_written)
    written = os.stat(path).st_mtime_ns
    assert sd.resolve_weights(FOLDER, "v1", "image_encoder") == path
    assert os.stat(path).st_mtime_ns == written
    with pytest.raises(dc.DiffusersFolderError, match="v1 weights.*'v2'"):
        sd.resolve_weights(FOLDER, "v2", "diffusion_model")
    with pytest.raises(dc.DiffusersFolderError, match="not a diffusers"):
        sd.resolve_weights(str(tmp_path), "v1", "decoder")


def _diffusers_sd3_layout(root):
    """The top of a diffusers SD3 folder (as stabilityai/stable-diffusion-3-medium-diffusers
    lays it out): model_index.json at the root, one config.json per component."""
    import json

    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline",
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"]}))
    for sub, cls in (("transformer", "SD3Transformer2DModel"), ("vae", "AutoencoderKL")):
        (root / sub).mkdir()
        (root / sub / "config.json").write_text(json.dumps({"_class_name": cls}))
    return root


def test_kerashub_does_not_load_a_diffusers_sd3_folder(tmp_path):
    """What docs/sd3.md says: KerasHub 0.32's from_preset reads KerasHub presets
    (config.json with registered_name), transformers checkpoints of the model types it
    converts, and timm; a diffusers SD3 folder is none of these, at its root or per part."""
    import keras_hub

    from keras_minsnr.backbones import sd3

    folder = _diffusers_sd3_layout(tmp_path / "sd3_diffusers")
    with pytest.raises(ValueError, match="has no config.json"):
        keras_hub.models.StableDiffusion3Backbone.from_preset(str(folder))
    with pytest.raises(ValueError, match="Unrecognized format for config.json"):
        keras_hub.models.StableDiffusion3Backbone.from_preset(str(folder / "transformer"))
    with pytest.raises(FileNotFoundError, match="not a KerasHub preset directory"):
        sd3.resolve_preset(str(folder))
