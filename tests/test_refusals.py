"""Bad input is refused before anything is written, in one line naming the value (issue 27,
items 4 and 5): config and data errors of `train`, device settings, backbones whose output
does not match their input, labels outside the classes, and `generate` arguments."""

import json

import keras
import numpy as np
import pytest
from keras import ops
from PIL import Image

from keras_minsnr import cli
from keras_minsnr import run_config
from keras_minsnr import training
from keras_minsnr.diffusion_model import DiffusionModel
from keras_minsnr.schedules import NoiseSchedule
from tests.tiny_backbones import TinyConvBackbone

SHORT = ["--set", "steps=2", "--set", "steps_per_epoch=2", "--set", "sample_steps=2",
         "--set", "num_samples=4"]
SMALL_MLP = ["--set", "backbone_args.hidden_size=16", "--set", "backbone_args.depth=1"]


def _refused(capsys, run, *flags, backbone_args=SMALL_MLP):
    """Runs `train digits` with ``flags``; asserts exit 2, one line, no output folder."""
    code = cli.main(["train", "digits", "--output-dir", str(run), *SHORT, *backbone_args,
                     *flags])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert not run.exists()
    # The notes of the CPU defaults (xla_flags, tf_onednn: "keras_minsnr: ...") are not
    # part of the error.
    lines = [line for line in err.splitlines()
             if line.strip() and not line.startswith("keras_minsnr: ")]
    assert len(lines) == 1 and lines[0].startswith("keras-minsnr: error: "), err[-3000:]
    return lines[0]


def _caption_folder(path, encoding):
    path.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), "uint8")).save(path / "a.png")
    with open(path / "metadata.jsonl", "w", encoding=encoding) as f:
        f.write(json.dumps({"file_name": "a.png", "text": "un café"}, ensure_ascii=False))


@pytest.mark.parametrize("case, words", [
    ("unknown backbone_args key", ["nope"]),
    ("backbone_args.depth=-1", ["depth", "-1"]),
    ("missing data folder", ["does-not-exist"]),
    ("data_args.split=nope", ["split", "nope"]),
    ("empty image folder", ["empty"]),
    ("Latin-1 metadata.jsonl", ["metadata.jsonl", "UTF-8"]),
])
def test_train_refuses_bad_config_and_data_before_creating_the_output_folder(
    tmp_path, capsys, case, words
):
    """Item 4: each of these used to create an empty --output-dir before the error."""
    flags = {
        "unknown backbone_args key": ["--set", "backbone_args.nope=1"],
        "backbone_args.depth=-1": ["--set", "backbone_args.depth=-1"],
        "missing data folder": ["--set", f"data={tmp_path / 'does-not-exist'}"],
        "data_args.split=nope": ["--set", "data_args.split=nope"],
        "empty image folder": ["--set", f"data={tmp_path / 'empty'}"],
        "Latin-1 metadata.jsonl": ["--set", f"data={tmp_path / 'captions'}"],
    }[case]
    (tmp_path / "empty").mkdir()
    _caption_folder(tmp_path / "captions", "latin-1")
    line = _refused(capsys, tmp_path / "run", *flags)
    for word in words:
        assert word.lower() in line.lower(), (word, line)


def test_a_mesh_without_a_distribution_is_refused(tmp_path, capsys):
    """Item 5: --mesh 3x3 with distribution none was ignored."""
    line = _refused(capsys, tmp_path / "run", "--mesh", "3x3")
    assert "mesh='3x3'" in line and "data_parallel" in line and "model_parallel" in line


@pytest.mark.parametrize("backbone", ["mlp_digits", "unet_cifar10"])
def test_model_parallel_with_nothing_to_split_is_refused(tmp_path, capsys, backbone):
    """Item 5: model_parallel for a backbone that declares no layout rules only repeated
    the work on the model axis (JAX); TensorFlow refuses model_parallel altogether."""
    line = _refused(capsys, tmp_path / "run", "--distribution", "model_parallel",
                    "--set", f"backbone={backbone}", backbone_args=[])
    if keras.backend.backend() == "jax":
        assert backbone in line and "layout rules" in line and "data_parallel" in line
    else:
        assert "needs the JAX backend" in line


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="JAX runs fsdp: tests/test_distribution.py, test_cli_distribution.py")
def test_fsdp_on_tensorflow_is_refused(tmp_path, capsys):
    """Issue 25, item 4: FSDP is keras.distribution's (JAX); tf.distribute has no such
    layout here."""
    line = _refused(capsys, tmp_path / "run", "--distribution", "fsdp")
    assert "distribution='fsdp'" in line and "needs the JAX backend" in line


