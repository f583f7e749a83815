"""`PatchTransformer`: what DiT and the in-context ViT share.

Both embed ``p×p`` patches with a stride-``p`` convolution, embed the timestep (a
sinusoidal MLP or a learned table) and the class (a table whose last row is the null
class), run ``depth`` transformer blocks and unpatchify. They differ in how the timestep
and the class reach the blocks, the positions and the output layer; each subclass
(`keras_minsnr.backbones.dit.DiT`, `keras_minsnr.backbones.vit.InContextViT`) defines
those.
"""

import keras
import numpy as np
from keras import ops

from keras_minsnr.backbones import contract
from keras_minsnr.backbones.contract import MODEL_AXIS
from keras_minsnr.backbones.contract import check_divisible
from keras_minsnr.backbones.layers import TimestepEmbedding
from keras_minsnr.backbones.remat import check_flag
from keras_minsnr.backbones.remat import rematerialized
from keras_minsnr.backbones.transformer_layers import unpatchify

TIMESTEP_EMBEDDINGS = ("mlp", "table")


def positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}.")
    return int(value)


def _check_image_shape(image_shape, patch_size):
    try:
        image_shape = tuple(image_shape)
    except TypeError:
        image_shape = (image_shape,)
    if len(image_shape) != 3:
        raise ValueError(
            f"image_shape must be (height, width, channels), got {image_shape!r}."
        )
    image_shape = tuple(
        positive_int(f"image_shape {axis}", size)
        for axis, size in zip(("height", "width", "channels"), image_shape)
    )
    if image_shape[0] % patch_size or image_shape[1] % patch_size:
        raise ValueError(
            f"image_shape {image_shape} is not divisible by patch_size={patch_size}: "
            f"height and width must be multiples of the patch size."
        )
    return image_shape


def _check_num_classes(num_classes):
    if num_classes is not None and (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, (int, np.integer))
        or num_classes < 0
    ):
        raise ValueError(
            f"num_classes must be None or a non-negative integer, got "
            f"num_classes={num_classes!r}."
        )
    return int(num_classes) if num_classes else None


