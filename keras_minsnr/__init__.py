"""keras_minsnr: Min-SNR-gamma diffusion training for Keras 3 (TensorFlow and JAX).

``import keras_minsnr`` imports the whole public API at once, so every class is
registered with Keras and ``keras.models.load_model`` finds it. Only the ``keras-minsnr``
command-line process imports names on first use (PEP 562), so its ``--help`` and config
checks run without loading Keras, TensorFlow or JAX; its commands import what they use
(also under ``python -m keras_minsnr.cli`` and ``python -m recipes.NAME``).
"""

import importlib
import os
import sys

from keras_minsnr import tf_onednn
from keras_minsnr import xla_flags

# public name -> (module, attribute or None for the module itself)
_EXPORTS = {
    "backbones": ("keras_minsnr.backbones", None),
    "builders": ("keras_minsnr.builders", None),
    "distribution": ("keras_minsnr.distribution", None),
    "lora": ("keras_minsnr.lora", None),
    "interrupts": ("keras_minsnr.interrupts", None),
    "resume": ("keras_minsnr.resume", None),
    "run_lock": ("keras_minsnr.run_lock", None),
    "run_sharing": ("keras_minsnr.run_sharing", None),
    "sharded_checkpoint": ("keras_minsnr.sharded_checkpoint", None),
    "samplers": ("keras_minsnr.samplers", None),
    "split_sampling": ("keras_minsnr.split_sampling", None),
    "noise_level_error": ("keras_minsnr.noise_level_error", None),
    "official": ("keras_minsnr.official", None),
    "weighting": ("keras_minsnr.weighting", None),
    "DiffusionModel": ("keras_minsnr.diffusion_model", "DiffusionModel"),
    "convert_diffusers": ("keras_minsnr.backbones.diffusers_conversion", "convert_diffusers"),
    "FlowMatchingSchedule": ("keras_minsnr.flow", "FlowMatchingSchedule"),
    "SAMPLERS": ("keras_minsnr.samplers", "SAMPLERS"),
    "PREDICTION_TYPES": ("keras_minsnr.schedules", "PREDICTION_TYPES"),
    "SCHEDULES": ("keras_minsnr.schedules", "SCHEDULES"),
    "NoiseSchedule": ("keras_minsnr.schedules", "NoiseSchedule"),
    "PerUpdateSchedule": ("keras_minsnr.lr_schedules", "PerUpdateSchedule"),
    "WarmupDecaySchedule": ("keras_minsnr.lr_schedules", "WarmupDecaySchedule"),
    "TimestepSampling": ("keras_minsnr.timestep_sampling", "TimestepSampling"),
    "STRATEGIES": ("keras_minsnr.weighting", "STRATEGIES"),
    "LossWeighting": ("keras_minsnr.weighting", "LossWeighting"),
    "loss_weight": ("keras_minsnr.weighting", "loss_weight"),
    "generate_split": ("keras_minsnr.split_sampling", "generate_split"),
    "x0_error_by_timestep": ("keras_minsnr.noise_level_error", "x0_error_by_timestep"),
}
COMMAND_NAME = "keras-minsnr"

__version__ = "0.1.0"
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'keras_minsnr' has no attribute {name!r}")
    module_name, attribute = _EXPORTS[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


def import_all():
    """Imports every public name, registering all classes that `.keras` files name."""
    for name in _EXPORTS:
        __getattr__(name)


def _is_command_line_process():
    # The console script, or `python -m keras_minsnr.cli` / `-m recipes.NAME`: while
    # Python locates a `-m` module, argv[0] is "-m".
    first = (sys.argv or [""])[0] or ""
    return os.path.basename(first) == COMMAND_NAME or first == "-m"


XLA_FLAGS_ADDED = xla_flags.configure(quiet=_is_command_line_process())  # before JAX starts
ONEDNN_SET = tf_onednn.configure(quiet=_is_command_line_process())  # before TensorFlow starts

if not _is_command_line_process():
    import_all()
