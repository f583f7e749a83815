"""TensorFlow's oneDNN CPU kernels, turned on before TensorFlow starts where it leaves them off.

TensorFlow reads ``TF_ENABLE_ONEDNN_OPTS`` once, when it is imported. Unset, it turns its
oneDNN kernels on only on CPUs with AVX-512 VNNI/BF16 or AMX; elsewhere (AVX2 CPUs: AMD
EPYC, older Xeons, most laptops) matmuls run on Eigen. On a 2-core AVX2 EPYC the oneDNN
matmul is 1.2x faster and the train step 1.2-1.4x (benchmarks/tf_onednn.py,
docs/performance.md); torch uses oneDNN on the same CPUs.

`import keras_minsnr` calls `configure()`, which sets ``TF_ENABLE_ONEDNN_OPTS=1`` only when
all of these hold, and says once on stderr what it set:

- the Keras backend is TensorFlow and TensorFlow is not imported yet;
- ``TF_ENABLE_ONEDNN_OPTS`` is not set (``0`` is the opt-out, and any value the user set is
  kept);
- ``KERAS_MINSNR_XLA_CPU_FLAGS`` is not ``0`` (the opt-out of all CPU speed settings).
"""

import os
import sys

from keras_minsnr import xla_flags

VARIABLE = "TF_ENABLE_ONEDNN_OPTS"


def _tensorflow_imported():
    return "tensorflow" in sys.modules


def _reason_not_to_set(backend, environ):
    if environ.get(xla_flags.OPT_OUT_VARIABLE, "1") == "0":
        return f"{xla_flags.OPT_OUT_VARIABLE}=0"
    if backend != "tensorflow":
        return f"the Keras backend is {backend}"
    if VARIABLE in environ:
        return f"{VARIABLE} is already set"
    if _tensorflow_imported():
        return "TensorFlow is already imported"
    return None


def announcement():
    """The line that says what `configure` set."""
    return (f"keras_minsnr: set {VARIABLE}=1 (TensorFlow's oneDNN CPU kernels: faster "
            f"training on CPUs where TensorFlow leaves them off; set {VARIABLE}=0 to opt out).")


def is_enabled():
    """Whether this process's TensorFlow runs its oneDNN kernels (imports TensorFlow)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def configure(backend=None, environ=None, stream=None, quiet=False):
    """Sets ``TF_ENABLE_ONEDNN_OPTS=1`` where it is unset and TensorFlow not yet imported;
    returns whether it did. Says so on ``stream`` (stderr) unless ``quiet``."""
    environ = os.environ if environ is None else environ
    if backend is None:
        backend = xla_flags.keras_backend_name(environ)
    if _reason_not_to_set(backend, environ) is not None:
        return False
    environ[VARIABLE] = "1"
    if not quiet:
        print(announcement(), file=stream or sys.stderr)
    return True
