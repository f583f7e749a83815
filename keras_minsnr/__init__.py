"""keras_minsnr: Min-SNR-gamma diffusion training for Keras 3 (TensorFlow and JAX)."""

from keras_minsnr import xla_flags

xla_flags.configure()  # before anything makes a JAX device: see xla_flags

from keras_minsnr import backbones  # noqa: E402
from keras_minsnr import distribution
from keras_minsnr import samplers
from keras_minsnr import weighting
from keras_minsnr.diffusion_model import DiffusionModel
from keras_minsnr.flow import FlowMatchingSchedule
from keras_minsnr.samplers import SAMPLERS
from keras_minsnr.schedules import PREDICTION_TYPES
from keras_minsnr.schedules import SCHEDULES
from keras_minsnr.schedules import NoiseSchedule
from keras_minsnr.timestep_sampling import TimestepSampling
from keras_minsnr.weighting import STRATEGIES
from keras_minsnr.weighting import LossWeighting
from keras_minsnr.weighting import loss_weight

__version__ = "0.1.0"
