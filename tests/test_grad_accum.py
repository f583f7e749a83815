"""Gradient accumulation in training runs: `grad_accum` / `--grad-accum N`.

A run's step is a real optimizer update of N micro-batches of ``batch_size``: `steps`,
checkpoints, metrics rows, `state.json`, the data position of a resume, the EMA warm-up
and the learning-rate warm-up all count updates. The runs are the digits recipe with a
one-block MLP of width 16 and micro-batches of 8, as in tests/test_reliability.py.
"""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

import keras_minsnr as kms
from keras_minsnr import builders
from keras_minsnr import checkpointing
from keras_minsnr import cli
from keras_minsnr import optimizers
from keras_minsnr import run_config
from keras_minsnr import resume
from keras_minsnr import training
from tests import test_reliability
from tests.test_diffusion_model import fixed_batch
from tests.test_diffusion_model import numpy_loss_and_grads
from tests.test_reliability import _rows
from tests.test_reliability import _state
from tests.test_reliability import _weights as _variables
from tests.tiny_backbones import PixelLinearBackbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    **test_reliability.TINY,
    # Three updates, a metrics row and a checkpoint after each; fit() epochs of one
    # update, so the kill after step 2 resumes in the middle of a 2-step epoch.
    "steps_per_epoch": 2,
    "checkpoint_every": 1,
}
ARGS = ["--steps", "3", "--grad-accum", "2",
        *[arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]]


def _config(**overrides):
    from recipes.digits import RECIPE

    return run_config.resolve_config(RECIPE, {**TINY, "steps": 3, "grad_accum": 2, **overrides})


