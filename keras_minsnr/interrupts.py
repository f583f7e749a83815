"""Ctrl-C and SIGTERM that stop a run at the next step, with a checkpoint.

Python's default SIGINT handler raises `KeyboardInterrupt` wherever the main thread is.
During `fit` on JAX that is usually inside the device-to-host copy of the step's logs,
which Keras wraps in a bare ``except`` (``pythonify_logs``): the interrupt is swallowed
and training goes on. SIGTERM (what a cluster scheduler sends before it kills) has no
Python handler at all and ends the process on the spot. `StopRequests` replaces both
handlers with one that only records the request; `StopAtStepBoundary` turns it into
``model.stop_training`` after the current optimizer step, so `train` can write a
checkpoint and exit with 130 (SIGINT) or 143 (SIGTERM).
"""

import signal
import sys
import threading

import keras

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum):
    return signal.Signals(signum).name


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after a checkpoint of its last step.

    Attributes:
        signum: the signal (``signal.SIGINT`` or ``signal.SIGTERM``).
        step: the optimizer step the run stopped (and was checkpointed) at.
        exit_code: ``128 + signum``, what a shell reports for the signal (130, 143).
    """

    def __init__(self, signum, step, message):
        super().__init__(message)
        self.signum = signum
        self.step = step
        self.exit_code = 128 + int(signum)


class StopRequests:
    """Records SIGINT / SIGTERM instead of acting on them, while entered.

    The first signal sets `signum`; training code polls it between steps. A second
    SIGINT means "now": the previous handlers are put back and `KeyboardInterrupt` is
    raised at once (a second SIGTERM ends the process as SIGTERM does). Off the main
    thread, where Python cannot install handlers, this does nothing.

    Example:
    ```python
    with StopRequests() as stop:
        model.fit(data, callbacks=[StopAtStepBoundary(stop)])
    if stop.signum is not None:
        ...  # checkpoint, then exit with 128 + stop.signum
    ```
    """

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            print(f"\n{signal_name(signum)}: stopping after the current step and writing "
                  "a checkpoint (Ctrl-C again to stop at once, without one).",
                  file=sys.stderr, flush=True)
            return
        self._restore()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.raise_signal(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        self._restore()

    def _restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class StopAtStepBoundary(keras.callbacks.Callback):
    """Stops `fit` after the optimizer step during which a stop was requested.

    With gradient accumulation an optimizer step is ``accumulation`` of `fit`'s batches;
    the stop waits for the update that ends the current group (each `fit` starts on an
    update boundary).

    Args:
        requests: the `StopRequests` to poll.
        accumulation: micro-batches per optimizer step.
    """

    def __init__(self, requests, accumulation=1):
        super().__init__()
        self.requests = requests
        self.accumulation = int(accumulation)
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self.requests.signum is not None and self._batches % self.accumulation == 0:
            self.model.stop_training = True
