"""Diffusion transformers: DiT (adaLN-Zero) and the Min-SNR paper's in-context ViT.

One `DiT` class covers both ways of feeding the timestep and the class to a transformer
over latent or pixel patches:

- ``"adaln_zero"`` (Peebles & Xie 2023): the summed timestep and class embeddings regress
  a per-block shift / scale / gate for the attention and MLP branches; the regressors and
  the output projection start at zero, so every block starts as the identity and the model
  starts by predicting zeros. Fixed 2-D sin-cos positions.
- ``"in_context"`` (Hang et al. 2023, ``guided_diffusion/vision_transformer.py``): the
  timestep and class embeddings are two extra tokens in front of the patch tokens; learned
  absolute positions, pre-LN blocks with plain residuals, a final LayerNorm and a linear
  head initialised very small. The extra tokens are dropped before unpatchifying.

Two options reproduce the official ViT's layout exactly, which the converter of its
released checkpoints (`keras_minsnr.official`) needs: ``timestep_embedding="table"`` (a
learned table with one row per timestep instead of the sinusoidal MLP) and
``final_norm=False`` (the official model has no LayerNorm before its head).
"""

import math

import keras
import numpy as np
from keras import ops

from keras_minsnr.backbones import initializers
from keras_minsnr.backbones.contract import MODEL_AXIS
from keras_minsnr.backbones.contract import check_divisible
from keras_minsnr.backbones.layers import TimestepEmbedding
from keras_minsnr.backbones.layers import gelu

CONDITIONING_MODES = ("adaln_zero", "in_context")
TIMESTEP_EMBEDDINGS = ("mlp", "table")

_LN_EPSILON = 1e-6


def sincos_position_embedding_2d(hidden_size, grid_height, grid_width):
    """Fixed 2-D sin-cos position embedding, numpy float64 ``(grid_h * grid_w, hidden)``.

    The first half of the channels encodes the column index, the second half the row
    index; each half is ``[sin(pos * w_k), cos(pos * w_k)]`` with
    ``w_k = 10000 ** (-k / (hidden/4))``, ``k = 0 .. hidden/4 - 1`` (the DiT / MAE layout).
    Tokens are in row-major order (row ``i``, column ``j`` is token ``i * grid_w + j``).
    """
    if hidden_size % 4:
        raise ValueError(
            f"hidden_size must be divisible by 4 for the 2-D sin-cos position "
            f"embedding, got hidden_size={hidden_size}."
        )
    quarter = hidden_size // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(
        np.arange(grid_height, dtype=np.float64),
        np.arange(grid_width, dtype=np.float64),
        indexing="ij",
    )

    def encode(positions):
        angles = positions.reshape(-1, 1) * omega.reshape(1, -1)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1)


def unpatchify(tokens, grid_height, grid_width, patch_size, channels):
    """``(B, gh * gw, p * p * C)`` patch tokens back to images ``(B, gh * p, gw * p, C)``.

    Each token holds its patch in ``(row-in-patch, column-in-patch, channel)`` order.
    """
    x = ops.reshape(
        tokens, (-1, grid_height, grid_width, patch_size, patch_size, channels)
    )
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(
        x, (-1, grid_height * patch_size, grid_width * patch_size, channels)
    )


def _modulate(x, shift, scale):
    return x * (1.0 + ops.expand_dims(scale, 1)) + ops.expand_dims(shift, 1)


