"""Runs that never lose work: NaN, kills, mid-epoch resume, backend switches.

Every run here is the digits recipe with a one-block MLP of width 16 and batches of 8, so
a step costs well under a millisecond and a run's time is its start-up.
"""

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from keras_minsnr import checkpointing
from keras_minsnr import run_config
from keras_minsnr import resume
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
    model = resume.load_checkpoint(run)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 10
    assert _state(run)["step"] == 10
    # A row per checkpoint interval; the third epoch is two steps short.
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10]
    assert [int(r["epoch"]) for r in rows] == [0, 0, 1, 1, 2]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    # keep_checkpoints=2: the last two step checkpoints with their sidecars, nothing
    # half-written.
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == [
        "state.json", "step-00000008.json", "step-00000008.keras", "step-00000010.json",
        "step-00000010.keras"]


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
    _assert_same_weights(_weights(resume.load_checkpoint(run)), good_weights)

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
from keras_minsnr import resume
from keras_minsnr import training
config, run, weights_file = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
model = resume.load_checkpoint(run)
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
        resume.config_changes(str(tmp_path), changed)
    with pytest.raises(ValueError, match="gamma cannot change in an existing run"):
        resume.config_changes(str(tmp_path), changed, ["gamma", "learning_rate"],
                                has_checkpoint=True)
    assert resume.config_changes(str(tmp_path), changed, ["gamma", "learning_rate"]) == [
        ("gamma", 5.0, 1.0), ("learning_rate", 1e-3, 5e-4), ("steps", 10, 20)]
    with pytest.raises(ValueError, match="unknown config key.*lr"):
        resume.config_changes(str(tmp_path), changed, ["lr"])


# --- Issue 27: run directories that defend themselves -----------------------------------

def _start_cli(run, fault, steps=REFERENCE["steps"]):
    """The CLI in a child process (not waited for), its output in files under ``run``'s
    parent."""
    command = [sys.executable, "-m", "keras_minsnr.cli", "train", "digits", "--output-dir", run,
               "--steps", str(steps), *TINY_ARGS,
               "--set", f"steps_per_epoch={REFERENCE['steps_per_epoch']}",
               "--set", f"checkpoint_every={REFERENCE['checkpoint_every']}"]
    env = {**os.environ, "PYTHONPATH": ROOT, checkpointing.FAULT_ENV: fault}
    logs = os.path.dirname(run)
    return subprocess.Popen(command, env=env, cwd=ROOT,
                            stdout=open(os.path.join(logs, "child.out"), "w"),
                            stderr=open(os.path.join(logs, "child.err"), "w"))


def _wait_for_checkpoint(run, child, timeout=400):
    """Waits until the child has committed a checkpoint; returns its step."""
    deadline = time.time() + timeout
    path = os.path.join(run, "checkpoints", "state.json")
    while time.time() < deadline:
        assert child.poll() is None, "the child ended before its first checkpoint"
        if os.path.exists(path):
            try:
                return _state(run)["step"]
            except ValueError:
                pass  # being replaced
        time.sleep(0.05)
    child.kill()
    raise AssertionError("no checkpoint within the time limit")


def _train_args(run, steps=REFERENCE["steps"]):
    return ["train", "digits", "--output-dir", run, "--steps", str(steps), *TINY_ARGS,
            "--set", f"steps_per_epoch={REFERENCE['steps_per_epoch']}",
            "--set", f"checkpoint_every={REFERENCE['checkpoint_every']}"]


def test_a_second_start_is_refused_while_the_first_runs_and_a_dead_ones_lock_is_taken_over(
    tmp_path, capsys, reference
):
    """Item 1: the same command twice at once. The second start must stop with one line
    naming the first process, before it writes anything; once the first is killed (-9,
    its lock file stays behind) the next start takes the lock over and ends where an
    uninterrupted run ends."""
    from keras_minsnr import cli

    _, weights, rows = reference
    run = str(tmp_path / "run")
    child = _start_cli(run, "slow:step:1")  # 0.3 s per step: still running below
    try:
        _wait_for_checkpoint(run, child)
        rows_before = _rows(run)
        capsys.readouterr()
        assert cli.main(_train_args(run)) == 2
        err = capsys.readouterr().err
        # The notes of the CPU defaults (xla_flags, tf_onednn: "keras_minsnr: ...") are not
        # part of the error.
        lines = [line for line in err.splitlines()
                 if line.strip() and not line.startswith("keras_minsnr: ")]
        assert len(lines) == 1 and lines[0].startswith("keras-minsnr: error: "), err
        assert f"in use by pid {child.pid}" in err
        assert child.poll() is None  # the first run was not disturbed
        assert _rows(run)[: len(rows_before)] == rows_before
    finally:
        child.kill()
        child.wait()
    assert os.path.exists(os.path.join(run, "run.lock"))  # SIGKILL cleans nothing up
    assert cli.main(_train_args(run)) == 0
    out = capsys.readouterr().out
    assert f"Took over the lock of {run} left by pid {child.pid}" in out
    _assert_same_weights(_weights(resume.load_checkpoint(run)), weights)
    assert _rows(run) == rows
    assert not os.path.exists(os.path.join(run, "run.lock"))


@pytest.fixture(scope="module")
def reference_to_12(reference, tmp_path_factory):
    """The reference run resumed undamaged to step 12: weights and rows."""
    run = str(tmp_path_factory.mktemp("intact") / "run")
    shutil.copytree(reference[0], run)
    model = training.train(_config(**{**REFERENCE, "steps": 12}), run, verbose=0)
    return _weights(model), _rows(run)


