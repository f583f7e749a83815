import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Most of the suite's time is XLA:CPU compiling small programs that then run once or
# twice; without LLVM's optimisation passes a train step compiles ~6x faster (the JAX
# suite takes half the time) and computes the same numbers the tests check. Child
# processes the tests start inherit it. KERAS_MINSNR_TEST_FULL_XLA=1 keeps XLA's defaults.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                      "--xla_llvm_disable_expensive_passes=true")
if os.environ.get("KERAS_MINSNR_TEST_FULL_XLA") != "1":
    _flags = os.environ.get("XLA_FLAGS", "")
    _missing = [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in _flags]
    os.environ["XLA_FLAGS"] = " ".join([_flags, *_missing]).strip()

# Tests build many models of the same few shapes, in this process and in the child
# processes they start: a persistent compilation cache, fresh for each session, lets a
# program compiled once be loaded instead of compiled again (even the sub-second ones).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kms-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# Before Keras loads TensorFlow: the library's CPU defaults (TensorFlow's oneDNN kernels,
# keras_minsnr.tf_onednn) then hold in this process as they do for a user's.
import keras_minsnr  # noqa: E402, F401
import keras  # noqa: E402

keras.utils.disable_interactive_logging()


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(0)
    np.random.seed(0)
    yield
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.fixture
def backend():
    return keras.backend.backend()