@keras.saving.register_keras_serializable(package="keras_minsnr")
class SelfAttention(keras.layers.Layer):
    """Multi-head self-attention through `keras.ops.dot_product_attention`.

    One fused ``qkv`` projection (with bias) and an output projection. The attention
    itself goes through `keras.ops.dot_product_attention`, which picks fused kernels on GPU
    (cuDNN flash attention on JAX, when available) and plain XLA math elsewhere.

    Args:
        hidden_size: token width ``D``; must be divisible by ``num_heads``.
        num_heads: number of attention heads.
        kernel_initializer: initializer of the ``qkv`` kernel.
        output_initializer: initializer of the output projection kernel.

    Example:
    ```python
    attn = SelfAttention(64, num_heads=4)
    y = attn(keras.random.normal((2, 16, 64)))  # (2, 16, 64)
    ```

    Reference:
        Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
    """

    def __init__(
        self,
        hidden_size,
        num_heads,
        kernel_initializer="glorot_uniform",
        output_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}."
            )
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.output_initializer = keras.initializers.get(output_initializer)
        self.qkv = keras.layers.Dense(
            3 * hidden_size,
            kernel_initializer=initializers.clone(self.kernel_initializer),
            dtype=self.dtype_policy,
            name="qkv",
        )
        self.proj = keras.layers.Dense(
            hidden_size,
            kernel_initializer=initializers.clone(self.output_initializer),
            dtype=self.dtype_policy,
            name="proj",
        )

    def build(self, input_shape):
        self.qkv.build((None, None, self.hidden_size))
        self.proj.build((None, None, self.hidden_size))

    def call(self, x):
        head_dim = self.hidden_size // self.num_heads
        qkv = self.qkv(x)
        qkv = ops.reshape(qkv, (ops.shape(x)[0], -1, 3, self.num_heads, head_dim))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = ops.dot_product_attention(q, k, v)  # (B, N, heads, head_dim)
        out = ops.reshape(out, (ops.shape(x)[0], -1, self.hidden_size))
        return self.proj(out)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_size": self.hidden_size,
                "num_heads": self.num_heads,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "output_initializer": keras.initializers.serialize(
                    self.output_initializer
                ),
            }
        )
        return config


class _TransformerBlockBase(keras.layers.Layer):
    """Attention + MLP sub-layers shared by both block kinds."""

    def __init__(
        self,
        hidden_size,
        num_heads,
        mlp_ratio,
        kernel_initializer,
        output_initializer,
        gelu_approximate,
        layer_norm_affine,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.output_initializer = keras.initializers.get(output_initializer)
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self._gelu_approximate = gelu_approximate
        norm_kwargs = dict(
            epsilon=_LN_EPSILON,
            center=layer_norm_affine,
            scale=layer_norm_affine,
            dtype=self.dtype_policy,
        )
        self.norm1 = keras.layers.LayerNormalization(name="norm1", **norm_kwargs)
        self.norm2 = keras.layers.LayerNormalization(name="norm2", **norm_kwargs)
        self.attn = SelfAttention(
            hidden_size,
            num_heads,
            kernel_initializer=self.kernel_initializer,
            output_initializer=self.output_initializer,
            dtype=self.dtype_policy,
            name="attn",
        )
        self.fc1 = keras.layers.Dense(
            self.mlp_hidden,
            kernel_initializer=initializers.clone(self.kernel_initializer),
            dtype=self.dtype_policy,
            name="fc1",
        )
        self.fc2 = keras.layers.Dense(
            hidden_size,
            kernel_initializer=initializers.clone(self.output_initializer),
            dtype=self.dtype_policy,
            name="fc2",
        )

    def _build_trunk(self):
        token_shape = (None, None, self.hidden_size)
        self.norm1.build(token_shape)
        self.norm2.build(token_shape)
        self.attn.build(token_shape)
        self.fc1.build(token_shape)
        self.fc2.build((None, None, self.mlp_hidden))

    def _mlp(self, x):
        return self.fc2(gelu(self.fc1(x), approximate=self._gelu_approximate))

    def _config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_size": self.hidden_size,
                "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "output_initializer": keras.initializers.serialize(
                    self.output_initializer
                ),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_minsnr")