class PatchTransformer(keras.Model):
    """Base of the patch transformers; not used on its own.

    Subclasses set `INITIALIZERS` (a function of ``(fan_in, hidden_size, depth,
    head_init_scale)`` giving every random initialiser) and `BLOCK` (the block layer
    class), and define ``_make_output_layers(init)``, ``_build_trunk()`` and ``_run_trunk(h, t_emb,
    y_emb)``, which calls each block through ``self.block_call(block)``.

    Args:
        image_shape, patch_size, hidden_size, depth, num_heads, mlp_ratio, num_classes,
        frequency_dim, timestep_embedding, timestep_table_size: see the subclasses.
        gradient_checkpointing: recompute each transformer block in the backward pass
            (less memory, one more forward pass; `keras_minsnr.backbones.remat`). May be
            set as an attribute before the model is traced.
        **kwargs: `keras.Model` arguments (``name``, ``dtype``).

    Example:
    ```python
    backbone = DiT(image_shape=(32, 32, 4), patch_size=2, hidden_size=384, depth=12,
                   num_heads=6)  # a PatchTransformer
    ```

    Reference:
        Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021.
    """

    gradient_checkpointing = False  # backbones.contract: this backbone can remat

    def __init__(
        self,
        image_shape,
        patch_size,
        hidden_size,
        depth,
        num_heads,
        mlp_ratio,
        num_classes,
        frequency_dim,
        timestep_embedding,
        timestep_table_size,
        head_init_scale,
        gradient_checkpointing=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if timestep_embedding not in TIMESTEP_EMBEDDINGS:
            raise ValueError(
                f"Unknown timestep_embedding {timestep_embedding!r}; expected one of "
                f"{TIMESTEP_EMBEDDINGS}."
            )
        patch_size = positive_int("patch_size", patch_size)
        image_shape = _check_image_shape(image_shape, patch_size)
        hidden_size = positive_int("hidden_size", hidden_size)
        num_heads = positive_int("num_heads", num_heads)
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}."
            )
        if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0):
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}.")

        # === Config ===
        self.image_shape = image_shape
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.depth = positive_int("depth", depth)
        self.num_heads = num_heads
        self.mlp_ratio = float(mlp_ratio)
        self.num_classes = _check_num_classes(num_classes)
        self.conditioning = "class" if self.num_classes else None
        self.frequency_dim = positive_int("frequency_dim", frequency_dim)
        self.timestep_embedding = timestep_embedding
        self.timestep_table_size = positive_int("timestep_table_size", timestep_table_size)
        self.head_init_scale = float(head_init_scale)
        self.gradient_checkpointing = check_flag(gradient_checkpointing)
        self.grid_shape = (image_shape[0] // patch_size, image_shape[1] // patch_size)
        self.num_patches = self.grid_shape[0] * self.grid_shape[1]
        self._check_config()

        # === Layers ===
        init = type(self).INITIALIZERS(
            patch_size * patch_size * image_shape[2], hidden_size, self.depth,
            self.head_init_scale,
        )
        self.patch_embed = keras.layers.Conv2D(
            hidden_size,
            patch_size,
            strides=patch_size,
            padding="valid",
            data_format="channels_last",
            kernel_initializer=init["patch_kernel"],
            bias_initializer=init["patch_bias"],
            dtype=self.dtype_policy,
            name="patch_embed",
        )
        if timestep_embedding == "table":
            self.t_embedder = keras.layers.Embedding(
                self.timestep_table_size,
                hidden_size,
                embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0),
                dtype=self.dtype_policy,
                name="t_embedder",
            )
        else:
            self.t_embedder = TimestepEmbedding(
                hidden_size,
                self.frequency_dim,
                kernel_initializer=init["timestep"],
                dtype=self.dtype_policy,
                name="t_embedder",
            )
        self.y_embedder = None
        if self.num_classes:
            self.y_embedder = keras.layers.Embedding(
                self.num_classes + 1,  # the last row is the null class
                hidden_size,
                embeddings_initializer=init["labels"],
                dtype=self.dtype_policy,
                name="y_embedder",
            )
        self.blocks = [
            type(self).BLOCK(
                self.hidden_size,
                self.num_heads,
                self.mlp_ratio,
                kernel_initializer=init["block_kernel"][i],
                output_initializer=init["block_output"][i],
                dtype=self.dtype_policy,
                name=f"block_{i}",
            )
            for i in range(self.depth)
        ]
        self._make_output_layers(init)
        # Every shape is known from the config, so the model is built right away
        # (count_params() works before the first call, and loading needs no input shape).
        self.build()

    def _check_config(self):
        """Subclass checks of the arguments (after they are set as attributes)."""

    def build(self, input_shape=None):
        if self.built:
            return
        height, width, channels = self.image_shape
        self.patch_embed.build((None, height, width, channels))
        self.t_embedder.build((None,))
        if self.y_embedder is not None:
            self.y_embedder.build((None,))
        self._build_trunk()

    def _unpack(self, inputs):
        if not isinstance(inputs, dict) or "x" not in inputs or "t" not in inputs:
            got = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
            raise ValueError(
                f"{type(self).__name__} expects a dict with keys 'x', 't' and optional "
                f"'y'; got {got}."
            )
        x, t, y = inputs["x"], inputs["t"], inputs.get("y")
        shape = tuple(x.shape)
        if len(shape) != 4:
            raise ValueError(
                f"'x' must have rank 4 (batch, height, width, channels), got shape "
                f"{shape}."
            )
        for axis, (got, want) in enumerate(zip(shape[1:], self.image_shape)):
            if got is not None and got != want:
                raise ValueError(
                    f"'x' has shape {shape} but this backbone was built for images of "
                    f"shape {self.image_shape} (axis {axis + 1} is {got}, expected "
                    f"{want})."
                )
        if len(tuple(t.shape)) != 1:
            raise ValueError(
                f"'t' must be integer timesteps of shape (batch,), got shape "
                f"{tuple(t.shape)}."
            )
        if y is not None and self.num_classes and len(tuple(y.shape)) != 1:
            raise ValueError(
                f"'y' must be integer class labels of shape (batch,), got shape "
                f"{tuple(y.shape)}."
            )
        return x, t, y

    def call(self, inputs, training=None):
        x, t, y = self._unpack(inputs)  # x: (B, H, W, C), t: (B,), y: (B,) or None
        h = self.patch_embed(x)  # (B, H/p, W/p, D)
        h = ops.reshape(h, (-1, self.num_patches, self.hidden_size))  # (B, N, D)
        t_emb = self.t_embedder(t)  # (B, D)
        y_emb = None
        if self.num_classes:
            if y is None:
                y = ops.zeros_like(ops.cast(t, "int32")) + self.num_classes
            y_emb = self.y_embedder(y)  # (B, D)
        h = self._run_trunk(h, t_emb, y_emb)  # (B, N, p*p*C)
        out = unpatchify(h, *self.grid_shape, self.patch_size, self.image_shape[2])
        return ops.cast(out, "float32")  # (B, H, W, C)

    def block_call(self, block):
        """``block`` as `_run_trunk` calls it: recomputed in the backward pass under
        ``gradient_checkpointing``."""
        return rematerialized(block, self.gradient_checkpointing)

    def compute_output_shape(self, input_shape):
        return input_shape["x"]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "image_shape": list(self.image_shape),
                "patch_size": self.patch_size,
                "hidden_size": self.hidden_size,
                "depth": self.depth,
                "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio,
                "num_classes": self.num_classes,
                "frequency_dim": self.frequency_dim,
                "timestep_embedding": self.timestep_embedding,
                "timestep_table_size": self.timestep_table_size,
                "gradient_checkpointing": self.gradient_checkpointing,
            }
        )
        return config

    # -- what the rest of the library asks of a backbone (backbones.contract) ----------

    @classmethod
    def data_arguments(cls, info, config):
        """Image shape and classes from the data."""
        return contract.image_and_class_arguments(info)

    @classmethod
    def lora_target_groups(cls):
        """Attention is generic; block MLPs, adaLN modulations, embeddings."""
        return {
            "mlp": [(r"DiTBlock|PreLNBlock", r"fc1|fc2")],
            "modulation": [(None, r"modulation")],
            "embedding": [(r"TimestepEmbedding", r".*"), (None, r"y_embedder|patch_embed")],
        }

    @classmethod
    def layout_rules(cls, config, model_shards):
        """Megatron-style rules for each block: ``qkv`` and ``fc1`` column-split (output
        dim) over ``model``, ``proj`` and ``fc2`` row-split (input dim), the adaLN
        ``modulation`` column-split. Each rule is a regex with ``.`` between path parts
        and ``.*`` around, so the EMA copy and optimizer slots of a weight match too."""
        hidden = config.get("hidden_size", 384)
        check_divisible({"hidden_size": hidden,
                         "MLP width": int(hidden * config.get("mlp_ratio", 4.0))},
                        model_shards)
        column, row, vector = (None, MODEL_AXIS), (MODEL_AXIS, None), (MODEL_AXIS,)
        return [
            (r".*block_\d+.attn.qkv.kernel.*", column),
            (r".*block_\d+.attn.qkv.bias.*", vector),
            (r".*block_\d+.attn.proj.kernel.*", row),
            (r".*block_\d+.fc1.kernel.*", column),
            (r".*block_\d+.fc1.bias.*", vector),
            (r".*block_\d+.fc2.kernel.*", row),
            (r".*block_\d+.modulation.kernel.*", column),
            (r".*block_\d+.modulation.bias.*", vector),
        ]