def _damage(run, how):
    checkpoints = os.path.join(run, "checkpoints")
    if how == "state.json deleted":
        os.remove(os.path.join(checkpoints, "state.json"))
    elif how == "state.json empty":
        open(os.path.join(checkpoints, "state.json"), "w").close()
    elif how == "state.json garbled":
        with open(os.path.join(checkpoints, "state.json"), "w") as f:
            f.write('{"step": 10, "checkp')
    elif how == "newest checkpoint truncated":
        path = os.path.join(checkpoints, "step-00000010.keras")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "newest checkpoint zeroed":
        path = os.path.join(checkpoints, "step-00000010.keras")
        with open(path, "r+b") as f:
            f.write(b"\0" * os.path.getsize(path))


@pytest.mark.parametrize("how", ["state.json deleted", "state.json empty",
                                 "state.json garbled", "newest checkpoint truncated",
                                 "newest checkpoint zeroed"])
def test_damaged_run_state_resumes_from_the_newest_checkpoint_that_loads(
    tmp_path, capsys, reference, reference_to_12, how
):
    """Item 2: the reference run (checkpoints of steps 8 and 10) damaged, then resumed to
    step 12. It must resume from step 10 (state damaged) or 8 (step 10 broken), say so,
    and end bit for bit where the undamaged run ends."""
    expected, expected_rows = reference_to_12
    run = _copy(reference, tmp_path)
    _damage(run, how)
    capsys.readouterr()
    model = training.train(_config(**{**REFERENCE, "steps": 12}), run, verbose=0)
    out = capsys.readouterr().out
    resumed_from = 8 if "checkpoint" in how else 10
    assert f"Resuming {run} from step {resumed_from} of 12" in out
    if "checkpoint" in how:
        assert "step-00000010.keras does not load" in out
        assert os.path.exists(os.path.join(run, "checkpoints", "step-00000010.keras.broken"))
    else:
        assert "state.json is " + ("missing" if "deleted" in how else "damaged") in out
    _assert_same_weights(_weights(model), expected)
    assert _rows(run) == expected_rows


def test_no_loadable_checkpoint_is_refused_until_restart(tmp_path, capsys, reference):
    """Item 2: every checkpoint broken: never a silent restart from 0; --restart moves the
    old files aside and trains from step 0 to the reference result."""
    run = _copy(reference, tmp_path)
    for name in ("step-00000008.keras", "step-00000010.keras"):
        with open(os.path.join(run, "checkpoints", name), "wb") as f:
            f.write(b"\0" * 100)
    with pytest.raises(ValueError, match="No checkpoint of .* loads.*--restart"):
        training.train(_config(**REFERENCE), run, verbose=0)
    model = training.train(_config(**REFERENCE), run, verbose=0, restart=True)
    assert "Restarting" in capsys.readouterr().out
    _assert_same_weights(_weights(model), reference[1])
    assert _rows(run) == reference[2]
    moved = [n for n in os.listdir(run) if n.startswith("replaced-")]
    assert len(moved) == 1
    assert sorted(os.listdir(os.path.join(run, moved[0]))) == [
        "checkpoints", "metrics.csv", "model.keras"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_at_the_next_step_with_a_checkpoint(tmp_path, capsys, reference, signum):
    """Item 3: one real SIGINT / SIGTERM to a training child process. It must stop after
    the step it is in, checkpoint that step, print the resume command and exit 130 / 143;
    resuming then ends bit for bit where the uninterrupted run ends."""
    _, weights, rows = reference
    run = str(tmp_path / "run")
    child = _start_cli(run, "slow:step:1")
    try:
        _wait_for_checkpoint(run, child)
        child.send_signal(signum)
        code = child.wait(timeout=300)
    finally:
        child.kill()
    with open(tmp_path / "child.err") as f:
        err = f.read()
    assert code == 128 + signum, err[-3000:]
    stopped = _state(run)["step"]
    assert 2 <= stopped < REFERENCE["steps"]
    assert f"Stopped at step {stopped} of 10 on {signal.Signals(signum).name}" in err
    assert f"--output-dir {run}" in err.split("Resume with:")[1]
    capsys.readouterr()
    model = training.train(_config(**REFERENCE), run, verbose=0)
    assert f"from step {stopped} of 10" in capsys.readouterr().out
    _assert_same_weights(_weights(model), weights)
    # The row of the interval the signal split averages the steps after the resume only.
    assert [r["step"] for r in _rows(run)] == [r["step"] for r in rows]


def test_a_second_ctrl_c_raises_at_once():
    """Item 3: the first SIGINT is only recorded; the second raises KeyboardInterrupt and
    the previous handler is back."""
    from keras_minsnr import interrupts

    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with interrupts.StopRequests() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert stop.signum == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is previous


def test_steps_below_a_finished_run_are_refused_and_config_json_is_kept(tmp_path, reference):
    """Item 4: --steps 6 on a finished 10-step run."""
    run = _copy(reference, tmp_path)
    with open(os.path.join(run, "config.json"), "rb") as f:
        before = f.read()
    with pytest.raises(ValueError, match="steps=6 is below step 10, which .* already reached"):
        training.train(_config(**{**REFERENCE, "steps": 6}), run, verbose=0)
    with open(os.path.join(run, "config.json"), "rb") as f:
        assert f.read() == before