class DiTBlock(_TransformerBlockBase):
    """DiT block with adaLN-Zero conditioning, called as ``block(x, c)``.

    ``c`` (the summed timestep and class embedding, ``(B, D)``) goes through SiLU and a
    linear layer to six vectors: shift / scale / gate for the attention branch and for the
    MLP branch. ``x + gate * branch(LN(x) * (1 + scale) + shift)``. The linear layer is
    zero-initialised, so the gates start at 0 and the block starts as the identity.

    Args:
        hidden_size: token width ``D``.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``D``.

    Example:
    ```python
    block = DiTBlock(64, num_heads=4)
    y = block(keras.random.normal((2, 16, 64)), keras.random.normal((2, 64)))
    ```

    Reference:
        Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023.
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, **kwargs):
        kwargs.setdefault("kernel_initializer", "glorot_uniform")
        kwargs.setdefault("output_initializer", "glorot_uniform")
        super().__init__(
            hidden_size,
            num_heads,
            mlp_ratio,
            gelu_approximate=True,
            layer_norm_affine=False,
            **kwargs,
        )
        self.modulation = keras.layers.Dense(
            6 * hidden_size,
            kernel_initializer="zeros",
            bias_initializer="zeros",
            dtype=self.dtype_policy,
            name="modulation",
        )

    def build(self, x_shape, c_shape=None):
        self._build_trunk()
        self.modulation.build((None, self.hidden_size))

    def call(self, x, c):
        mod = self.modulation(ops.silu(c))
        shift1, scale1, gate1, shift2, scale2, gate2 = ops.split(mod, 6, axis=-1)
        x = x + ops.expand_dims(gate1, 1) * self.attn(
            _modulate(self.norm1(x), shift1, scale1)
        )
        x = x + ops.expand_dims(gate2, 1) * self._mlp(
            _modulate(self.norm2(x), shift2, scale2)
        )
        return x

    def compute_output_shape(self, x_shape, c_shape=None):
        return x_shape

    def get_config(self):
        return self._config()


@keras.saving.register_keras_serializable(package="keras_minsnr")
class PreLNBlock(_TransformerBlockBase):
    """Pre-LayerNorm transformer block with plain residuals (the in-context ViT's block).

    ``x + attn(LN(x))`` then ``x + mlp(LN(x))``, exact GELU, affine LayerNorms.

    Args:
        hidden_size: token width ``D``.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``D``.
        kernel_initializer: initializer of the ``qkv`` and first MLP kernels.
        output_initializer: initializer of the attention-output and second MLP kernels
            (the ViT shrinks these with depth).

    Example:
    ```python
    block = PreLNBlock(64, num_heads=4)
    y = block(keras.random.normal((2, 18, 64)))
    ```

    Reference:
        Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021; Hang et al.,
        "Efficient Diffusion Training via Min-SNR Weighting Strategy", ICCV 2023.
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, **kwargs):
        kwargs.setdefault("kernel_initializer", "glorot_uniform")
        kwargs.setdefault("output_initializer", "glorot_uniform")
        super().__init__(
            hidden_size,
            num_heads,
            mlp_ratio,
            gelu_approximate=False,
            layer_norm_affine=True,
            **kwargs,
        )

    def build(self, input_shape):
        self._build_trunk()

    def call(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self._mlp(self.norm2(x))
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return self._config()


@keras.saving.register_keras_serializable(package="keras_minsnr")
class AdaLNFinalLayer(keras.layers.Layer):
    """DiT output layer: adaLN-modulated LayerNorm, then a zero-initialised linear map.

    Args:
        hidden_size: token width ``D``.
        output_size: features per token (``patch_size**2 * channels``).

    Example:
    ```python
    final = AdaLNFinalLayer(64, output_size=16)
    y = final(keras.random.normal((2, 16, 64)), keras.random.normal((2, 64)))  # zeros
    ```

    Reference:
        Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023.
    """

    def __init__(self, hidden_size, output_size, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.norm = keras.layers.LayerNormalization(
            epsilon=_LN_EPSILON,
            center=False,
            scale=False,
            dtype=self.dtype_policy,
            name="norm",
        )
        self.modulation = keras.layers.Dense(
            2 * hidden_size,
            kernel_initializer="zeros",
            dtype=self.dtype_policy,
            name="modulation",
        )
        self.linear = keras.layers.Dense(
            output_size,
            kernel_initializer="zeros",
            dtype=self.dtype_policy,
            name="linear",
        )

    def build(self, x_shape, c_shape=None):
        self.norm.build((None, None, self.hidden_size))
        self.modulation.build((None, self.hidden_size))
        self.linear.build((None, None, self.hidden_size))

    def call(self, x, c):
        shift, scale = ops.split(self.modulation(ops.silu(c)), 2, axis=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))

    def compute_output_shape(self, x_shape, c_shape=None):
        return tuple(x_shape[:-1]) + (self.output_size,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"hidden_size": self.hidden_size, "output_size": self.output_size}
        )
        return config


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}.")
    return int(value)


def _check_layout_args(conditioning_mode, timestep_embedding, timestep_table_size,
                       final_norm):
    """Validates the layout options; returns them normalised, in order."""
    if timestep_embedding not in TIMESTEP_EMBEDDINGS:
        raise ValueError(
            f"Unknown timestep_embedding {timestep_embedding!r}; expected one of "
            f"{TIMESTEP_EMBEDDINGS}."
        )
    timestep_table_size = _positive_int("timestep_table_size", timestep_table_size)
    if not isinstance(final_norm, (bool, np.bool_)):
        raise ValueError(f"final_norm must be True or False, got {final_norm!r}.")
    if conditioning_mode == "adaln_zero" and not final_norm:
        raise ValueError(
            "final_norm=False applies to conditioning_mode='in_context' only: the "
            "adaLN-Zero final layer always normalises before its modulation."
        )
    return timestep_embedding, timestep_table_size, bool(final_norm)


