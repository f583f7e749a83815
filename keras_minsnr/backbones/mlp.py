"""A residual-MLP denoiser for very small images (the 8x8 digits)."""

import math

import keras
from keras import ops

from keras_minsnr.backbones import contract
from keras_minsnr.backbones.layers import TimestepEmbedding


@keras.saving.register_keras_serializable(package="keras_minsnr")
class MLPDenoiser(keras.Model):
    """Residual MLP over flattened pixels, conditioned by adaptive LayerNorm.

    Small images such as the 8x8 digits are 64-dimensional vectors; an MLP treats them
    as such and trains orders of magnitude faster on a CPU than a convolutional or
    attention backbone with a similar number of parameters, which is what the offline
    demo and the convergence benchmark need. Each block is
    ``h + W₂ silu(W₁ (LN(h)·(1 + scale) + shift))`` with ``(scale, shift)`` computed from
    the timestep (+ class) embedding; the output layer starts at zero.

    Args:
        image_shape: ``(H, W, C)``.
        hidden_size: width of the residual stream.
        depth: number of residual blocks.
        mlp_ratio: width of each block's hidden layer relative to ``hidden_size``.
        num_classes: real classes for class conditioning (a null class is added for
            classifier-free guidance); ``None`` for unconditional.
        dropout: dropout inside the blocks.

    Example:
    ```python
    mlp = MLPDenoiser(image_shape=(8, 8, 1), hidden_size=256, depth=3, num_classes=10)
    out = mlp({"x": keras.ops.zeros((2, 8, 8, 1)), "t": keras.ops.array([0, 999]),
               "y": keras.ops.array([3, 10])})   # (2, 8, 8, 1)
    ```
    """

    @classmethod
    def data_arguments(cls, info, config):
        """Image shape and classes from the data (see `backbones.contract`)."""
        return contract.image_and_class_arguments(info)

    @classmethod
    def lora_target_groups(cls):
        """The residual MLPs, their adaLN modulations and the embeddings."""
        return {
            "mlp": [(r"MLPDenoiser", r"dense_1|dense_2")],
            "modulation": [(None, r"modulation")],
            "embedding": [(r"TimestepEmbedding", r".*"), (None, r"class_embedding")],
        }

    def __init__(
        self,
        image_shape=(8, 8, 1),
        hidden_size=512,
        depth=4,
        mlp_ratio=2.0,
        num_classes=None,
        dropout=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (H, W, C) of positive ints, got {image_shape}.")
        for name, value in (("hidden_size", hidden_size), ("depth", depth)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {num_classes!r}.")
        self.image_shape = image_shape
        self.hidden_size = int(hidden_size)
        self.depth = int(depth)
        self.mlp_ratio = float(mlp_ratio)
        self.num_classes = num_classes
        self.dropout = float(dropout)
        self.conditioning = "class" if num_classes else None

        self.input_projection = keras.layers.Dense(self.hidden_size, name="input_projection")
        self.time_embedding = TimestepEmbedding(self.hidden_size, name="time_embedding")
        if num_classes:
            self.class_embedding = keras.layers.Embedding(
                num_classes + 1, self.hidden_size, name="class_embedding"
            )
        inner = int(self.hidden_size * self.mlp_ratio)
        self.blocks = []
        for i in range(self.depth):
            self.blocks.append(
                {
                    "norm": keras.layers.LayerNormalization(
                        epsilon=1e-6, center=False, scale=False, name=f"block_{i}_norm"
                    ),
                    "modulation": keras.layers.Dense(
                        2 * self.hidden_size, kernel_initializer="zeros", name=f"block_{i}_mod"
                    ),
                    "dense_1": keras.layers.Dense(inner, activation="silu", name=f"block_{i}_fc1"),
                    "dropout": keras.layers.Dropout(self.dropout),
                    "dense_2": keras.layers.Dense(self.hidden_size, name=f"block_{i}_fc2"),
                }
            )
        self.output_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="output_norm")
        self.output_projection = keras.layers.Dense(
            math.prod(image_shape), kernel_initializer="zeros", name="output_projection"
        )

    def build(self, input_shape=None):
        pixels = math.prod(self.image_shape)
        self.input_projection.build((None, pixels))
        self.time_embedding.build((None,))
        if self.num_classes:
            self.class_embedding.build((None,))
        inner = int(self.hidden_size * self.mlp_ratio)
        for block in self.blocks:
            block["norm"].build((None, self.hidden_size))
            block["modulation"].build((None, self.hidden_size))
            block["dense_1"].build((None, self.hidden_size))
            block["dense_2"].build((None, inner))
        self.output_norm.build((None, self.hidden_size))
        self.output_projection.build((None, self.hidden_size))
        self.built = True

    def call(self, inputs, training=False):
        if not isinstance(inputs, dict) or "x" not in inputs or "t" not in inputs:
            got = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
            raise ValueError(
                f"MLPDenoiser expects a dict with keys 'x', 't' and optional 'y'; got "
                f"{got}."
            )
        x = inputs["x"]
        if len(x.shape) != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"MLPDenoiser expects x of shape (batch, {', '.join(map(str, self.image_shape))}),"
                f" got {tuple(x.shape)}."
            )
        h = self.input_projection(ops.reshape(x, (-1, math.prod(self.image_shape))))
        emb = self.time_embedding(inputs["t"])
        if self.num_classes:
            y = inputs.get("y")
            if y is None:
                y = ops.full((ops.shape(x)[0],), self.num_classes, dtype="int32")
            emb = emb + self.class_embedding(y)
        emb = keras.activations.silu(emb)
        for block in self.blocks:
            scale, shift = ops.split(block["modulation"](emb), 2, axis=-1)
            n = block["norm"](h) * (1.0 + scale) + shift
            n = block["dense_2"](block["dropout"](block["dense_1"](n), training=training))
            h = h + n
        out = self.output_projection(self.output_norm(h))
        return ops.cast(ops.reshape(out, (-1,) + self.image_shape), "float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "image_shape": self.image_shape,
                "hidden_size": self.hidden_size,
                "depth": self.depth,
                "mlp_ratio": self.mlp_ratio,
                "num_classes": self.num_classes,
                "dropout": self.dropout,
            }
        )
        return config


PRESETS = {
    "mlp_digits": {
        "class": MLPDenoiser,
        "config": {
            "image_shape": (8, 8, 1),
            "hidden_size": 256,
            "depth": 4,
            "mlp_ratio": 2.0,
            "num_classes": 10,
            "dropout": 0.0,
        },
        "description": "Residual adaLN MLP for the 8x8 digits (offline demo, CPU benchmarks).",
        "paper_params": None,
    },
}
