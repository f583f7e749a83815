"""tf.distribute.MirroredStrategy over 2 logical CPUs trains as one device does.

Logical devices must be set before TensorFlow initialises, so the training runs in a
fresh process (tests/tf_distribute_check.py), which writes a JSON report.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if keras.backend.backend() != "tensorflow":
        pytest.skip(
            "tf.distribute is TensorFlow's; the JAX equivalent (keras.distribution "
            "DataParallel against one device) is tests/test_distribution.py"
        )
    out = tmp_path_factory.mktemp("tf_distribute") / "report.json"
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": ROOT,
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "tf_distribute_check.py"), str(out)],
        env=env, capture_output=True, text=True, cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


def assert_same_state(a, b):
    # float32 sums over 4 + 4 samples instead of 8: agreement to ~1e-7 (tolerance 1e-6).
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-5, atol=1e-6)


def test_mirrored_steps_equal_one_device_steps(report):
    assert report["replicas"] == 2
    one, two = report["one_device"], report["mirrored"]
    assert one["error"] is None and two["error"] is None
    assert one["steps"] == two["steps"] == 2
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
    # Weights, then EMA copies, after two SGD steps on the same global batches.
    assert_same_state(two["state"], one["state"])


def test_nan_in_one_replica_skips_the_update_on_every_replica(report):
    bad = report["mirrored_nan"]
    assert bad["error"] is not None and "nan at step 2 (epoch 1, batch 2)" in bad["error"]
    assert bad["steps"] == 1
    # The state is that after the first (finite) global batch only.
    assert_same_state(bad["state"], report["one_device_first_batch"]["state"])


def test_mirrored_replicas_draw_their_own_noise_as_one_device_would(report):
    # Each replica must not draw the same timesteps, noise and label dropout as the other
    # (one random state is mirrored on both): the draws for the global batch are split
    # over the replicas, so the run equals one device with the same seed.
    one, two = report["one_device_random"], report["mirrored_random"]
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
    assert_same_state(two["state"], one["state"])
