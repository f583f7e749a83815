"""Several hosts as a cluster runs them, with real processes on 127.0.0.1.

`keras-minsnr train --multihost` in two JAX processes (`jax.distributed` through the
library's `initialize_multihost`, one CPU device each) with ONE ``--output-dir``:
process 0 writes the run directory, the other only its shards of a sharded checkpoint;
a run killed in the middle resumes on both and ends equal to one device; a model axis
that spans the two processes checkpoints (Orbax) and resumes on one device.

JAX-only by nature (`jax.distributed`); the decision "shared directory or one per host"
is tested on both backends with the processes played by threads. TensorFlow's
multi-worker path is covered by tests/test_tf_multi_worker.py.
"""

import csv
import glob
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest

from keras_minsnr import checkpointing
from keras_minsnr import cli
from tests.saved_weights import all_weights
from tests.saved_weights import assert_same_weights
from keras_minsnr import run_sharing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_ONLY = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="jax.distributed processes; TensorFlow's workers: tests/test_tf_multi_worker.py",
)
TINY = ["--set", "backbone_args.hidden_size=16", "--set", "backbone_args.depth=1",
        "--set", "batch_size=8", "--set", "num_samples=2", "--set", "sample_steps=2",
        "--set", "warmup_steps=0", "--set", "sample_every_epochs=1000",
        "--set", "steps_per_epoch=2", "--checkpoint-every", "2"]
# A DiT the layout rules split over a model axis of 2 (heads and MLP width), wide enough
# (head width 32) that XLA:CPU's fusion flag breaks its sharded program ("unsupported
# layout in YNN fusion"; width 16 compiles either way).
TINY_DIT = ["--set", "backbone=dit_s_2", "--set", "backbone_args.num_heads=2",
            "--set", "backbone_args.hidden_size=64"]
TIMEOUT = 300


