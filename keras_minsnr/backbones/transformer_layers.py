"""The layers both patch transformers are made of: attention, the two block kinds, DiT's
adaLN final layer, fixed 2-D positions and unpatchify."""

import keras
import numpy as np
from keras import ops

from keras_minsnr.backbones import initializers
from keras_minsnr.backbones.layers import gelu

LN_EPSILON = 1e-6


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
        # One unstack, not three slices: on TensorFlow its gradient is one stack, where
        # each slice's gradient writes a zero-padded copy of the whole qkv tensor.
        q, k, v = ops.unstack(qkv, 3, axis=2)
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
            epsilon=LN_EPSILON,
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
            epsilon=LN_EPSILON,
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
