"""`keras-minsnr train --multihost` on TensorFlow: two `MultiWorkerMirroredStrategy`
workers on 127.0.0.1 (``TF_CONFIG``, one CPU each) train as one device does.

A CLI test: the workers and the one-device reference are `keras-minsnr` processes with
``KERAS_BACKEND=tensorflow`` (the collectives must be configured before TensorFlow
starts, so they cannot share this process). It runs in the TensorFlow pass of the suite
only: under JAX it would start the very same TensorFlow processes a second time.
"""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.test_cli_distribution import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2
TIMEOUT_S = 240


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start(run_dir, tf_config=None):
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": ROOT,
           "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TF_CONFIG", None)
    args = ["train", "digits", "--output-dir", str(run_dir), "--steps", str(STEPS), *TINY]
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
        args += ["--distribution", "data_parallel", "--multihost"]
    return subprocess.Popen([sys.executable, "-m", "keras_minsnr.cli", *args], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(processes):
    """Waits for every process; kills the rest when one fails (its peers would wait
    for it in a collective until their own timeout)."""
    results = []
    try:
        for p in processes:
            out, err = p.communicate(timeout=TIMEOUT_S)
            results.append((p.returncode, out, err))
            if p.returncode:
                break
    except subprocess.TimeoutExpired:
        results.append((None, "", "timed out"))
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def _weights(run_dir):
    model = keras.models.load_model(os.path.join(run_dir, "model.keras"), compile=False)
    return [keras.ops.convert_to_numpy(v) for v in model.backbone.weights + model.ema_weights]


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the same TensorFlow worker processes run in the KERAS_BACKEND=tensorflow pass",
)
def test_two_tensorflow_workers_equal_one_device(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = [
        _start(tmp_path / f"worker{i}", {"cluster": cluster, "task": {"type": "worker",
                                                                       "index": i}})
        for i in range(2)
    ]
    reference = _start(tmp_path / "one_device")
    results = _finish(workers + [reference])
    for code, out, err in results:
        assert code == 0, (out[-2000:], err[-4000:])
    assert len(results) == 3

    # The chief's model (worker 0 writes the run's files); each worker computed the
    # gradient of half of every global batch, and the all-reduce only reorders float32
    # sums.
    got, want = _weights(tmp_path / "worker0"), _weights(tmp_path / "one_device")
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
