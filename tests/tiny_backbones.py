"""Small backbones for the model tests (the real ones live in keras_minsnr.backbones)."""

import keras
import numpy as np
from keras import ops

from keras_minsnr.backbones.layers import TimestepEmbedding


@keras.saving.register_keras_serializable(package="keras_minsnr_tests")
class TinyConvBackbone(keras.Model):
    """Two 3x3 convolutions with timestep (and optional class) conditioning."""

    def __init__(self, image_shape=(8, 8, 1), num_classes=None, width=16, **kwargs):
        super().__init__(**kwargs)
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.conditioning = "class" if num_classes else None
        self.width = width
        self.time_embedding = TimestepEmbedding(width, frequency_dim=32)
        if num_classes:
            self.class_embedding = keras.layers.Embedding(num_classes + 1, width)
        self.conv_in = keras.layers.Conv2D(width, 3, padding="same")
        self.conv_out = keras.layers.Conv2D(self.image_shape[-1], 3, padding="same")

    def call(self, inputs):
        h = self.conv_in(inputs["x"])
        emb = self.time_embedding(inputs["t"])
        if self.num_classes:
            emb = emb + self.class_embedding(inputs["y"])
        h = keras.activations.silu(h + emb[:, None, None, :])
        return self.conv_out(h)

    def get_config(self):
        return {
            **super().get_config(),
            "image_shape": self.image_shape,
            "num_classes": self.num_classes,
            "width": self.width,
        }


@keras.saving.register_keras_serializable(package="keras_minsnr_tests")
class TinyContextBackbone(keras.Model):
    """A text-conditional toy: a 3x3 convolution shifted by a projection of the context."""

    def __init__(self, image_shape=(8, 8, 1), context_shape=(3, 2), **kwargs):
        super().__init__(**kwargs)
        self.image_shape = tuple(image_shape)
        self.context_shape = tuple(context_shape)
        self.conditioning = "context"
        self.time_embedding = TimestepEmbedding(8, frequency_dim=16)
        self.context_projection = keras.layers.Dense(8)
        self.conv_in = keras.layers.Conv2D(8, 3, padding="same")
        self.conv_out = keras.layers.Conv2D(self.image_shape[-1], 3, padding="same")

    def call(self, inputs):
        emb = self.time_embedding(inputs["t"])
        emb = emb + self.context_projection(ops.mean(inputs["y"], axis=1))
        h = keras.activations.silu(self.conv_in(inputs["x"]) + emb[:, None, None, :])
        return self.conv_out(h)

    def get_config(self):
        return {
            **super().get_config(),
            "image_shape": self.image_shape,
            "context_shape": self.context_shape,
        }


@keras.saving.register_keras_serializable(package="keras_minsnr_tests")
class PixelLinearBackbone(keras.Model):
    """``pred = a * x_t + b`` with two scalar weights: its gradient is easy by hand."""

    def __init__(self, image_shape=(2, 2, 1), **kwargs):
        super().__init__(**kwargs)
        self.image_shape = tuple(image_shape)
        self.conditioning = None

    def build(self, input_shape=None):
        self.a = self.add_weight(shape=(), initializer=keras.initializers.Constant(0.5), name="a")
        self.b = self.add_weight(shape=(), initializer=keras.initializers.Constant(0.1), name="b")
        self.built = True

    def call(self, inputs):
        return self.a * inputs["x"] + self.b

    def get_config(self):
        return {**super().get_config(), "image_shape": self.image_shape}


class GaussianOptimalDenoiser(keras.Model):
    """The exact ε-prediction for data ``x0 ~ N(mean, std²)`` independently per pixel.

    ``E[x0 | x_t] = mean + α std² / (α² std² + σ²) · (x_t − α mean)`` and
    ``ε̂ = (x_t − α E[x0|x_t]) / σ``; returned in the requested prediction space.
    """

    def __init__(self, schedule, mean, std, image_shape, prediction_type="epsilon", **kwargs):
        super().__init__(**kwargs)
        self.image_shape = tuple(image_shape)
        self.conditioning = None
        self.schedule = schedule
        self.mean = float(mean)
        self.std = float(std)
        self.prediction_type = prediction_type
        self.alpha_table = np.sqrt(schedule.alphas_cumprod).astype("float32")
        self.sigma_table = np.sqrt(1 - schedule.alphas_cumprod).astype("float32")

    def call(self, inputs):
        x, t = inputs["x"], inputs["t"]
        a = ops.reshape(ops.take(ops.convert_to_tensor(self.alpha_table), t), (-1, 1, 1, 1))
        s = ops.reshape(ops.take(ops.convert_to_tensor(self.sigma_table), t), (-1, 1, 1, 1))
        var = self.std**2
        x0 = self.mean + a * var / (a * a * var + s * s) * (x - a * self.mean)
        eps = (x - a * x0) / s
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        return a * eps - s * x0
