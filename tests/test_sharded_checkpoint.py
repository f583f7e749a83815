"""`checkpoint_format: orbax` from the command line: sharded step checkpoints that resume
exactly on another device count, and `keras-minsnr export` to one `.keras` file.

The multi-process case (shards written by two processes) is in tests/test_multihost.py.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_minsnr import cli
from tests.saved_weights import all_weights
from tests.saved_weights import assert_same_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "backbone_args.hidden_size=16", "--set", "backbone_args.depth=1",
        "--set", "batch_size=8", "--set", "num_samples=2", "--set", "sample_steps=2",
        "--set", "warmup_steps=0", "--set", "sample_every_epochs=1000",
        "--set", "steps_per_epoch=2", "--checkpoint-every", "2"]
ORBAX = ["--set", "checkpoint_format=orbax"]


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="Orbax shards JAX arrays")
@pytest.mark.large  # a two-device subprocess and two runs here: minutes
def test_orbax_checkpoints_on_two_devices_resume_on_one_and_export(tmp_path):
    reference = tmp_path / "one_device"
    assert cli.main(["train", "digits", "--output-dir", str(reference), "--steps", "4",
                     *TINY]) == 0
    run = tmp_path / "two_devices"
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3",
           "KERAS_BACKEND": "jax",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
           + " --xla_force_host_platform_device_count=2"}
    child = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "cli_on_two_devices.py"), "train",
         "digits", "--output-dir", str(run), "--steps", "2", "--distribution",
         "data_parallel", *ORBAX, *TINY],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert sorted(os.listdir(run / "checkpoints")) == [
        "state.json", "step-00000002.json", "step-00000002.orbax"]
    # Resumed here on one device from the sharded checkpoint: the uninterrupted run.
    assert cli.main(["train", "digits", "--output-dir", str(run), "--steps", "4",
                     "--distribution", "none", "--set", "keep_checkpoints=1", *ORBAX,
                     *TINY]) == 0
    assert sorted(os.listdir(run / "checkpoints")) == [  # keep_checkpoints applies
        "state.json", "step-00000004.json", "step-00000004.orbax"]
    uninterrupted = all_weights(reference / "model.keras")
    assert_same_weights(all_weights(run / "model.keras"), uninterrupted)
    exported = tmp_path / "exported.keras"
    assert cli.main(["export", str(run), str(exported)]) == 0
    assert_same_weights(all_weights(exported), uninterrupted)
    model = keras.saving.load_model(exported)
    images = model.generate(labels=np.arange(2, dtype="int32"), num_steps=2, seed=0)
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


@pytest.mark.skipif(keras.backend.backend() == "jax", reason="the refusal is TensorFlow's")
def test_orbax_on_tensorflow_is_refused_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "digits", "--output-dir", str(run), "--steps", "2",
                     *ORBAX, *TINY]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("keras-minsnr: error: checkpoint_format=orbax needs "
                                "KERAS_BACKEND=jax")
    assert not run.exists()


@pytest.mark.skipif(keras.backend.backend() != "jax",
                    reason="on TensorFlow Orbax is refused before this (the test above)")
def test_orbax_with_a_folder_per_host_is_refused_before_anything_is_written(
        tmp_path, capsys, monkeypatch):
    """Two hosts that each see only their own --output-dir cannot write one sharded
    checkpoint: refused before the run directory is made (it was made, then refused)."""
    from keras_minsnr import run_sharing

    # What `run_sharing.decide` finds on process 0 when process 1 did not see its marker
    # (the decision itself is tested with threads for processes in tests/test_multihost.py).
    apart = run_sharing.RunSharing(process_index=0, process_count=2, writes=True,
                                   all_shared=False)
    monkeypatch.setattr(run_sharing, "decide", lambda run_dir, *args, **kwargs: apart)
    run = tmp_path / "run"
    assert cli.main(["train", "digits", "--output-dir", str(run), "--steps", "2",
                     *ORBAX, *TINY]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("keras-minsnr: error: checkpoint_format=orbax needs one "
                                "--output-dir shared by all 2 processes"), error[-1]
    assert not run.exists()


def test_export_refuses_a_bad_output_or_run_directory_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for argv, message in (
        ([str(run), str(tmp_path / "model.h5")], "must end with .keras"),
        ([str(run), str(tmp_path / "missing" / "m.keras")], "does not exist"),
        ([str(run), str(tmp_path / "m.keras")], "is not a run directory (no config.json)"),
    ):
        assert cli.main(["export", *argv]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("keras-minsnr: error: ") and message in error, error
    assert os.listdir(tmp_path) == ["run"]  # nothing written
