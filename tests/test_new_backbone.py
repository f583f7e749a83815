"""Adding a backbone touches `backbones/` and its test only.

`TokenMixer` below is a new backbone written in this file alone: it says how it takes its
shape and classes from the data, which of its layers the LoRA groups name and how its
weights split over a model axis (the hooks of `keras_minsnr.backbones.contract`). With no
library file edited, the run builder shapes it from the data, LoRA adapts the layers it
names and `keras.distribution` gets its layout rules.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_minsnr import backbones
from keras_minsnr import builders
from keras_minsnr import distribution
from keras_minsnr import lora
from keras_minsnr import run_config
from keras_minsnr.backbones.contract import MODEL_AXIS
from keras_minsnr.backbones.contract import check_divisible
from keras_minsnr.backbones.layers import TimestepEmbedding
from keras_minsnr.data.info import DatasetInfo

PRESET = "token_mixer_test"


@keras.saving.register_keras_serializable(package="keras_minsnr_tests")
class TokenMixer(keras.Model):
    """Pixels as tokens: a width-``width`` MLP over each pixel, shifted by the timestep and
    class embeddings."""

    def __init__(self, image_shape=(4, 4, 1), num_classes=None, width=8, **kwargs):
        super().__init__(**kwargs)
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.conditioning = "class" if num_classes else None
        self.width = width
        # Variable paths (what layout rules match) use these names.
        self.time_table = TimestepEmbedding(width, frequency_dim=16, name="time_table")
        self.label_table = (keras.layers.Embedding(num_classes + 1, width, name="label_table")
                            if num_classes else None)
        self.mix_in = keras.layers.Dense(width, activation="silu", name="mix_in")
        self.mix_out = keras.layers.Dense(self.image_shape[-1], name="mix_out")
        self.build()

    def build(self, input_shape=None):
        self.time_table.build((None,))
        if self.label_table is not None:
            self.label_table.build((None,))
        self.mix_in.build((None, None, None, self.image_shape[-1]))
        self.mix_out.build((None, None, None, self.width))

    def call(self, inputs):
        emb = self.time_table(inputs["t"])
        if self.label_table is not None:
            emb = emb + self.label_table(inputs["y"])
        return self.mix_out(self.mix_in(inputs["x"]) + emb[:, None, None, :])

    def get_config(self):
        return {**super().get_config(), "image_shape": self.image_shape,
                "num_classes": self.num_classes, "width": self.width}

    # -- the hooks (keras_minsnr.backbones.contract) -----------------------------------

    @classmethod
    def data_arguments(cls, info, config):
        return {"image_shape": tuple(info.image_shape), "num_classes": info.num_classes}

    @classmethod
    def lora_target_groups(cls):
        return {"mlp": [("TokenMixer", "mix_in|mix_out")],
                "embedding": [(None, "label_table")]}

    @classmethod
    def layout_rules(cls, config, model_shards):
        check_divisible({"width": config.get("width", 8)}, model_shards)
        return [(r".*mix_in.kernel.*", (None, MODEL_AXIS)), (r".*mix_in.bias.*", (MODEL_AXIS,)),
                (r".*mix_out.kernel.*", (MODEL_AXIS, None))]


@pytest.fixture
def preset(monkeypatch):
    monkeypatch.setitem(backbones.PRESETS, PRESET, {
        "class": TokenMixer, "config": {"width": 8}, "description": "test", "paper_params": None,
    })
    return PRESET


INFO = DatasetInfo(name="planted", image_shape=(4, 4, 1), num_classes=3)


def _config(**overrides):
    return run_config.resolve_config({
        "backbone": PRESET, "batch_size": 4, "learning_rate": 0.1, "warmup_steps": 0,
        "ema_decay": 0.0, "weight_decay": 0.0, "clipnorm": None, **overrides})


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, (4, 4, 4, 1)).astype("float32"), np.array([0, 1, 2, 0]))


def test_the_run_builder_shapes_a_new_backbone_from_the_data(preset):
    model = builders.build_model(_config(), INFO)
    assert type(model.backbone) is TokenMixer
    assert model.backbone.image_shape == INFO.image_shape and model.backbone.num_classes == 3
    # Parameters counted by hand: timestep MLP (16·8 + 8 + 8·8 + 8), the class table with
    # its null row (4·8), mix_in (1·8 + 8), mix_out (8·1 + 1).
    assert model.backbone.count_params() == (16 * 8 + 8 + 64 + 8) + 4 * 8 + 16 + 9
    before = [ops.convert_to_numpy(w) for w in model.backbone.trainable_weights]
    history = model.fit(*_data(), batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = [ops.convert_to_numpy(w) for w in model.backbone.trainable_weights]
    assert all(np.any(a != b) for a, b in zip(after, before))  # every weight trains


def test_lora_adapts_the_layers_the_new_backbone_names(preset):
    model = builders.build_model(_config(lora_rank=2, lora_alpha=4.0, lora_targets="mlp"), INFO)
    backbone = model.backbone
    assert sorted(lora.lora_layers(backbone)) == ["mix_in", "mix_out"]
    assert sorted(lora.target_layers(backbone, "embedding")) == ["label_table"]
    frozen = {w.path: ops.convert_to_numpy(w) for w in backbone.weights if not w.trainable}
    model.fit(*_data(), batch_size=4, epochs=1, verbose=0)
    for w in backbone.weights:  # the base kernels and everything else stayed put
        if w.path in frozen:
            np.testing.assert_array_equal(ops.convert_to_numpy(w), frozen[w.path])
    # Merging folds W + (alpha / rank)·A·B into the kernel: a float64 reference.
    layer = backbone.mix_in
    want = (np.asarray(ops.convert_to_numpy(layer._kernel), np.float64)
            + 2.0 * ops.convert_to_numpy(layer.lora_kernel_a).astype(np.float64)
            @ ops.convert_to_numpy(layer.lora_kernel_b).astype(np.float64))
    assert np.abs(ops.convert_to_numpy(layer.lora_kernel_b)).max() > 0  # B trained
    model.merge_lora()
    np.testing.assert_allclose(ops.convert_to_numpy(layer.kernel), want, rtol=1e-6, atol=1e-7)


def test_the_new_backbone_declares_its_own_layout(preset):
    assert distribution.backbone_rules(PRESET, 2) == TokenMixer.layout_rules({"width": 8}, 2)
    assert distribution.match_rules(PRESET, "token_mixer/mix_in/kernel") == (None, "model")
    assert distribution.match_rules(PRESET, "ema/token_mixer/mix_out/kernel") == ("model", None)
    assert distribution.match_rules(PRESET, "token_mixer/mix_out/bias") is None
    with pytest.raises(ValueError, match="width 8 is not divisible by 3"):
        distribution.backbone_rules(PRESET, 3)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution is JAX's")
def test_a_model_parallel_run_places_the_new_backbone_by_its_rules(preset):
    dist = distribution.configure("model_parallel", (1, 1), backbone_name=PRESET,
                                  set_global=False)
    with dist.scope():
        model = builders.build_model(_config(ema_decay=0.9), INFO)
    backbone = model.backbone
    want = {id(backbone.mix_in.kernel): (None, "model"), id(backbone.mix_in.bias): ("model",),
            id(backbone.mix_out.kernel): ("model", None)}
    for weight in backbone.weights:
        axes = tuple(dist.get_variable_layout(weight).axes)
        assert axes == want.get(id(weight), (None,) * len(weight.shape)), weight.path
        average = model.ema.average_of(weight)  # the EMA copy follows its weight
        if average is not None:
            assert tuple(dist.get_variable_layout(average).axes) == axes, average.path
