"""The persistent part of a run directory: step checkpoints, metrics rows and history.

A run directory survives being killed at any instant (``kill -9``, a full disk, a NaN):

- ``checkpoints/step-00000040.keras`` are whole models (weights, optimizer, EMA). Each is
  written to a temporary file and renamed; ``checkpoints/state.json`` (also replaced
  atomically) then names the newest one. Each checkpoint also gets a sidecar
  ``step-00000040.json`` holding the same state, written after the model file, so a
  missing or damaged ``state.json`` loses nothing (`keras_minsnr.resume`). The last
  ``keep_checkpoints`` checkpoints are kept.
- ``state.json`` also holds what a `.keras` file does not restore: the state of every
  `keras.random.SeedGenerator` (the training noise) and the backend that wrote it.
- ``metrics.csv`` gets one row per logged step, written before the checkpoint of that
  step; on resume rows after the checkpoint's step are dropped and replayed, so a crash
  between the two never leaves two rows for one step.
- ``history.jsonl`` records every change of the configuration between sessions.
- With ``checkpoint_format`` ``orbax`` a checkpoint is the folder ``step-00000040.orbax/``
  (`keras_minsnr.sharded_checkpoint`: each host writes its shards, Orbax renames the
  folder when all are in); sidecars, ``state.json`` and ``keep_checkpoints`` are the same.
- In a multi-host run that shares the directory only process 0 writes these files
  (``RunDirectory(writes=False)`` on the others, `keras_minsnr.run_sharing`).

Faults can be injected for tests with the environment variable ``KERAS_MINSNR_FAULT``
set to ``ACTION:POINT:STEP``: ``ACTION`` is ``kill`` (SIGKILL, nothing is cleaned up),
``raise`` (a `RuntimeError`) or ``slow`` (sleep `SLOW_SECONDS` after that step and every
later one, so that a test can act on a running process), ``POINT`` is ``step`` (after
that optimizer step) or
``checkpoint`` (inside the checkpoint write of that step, after its metrics row and after
the temporary file is written, before it is renamed).
"""

import csv
import datetime
import glob
import json
import os
import re
import shutil
import signal
import time

import keras
import numpy as np

from keras_minsnr import backend as backend_lib
from keras_minsnr.run_config import CHECKPOINT_FORMATS

FAULT_ENV = "KERAS_MINSNR_FAULT"
SLOW_SECONDS = 0.3
_CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)\.(keras|orbax)$")
# Orbax writes a checkpoint into a folder of this name and renames it when committed.
_ORBAX_TEMPORARY = "*.orbax-checkpoint-tmp*"


def inject_fault(point, step):
    """Kills or interrupts the process when ``KERAS_MINSNR_FAULT`` names this point."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    action, fault_point, fault_step = spec.split(":")
    if action == "slow" and fault_point == point and int(step) >= int(fault_step):
        time.sleep(SLOW_SECONDS)
        return
    if fault_point != point or int(fault_step) != int(step):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault {spec}")


def atomic_write_json(path, obj):
    _atomic_write(path, lambda tmp: _dump_json(tmp, obj))


def atomic_save_model(model, path, fault_step=None):
    """``model.save`` to ``path`` through a temporary file: ``path`` is whole or absent."""

    def save(tmp):
        model.save(tmp)
        if fault_step is not None:
            inject_fault("checkpoint", fault_step)

    _atomic_write(path, save, suffix=".tmp.keras")


def _dump_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)


def _atomic_write(path, write, suffix=".tmp"):
    tmp = path + suffix
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        # A failed write (full disk, an exception) leaves no partial file behind.
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def seed_states(model):
    """The states of the model's `SeedGenerator`s, which `.keras` files do not restore."""
    return [
        backend_lib.host_value(v.value).tolist()
        for v in model.non_trainable_variables
        if v.name == "seed_generator_state"
    ]


def restore_seed_states(model, states):
    variables = [v for v in model.non_trainable_variables if v.name == "seed_generator_state"]
    if len(variables) != len(states):
        raise ValueError(
            f"The checkpoint holds {len(states)} random-generator states but the model has "
            f"{len(variables)}; the checkpoint does not belong to this model."
        )
    for variable, state in zip(variables, states):
        variable.assign(np.asarray(state, dtype=variable.dtype))


