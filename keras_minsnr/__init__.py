"""keras_minsnr: Min-SNR-gamma diffusion training for Keras 3 (TensorFlow and JAX)."""

__version__ = "0.1.0"
