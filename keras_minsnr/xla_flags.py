"""XLA:CPU flags that make the JAX train step fast on CPU, set before JAX starts.

On CPU, XLA (jaxlib 0.10) fuses each block's weight-gradient matmuls with a copy of the
residual-add and LayerNorm-backward chain of every later block, so the backward pass grows
with the square of depth (a `dit_s_2` step: 4.2 s; with the flag below: 1.8 s; the loss and
gradients are the same). ``--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce``
stops the duplication. `benchmarks/xla_cpu_fusion.py` reproduces it.

`import keras_minsnr` calls `configure()`, which adds the flag to ``XLA_FLAGS`` only when
all of these hold, and says once on stderr what it set:

- the Keras backend is JAX and JAX has not created its devices yet (XLA reads
  ``XLA_FLAGS`` once, when the first device is made);
- no GPU or TPU plugin for JAX is installed (the flag is about XLA:CPU only);
- the installed jaxlib is one this flag was verified on (an unknown flag aborts XLA);
- the CPU is one device (no ``--xla_force_host_platform_device_count`` above 1): with
  sharded programs XLA fails ("Instruction with unsupported layout in YNN fusion");
- ``XLA_FLAGS`` does not already name the option (a value this module added, inherited
  by a child process, is decided anew there);
- ``KERAS_MINSNR_XLA_CPU_FLAGS`` is not ``0`` (the opt-out).

Whether a run splits its weights is known only once its config is read, after the
import: with a model axis (``model_parallel`` on a mesh ``DxM`` with ``M > 1``; on
one device per process this is the multi-host case) the same XLA error occurs, so the
command line calls `withdraw_for_mesh` before JAX starts, which takes the flag out again.
"""

import importlib.metadata
import importlib.util
import json
import os
import re
import sys

FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"
OPT_OUT_VARIABLE = "KERAS_MINSNR_XLA_CPU_FLAGS"
# Set beside XLA_FLAGS when this module added the flag, so a child process can tell.
ADDED_VARIABLE = "KERAS_MINSNR_ADDED_XLA_FLAGS"
# jaxlib versions on which FUSION_FLAG exists and was measured (>= this, < the next major).
VERIFIED_JAXLIB = ((0, 10), (0, 11))
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm_plugin", "libtpu")


def _jaxlib_version():
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _jax_devices_created():
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # a JAX without this private module: assume it has started
        return True
    return bool(getattr(xla_bridge, "_backends", True))


def _reason_not_to_set(backend, environ):
    if environ.get(OPT_OUT_VARIABLE, "1") == "0":
        return f"{OPT_OUT_VARIABLE}=0"
    if backend != "jax":
        return f"the Keras backend is {backend}"
    flags = environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return "XLA_FLAGS already sets it"
    devices = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    if devices and int(devices.group(1)) > 1:
        return "the CPU is split into several devices"
    platforms = environ.get("JAX_PLATFORMS", "")
    cpu_only = platforms.strip().lower() == "cpu"
    if not cpu_only and any(importlib.util.find_spec(p) for p in _ACCELERATOR_PLUGINS):
        return "a GPU/TPU plugin for JAX is installed"
    version = _jaxlib_version()
    low, high = VERIFIED_JAXLIB
    if version is None or not low <= version < high:
        return f"jaxlib {version} is not one the flag was verified on"
    if _jax_devices_created():
        return "JAX has already created its devices"
    return None


def keras_backend_name(environ=None):
    """The backend Keras uses or will use, without importing Keras if it is not loaded."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    return backend_from_environment(os.environ if environ is None else environ)


def backend_from_environment(environ):
    """What Keras will pick: ``KERAS_BACKEND``, else ``keras.json``, else TensorFlow."""
    if environ.get("KERAS_BACKEND"):
        return environ["KERAS_BACKEND"]
    home = environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"  # Keras' own default


def announcement():
    """The line that says what `configure` set."""
    return (f"keras_minsnr: added {FUSION_FLAG} to XLA_FLAGS (faster JAX training on CPU; "
            f"set {OPT_OUT_VARIABLE}=0 to opt out).")


def splits_weights(distribution, mesh_shape):
    """Whether a run's weights are split over devices, over a model axis or (FSDP) over
    the data axis: the flag breaks such sharded programs (FSDP over two processes failed
    in sampling with it, tests/test_multihost.py)."""
    if distribution == "fsdp":
        return True
    return distribution == "model_parallel" and mesh_shape is not None and mesh_shape[1] > 1


def withdraw_for_mesh(distribution, mesh_shape, environ=None):
    """Takes `FUSION_FLAG` out of ``XLA_FLAGS`` again when this module added it and the
    run splits its weights (`splits_weights`); returns whether it did.

    Only before JAX creates its devices (XLA reads the flags once): call it as soon as
    the run's distribution and mesh are known.
    """
    environ = os.environ if environ is None else environ
    if not splits_weights(distribution, mesh_shape):
        return False
    flags = environ.get("XLA_FLAGS", "").split()
    if environ.get(ADDED_VARIABLE) != FUSION_FLAG or FUSION_FLAG not in flags:
        return False
    if _jax_devices_created():
        raise RuntimeError(
            f"{FUSION_FLAG} is in force but this run splits its weights over a model axis, "
            f"which XLA:CPU cannot compile with it; set {OPT_OUT_VARIABLE}=0."
        )
    flags.remove(FUSION_FLAG)
    environ["XLA_FLAGS"] = " ".join(flags)
    del environ[ADDED_VARIABLE]
    return True


def configure(backend=None, environ=None, stream=None, quiet=False):
    """Adds `FUSION_FLAG` to ``XLA_FLAGS`` where it helps; returns whether it did.

    Says so on ``stream`` (stderr) unless ``quiet`` (the command line says it itself when
    a run starts, so that an early error stands alone).
    """
    environ = os.environ if environ is None else environ
    if backend is None:
        backend = keras_backend_name(environ)
    flags = environ.get("XLA_FLAGS", "").split()
    if environ.get(ADDED_VARIABLE) == FUSION_FLAG and FUSION_FLAG in flags:
        if _jax_devices_created():
            return False  # in force already: XLA read it
        # Inherited from a parent this module configured: decide again for this process.
        flags.remove(FUSION_FLAG)
        environ["XLA_FLAGS"] = " ".join(flags)
        del environ[ADDED_VARIABLE]
    if _reason_not_to_set(backend, environ) is not None:
        return False
    environ["XLA_FLAGS"] = (environ.get("XLA_FLAGS", "") + " " + FUSION_FLAG).strip()
    environ[ADDED_VARIABLE] = FUSION_FLAG
    if not quiet:
        print(announcement(), file=stream or sys.stderr)
    return True
