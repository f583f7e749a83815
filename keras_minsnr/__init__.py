"""keras_minsnr: Min-SNR-gamma diffusion training for Keras 3 (TensorFlow and JAX).

Names are imported on first use (PEP 562), so the command line's help and config checks
run without loading Keras, TensorFlow or JAX.
"""

import importlib

# public name -> (module, attribute or None for the module itself)
_EXPORTS = {
    "backbones": ("keras_minsnr.backbones", None),
    "samplers": ("keras_minsnr.samplers", None),
    "weighting": ("keras_minsnr.weighting", None),
    "DiffusionModel": ("keras_minsnr.diffusion_model", "DiffusionModel"),
    "SAMPLERS": ("keras_minsnr.samplers", "SAMPLERS"),
    "PREDICTION_TYPES": ("keras_minsnr.schedules", "PREDICTION_TYPES"),
    "SCHEDULES": ("keras_minsnr.schedules", "SCHEDULES"),
    "NoiseSchedule": ("keras_minsnr.schedules", "NoiseSchedule"),
    "STRATEGIES": ("keras_minsnr.weighting", "STRATEGIES"),
    "LossWeighting": ("keras_minsnr.weighting", "LossWeighting"),
    "loss_weight": ("keras_minsnr.weighting", "loss_weight"),
}

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
