"""Gradient checkpointing (`gradient_checkpointing`, keras_minsnr/backbones/remat.py).

The reference is the same backbone without it: recomputing the blocks in the backward
pass must give the same loss and gradients (float32, ≤ 1e-6), with every block boundary
going through `keras.remat` (``jax.checkpoint`` / ``tf.recompute_grad``), and with the
UNet's dropout drawing the same mask in the forward pass and the recomputation. The
backbones are the smallest transformer and UNet presets shrunk to a few blocks of width 16
or 8.
"""

import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_minsnr as kms
from keras_minsnr import cli
from keras_minsnr import run_config
from keras_minsnr import training
from keras_minsnr.backbones import contract

TINY_PRESETS = {
    # The smallest transformer preset (the in-context ViT shares its block calls), called
    # as block(h, c): the gradient must reach c too.
    "dit": ("dit_s_2", dict(image_shape=(4, 4, 4), depth=2, hidden_size=16, num_heads=2,
                            num_classes=10)),
    # One level with attention and dropout 0.1: a down stage, the middle, two up stages.
    "unet": ("unet_cifar10", dict(image_shape=(4, 4, 3), base_channels=8,
                                  channel_multipliers=(1,), num_res_blocks=1,
                                  attention_resolutions=(4,), num_groups=4, dropout=0.1)),
}
REMAT_CALLS = {"dit": 2, "unet": 4}


def _model(kind, gradient_checkpointing):
    preset, overrides = TINY_PRESETS[kind]
    keras.utils.set_random_seed(0)  # the same weights and noise seed for both variants
    backbone = kms.backbones.get(preset, gradient_checkpointing=gradient_checkpointing,
                                 **overrides)
    return kms.DiffusionModel(backbone, kms.NoiseSchedule("cosine"), ema_decay=0.0,
                              label_dropout=0.0, seed=3)


def _loss_and_gradients(model, data):
    """The training loss and its gradients for the trainable variables, as numpy."""
    variables = model.trainable_variables
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss, _ = model.compute_training_loss(data, training=True)
        grads = tape.gradient(loss, variables)
    else:
        import jax

        def loss_fn(values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return model.compute_training_loss(data, training=True)[0]

        # LLVM optimisation changes no result here; level 0 compiles in a third of the time.
        step = jax.jit(jax.value_and_grad(loss_fn),
                       compiler_options={"xla_backend_optimization_level": 0})
        loss, grads = step([v.value for v in variables])
    return float(loss), [ops.convert_to_numpy(g) for g in grads]


@pytest.mark.parametrize("kind", sorted(TINY_PRESETS))
def test_checkpointed_blocks_give_the_same_loss_and_gradients(kind, monkeypatch):
    remat_calls = []
    real_remat = keras.remat
    monkeypatch.setattr(keras, "remat", lambda f: remat_calls.append(f) or real_remat(f))
    results = []
    for enabled in (False, True):
        model = _model(kind, enabled)
        images = np.random.RandomState(1).randn(4, *model.backbone.image_shape)
        data = images.astype("float32")
        if model.conditioning == "class":
            data = (data, np.array([0, 3, 7, 9], "int32"))
        results.append(_loss_and_gradients(model, data))
        if not enabled:
            assert not remat_calls
    # One keras.remat per block boundary, traced once.
    assert len(remat_calls) == REMAT_CALLS[kind]
    (loss, grads), (remat_loss, remat_grads) = results
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    assert len(grads) == len(remat_grads)
    assert any(np.abs(g).max() > 0 for g in grads)
    for g, remat_g in zip(grads, remat_grads):
        np.testing.assert_allclose(remat_g, g, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_the_setting_round_trips_in_a_keras_file(kind, tmp_path):
    model = _model(kind, True)
    assert model.backbone.get_config()["gradient_checkpointing"] is True
    path = os.path.join(tmp_path, "backbone.keras")
    model.backbone.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.gradient_checkpointing is True
    contract.set_gradient_checkpointing(loaded, False)
    assert loaded.get_config()["gradient_checkpointing"] is False


def test_bad_values_and_backbones_that_cannot_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"gradient_checkpointing must be True or False, "
                                         r"got 'yes'"):
        kms.backbones.get("dit_s_2", depth=1, gradient_checkpointing="yes")
    with pytest.raises(ValueError, match=r"gradient_checkpointing: 2\. Allowed: true or false"):
        run_config.resolve_config({}, {"gradient_checkpointing": 2})
    # The MLP has no blocks to recompute: refused before the run directory is made.
    config = run_config.resolve_config(
        {"backbone": "mlp_digits"}, {"gradient_checkpointing": True, "steps": 1})
    run_dir = os.path.join(tmp_path, "run")
    with pytest.raises(ValueError, match=r"backbone MLPDenoiser has no gradient_"
                                         r"checkpointing attribute"):
        training.train(config, run_dir)
    assert not os.path.exists(run_dir)


def test_the_flag_sets_the_key_and_the_key_may_change_on_resume():
    parser = cli.build_parser()
    args = parser.parse_args(["train", "digits", "--output-dir", "x",
                              "--gradient-checkpointing"])
    assert cli._config_from_args(args)["gradient_checkpointing"] is True
    args = parser.parse_args(["train", "digits", "--output-dir", "x"])
    assert cli._config_from_args(args)["gradient_checkpointing"] is False
    # Same weights and same numbers: a run may turn it on or off between sessions.
    assert "gradient_checkpointing" in run_config.RESUMABLE_KEYS


def test_a_run_turns_it_on_when_resumed_and_records_the_change(tmp_path, capsys):
    """The loaded checkpoint's backbone gets this session's setting before fit() traces."""
    from recipes.digits import RECIPE

    overrides = {"backbone": "dit_s_2", "backbone_args": {"depth": 1, "hidden_size": 16,
                                                          "num_heads": 2},
                 "batch_size": 4, "steps_per_epoch": 1, "num_samples": 2, "sample_steps": 1,
                 "sample_every_epochs": 1000, "warmup_steps": 0}
    run_dir = os.path.join(tmp_path, "run")
    first = training.train(run_config.resolve_config(RECIPE, {**overrides, "steps": 1}),
                           run_dir, verbose=0)
    assert first.backbone.gradient_checkpointing is False
    resumed = training.train(run_config.resolve_config(
        RECIPE, {**overrides, "steps": 2, "gradient_checkpointing": True}), run_dir, verbose=0)
    assert resumed.backbone.gradient_checkpointing is True
    assert int(ops.convert_to_numpy(resumed.optimizer.iterations)) == 2
    assert "gradient_checkpointing False -> True" in capsys.readouterr().out
    with open(os.path.join(run_dir, "history.jsonl")) as f:
        assert '"gradient_checkpointing"' in f.read()