def _calls(optimizer):
    """How many micro-batches the optimizer has seen (Keras' raw call counter)."""
    return int(ops.convert_to_numpy(optimizer._iterations))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of 3 updates of 2 micro-batches each."""
    run = str(tmp_path_factory.mktemp("accum") / "run")
    model = training.train(_config(), run, verbose=0)
    return run, model, _variables(model)


def test_steps_count_real_updates(reference):
    run, model, _ = reference
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 3
    assert _calls(model.optimizer) == 6
    assert model.optimizer.gradient_accumulation_steps == 2
    assert [int(r["step"]) for r in _rows(run)] == [1, 2, 3]
    assert [int(r["epoch"]) for r in _rows(run)] == [0, 0, 1]
    state = _state(run)
    assert state["step"] == 3 and state["batches"] == 6
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == [
        "state.json", "step-00000002.json", "step-00000002.keras", "step-00000003.json",
        "step-00000003.keras"]
    saved = keras.models.load_model(os.path.join(run, "model.keras"))
    assert int(ops.convert_to_numpy(saved.optimizer.iterations)) == 3


def test_the_run_consumed_exactly_six_micro_batches(reference):
    """Equal to one plain fit() over the first 6 batches of the same pipeline."""
    _, _, weights = reference
    config = _config()
    keras.utils.set_random_seed(config["seed"])  # as `train` does
    dataset, info = training.build_dataset(config)
    model = builders.build_model(config, info)
    model.fit(dataset.take(6), epochs=1, verbose=0, shuffle=False)
    assert _calls(model.optimizer) == 6
    for got, want in zip(_variables(model), weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # Not 3 micro-batches (one per step) nor 12: those give other weights.
    model.fit(dataset.skip(6).take(1), epochs=1, verbose=0, shuffle=False)
    assert not all(np.array_equal(g, w) for g, w in zip(_variables(model), weights))


def test_cli_stopped_after_step_2_resumes_to_the_uninterrupted_run(
    tmp_path, capsys, monkeypatch, reference
):
    """The run dies right after update 2 (micro-batch 4), before that step's checkpoint;
    the resume from step 1 skips 2 micro-batches, not 1, and replays the rest."""
    run_ref, _, weights = reference
    run = str(tmp_path / "run")
    monkeypatch.setenv(checkpointing.FAULT_ENV, "raise:step:2")
    with pytest.raises(RuntimeError, match="injected fault"):
        cli.main(["train", "digits", "--output-dir", run, *ARGS])
    assert "Effective batch: 2 micro-batches x 8 = 16" in capsys.readouterr().out
    assert _state(run)["step"] == 1 and _state(run)["batches"] == 2
    monkeypatch.delenv(checkpointing.FAULT_ENV)
    assert cli.main(["train", "digits", "--output-dir", run, *ARGS]) == 0
    assert f"Resuming {run} from step 1 of 3" in capsys.readouterr().out
    model = resume.load_checkpoint(run)
    # The same backend and program replay the same micro-batches: bit-identical.
    for got, want in zip(_variables(model), weights, strict=True):
        np.testing.assert_array_equal(got, want)
    assert _rows(run) == _rows(run_ref)
    assert _state(run)["step"] == 3 and _state(run)["batches"] == 6


def test_tensorflow_refuses_grad_accum_under_tf_distribute(tmp_path, capsys, backend):
    if backend != "tensorflow":
        pytest.skip("JAX: tested on two devices below")
    run = tmp_path / "run"
    assert cli.main(["train", "digits", "--output-dir", str(run), "--distribution",
                     "data_parallel", *ARGS]) == 2
    err = capsys.readouterr().err
    assert "grad_accum=2 with distribution='data_parallel' is not supported on TensorFlow" \
        in err and "KERAS_BACKEND=jax" in err
    assert not os.path.exists(run / "config.json")


@pytest.mark.large
def test_data_parallel_on_two_devices_equals_one_device(tmp_path, reference, backend):
    """`--distribution data_parallel --grad-accum 2` over 2 devices (4 examples each per
    micro-batch) equals the one-device run on the same micro-batches (JAX)."""
    if backend != "jax":
        pytest.skip("TensorFlow refuses grad_accum under tf.distribute (test above)")
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3",
           "KERAS_BACKEND": keras.backend.backend()}
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=2").strip()
    run = tmp_path / "two_devices"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "cli_on_two_devices.py"), "train",
         "digits", "--output-dir", str(run), "--distribution", "data_parallel", *ARGS],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model = keras.models.load_model(run / "model.keras")
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 3
    assert _calls(model.optimizer) == 6 and _state(str(run))["batches"] == 6
    one_device = reference[1]
    for got, want in zip(model.backbone.weights + model.ema_weights,
                         one_device.backbone.weights + one_device.ema_weights, strict=True):
        # Two replicas only reorder float32 sums.
        np.testing.assert_allclose(ops.convert_to_numpy(got), ops.convert_to_numpy(want),
                                   rtol=1e-4, atol=1e-6)


def test_changing_grad_accum_on_resume_needs_permission(tmp_path, capsys, reference):
    run = str(tmp_path / "run")
    shutil.copytree(reference[0], run)
    changed = _config(grad_accum=3, steps=4)
    with pytest.raises(ValueError, match=r"changed: grad_accum\).*--allow-config-change"):
        training.train(changed, run, verbose=0)
    model = training.train(changed, run, verbose=0, allow_config_change=["grad_accum"])
    assert "grad_accum 2 -> 3" in capsys.readouterr().out
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 4
    assert model.optimizer.gradient_accumulation_steps == 3
    # 3 updates of 2 micro-batches, then one of 3: the data goes on from batch 6.
    assert _state(run)["step"] == 4 and _state(run)["batches"] == 9
    assert all(np.all(np.isfinite(v)) for v in _variables(model))
    with open(os.path.join(run, "history.jsonl")) as f:
        history = [json.loads(line) for line in f]
    assert [(h["key"], h["old"], h["new"], h["step"]) for h in history] == [
        ("grad_accum", 2, 3, 3), ("steps", 3, 4, 3)]


@pytest.mark.parametrize("value, shown", [(0, "0"), (-1, "-1"), ("x", "'x'"), (2.5, "2.5"),
                                          (True, "True")])
def test_bad_grad_accum_values_are_named(value, shown):
    with pytest.raises(ValueError, match=rf"grad_accum: {shown}\. Allowed: an integer >= 1"):
        run_config.resolve_config({}, {"grad_accum": value})


@pytest.mark.parametrize("text, message", [("0", "'0' is not allowed: must be >= 1"),
                                           ("-1", "'-1' is not allowed: must be >= 1"),
                                           ("x", "'x' is not an integer")])
def test_bad_grad_accum_flags_are_named(tmp_path, capsys, text, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "digits", "--output-dir", str(tmp_path / "run"),
                  "--grad-accum", text])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--grad-accum" in err and message in err
    assert not os.path.exists(tmp_path / "run")


def test_show_prints_grad_accum(capsys):
    assert cli.main(["show", "digits", "--set", "grad_accum=4"]) == 0
    assert "grad_accum = 4  #" in capsys.readouterr().out


def test_learning_rate_warmup_counts_real_updates():
    """The warm-up of update k (1-based) uses rate · min(k − 1, W) / W, whatever N is."""
    config = _config(grad_accum=4, warmup_steps=3, learning_rate=0.1)
    optimizer = optimizers.make_optimizer(config)
    variable = keras.Variable(np.zeros(2, "float32"))
    optimizer.build([variable])
    rates = []
    for update in range(1, 6):
        # Keras reads the rate of update k while its counter of micro-batches is at the
        # update's last one, k·N − 1.
        optimizer._iterations.assign(update * 4 - 1)
        rates.append(float(ops.convert_to_numpy(optimizer.learning_rate)))
    np.testing.assert_allclose(rates, [0.0, 0.1 / 3, 0.2 / 3, 0.1, 0.1], rtol=1e-6)
    optimizer._iterations.assign(7)  # and the update really happens at that count
    optimizer.apply([ops.ones(2)], [variable])
    assert int(ops.convert_to_numpy(optimizer.iterations)) == 2
    assert float(ops.convert_to_numpy(variable[0])) < 0
    # It survives a save and load (checkpoints hold the optimizer).
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert again.get_config()["learning_rate"] == optimizer.get_config()["learning_rate"]


def _micro_batch(seed):
    batch = fixed_batch(batch=2, seed=seed)
    batch["timesteps"] = np.array([[3, 990], [250, 600], [40, 700]][seed % 3], "int32")
    return batch


def _concat(*batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_a_nan_in_a_micro_batch_skips_the_whole_update_and_its_ema_step():
    """Update 2 would average micro-batches 3 and 4; 4 is NaN: fit() stops naming step 2,
    and micro-batch 3 is dropped too, so the next update is micro-batches 5 and 6 only."""
    model = kms.DiffusionModel(PixelLinearBackbone(), "cosine", ema_decay=0.9)
    model.compile(optimizer=keras.optimizers.SGD(0.05, gradient_accumulation_steps=2))
    first = _concat(_micro_batch(1), _micro_batch(2))
    model.fit(first, batch_size=2, shuffle=False, verbose=0)
    bad = _micro_batch(4)
    bad["images"][0, 0, 0, 0] = np.nan
    with pytest.raises(FloatingPointError, match=r"nan at step 2 \(epoch 1, batch 2\)"):
        model.fit(_concat(_micro_batch(3), bad), batch_size=2, shuffle=False, verbose=0)

    def weights_and_ema():
        return ([float(ops.convert_to_numpy(v)) for v in model.backbone.trainable_variables],
                [float(ops.convert_to_numpy(v)) for v in model.ema_weights])

    _, grad_a, grad_b = numpy_loss_and_grads(first, 0.5, 0.1, "epsilon")
    one = np.array([0.5 - 0.05 * grad_a, 0.1 - 0.05 * grad_b])
    ema_one = 2 / 11 * np.array([0.5, 0.1]) + 9 / 11 * one  # warm-up decay of update 1
    weights, ema = weights_and_ema()
    np.testing.assert_allclose(weights, one, rtol=1e-5)
    np.testing.assert_allclose(ema, ema_one, rtol=1e-5)
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 1

    after = _concat(_micro_batch(5), _micro_batch(6))
    model.fit(after, batch_size=2, shuffle=False, verbose=0)
    _, grad_a, grad_b = numpy_loss_and_grads(after, *one, "epsilon")
    two = one - 0.05 * np.array([grad_a, grad_b])
    weights, ema = weights_and_ema()
    np.testing.assert_allclose(weights, two, rtol=1e-5)
    np.testing.assert_allclose(ema, 3 / 12 * ema_one + 9 / 12 * two, rtol=1e-5)
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 2


def test_xl_recipe_states_its_devices_and_every_listed_layout_keeps_batch_256():
    """The defaults are the paper's 8 x 32 data-parallel; each line of the recipe's device
    list gives an effective batch (grad_accum x batch_size) of 256."""
    import re

    from keras_minsnr import run_config
    from recipes import imagenet256_vit_xl2

    # What `keras-minsnr show imagenet256_vit_xl2` prints.
    shown = "\n" + run_config.describe(run_config.resolve_config(imagenet256_vit_xl2.RECIPE))
    for line in ('distribution = "data_parallel"', "mesh = null", "grad_accum = 1",
                 "batch_size = 256"):
        assert f"\n{line}  #" in shown, line
    lines = re.findall(r"^ {4}(\d+) devices?.*?  +(\S.*)$", imagenet256_vit_xl2.__doc__, re.M)
    assert len(lines) == 5
    for devices, options in lines:
        batch = re.search(r"batch_size=(\d+)", options)
        accum = re.search(r"--grad-accum (\d+)", options)
        batch = int(batch.group(1)) if batch else imagenet256_vit_xl2.RECIPE["batch_size"]
        accum = int(accum.group(1)) if accum else imagenet256_vit_xl2.RECIPE["grad_accum"]
        assert batch * accum == 256 and batch % int(devices) == 0, (devices, options)
        assert batch // int(devices) == 32  # the paper's per-device batch
    # The other paper-size recipes expect the same 8 x 32 data-parallel layout.
    from recipes import imagenet64_vit_l4
    from recipes import imagenet256_vit_b2

    for recipe in (imagenet64_vit_l4.RECIPE, imagenet256_vit_b2.RECIPE):
        config = run_config.resolve_config(recipe)
        assert (config["distribution"], config["mesh"], config["grad_accum"],
                config["batch_size"]) == ("data_parallel", None, 1, 256)