def _check_dit_args(
    image_shape, patch_size, hidden_size, depth, num_heads, mlp_ratio, num_classes,
    conditioning_mode, frequency_dim,
):
    """Validates `DiT`'s constructor arguments; returns them normalised, in order.

    ``image_shape`` becomes a tuple of ints, ``num_classes`` 0 becomes ``None``.
    """
    if conditioning_mode not in CONDITIONING_MODES:
        raise ValueError(
            f"Unknown conditioning_mode {conditioning_mode!r}; expected one of "
            f"{CONDITIONING_MODES}."
        )
    try:
        image_shape = tuple(image_shape)
    except TypeError:
        image_shape = (image_shape,)
    if len(image_shape) != 3:
        raise ValueError(
            f"image_shape must be (height, width, channels), got {image_shape!r}."
        )
    image_shape = tuple(
        _positive_int(f"image_shape {axis}", size)
        for axis, size in zip(("height", "width", "channels"), image_shape)
    )
    patch_size = _positive_int("patch_size", patch_size)
    if image_shape[0] % patch_size or image_shape[1] % patch_size:
        raise ValueError(
            f"image_shape {image_shape} is not divisible by patch_size={patch_size}: "
            f"height and width must be multiples of the patch size."
        )
    hidden_size = _positive_int("hidden_size", hidden_size)
    depth = _positive_int("depth", depth)
    num_heads = _positive_int("num_heads", num_heads)
    frequency_dim = _positive_int("frequency_dim", frequency_dim)
    if hidden_size % num_heads:
        raise ValueError(
            f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}."
        )
    if conditioning_mode == "adaln_zero" and hidden_size % 4:
        raise ValueError(
            f"adaln_zero uses a 2-D sin-cos position embedding, so hidden_size must "
            f"be divisible by 4; got hidden_size={hidden_size}."
        )
    if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0):
        raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}.")
    if num_classes is not None and (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, (int, np.integer))
        or num_classes < 0
    ):
        raise ValueError(
            f"num_classes must be None or a non-negative integer, got "
            f"num_classes={num_classes!r}."
        )
    num_classes = int(num_classes) if num_classes else None
    return (
        image_shape, patch_size, hidden_size, depth, num_heads, float(mlp_ratio),
        num_classes, conditioning_mode, frequency_dim,
    )


def _reference_initializers(in_context, fan_in, hidden_size, depth, head_init_scale):
    """Every random initialiser of `DiT`, as its reference sets it (docs/backbones.md).

    Zero-initialised layers (adaLN modulations, DiT's final layer) set theirs where they
    are defined; DiT's positions are the fixed sin-cos table.
    """
    if in_context:
        # Min-SNR ViT: timm trunc_normal_(std=.02) (absolute +-2 bounds) on every linear
        # layer and the positions; attention-out / fc2 shrunk with depth
        # (fix_init_weight); head x init_scale; the patch conv keeps PyTorch's default
        # U(+-1/sqrt(fan_in)) for kernel and bias; nn.Embedding's N(0, 1) class table.
        bound = 1.0 / math.sqrt(fan_in)
        trunc = initializers.TruncatedNormal
        return {
            "patch_kernel": keras.initializers.RandomUniform(-bound, bound),
            "patch_bias": keras.initializers.RandomUniform(-bound, bound),
            # The ViT's timestep is a learned table; ours is DiT's MLP (no reference).
            "timestep": "glorot_uniform",
            "labels": keras.initializers.RandomNormal(stddev=1.0),
            "block_kernel": [trunc(stddev=0.02) for _ in range(depth)],
            "block_output": [
                trunc(stddev=0.02 / math.sqrt(2.0 * (i + 1))) for i in range(depth)
            ],
            "head": trunc(stddev=0.02 * head_init_scale),
            "positions": trunc(stddev=0.02),
        }
    # DiT initialize_weights: xavier_uniform on every linear layer and on the patch conv
    # kernel seen as a (p*p*C, D) matrix (Keras' glorot on a conv kernel would count
    # p*p*D as fan-out), normal(0.02) on the label table and the timestep MLP.
    limit = math.sqrt(6.0 / (fan_in + hidden_size))
    return {
        "patch_kernel": keras.initializers.RandomUniform(-limit, limit),
        "patch_bias": "zeros",
        "timestep": keras.initializers.RandomNormal(stddev=0.02),
        "labels": keras.initializers.RandomNormal(stddev=0.02),
        "block_kernel": ["glorot_uniform"] * depth,
        "block_output": ["glorot_uniform"] * depth,
    }