class RunDirectory:
    """Checkpoints, metrics rows and history of one run directory.

    Args:
        run_dir: the run directory (created if missing).
        keep_checkpoints: how many step checkpoints to keep (the newest ones).
        writes: whether this process writes the directory. In a multi-host run that
            shares one directory only process 0 does (`keras_minsnr.run_sharing`); the
            others take part in what needs every process (gathering split arrays, the
            shards of an Orbax checkpoint) and write nothing else.
        checkpoint_format: ``"keras"`` (``step-N.keras``, whole arrays, gathered from
            the hosts when split) or ``"orbax"`` (``step-N.orbax/``, each host writes its
            shards; `keras_minsnr.sharded_checkpoint`).

    Example:

    >>> run = RunDirectory("runs/digits")
    >>> state = run.read_state()       # None before the first checkpoint
    >>> run.truncate_metrics(state["step"] if state else 0)
    """

    def __init__(self, run_dir, keep_checkpoints=2, writes=True, checkpoint_format="keras"):
        if int(keep_checkpoints) < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep_checkpoints!r}.")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got "
                             f"{checkpoint_format!r}.")
        self.run_dir = run_dir
        self.keep_checkpoints = int(keep_checkpoints)
        self.writes = bool(writes)
        self.checkpoint_format = checkpoint_format
        self.checkpoint_dir = os.path.join(run_dir, "checkpoints")
        self.state_path = os.path.join(self.checkpoint_dir, "state.json")
        self.metrics_path = os.path.join(run_dir, "metrics.csv")
        self.history_path = os.path.join(run_dir, "history.jsonl")

    # -- checkpoints --------------------------------------------------------------------

    def read_state(self):
        """The newest committed checkpoint's state (``step``, ``checkpoint``, ...) or None."""
        if not os.path.exists(self.state_path):
            return None
        with open(self.state_path) as f:
            state = json.load(f)
        state.setdefault("checkpoint", "latest.keras")  # run directories before step files
        if not os.path.exists(os.path.join(self.checkpoint_dir, state["checkpoint"])):
            raise FileNotFoundError(
                f"{self.state_path} names {state['checkpoint']}, which is missing; the run "
                "directory was modified by hand."
            )
        return state

    def checkpoint_path(self, state):
        return os.path.join(self.checkpoint_dir, state["checkpoint"])

    def remove_partial_files(self):
        """Deletes temporary files a killed process left behind (never a committed file)."""
        if not self.writes:
            return
        for directory in (self.run_dir, self.checkpoint_dir):
            for pattern in ("*.tmp", "*.tmp.keras"):
                for path in glob.glob(os.path.join(directory, pattern)):
                    os.remove(path)
        for path in glob.glob(os.path.join(self.checkpoint_dir, _ORBAX_TEMPORARY)):
            shutil.rmtree(path, ignore_errors=True)

    def save_checkpoint(self, model, step, epoch, extra=None):
        """Writes checkpoint ``step``; in a multi-host run every process calls it."""
        name = f"step-{step:08d}.{self.checkpoint_format}"
        path = os.path.join(self.checkpoint_dir, name)
        if self.writes:
            os.makedirs(self.checkpoint_dir, exist_ok=True)
        if self.checkpoint_format == "orbax":
            from keras_minsnr import sharded_checkpoint

            # Every process writes its shards; Orbax renames the folder once all are in.
            sharded_checkpoint.save(model, path)
            inject_fault("checkpoint", step)
        else:
            with backend_lib.readable_variables(model):
                if self.writes:
                    with backend_lib.one_process_only():
                        atomic_save_model(model, path, fault_step=step)
        if not self.writes:
            return
        state = {
            "step": int(step),
            "epoch": int(epoch),
            "checkpoint": name,
            "backend": keras.backend.backend(),
            "seed_states": seed_states(model),
            **(extra or {}),  # e.g. the micro-batches consumed (training.py)
        }
        # The sidecar makes the file resumable on its own; state.json points at it.
        atomic_write_json(self.sidecar_path(name), state)
        atomic_write_json(self.state_path, state)
        self._remove_old_checkpoints(keep=name)

    def sidecar_path(self, name):
        """``step-N.json`` next to ``step-N.keras`` (or ``step-N.orbax``): its state."""
        return os.path.join(self.checkpoint_dir, os.path.splitext(name)[0] + ".json")

    def checkpoint_files(self):
        """``[(step, name)]`` of the step checkpoints on disk, oldest first."""
        if not os.path.isdir(self.checkpoint_dir):
            return []
        return sorted(
            (int(m.group(1)), name)
            for name in os.listdir(self.checkpoint_dir)
            if (m := _CHECKPOINT_PATTERN.match(name))
        )

    def _remove_old_checkpoints(self, keep):
        for _, name in self.checkpoint_files()[: -self.keep_checkpoints]:
            if name != keep:
                remove_checkpoint(os.path.join(self.checkpoint_dir, name))
                if os.path.exists(self.sidecar_path(name)):
                    os.remove(self.sidecar_path(name))

    # -- metrics ------------------------------------------------------------------------

    def truncate_metrics(self, step):
        """Drops the rows logged after ``step`` (and a half-written last line)."""
        if not self.writes or not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path, newline="") as f:
            lines = f.read().splitlines(keepends=True)
        if not lines:
            return
        header = next(csv.reader([lines[0]]))
        if "step" not in header:
            return  # a run directory from before step-numbered rows
        kept = [lines[0]]
        for line in lines[1:]:
            row = next(csv.reader([line]), [])
            if not line.endswith("\n") or len(row) != len(header):
                break
            if int(row[header.index("step")]) > step:
                break
            kept.append(line)
        if len(kept) != len(lines):
            atomic_write_text(self.metrics_path, "".join(kept))

    def append_metrics(self, row):
        """Appends one row (``epoch``, ``step`` and the logged metrics)."""
        if not self.writes:
            return
        exists = os.path.exists(self.metrics_path) and os.path.getsize(self.metrics_path) > 0
        if exists:
            with open(self.metrics_path, newline="") as f:
                fields = next(csv.reader(f))
        else:
            fields = ["epoch", "step", *sorted(k for k in row if k not in ("epoch", "step"))]
        with open(self.metrics_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if not exists:
                writer.writeheader()
            writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())

    # -- history ------------------------------------------------------------------------

    def record_change(self, step, key, old, new):
        if not self.writes:
            return
        entry = {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "step": int(step),
            "key": key,
            "old": old,
            "new": new,
        }
        with open(self.history_path, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")


def remove_checkpoint(path):
    """Deletes a checkpoint: a ``.keras`` file or an Orbax folder."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def atomic_write_text(path, text):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(text)

    _atomic_write(path, write)
