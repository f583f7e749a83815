"""The EMA is kept per weight: freezing, unfreezing and save/load keep the pairs right."""

import keras
import numpy as np
from keras import ops

import keras_minsnr as kms
from keras_minsnr.backbones.contract import BackboneContract
from tests.tiny_backbones import TinyConvBackbone

LR = 0.05


def values(variables):
    return [ops.convert_to_numpy(v).astype(np.float64) for v in variables]


def one_batch(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "images": rng.uniform(-1, 1, size=(4, 8, 8, 1)).astype("float32"),
        "labels": rng.integers(0, 10, size=4).astype("int32"),
    }


def make_model(decay=0.9):
    backbone = TinyConvBackbone((8, 8, 1), num_classes=10, width=4)
    return kms.DiffusionModel(backbone, "cosine", ema_decay=decay, seed=0)


def check_step(model, weights, before_w, before_ema, n):
    """After update n every EMA copy is decay_n·ema + (1 − decay_n)·w_new (float64)."""
    decay = min(model.ema_decay, (1 + n) / (10 + n))
    for w, w0, e0 in zip(weights, before_w, before_ema):
        got = ops.convert_to_numpy(model.ema.average_of(w))
        expected = decay * e0 + (1 - decay) * ops.convert_to_numpy(w).astype(np.float64)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7, err_msg=w.path)


def test_freezing_a_layer_after_building_pairs_each_copy_with_its_weight():
    model = make_model()
    backbone = model.backbone
    assert [a.path for a in model.ema_weights] == [
        "ema/" + w.path for w in backbone.trainable_variables
    ]
    backbone.conv_in.trainable = False  # the first step of fine-tuning
    frozen = list(backbone.conv_in.weights)
    trained = list(backbone.trainable_variables)
    model.compile(optimizer=keras.optimizers.SGD(LR))
    frozen_before = values(frozen)
    ema_before = values([model.ema.average_of(w) for w in trained])
    model.fit(one_batch(), batch_size=4, epochs=1, verbose=0)
    for w, before in zip(frozen, frozen_before):
        np.testing.assert_array_equal(ops.convert_to_numpy(w), before)
        np.testing.assert_array_equal(ops.convert_to_numpy(model.ema.average_of(w)), before)
    # Before the first update the copies equal the weights, so ema_before is w0.
    check_step(model, trained, ema_before, ema_before, n=1)

    # Unfreeze between fit() calls: Keras needs a new compile() for the new variable set.
    backbone.conv_in.trainable = True
    model.compile(optimizer=keras.optimizers.SGD(LR))
    weights = list(backbone.trainable_variables)
    ema_before = values([model.ema.average_of(w) for w in weights])
    model.fit(one_batch(1), batch_size=4, epochs=1, verbose=0)
    check_step(model, weights, ema_before, ema_before, n=1)
    assert not np.allclose(ops.convert_to_numpy(frozen[0]), frozen_before[0])


def test_a_layer_frozen_before_wrapping_gets_its_copy_when_unfrozen(tmp_path):
    backbone = TinyConvBackbone((8, 8, 1), num_classes=10, width=4)
    backbone(BackboneContract((8, 8, 1), "class", 10).dummy_inputs(1))
    backbone.conv_out.trainable = False
    model = kms.DiffusionModel(backbone, "cosine", ema_decay=0.9, seed=0)
    assert all(model.ema.average_of(w) is None for w in backbone.conv_out.weights)
    count = len(model.ema_weights)
    backbone.conv_out.trainable = True
    model.compile(optimizer=keras.optimizers.SGD(LR))
    weights = list(backbone.trainable_variables)
    start = values(weights)
    model.fit(one_batch(), batch_size=4, epochs=1, verbose=0)
    assert len(model.ema_weights) == count + 2  # kernel and bias of conv_out
    check_step(model, weights, start, start, n=1)

    # A model saved with late copies loads with every copy in place.
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    for w, w2 in zip(backbone.weights, restored.backbone.weights):
        a, a2 = model.ema.average_of(w), restored.ema.average_of(w2)
        assert (a is None) == (a2 is None)
        if a is not None:
            np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(a2))
    kwargs = dict(labels=[1, 2], num_steps=3, seed=0, clip_denoised=True)
    np.testing.assert_array_equal(model.generate(**kwargs), restored.generate(**kwargs))


def test_generate_uses_the_average_of_trainable_weights_only():
    model = make_model(decay=0.5)
    for i, average in enumerate(model.ema_weights):
        average.assign(np.full(average.shape, i + 1.0, "float32"))
    model.backbone.conv_in.trainable = False
    trainable, non_trainable = model.sampling_weights(use_ema=True)
    expected = [i + 1.0 for i, w in enumerate(model.ema.averages)
                if not any(w is model.ema.average_of(f) for f in model.backbone.conv_in.weights)]
    assert len(trainable) == len(expected)
    for got, want in zip(trainable, expected):
        np.testing.assert_array_equal(ops.convert_to_numpy(got), want)
    # The frozen layer is sampled with its own weights.
    frozen = [ops.convert_to_numpy(v) for v in model.backbone.conv_in.weights]
    got = [ops.convert_to_numpy(v) for v in non_trainable]
    for want in frozen:
        assert any(g.shape == want.shape and np.array_equal(g, want) for g in got)


def test_a_file_saved_before_the_ema_became_a_sub_layer_loads_with_its_averages():
    """Before e4ee228 the EMA copies were the DiffusionModel's own weights; such a file
    (written by that code, see tests/data/make_ema_before_e4ee228.py) loads with every
    average on its weight, and trains on."""
    import os

    folder = os.path.join(os.path.dirname(__file__), "data")
    model = keras.models.load_model(os.path.join(folder, "ema_before_e4ee228.keras"))
    saved = np.load(os.path.join(folder, "ema_before_e4ee228.npz"))
    arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    weights = model.backbone.trainable_variables
    assert len(arrays) == 2 * len(weights)
    for k, w in enumerate(weights):
        np.testing.assert_array_equal(ops.convert_to_numpy(w), arrays[len(weights) + k])
        np.testing.assert_array_equal(
            ops.convert_to_numpy(model.ema.average_of(w)), arrays[k], err_msg=w.path)
    assert any(not np.array_equal(a, b) for a, b in zip(arrays[:len(weights)],
                                                         arrays[len(weights):]))
    model.fit(one_batch(), batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(model.generate(labels=[3], num_steps=2, seed=0)).all()
