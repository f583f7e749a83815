"""Layers shared by the backbones."""

import math

import keras
from keras import ops

from keras_minsnr.backbones import initializers


def gelu(x, approximate=False):
    """GELU: ``x·Φ(x) = x/2·(1 + erf(x/√2))``, or its tanh approximation.

    The same function as `keras.ops.gelu`, but the exact form is written with ``erf``:
    ``jax.nn.gelu`` uses ``erfc``, which XLA:CPU expands into a rational polynomial whose
    ~30 scalar constants become full-size arrays under the YNN fusion flag (a third of the
    memory traffic of a ViT-B train step; see docs/performance.md).
    """
    if approximate:
        return ops.gelu(x, approximate=True)
    return 0.5 * x * (1.0 + ops.erf(x * math.sqrt(0.5)))


def sinusoidal_embedding(t, dim, max_period=10000.0):
    """Sinusoidal features of integer timesteps, shape ``(B,) -> (B, dim)``.

    Frequencies fall geometrically from 1 to ``1 / max_period``; the cosine half comes first
    (the ADM / DiT convention).
    """
    half = dim // 2
    freqs = ops.exp(
        -math.log(max_period) * ops.arange(half, dtype="float32") / float(half)
    )
    args = ops.cast(ops.reshape(t, (-1, 1)), "float32") * ops.reshape(freqs, (1, -1))
    embedding = ops.concatenate([ops.cos(args), ops.sin(args)], axis=-1)
    if dim % 2:
        embedding = ops.pad(embedding, [[0, 0], [0, 1]])
    return embedding


@keras.saving.register_keras_serializable(package="keras_minsnr")
class TimestepEmbedding(keras.layers.Layer):
    """Sinusoidal timestep features followed by a two-layer SiLU MLP.

    Args:
        hidden_size: width of the output embedding.
        frequency_dim: number of sinusoidal features fed to the MLP.
        kernel_initializer: initializer of both MLP kernels (biases start at zero).

    Example:
    ```python
    emb = TimestepEmbedding(256)(keras.ops.array([0, 10, 999]))  # (3, 256)
    ```
    """

    def __init__(
        self, hidden_size, frequency_dim=256, kernel_initializer="glorot_uniform", **kwargs
    ):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.frequency_dim = frequency_dim
        # Kept as given: each Dense gets its own instance (initializers.clone).
        self.kernel_initializer = kernel_initializer
        self.dense_1 = keras.layers.Dense(
            hidden_size,
            activation="silu",
            kernel_initializer=initializers.clone(self.kernel_initializer),
            name="dense_1",
        )
        self.dense_2 = keras.layers.Dense(
            hidden_size,
            kernel_initializer=initializers.clone(self.kernel_initializer),
            name="dense_2",
        )

    def build(self, input_shape):
        self.dense_1.build((None, self.frequency_dim))
        self.dense_2.build((None, self.hidden_size))
        self.built = True

    def call(self, t):
        features = sinusoidal_embedding(t, self.frequency_dim)
        features = ops.cast(features, self.compute_dtype)
        return self.dense_2(self.dense_1(features))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.hidden_size)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_size": self.hidden_size,
                "frequency_dim": self.frequency_dim,
                "kernel_initializer": self.kernel_initializer
                if isinstance(self.kernel_initializer, str)
                else keras.initializers.serialize(
                    keras.initializers.get(self.kernel_initializer)
                ),
            }
        )
        return config
