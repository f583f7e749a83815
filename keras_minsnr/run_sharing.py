"""Which process of a multi-host run writes the run directory.

A cluster job starts the same command on every host, usually with one ``--output-dir``
on a file system all hosts mount (NFS, a bucket mount); some setups give each host a
local folder instead. Whether a path is shared cannot be read from the path, so the
processes find out: process 0 writes a marker file with a random token (the same token
on every process, broadcast from process 0) into the run directory, all processes meet
at a barrier, and each of the others looks for the marker.

- A process that sees the marker shares process 0's directory: it writes nothing there
  (process 0 writes the config, metrics, samples, lock and ``.keras`` files) except its
  part of a sharded checkpoint, and it reads ``checkpoints/state.json`` to resume.
- A process that does not see it has a directory of its own, which it writes as a
  one-host run does (the per-host layout).

The decision is made once per session, before anything else is written, and every
process learns whether all of them share one directory (`RunSharing.all_shared`): only
then can a sharded checkpoint be written, since every host writes its shards into the
same folder.

TensorFlow's workers cannot meet before their strategy exists, so there nothing is
decided: every worker writes its ``--output-dir`` and only worker 0 (the chief) holds
the lock, as before (`RunSharing.coordinated` is False).
"""

import dataclasses
import os
import time

import numpy as np

from keras_minsnr import backend as backend_lib

MARKER_PREFIX = ".hosts-"
# How long a process other than 0 looks for the marker: a network file system may show a
# new file to other clients only after its attribute cache expires.
MARKER_WAIT_SECONDS = 3.0


@dataclasses.dataclass(frozen=True)
class RunSharing:
    """Who writes a run directory, as decided by `decide`.

    Args:
        process_index: this process's index (0 on one host).
        process_count: the number of processes.
        writes: whether this process writes the run directory it was given.
        all_shared: whether every process uses process 0's directory (always False with
            one process: nothing is shared).
        coordinated: whether the processes could find it out together (JAX); without
            that every process writes and only process 0 locks the directory.
    """

    process_index: int = 0
    process_count: int = 1
    writes: bool = True
    all_shared: bool = False
    coordinated: bool = True

    @property
    def locks(self):
        """Whether this process holds the run directory's lock (`run_lock`)."""
        return self.writes and (self.coordinated or self.process_index == 0)


class _Collectives:
    """The cross-process operations `decide` needs (JAX's, from `keras_minsnr.backend`)."""

    process_index = staticmethod(backend_lib.process_index)
    process_count = staticmethod(backend_lib.process_count)
    coordinated = staticmethod(backend_lib.has_collectives)
    barrier = staticmethod(backend_lib.barrier)
    broadcast_from_first = staticmethod(backend_lib.broadcast_from_first)
    gather_from_all = staticmethod(backend_lib.gather_from_all)


def decide(run_dir, collectives=None, wait_seconds=MARKER_WAIT_SECONDS):
    """Finds out which processes share ``run_dir``; every process must call it.

    Process 0 creates ``run_dir`` (it always writes it); a process with a folder of its
    own does not create it here (`train` does, as for one host). The marker is removed
    before this returns.

    Args:
        run_dir: this process's ``--output-dir``.
        collectives: the cross-process operations (default: the backend's; tests pass
            their own).
        wait_seconds: how long a process other than 0 looks for the marker.

    Returns:
        a `RunSharing`.

    Example:
    ```python
    sharing = decide("/nfs/runs/in256")
    if sharing.writes:
        ...  # write config.json, metrics.csv, ...
    ```
    """
    ops = collectives or _Collectives
    index, count = int(ops.process_index()), int(ops.process_count())
    if count == 1:
        return RunSharing()
    if not ops.coordinated():
        return RunSharing(process_index=index, process_count=count, coordinated=False)
    token = ops.broadcast_from_first(np.frombuffer(os.urandom(16), dtype=np.uint32))
    marker = os.path.join(run_dir, MARKER_PREFIX + "".join(f"{int(t):08x}" for t in token))
    if index == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(marker, "w") as f:
            f.write("process 0 of this run writes here\n")
    ops.barrier("keras_minsnr.run_sharing.marker_written")
    seen = index == 0 or _appears(marker, wait_seconds)
    everyone = [bool(v) for v in ops.gather_from_all(np.asarray(int(seen)))]
    if index == 0:  # every process has looked: the gather above waited for all
        os.remove(marker)
    return RunSharing(process_index=index, process_count=count,
                      writes=index == 0 or not seen, all_shared=all(everyone))


def _appears(path, wait_seconds):
    deadline = time.monotonic() + wait_seconds
    while True:
        directory = os.path.dirname(path)
        # Listing the folder makes an NFS client revalidate it, not only its cache.
        if os.path.isdir(directory) and os.path.basename(path) in os.listdir(directory):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
