"""Runs that never lose work: NaN, kills, mid-epoch resume, backend switches.

Every run here is the digits recipe with a one-block MLP of width 16 and batches of 8, so
a step costs well under a millisecond and a run's time is its start-up.
"""

import csv
import json
import os
import random
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_minsnr import checkpointing
from keras_minsnr import run_config
from keras_minsnr import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "backbone_args.hidden_size": 16,
    "backbone_args.depth": 1,
    "batch_size": 8,
    "num_samples": 2,
    "sample_steps": 2,
    "warmup_steps": 0,
    "sample_every_epochs": 1000,
}
TINY_ARGS = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]


def _config(**overrides):
    from recipes.digits import RECIPE

    return run_config.resolve_config(RECIPE, {**TINY, **overrides})


def _weights(model):
    """Every variable of the model (weights, EMA, optimizer slots), as float64 numpy."""
    values = [*model.trainable_variables, *model.non_trainable_variables,
              *model.optimizer.variables]
    return [np.asarray(keras.ops.convert_to_numpy(v), dtype="float64") for v in values]


def _rows(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def _state(run):
    with open(os.path.join(run, "checkpoints", "state.json")) as f:
        return json.load(f)


def _assert_same_weights(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        # Same backend, same device, same program: the replay is bit-for-bit.
        np.testing.assert_array_equal(a, e)


REFERENCE = dict(steps=10, steps_per_epoch=4, checkpoint_every=2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: 10 steps, epochs of 4, a checkpoint every 2 steps."""
    run = str(tmp_path_factory.mktemp("reference") / "run")
    model = training.train(_config(**REFERENCE), run, verbose=0)
    return run, _weights(model), _rows(run)


def test_steps_trains_exactly_that_many_optimizer_steps(reference):
    run, _, rows = reference
    model = training.load_checkpoint(run)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 10
    assert _state(run)["step"] == 10
    # A row per checkpoint interval; the third epoch is two steps short.
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10]
    assert [int(r["epoch"]) for r in rows] == [0, 0, 1, 1, 2]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    # keep_checkpoints=2: the last two step checkpoints, nothing half-written.
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == [
        "state.json", "step-00000008.keras", "step-00000010.keras"]


def _copy(reference, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(reference[0], run)
    return run


def test_a_nan_keeps_the_last_good_checkpoint_and_resumes_with_a_lower_rate(
    tmp_path, capsys, reference
):
    run = _copy(reference, tmp_path)  # checkpointed at step 10, rows up to step 10
    good_weights, good_rows = reference[1], reference[2]
    with pytest.raises(FloatingPointError, match=r"step 10.*--allow-config-change learning_rate"):
        training.train(_config(**{**REFERENCE, "steps": 14, "learning_rate": 1e30}), run,
                       verbose=0, allow_config_change=["learning_rate"])
    # The interval that hit the NaN (steps 11-12) left no trace: same checkpoint, no row.
    assert _state(run)["step"] == 10
    assert _rows(run) == good_rows
    _assert_same_weights(_weights(training.load_checkpoint(run)), good_weights)

    # Without an explicit permission a changed rate is refused, naming the way out.
    lower = _config(**{**REFERENCE, "steps": 14, "learning_rate": 5e-4})
    with pytest.raises(ValueError, match="learning_rate.*--allow-config-change"):
        training.train(lower, run, verbose=0)
    capsys.readouterr()
    model = training.train(lower, run, verbose=0, allow_config_change=["learning_rate"])
    assert "learning_rate" in capsys.readouterr().out
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 14
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(5e-4)
    assert all(np.all(np.isfinite(w)) for w in _weights(model))
    assert [int(r["step"]) for r in _rows(run)] == [2, 4, 6, 8, 10, 12, 14]
    with open(os.path.join(run, "history.jsonl")) as f:
        history = [json.loads(line) for line in f]
    changes = [(h["key"], h["old"], h["new"], h["step"]) for h in history
               if h["key"] == "learning_rate"]
    assert changes == [("learning_rate", 1e-3, 1e30, 10), ("learning_rate", 1e30, 5e-4, 10)]


_SWITCH_CHILD = """
import json, sys
import keras, numpy as np
from keras_minsnr import builders
from keras_minsnr import checkpointing
from keras_minsnr import training
config, run, weights_file = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
model = training.load_checkpoint(run)
fresh = builders.build_model(config, training.build_dataset(config)[1])
expected = np.load(weights_file)
values = [*model.trainable_variables, *model.non_trainable_variables, *model.optimizer.variables]
same = all(np.allclose(keras.ops.convert_to_numpy(v), expected[f"w{i}"], rtol=0, atol=0)
           for i, v in enumerate(values))
start = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
model = training.train(config, run, verbose=0)
print("RESULT", json.dumps({
    "jit_compile": model.jit_compile, "default_jit_compile": fresh.jit_compile,
    "loaded_weights_equal": bool(same), "start_step": start,
    "end_step": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
    "finite": bool(all(np.all(np.isfinite(keras.ops.convert_to_numpy(v)))
                       for v in model.trainable_variables)),
}))
"""


def test_a_checkpoint_resumes_on_the_other_backend(tmp_path, backend, reference):
    """TF -> JAX in the TensorFlow suite, JAX -> TF in the JAX suite."""
    other = "jax" if backend == "tensorflow" else "tensorflow"
    run = _copy(reference, tmp_path)
    assert _state(run)["backend"] == backend
    np.savez(tmp_path / "w.npz", **{f"w{i}": w for i, w in enumerate(reference[1])})

    config = _config(**{**REFERENCE, "steps": 12})
    env = {**os.environ, "PYTHONPATH": ROOT, "KERAS_BACKEND": other}
    child = subprocess.run(
        [sys.executable, "-c", _SWITCH_CHILD, json.dumps(config), run, str(tmp_path / "w.npz")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.split("RESULT", 1)[1])
    assert result["jit_compile"] == result["default_jit_compile"]
    assert result["jit_compile"] == (other == "jax")  # CPU defaults: XLA on JAX, graph on TF
    assert result["loaded_weights_equal"] and result["start_step"] == 10
    assert result["end_step"] == 12 and result["finite"]
    assert _state(run)["backend"] == other
    with open(os.path.join(run, "history.jsonl")) as f:
        assert any(h["key"] == "backend" and h["old"] == backend and h["new"] == other
                   for h in map(json.loads, f))


def _cli(run, fault):
    command = [sys.executable, "-m", "keras_minsnr.cli", "train", "digits", "--output-dir", run,
               "--steps", str(REFERENCE["steps"]), *TINY_ARGS,
               "--set", f"steps_per_epoch={REFERENCE['steps_per_epoch']}",
               "--set", f"checkpoint_every={REFERENCE['checkpoint_every']}"]
    env = {**os.environ, "PYTHONPATH": ROOT, checkpointing.FAULT_ENV: fault}
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def _kill_and_resume(run, faults):
    """Runs the CLI once per fault (each one SIGKILLs it), then resumes to the end."""
    for fault in faults:
        result = _cli(run, fault)
        assert result.returncode == -9, (fault, result.stdout[-2000:], result.stderr[-2000:])
    return training.train(_config(**REFERENCE), run, verbose=0)


def _fault_schedule(seed):
    """Two kills: after a random step, then inside a later checkpoint write."""
    rng = random.Random(seed)
    first = rng.randint(1, REFERENCE["steps"] - 3)
    second = rng.choice([s for s in range(first + 1, REFERENCE["steps"] + 1) if s % 2 == 0])
    return [f"kill:step:{first}", f"kill:checkpoint:{second}"]


def test_cli_killed_in_a_checkpoint_write_resumes_to_the_uninterrupted_result(
    tmp_path, backend, capsys, reference
):
    """kill -9 of the CLI inside the checkpoint write of step 4 (TF) / 8 (JAX), after that
    step's metrics row: the step-2 / step-6 checkpoint stays current, the row is dropped,
    and the resume (mid-epoch: epochs are 4 steps) equals the run that never stopped."""
    _, weights, rows = reference
    run = str(tmp_path / "run")
    kill_step = {"tensorflow": 4, "jax": 8}[backend]
    result = _cli(run, f"kill:checkpoint:{kill_step}")
    assert result.returncode == -9, (result.stdout[-2000:], result.stderr[-2000:])
    assert _state(run)["step"] == kill_step - 2
    assert [int(r["step"]) for r in _rows(run)][-1] == kill_step  # written, not committed
    capsys.readouterr()

    model = training.train(_config(**REFERENCE), run, verbose=0)
    assert f"Resuming {run} from step {kill_step - 2} of 10" in capsys.readouterr().out
    _assert_same_weights(_weights(model), weights)
    assert _rows(run) == rows  # one row per logged step, the same values
    assert not [n for n in os.listdir(os.path.join(run, "checkpoints")) if ".tmp" in n]


@pytest.mark.large
@pytest.mark.parametrize("seed", [0, 1])  # docs/reliability.md counts a run of seeds 0-3
def test_cli_fault_injection_random_schedules(tmp_path, reference, seed):
    """kill -9 after a random step, then inside a later checkpoint write; resume.

    Seed 0 kills after step 7 and in the write of the final checkpoint (step 10); seed 1
    after step 2 (before the first checkpoint: a restart from scratch) and in step 4's."""
    _, weights, rows = reference
    run = str(tmp_path / "run")
    model = _kill_and_resume(run, _fault_schedule(seed))
    _assert_same_weights(_weights(model), weights)
    assert _rows(run) == rows


def test_truncated_metrics_keep_the_rows_up_to_the_checkpoint(tmp_path):
    run = checkpointing.RunDirectory(str(tmp_path))
    for step in (2, 4, 6):
        run.append_metrics({"epoch": (step - 1) // 4, "step": step, "loss": 0.5})
    with open(run.metrics_path, "a") as f:
        f.write("2,8,0.")  # killed while writing the row of step 8
    run.truncate_metrics(4)
    assert [(r["epoch"], r["step"], r["loss"]) for r in _rows(str(tmp_path))] == [
        ("0", "2", "0.5"), ("0", "4", "0.5")]
    run.truncate_metrics(0)  # killed before the first checkpoint: no row survives
    assert _rows(str(tmp_path)) == []


def test_config_changes_need_permission_and_never_touch_the_saved_model(tmp_path):
    config = _config(**REFERENCE)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    changed = {**config, "steps": 20, "learning_rate": 5e-4, "gamma": 1.0}
    with pytest.raises(ValueError, match=r"changed: gamma, learning_rate\)"):
        training.config_changes(str(tmp_path), changed)
    with pytest.raises(ValueError, match="gamma cannot change in an existing run"):
        training.config_changes(str(tmp_path), changed, ["gamma", "learning_rate"],
                                has_checkpoint=True)
    assert training.config_changes(str(tmp_path), changed, ["gamma", "learning_rate"]) == [
        ("gamma", 5.0, 1.0), ("learning_rate", 1e-3, 5e-4), ("steps", 10, 20)]
    with pytest.raises(ValueError, match="unknown config key.*lr"):
        training.config_changes(str(tmp_path), changed, ["lr"])