@keras.saving.register_keras_serializable(package="keras_minsnr")
class DiT(keras.Model):
    """Diffusion transformer over image or latent patches (DiT or the in-context ViT).

    Called with the backbone-contract dict ``{"x": (B, H, W, C) float, "t": (B,) int,
    "y": (B,) int}`` and returns a float32 tensor shaped like ``x``. The class table has
    ``num_classes + 1`` rows; label ``num_classes`` is the null class of classifier-free
    guidance, and a missing ``"y"`` means the null class. With ``num_classes`` ``None`` or
    0 the model is unconditional and ignores ``"y"``.

    Args:
        image_shape: ``(H, W, C)`` of the inputs; ``H`` and ``W`` divisible by
            ``patch_size``.
        patch_size: side of the square patches (a stride-``p`` convolution embeds them).
        hidden_size: token width.
        depth: number of transformer blocks.
        num_heads: attention heads; must divide ``hidden_size``.
        mlp_ratio: MLP hidden width as a multiple of ``hidden_size``.
        num_classes: number of real classes, or ``None`` / 0 for an unconditional model.
        conditioning_mode: ``"adaln_zero"`` (DiT) or ``"in_context"`` (the Min-SNR ViT).
        frequency_dim: sinusoidal timestep features fed to the timestep MLP.
        head_init_scale: ``in_context`` only: the head's kernel starts as timm's
            truncated normal with std ``0.02 * head_init_scale`` (the ViT's
            ``init_scale=0.001``). docs/backbones.md lists every layer's initialiser.
        timestep_embedding: ``"mlp"`` (sinusoidal features and a two-layer SiLU MLP,
            as in DiT) or ``"table"`` (a learned table indexed by the integer
            timestep, as the official Min-SNR ViT; rows start as ``N(0, 1)``).
        timestep_table_size: rows of the ``"table"`` embedding (the official ViT has
            4000 although it is trained with 1000 timesteps); timesteps must be below
            it.
        final_norm: ``in_context`` only: LayerNorm before the head. The official ViT
            has none (``use_mean_pooling=True`` makes its final norm an identity); set
            ``False`` to match it.
        **kwargs: `keras.Model` arguments (``name``, ``dtype``).

    Example:
    ```python
    model = DiT(image_shape=(32, 32, 4), patch_size=2, hidden_size=384, depth=12,
                num_heads=6, num_classes=1000)          # DiT-S/2
    eps = model({"x": x_t, "t": t, "y": labels})       # (B, 32, 32, 4)
    vit = DiT(image_shape=(64, 64, 3), patch_size=4, hidden_size=1024, depth=21,
              num_heads=16, num_classes=1000, conditioning_mode="in_context")
    # The official ViT's exact layout (what keras_minsnr.official converts into):
    official = DiT(image_shape=(32, 32, 4), patch_size=2, hidden_size=1152, depth=28,
                   num_heads=16, num_classes=1000, conditioning_mode="in_context",
                   timestep_embedding="table", final_norm=False)
    ```

    Reference:
        Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023
        (arXiv 2212.09748); Hang et al., "Efficient Diffusion Training via Min-SNR
        Weighting Strategy", ICCV 2023 (arXiv 2303.09556), whose ViT puts the timestep
        and class in context.
    """

    @classmethod
    def data_arguments(cls, info, config):
        """Image shape and classes from the data (see `backbones.contract`)."""
        return {"image_shape": tuple(info.image_shape), "num_classes": info.num_classes}

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

    def __init__(
        self,
        image_shape=(32, 32, 4),
        patch_size=2,
        hidden_size=384,
        depth=12,
        num_heads=6,
        mlp_ratio=4.0,
        num_classes=1000,
        conditioning_mode="adaln_zero",
        frequency_dim=256,
        head_init_scale=1e-3,
        timestep_embedding="mlp",
        timestep_table_size=4000,
        final_norm=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        timestep_embedding, timestep_table_size, final_norm = _check_layout_args(
            conditioning_mode, timestep_embedding, timestep_table_size, final_norm
        )
        (
            image_shape, patch_size, hidden_size, depth, num_heads, mlp_ratio,
            num_classes, conditioning_mode, frequency_dim,
        ) = _check_dit_args(
            image_shape, patch_size, hidden_size, depth, num_heads, mlp_ratio,
            num_classes, conditioning_mode, frequency_dim,
        )

        # === Config ===
        self.image_shape = image_shape
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.conditioning = "class" if num_classes else None
        self.conditioning_mode = conditioning_mode
        self.frequency_dim = frequency_dim
        self.head_init_scale = float(head_init_scale)
        self.timestep_embedding = timestep_embedding
        self.timestep_table_size = timestep_table_size
        self.final_norm_enabled = final_norm
        self.grid_shape = (image_shape[0] // patch_size, image_shape[1] // patch_size)
        self.num_patches = self.grid_shape[0] * self.grid_shape[1]
        channels = image_shape[2]
        in_context = conditioning_mode == "in_context"
        self.num_extra_tokens = (1 + (num_classes is not None)) if in_context else 0

        # === Initialisers ===
        init = _reference_initializers(
            in_context, patch_size * patch_size * channels, hidden_size, depth,
            self.head_init_scale,
        )
        self._positions_initializer = init.get("positions")

        # === Layers ===
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
                timestep_table_size,
                hidden_size,
                embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0),
                dtype=self.dtype_policy,
                name="t_embedder",
            )
        else:
            self.t_embedder = TimestepEmbedding(
                hidden_size,
                frequency_dim,
                kernel_initializer=init["timestep"],
                dtype=self.dtype_policy,
                name="t_embedder",
            )
        self.y_embedder = None
        if num_classes:
            self.y_embedder = keras.layers.Embedding(
                num_classes + 1,  # the last row is the null class
                hidden_size,
                embeddings_initializer=init["labels"],
                dtype=self.dtype_policy,
                name="y_embedder",
            )
        block_class = PreLNBlock if in_context else DiTBlock
        self.blocks = [
            block_class(
                hidden_size,
                num_heads,
                mlp_ratio,
                kernel_initializer=init["block_kernel"][i],
                output_initializer=init["block_output"][i],
                dtype=self.dtype_policy,
                name=f"block_{i}",
            )
            for i in range(depth)
        ]
        if in_context:
            self.final_norm = None
            if final_norm:
                self.final_norm = keras.layers.LayerNormalization(
                    epsilon=_LN_EPSILON, dtype=self.dtype_policy, name="final_norm"
                )
            self.head = keras.layers.Dense(
                patch_size * patch_size * channels,
                kernel_initializer=init["head"],
                dtype=self.dtype_policy,
                name="head",
            )
        else:
            self.final_layer = AdaLNFinalLayer(
                hidden_size,
                patch_size * patch_size * channels,
                dtype=self.dtype_policy,
                name="final_layer",
            )
        # Every shape is known from the config, so the model is built right away
        # (count_params() works before the first call, and loading needs no input shape).
        self.build()

    def build(self, input_shape=None):
        if self.built:
            return
        height, width, channels = self.image_shape
        hidden = self.hidden_size
        tokens = (None, None, hidden)
        self.patch_embed.build((None, height, width, channels))
        self.t_embedder.build((None,))
        if self.y_embedder is not None:
            self.y_embedder.build((None,))
        if self.conditioning_mode == "in_context":
            self.pos_embed = self.add_weight(
                shape=(1, self.num_extra_tokens + self.num_patches, hidden),
                initializer=self._positions_initializer,
                name="pos_embed",
            )
            for block in self.blocks:
                block.build(tokens)
            if self.final_norm is not None:
                self.final_norm.build(tokens)
            self.head.build(tokens)
        else:
            self.pos_embed = self.add_weight(
                shape=(1, self.num_patches, hidden),
                initializer="zeros",
                trainable=False,
                name="pos_embed",
            )
            self.pos_embed.assign(
                sincos_position_embedding_2d(hidden, *self.grid_shape)[None].astype(
                    "float32"
                )
            )
            for block in self.blocks:
                block.build(tokens, (None, hidden))
            self.final_layer.build(tokens, (None, hidden))

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
        gh, gw = self.grid_shape
        d = self.hidden_size
        h = self.patch_embed(x)  # (B, H/p, W/p, D)
        h = ops.reshape(h, (-1, self.num_patches, d))  # (B, N, D), N = H*W/p²
        cond = self.t_embedder(t)  # (B, D)
        y_emb = None
        if self.num_classes:
            if y is None:
                y = ops.zeros_like(ops.cast(t, "int32")) + self.num_classes
            y_emb = self.y_embedder(y)  # (B, D)

        pos = ops.cast(self.pos_embed, h.dtype)  # (1, extra + N, D)
        if self.conditioning_mode == "in_context":
            extra = [ops.expand_dims(cond, 1)]  # [(B, 1, D)]
            if y_emb is not None:
                extra.append(ops.expand_dims(y_emb, 1))
            h = ops.concatenate(extra + [h], axis=1) + pos  # (B, extra + N, D)
            for block in self.blocks:
                h = block(h)  # (B, extra + N, D)
            if self.final_norm is not None:
                h = self.final_norm(h)
            h = h[:, self.num_extra_tokens :]  # (B, N, D)
            h = self.head(h)  # (B, N, p*p*C)
        else:
            if y_emb is not None:
                cond = cond + y_emb  # (B, D)
            h = h + pos  # (B, N, D)
            for block in self.blocks:
                h = block(h, cond)  # (B, N, D)
            h = self.final_layer(h, cond)  # (B, N, p*p*C)
        out = unpatchify(h, gh, gw, self.patch_size, self.image_shape[2])  # (B, H, W, C)
        return ops.cast(out, "float32")

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
                "conditioning_mode": self.conditioning_mode,
                "frequency_dim": self.frequency_dim,
                "head_init_scale": self.head_init_scale,
                "timestep_embedding": self.timestep_embedding,
                "timestep_table_size": self.timestep_table_size,
                "final_norm": self.final_norm_enabled,
            }
        )
        return config