def one_device_per_process(flags):
    """``XLA_FLAGS`` without a virtual device count (the suite's other flags stay)."""
    return " ".join(f for f in flags.split()
                    if not f.startswith("--xla_force_host_platform_device_count"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_hosts(run_dirs, args, faults=(None, None)):
    """`keras-minsnr train digits --multihost` in one process per run directory."""
    port = _free_port()
    children = []
    for index, (run_dir, fault) in enumerate(zip(run_dirs, faults)):
        env = {**os.environ, "PYTHONPATH": ROOT, "KERAS_BACKEND": "jax",
               "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu",
               "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{port}",
               "KERAS_DISTRIBUTION_NUM_PROCESSES": str(len(run_dirs)),
               "KERAS_DISTRIBUTION_PROCESS_ID": str(index)}
        env.pop(checkpointing.FAULT_ENV, None)
        env["XLA_FLAGS"] = one_device_per_process(env.get("XLA_FLAGS", ""))
        if fault:
            env[checkpointing.FAULT_ENV] = fault
        log = open(os.path.join(os.path.dirname(str(run_dir)), f"host{index}.log"), "w")
        children.append(subprocess.Popen(
            [sys.executable, "-m", "keras_minsnr.cli", "train", "digits", "--output-dir",
             str(run_dir), "--multihost", *args],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        ))
    return children


def _log(run_dir, index):
    with open(os.path.join(os.path.dirname(str(run_dir)), f"host{index}.log")) as f:
        return f.read()[-3000:]


def _finish(children, run_dir):
    deadline = time.monotonic() + TIMEOUT
    try:
        for index, child in enumerate(children):
            code = child.wait(timeout=max(deadline - time.monotonic(), 1))
            assert code == 0, _log(run_dir, index)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def _metric_steps(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


@JAX_ONLY
@pytest.mark.large  # two processes, killed and resumed, and a one-device run: minutes
def test_two_hosts_share_one_run_directory_survive_a_kill_and_equal_one_device(tmp_path):
    reference = tmp_path / "one_device"
    assert cli.main(["train", "digits", "--output-dir", str(reference), "--steps", "4",
                     *TINY]) == 0
    shared = tmp_path / "shared"
    args = ["--steps", "4", "--distribution", "data_parallel", *TINY]
    # Process 1 dies (SIGKILL) after step 3; process 0 then waits in the step's
    # all-reduce until the job is torn down, as a cluster scheduler does.
    children = _start_hosts([shared, shared], args, faults=(None, "kill:step:3"))
    try:
        assert children[1].wait(timeout=TIMEOUT) == -signal.SIGKILL, _log(shared, 1)
    finally:
        children[0].kill()
        children[0].wait()
    # One writer: one metrics row per step, checkpoint 2 committed, nothing half-written.
    assert _metric_steps(shared) == [2]
    names = sorted(os.listdir(shared / "checkpoints"))
    assert names == ["state.json", "step-00000002.json", "step-00000002.keras"]

    _finish(_start_hosts([shared, shared], args), shared)
    assert "Resuming" in _log(shared, 0) and "Resuming" in _log(shared, 1)
    assert _metric_steps(shared) == [2, 4]
    # Only process 0 wrote its TensorBoard events: one file per session.
    assert len(glob.glob(str(shared / "logs" / "events.out.tfevents.*"))) == 2
    assert not glob.glob(str(shared / ".hosts-*"))  # the sharing marker is gone
    assert_same_weights(all_weights(shared / "model.keras"), all_weights(reference / "model.keras"))


@JAX_ONLY
@pytest.mark.large  # two processes, then export and a resume here: minutes
def test_weights_split_across_two_hosts_checkpoint_and_resume_on_one_device(tmp_path):
    reference = tmp_path / "one_device"
    assert cli.main(["train", "digits", "--output-dir", str(reference), "--steps", "4",
                     *TINY, *TINY_DIT]) == 0
    run = tmp_path / "two_hosts"
    _finish(_start_hosts([run, run], ["--steps", "2", "--distribution", "model_parallel",
                                      "--mesh", "1x2", *TINY, *TINY_DIT]), run)
    # The blocks' kernels were split over the hosts: a sharded checkpoint, one part each.
    checkpoint = run / "checkpoints" / "step-00000002.orbax"
    assert sorted(glob.glob(str(checkpoint / "ocdbt.process_*"))) == [
        str(checkpoint / "ocdbt.process_0"), str(checkpoint / "ocdbt.process_1")]
    # The final model.keras holds whole arrays, gathered from both hosts.
    step_2 = all_weights(reference / "checkpoints" / "step-00000002.keras")
    assert_same_weights(all_weights(run / "model.keras"), step_2)
    # `export` turns the sharded checkpoint into one .keras file for one device.
    exported = tmp_path / "exported.keras"
    assert cli.main(["export", str(run), str(exported)]) == 0
    assert_same_weights(all_weights(exported), step_2)
    # Resumed here: one process, one device; the restore lays every array out anew.
    assert cli.main(["train", "digits", "--output-dir", str(run), "--steps", "4",
                     "--distribution", "none", *TINY, *TINY_DIT]) == 0
    assert_same_weights(all_weights(run / "model.keras"), all_weights(reference / "model.keras"))
    # FSDP over the two hosts (docs/scaling.md's TPU command): every large weight, its
    # EMA copy and AdamW slots split over the data axis, so the checkpoint is sharded too.
    fsdp = tmp_path / "fsdp"
    _finish(_start_hosts([fsdp, fsdp], ["--steps", "2", "--distribution", "fsdp",
                                        *TINY, *TINY_DIT]), fsdp)
    checkpoint = fsdp / "checkpoints" / "step-00000002.orbax"
    assert len(glob.glob(str(checkpoint / "ocdbt.process_*"))) == 2
    assert_same_weights(all_weights(fsdp / "model.keras"), step_2)


# -- the decision, with threads for processes (both backends) ---------------------------


class _ThreadCollectives:
    """`run_sharing`'s collectives for ``count`` threads that play processes."""

    def __init__(self, count):
        self.count = count
        self._barrier = threading.Barrier(count)
        self._slots = [None] * count
        self._local = threading.local()

    def bind(self, index):
        self._local.index = index

    def process_index(self):
        return self._local.index

    def process_count(self):
        return self.count

    def coordinated(self):
        return True

    def barrier(self, name):
        self._barrier.wait()

    def broadcast_from_first(self, values):
        return self.gather_from_all(values)[0]

    def gather_from_all(self, value):
        self._slots[self._local.index] = np.asarray(value)
        self._barrier.wait()
        result = list(self._slots)
        self._barrier.wait()
        return result


def _decide_in_threads(run_dirs):
    collectives = _ThreadCollectives(len(run_dirs))
    results = [None] * len(run_dirs)

    def play(index):
        collectives.bind(index)
        results[index] = run_sharing.decide(str(run_dirs[index]), collectives,
                                            wait_seconds=0.5)

    threads = [threading.Thread(target=play, args=(i,)) for i in range(len(run_dirs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_hosts_find_out_whether_they_share_the_run_directory(tmp_path):
    shared = _decide_in_threads([tmp_path / "run"] * 3)
    assert [(s.writes, s.all_shared) for s in shared] == [(True, True), (False, True),
                                                         (False, True)]
    assert os.listdir(tmp_path / "run") == []  # the marker is removed; nothing else made
    own = _decide_in_threads([tmp_path / f"host{i}" for i in range(3)])
    assert [(s.writes, s.all_shared) for s in own] == [(True, False)] * 3
    assert sorted(os.listdir(tmp_path)) == ["host0", "run"]  # only process 0 made its own
    # Hosts 0 and 1 share a folder, host 2 has its own: it writes it, orbax is impossible.
    mixed = _decide_in_threads([tmp_path / "pair", tmp_path / "pair", tmp_path / "alone"])
    assert [(s.writes, s.all_shared) for s in mixed] == [(True, False), (False, False),
                                                        (True, False)]
    assert run_sharing.decide(str(tmp_path / "single")) == run_sharing.RunSharing()
    assert all(s.locks for s in own) and [s.locks for s in shared] == [True, False, False]
