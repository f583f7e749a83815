"""`keras-minsnr train --distribution data_parallel` on two devices, and resuming a
two-device run on one device (a run directory resumes on a different device count); on
JAX that run is `--distribution fsdp` (its state split over the two devices)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np

from keras_minsnr import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "backbone_args.hidden_size=32", "--set", "backbone_args.depth=1",
        "--set", "num_samples=10", "--set", "sample_steps=2", "--set", "batch_size=16",
        "--set", "steps_per_epoch=2"]


# What the two-device run that resumes on one device uses: FSDP where there is one.
SPLIT_STATE = "fsdp" if keras.backend.backend() == "jax" else "data_parallel"


def _train_on_two_devices(run_dir, steps, kind="data_parallel"):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3",
           "KERAS_BACKEND": keras.backend.backend()}
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=2").strip()
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "cli_on_two_devices.py"), "train",
         "digits", "--output-dir", str(run_dir), "--steps", str(steps),
         "--distribution", kind, *TINY],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _weights(run_dir):
    model = keras.models.load_model(os.path.join(run_dir, "model.keras"))
    return [keras.ops.convert_to_numpy(v) for v in model.backbone.weights]


def test_data_parallel_run_equals_one_device_and_resumes_on_one_device(tmp_path):
    one = tmp_path / "one_device"
    assert cli.main(["train", "digits", "--output-dir", str(one), "--steps", "4", *TINY]) == 0
    both = tmp_path / "two_devices"
    _train_on_two_devices(both, 4)
    moved = tmp_path / "two_then_one"
    _train_on_two_devices(moved, 2, SPLIT_STATE)
    # Resumed here, on one device: the device setting may change with the run.
    assert cli.main(["train", "digits", "--output-dir", str(moved), "--steps", "4",
                     "--distribution", "none", *TINY]) == 0

    reference = _weights(one)
    for run in (both, moved):
        for got, want in zip(_weights(run), reference, strict=True):
            # Two replicas only reorder float32 sums (the global batch, its timesteps and
            # noise are those of one device).
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    with open(moved / "history.jsonl") as f:
        changes = [json.loads(line) for line in f]
    assert {"key": "distribution", "old": SPLIT_STATE, "new": "none"}.items() <= (
        next(c for c in changes if c["key"] == "distribution").items())
