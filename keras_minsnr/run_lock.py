"""One process per run directory: the ``run.lock`` file.

Two processes training into one run directory at once (a job restarted while its
predecessor still runs, a command typed twice) would each read the other's checkpoints
and interleave their metrics rows. `RunLock` makes the second one stop with one line
before it reads or writes anything.
"""

import datetime
import errno
import fcntl
import json
import os
import socket

LOCK_FILE = "run.lock"


class RunLockedError(ValueError):
    """The run directory is held by another live process."""


class RunLock:
    """An exclusive lock on a run directory, with the owner's host and pid in the file.

    The lock is an `fcntl.flock` on ``RUN_DIR/run.lock``: the kernel releases it when
    its process ends in any way (``kill -9`` included), so a lock file left behind by a
    dead process is taken over (with a message naming its owner) and a live owner makes
    `acquire` raise `RunLockedError`. The file is removed on `release`.

    Args:
        run_dir: the run directory (must exist).

    Example:
    ```python
    with RunLock("runs/digits"):
        ...  # read the state, train, write checkpoints
    ```

    Reference: flock(2); a lock on a network file system is only as good as the file
    system's support for flock (NFS v4 has it).
    """

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._file = None

    def acquire(self):
        """Takes the lock or raises `RunLockedError`; returns a message about a stale
        lock that was taken over (None otherwise)."""
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                handle.close()
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise RunLockedError(
                    f"{self.run_dir} is in use by {_describe(read_owner(self.path))}; wait "
                    "for it to end or stop it (one process per run directory)."
                ) from None
            # The owner may have removed the file between our open and flock: then we
            # hold a lock on a name nobody sees; start again on the current file.
            try:
                same = os.path.samestat(os.fstat(handle.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        previous = read_owner(self.path)
        handle.seek(0)
        handle.truncate()
        json.dump(_me(), handle)
        handle.flush()
        os.fsync(handle.fileno())
        self._file = handle
        if previous:
            return (f"Took over the lock of {self.run_dir} left by "
                    f"{_describe(previous)}, which is no longer running.")
        return None

    def release(self):
        if self._file is None:
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        self._file.close()  # closing releases the flock
        self._file = None

    def __enter__(self):
        message = self.acquire()
        if message:
            print(message)
        return self

    def __exit__(self, *exc_info):
        self.release()


def read_owner(path):
    """The ``{"host", "pid", "since"}`` written in a lock file, or None."""
    try:
        with open(path) as f:
            owner = json.load(f)
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _me():
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _describe(owner):
    if not owner:
        return "another process"
    return f"pid {owner.get('pid')} on {owner.get('host')} (since {owner.get('since')})"