class _WrongOutput(TinyConvBackbone):
    """Returns an output shaped unlike its input: 3 channels, pooled or half size."""

    def __init__(self, output, **kwargs):
        super().__init__(**kwargs)
        self.wrong = output

    def call(self, inputs):
        out = super().call(inputs)
        if self.wrong == "channels":
            return ops.concatenate([out, out, out], axis=-1)
        if self.wrong == "pooled":
            return ops.mean(out, axis=(1, 2), keepdims=True)
        if self.wrong == "half":
            return out[:, ::2, ::2, :]
        return out


@pytest.mark.parametrize("output, shape", [
    ("channels", "(8, 8, 3)"), ("pooled", "(1, 1, 1)"), ("half", "(4, 4, 1)")])
def test_a_backbone_whose_output_differs_from_its_input_is_refused(output, shape):
    """Item 5: (8, 8, 3) and (1, 1, 1) trained silently by broadcasting; (4, 4, 1) ended in
    a JAX broadcasting TypeError."""
    model = DiffusionModel(_WrongOutput(output), NoiseSchedule("cosine", 100))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    images = np.zeros((8, 8, 8, 1), "float32")
    with pytest.raises(ValueError, match=rf"output of shape \(batch, {shape[1:-1]}\).*"
                                         r"\(batch, 8, 8, 1\)"):
        model.fit(images, batch_size=4, epochs=1, verbose=0)


def _class_dataset(bad_label):
    import tensorflow as tf

    labels = np.zeros(16, "int32")
    labels[12] = bad_label  # in the second batch, after the first-batch check
    images = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)


@pytest.mark.parametrize("bad_label", [3, 7])
def test_a_label_outside_the_classes_in_a_later_batch_is_refused(bad_label):
    """Item 5: 3 classes, so 3 is the null class of guidance (trained silently) and 7 is
    past the embedding (a NaN loss on JAX, a graph traceback on TensorFlow)."""
    model = DiffusionModel(TinyConvBackbone(num_classes=3), NoiseSchedule("cosine", 100))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    with pytest.raises(ValueError, match=rf"Labels must lie in \[0, 2\].*holds {bad_label}\."):
        model.fit(_class_dataset(bad_label), epochs=1, verbose=0)


@pytest.fixture(scope="module")
def models():
    conditional = DiffusionModel(TinyConvBackbone(num_classes=3), NoiseSchedule("cosine", 100))
    unconditional = DiffusionModel(TinyConvBackbone(), NoiseSchedule("cosine", 100))
    return conditional, unconditional


@pytest.mark.parametrize("kwargs, words", [
    ({"num_samples": 0}, ["num_samples", "0", ">= 1"]),
    ({"labels": []}, ["labels", "empty"]),
    ({"num_samples": 2, "guidance_scale": -1}, ["guidance_scale", "-1", ">= 0"]),
])
def test_generate_refuses_empty_requests_and_negative_guidance(models, kwargs, words):
    """Item 5: num_samples=0 / labels=[] ended in "range() arg 3 must not be zero"."""
    with pytest.raises(ValueError) as info:
        models[0].generate(num_steps=2, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_generate_refuses_guidance_for_an_unconditional_model(models):
    with pytest.raises(ValueError, match="guidance_scale=3.*unconditional"):
        models[1].generate(2, num_steps=2, guidance_scale=3)
    assert models[1].generate(2, num_steps=2, guidance_scale=1.0).shape == (2, 8, 8, 1)


def test_a_nan_in_a_latent_cache_is_named(tmp_path):
    """Item 5: a NaN in a cached latent ended as a NaN loss naming no example."""
    from recipes.digits import RECIPE

    from keras_minsnr.data import latents

    values = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype("float32")
    values[5, 3, 3, 0] = np.nan
    dataset = [{"images": values[:8]}, {"images": values[8:]}]
    cache = str(tmp_path / "cache")
    latents.cache_latents(dataset, lambda x: x, cache, scale=1.0, shard_size=8)
    config = run_config.resolve_config(RECIPE, {
        "data": cache, "image_size": None, "batch_size": 8, "label_dropout": 0.0, "steps": 4,
        "steps_per_epoch": 2, "warmup_steps": 0, "backbone_args.hidden_size": 16,
        "backbone_args.depth": 1, "sample_every_epochs": 1000, "num_samples": 2,
        "sample_steps": 2})
    with pytest.raises(FloatingPointError, match=r"example 5 \(latents-00000.npy row 5\)"):
        training.train(config, str(tmp_path / "run"), verbose=0)