def _dit(hidden_size, depth, num_heads, description, paper_params):
    return {
        "class": DiT,
        "config": {
            "image_shape": (32, 32, 4),
            "patch_size": 2,
            "hidden_size": hidden_size,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": 4.0,
            "num_classes": 1000,
            "conditioning_mode": "adaln_zero",
        },
        "description": description,
        "paper_params": paper_params,
    }


def _vit(image_shape, patch_size, hidden_size, depth, num_heads, description, paper):
    return {
        "class": DiT,
        "config": {
            "image_shape": image_shape,
            "patch_size": patch_size,
            "hidden_size": hidden_size,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": 4.0,
            "num_classes": 1000,
            "conditioning_mode": "in_context",
        },
        "description": description,
        "paper_params": paper,
    }


PRESETS = {
    "dit_s_2": _dit(
        384, 12, 6, "DiT-S/2, adaLN-Zero, ImageNet-256 SD-VAE latents (32x32x4).",
        33_000_000,
    ),
    "dit_b_2": _dit(
        768, 12, 12, "DiT-B/2, adaLN-Zero, ImageNet-256 SD-VAE latents (32x32x4).",
        130_000_000,
    ),
    "dit_l_2": _dit(
        1024, 24, 16, "DiT-L/2, adaLN-Zero, ImageNet-256 SD-VAE latents (32x32x4).",
        458_000_000,
    ),
    "dit_xl_2": _dit(
        1152, 28, 16, "DiT-XL/2, adaLN-Zero, ImageNet-256 SD-VAE latents (32x32x4).",
        675_000_000,
    ),
    "vit_b_2_in256": _vit(
        (32, 32, 4), 2, 768, 12, 12,
        "Min-SNR in-context ViT-B/2 (12 layers), ImageNet-256 latents (32x32x4). The "
        "paper gives no parameter count for it.",
        None,
    ),
    "vit_l_4_in64": _vit(
        (64, 64, 3), 4, 1024, 21, 16,
        "Min-SNR in-context ViT-L/4 (21 layers), ImageNet-64 pixels (64x64x3).",
        269_000_000,
    ),
    "vit_xl_2_in256": _vit(
        (32, 32, 4), 2, 1152, 28, 16,
        "Min-SNR in-context ViT-XL/2 (28 layers), ImageNet-256 latents (32x32x4).",
        451_000_000,
    ),
}
