"""ADM-style UNet denoiser (Ho et al. 2020; Dhariwal & Nichol 2021)."""

import keras
from keras import ops

from keras_minsnr.backbones import contract
from keras_minsnr.backbones.layers import TimestepEmbedding
from keras_minsnr.backbones.remat import DrawnSeed
from keras_minsnr.backbones.remat import check_flag
from keras_minsnr.backbones.remat import rematerialized


def _check_groups(channels, num_groups, what):
    if channels % num_groups:
        raise ValueError(
            f"GroupNormalization needs num_groups={num_groups} to divide the channels, "
            f"but {what} has {channels} channels. Choose num_groups among the divisors "
            f"of every level's width (base_channels * multiplier)."
        )


@keras.saving.register_keras_serializable(package="keras_minsnr")
class UNetResBlock(keras.layers.Layer):
    """Residual block with timestep (+class) conditioning.

    GroupNorm → SiLU → 3×3 conv, then the embedding is injected either as a scale and
    shift of the second GroupNorm (``use_scale_shift_norm=True``, ADM) or added to the
    features before it (DDPM), then SiLU → dropout → zero-initialised 3×3 conv, plus a
    skip path (a 1×1 conv when the width changes). Starts as the identity (or the 1×1
    skip projection).

    Args:
        out_channels: output width.
        dropout: dropout rate before the last conv.
        use_scale_shift_norm: ADM's scale-shift conditioning instead of addition.
        num_groups: GroupNorm groups.

    Called as ``block(x, emb, training=..., dropout_seed=None)``; ``dropout_seed`` (a
    `keras_minsnr.backbones.remat.DrawnSeed` of ``block.drop.seed_generator``) draws the
    dropout mask from a seed taken before a recomputed stage.

    Example:
    ```python
    block = UNetResBlock(64)
    y = block(keras.ops.ones((2, 8, 8, 32)), keras.ops.ones((2, 128)))  # (2, 8, 8, 64)
    ```

    Reference:
        Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", 2021.
    """

    def __init__(
        self,
        out_channels,
        dropout=0.0,
        use_scale_shift_norm=True,
        num_groups=32,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.out_channels = out_channels
        self.dropout = dropout
        self.use_scale_shift_norm = use_scale_shift_norm
        self.num_groups = num_groups
        self.norm_1 = keras.layers.GroupNormalization(num_groups, epsilon=1e-5, name="norm_1")
        self.conv_1 = keras.layers.Conv2D(out_channels, 3, padding="same", name="conv_1")
        emb_width = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_proj = keras.layers.Dense(emb_width, name="emb_proj")
        self.norm_2 = keras.layers.GroupNormalization(num_groups, epsilon=1e-5, name="norm_2")
        self.drop = keras.layers.Dropout(dropout, name="dropout")
        self.conv_2 = keras.layers.Conv2D(
            out_channels, 3, padding="same", kernel_initializer="zeros", name="conv_2"
        )
        self.skip = None

    def build(self, inputs_shape, emb_shape):
        input_shape = inputs_shape
        in_channels = input_shape[-1]
        _check_groups(in_channels, self.num_groups, f"the input of {self.name}")
        _check_groups(self.out_channels, self.num_groups, self.name)
        out_shape = tuple(input_shape[:-1]) + (self.out_channels,)
        self.norm_1.build(input_shape)
        self.conv_1.build(input_shape)
        self.emb_proj.build(emb_shape)
        self.norm_2.build(out_shape)
        self.conv_2.build(out_shape)
        if in_channels != self.out_channels:
            self.skip = keras.layers.Conv2D(self.out_channels, 1, name="skip")
            self.skip.build(input_shape)
        self.built = True

    def call(self, inputs, emb, training=None, dropout_seed=None):
        h = self.conv_1(ops.silu(self.norm_1(inputs)))
        emb = self.emb_proj(ops.silu(emb))[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = ops.split(emb, 2, axis=-1)
            h = self.norm_2(h) * (1.0 + scale) + shift
        else:
            h = self.norm_2(h + emb)
        h = ops.silu(h)
        if dropout_seed is None:
            h = self.drop(h, training=training)
        elif training and self.dropout > 0:  # the mask self.drop would draw
            h = keras.random.dropout(h, self.dropout, seed=dropout_seed)
        h = self.conv_2(h)
        skip = inputs if self.skip is None else self.skip(inputs)
        return skip + h

    def compute_output_shape(self, inputs_shape, emb_shape):
        return tuple(inputs_shape[:-1]) + (self.out_channels,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "out_channels": self.out_channels,
                "dropout": self.dropout,
                "use_scale_shift_norm": self.use_scale_shift_norm,
                "num_groups": self.num_groups,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_minsnr")
class UNetAttentionBlock(keras.layers.Layer):
    """Multi-head self-attention over the pixels of a feature map, with a residual.

    GroupNorm → 1×1 qkv projection → `keras.ops.dot_product_attention` → zero-initialised
    1×1 output projection, so the block starts as the identity.

    Args:
        num_heads: attention heads; must divide the channels.
        num_groups: GroupNorm groups.

    Example:
    ```python
    y = UNetAttentionBlock(num_heads=4)(keras.ops.ones((2, 8, 8, 64)))  # (2, 8, 8, 64)
    ```

    Reference:
        Vaswani et al., "Attention Is All You Need", 2017; Dhariwal & Nichol 2021.
    """

    def __init__(self, num_heads=1, num_groups=32, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.num_groups = num_groups
        self.norm = keras.layers.GroupNormalization(num_groups, epsilon=1e-5, name="norm")
        self.qkv = None
        self.proj = None

    def build(self, input_shape):
        channels = input_shape[-1]
        _check_groups(channels, self.num_groups, self.name)
        if channels % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide the {channels} channels of "
                f"{self.name}."
            )
        self.norm.build(input_shape)
        # Dense layers on the channel axis are 1x1 convolutions.
        self.qkv = keras.layers.Dense(3 * channels, name="qkv")
        self.qkv.build(input_shape)
        self.proj = keras.layers.Dense(channels, kernel_initializer="zeros", name="proj")
        self.proj.build(input_shape)
        self.built = True

    def call(self, inputs):
        shape = ops.shape(inputs)
        batch, height, width, channels = shape[0], shape[1], shape[2], inputs.shape[-1]
        head_dim = channels // self.num_heads
        qkv = self.qkv(self.norm(inputs))
        qkv = ops.reshape(qkv, (batch, height * width, 3, self.num_heads, head_dim))
        q, k, v = ops.unstack(qkv, 3, axis=2)  # one stack as gradient, not three pads
        out = ops.dot_product_attention(q, k, v)
        out = ops.reshape(out, (batch, height, width, channels))
        return inputs + self.proj(out)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"num_heads": self.num_heads, "num_groups": self.num_groups})
        return config


@keras.saving.register_keras_serializable(package="keras_minsnr")
class UNet(keras.Model):
    """ADM-style UNet denoiser following the `keras_minsnr.backbones` contract.

    Conv-in, a down path of residual blocks (self-attention at the chosen resolutions,
    strided-conv downsampling between levels), a middle block (res, attention, res), an
    up path that concatenates the skips (nearest upsampling + conv between levels) and
    GroupNorm → SiLU → zero-initialised conv out, so the untrained model predicts 0.
    The timestep embedding (sinusoidal features of width ``base_channels`` through a
    SiLU MLP of width ``4 * base_channels``) conditions every residual block; for
    class-conditional models an embedding table with ``num_classes + 1`` rows (the last
    row is the null class of classifier-free guidance) is added to it.

    Called with ``{"x": (B, H, W, C) float, "t": (B,) int, "y": (B,) int}``; ``"y"`` is
    optional and defaults to the null class. Returns a float32 tensor shaped like ``x``.

    Args:
        image_shape: ``(H, W, C)`` of the images; H and W divisible by
            ``2 ** (len(channel_multipliers) - 1)``.
        base_channels: width of the first level.
        channel_multipliers: width multiplier of every level.
        num_res_blocks: residual blocks per level in the down path (the up path has one
            more, as in DDPM/ADM).
        attention_resolutions: feature-map sizes (height) that get self-attention.
        num_heads: attention heads.
        dropout: dropout rate inside the residual blocks.
        num_classes: real classes for class conditioning; ``None`` for unconditional.
        use_scale_shift_norm: ADM's scale-shift conditioning (``True``) or DDPM's plain
            addition of the embedding (``False``).
        num_groups: GroupNorm groups (must divide every width).
        gradient_checkpointing: recompute each stage (a residual block with its
            attention, the middle block) in the backward pass: less memory, one more
            forward pass (`keras_minsnr.backbones.remat`). May be set as an attribute
            before the model is traced.

    Example:
    ```python
    unet = UNet(image_shape=(16, 16, 3), base_channels=32, channel_multipliers=(1, 2),
                num_res_blocks=1, attention_resolutions=(8,), num_groups=8,
                num_classes=10)
    eps = unet({"x": keras.ops.ones((2, 16, 16, 3)), "t": keras.ops.array([1, 500]),
                "y": keras.ops.array([3, 10])})  # (2, 16, 16, 3)
    ```

    Reference:
        Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020;
        Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", NeurIPS 2021.
    """

    gradient_checkpointing = False  # backbones.contract: this backbone can remat

    @classmethod
    def data_arguments(cls, info, config):
        """Image shape and classes from the data (see `backbones.contract`)."""
        return contract.image_and_class_arguments(info)

    @classmethod
    def lora_target_groups(cls):
        """Attention is generic; the residual blocks' convolutions and the embeddings."""
        return {
            "conv": [(r"UNetResBlock", r"conv_1|conv_2|skip")],
            "embedding": [(r"TimestepEmbedding", r".*"), (None, r"class_embedding|emb_proj")],
        }

    def __init__(
        self,
        image_shape=(32, 32, 3),
        base_channels=128,
        channel_multipliers=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        num_heads=1,
        dropout=0.1,
        num_classes=None,
        use_scale_shift_norm=True,
        num_groups=32,
        gradient_checkpointing=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        image_shape = tuple(int(v) for v in image_shape)
        channel_multipliers = tuple(int(m) for m in channel_multipliers)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(
                f"image_shape must be (height, width, channels) of positive ints, "
                f"got {image_shape}."
            )
        if not channel_multipliers or min(channel_multipliers) < 1:
            raise ValueError(
                f"channel_multipliers must be a non-empty tuple of positive ints, "
                f"got {channel_multipliers}."
            )
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}.")
        factor = 2 ** (len(channel_multipliers) - 1)
        height, width, channels = image_shape
        if height % factor or width % factor:
            raise ValueError(
                f"image_shape {image_shape}: height and width must be divisible by "
                f"2**(levels-1) = {factor} for {len(channel_multipliers)} levels "
                f"(channel_multipliers={channel_multipliers})."
            )
        resolutions = [height // 2**i for i in range(len(channel_multipliers))]
        unknown = sorted(set(attention_resolutions) - set(resolutions))
        if unknown:
            raise ValueError(
                f"attention_resolutions {unknown} are not reached by this UNet; the "
                f"feature maps have heights {resolutions}."
            )
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {num_classes}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        for level, mult in enumerate(channel_multipliers):
            _check_groups(base_channels * mult, num_groups, f"a level of width x{mult}")
            if resolutions[level] in attention_resolutions:
                if (base_channels * mult) % num_heads:
                    raise ValueError(
                        f"num_heads={num_heads} must divide the width "
                        f"{base_channels * mult} of every level with attention."
                    )

        self.image_shape = image_shape
        self.base_channels = base_channels
        self.channel_multipliers = channel_multipliers
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.num_heads = num_heads
        self.dropout = dropout
        self.num_classes = num_classes
        self.use_scale_shift_norm = use_scale_shift_norm
        self.num_groups = num_groups
        self.gradient_checkpointing = check_flag(gradient_checkpointing)
        self.conditioning = None if num_classes is None else "class"

        emb_dim = 4 * base_channels
        self.time_embedding = TimestepEmbedding(
            emb_dim, frequency_dim=base_channels, name="time_embedding"
        )
        self.class_embedding = None
        if num_classes is not None:
            self.class_embedding = keras.layers.Embedding(
                num_classes + 1, emb_dim, name="class_embedding"
            )

        def res(ch, name):
            return UNetResBlock(ch, dropout, use_scale_shift_norm, num_groups, name=name)

        def attn(name):
            return UNetAttentionBlock(num_heads, num_groups, name=name)

        self.conv_in = keras.layers.Conv2D(
            base_channels, 3, padding="same", name="conv_in"
        )
        # Each entry: (res block or None, attention or None, resampler or None).
        self.down_blocks = []
        for level, mult in enumerate(channel_multipliers):
            use_attn = resolutions[level] in attention_resolutions
            for i in range(num_res_blocks):
                self.down_blocks.append(
                    [res(base_channels * mult, f"down_{level}_res_{i}"),
                     attn(f"down_{level}_attn_{i}") if use_attn else None,
                     None]
                )
            if level < len(channel_multipliers) - 1:
                down = keras.layers.Conv2D(
                    base_channels * mult, 3, strides=2, padding="same",
                    name=f"down_{level}_downsample",
                )
                self.down_blocks.append([None, None, down])
        mid = base_channels * channel_multipliers[-1]
        self.mid_res_1 = res(mid, "mid_res_1")
        self.mid_attn = attn("mid_attn")
        self.mid_res_2 = res(mid, "mid_res_2")
        self.up_blocks = []
        for level in reversed(range(len(channel_multipliers))):
            use_attn = resolutions[level] in attention_resolutions
            for i in range(num_res_blocks + 1):
                up = None
                if level > 0 and i == num_res_blocks:
                    up = keras.layers.Conv2D(
                        base_channels * channel_multipliers[level], 3, padding="same",
                        name=f"up_{level}_upsample_conv",
                    )
                self.up_blocks.append(
                    [res(base_channels * channel_multipliers[level], f"up_{level}_res_{i}"),
                     attn(f"up_{level}_attn_{i}") if use_attn else None,
                     up]
                )
        self.norm_out = keras.layers.GroupNormalization(
            num_groups, epsilon=1e-5, name="norm_out"
        )
        self.conv_out = keras.layers.Conv2D(
            channels, 3, padding="same", kernel_initializer="zeros", name="conv_out"
        )
        self._build_layers()

    def _build_layers(self):
        # Shape propagation instead of a symbolic trace: building big UNets stays fast.
        emb_shape = (None, 4 * self.base_channels)
        self.time_embedding.build((None,))
        if self.class_embedding is not None:
            self.class_embedding.build((None,))

        def shape(ch):
            return (None, None, None, ch)

        self.conv_in.build(shape(self.image_shape[-1]))
        ch = self.base_channels
        skips = [ch]
        for res_block, attn_block, down in self.down_blocks:
            if res_block is not None:
                res_block.build(shape(ch), emb_shape)
                ch = res_block.out_channels
            if attn_block is not None:
                attn_block.build(shape(ch))
            if down is not None:
                down.build(shape(ch))
            skips.append(ch)
        for block in (self.mid_res_1, self.mid_res_2):
            block.build(shape(ch), emb_shape)
        self.mid_attn.build(shape(ch))
        for res_block, attn_block, up in self.up_blocks:
            res_block.build(shape(ch + skips.pop()), emb_shape)
            ch = res_block.out_channels
            if attn_block is not None:
                attn_block.build(shape(ch))
            if up is not None:
                up.build(shape(ch))
        self.norm_out.build(shape(ch))
        self.conv_out.build(shape(ch))
        self.built = True

    def build(self, input_shape=None):
        if not self.built:
            self._build_layers()

    def compute_output_shape(self, input_shape):
        return tuple(input_shape["x"])

    def _check_inputs(self, inputs):
        if not isinstance(inputs, dict) or "x" not in inputs or "t" not in inputs:
            raise ValueError(
                "UNet expects a dict {'x': images, 't': timesteps, 'y': labels "
                f"(optional)}}, got {type(inputs).__name__}"
                + (f" with keys {sorted(inputs)}" if isinstance(inputs, dict) else "")
                + "."
            )
        shape = tuple(inputs["x"].shape)
        if len(shape) != 4:
            raise ValueError(
                f"UNet input 'x' must have rank 4 (batch, height, width, channels), "
                f"got shape {shape}."
            )
        if shape[-1] != self.image_shape[-1]:
            raise ValueError(
                f"UNet input 'x' has {shape[-1]} channels but the model was built for "
                f"image_shape={self.image_shape} ({self.image_shape[-1]} channels)."
            )
        factor = 2 ** (len(self.channel_multipliers) - 1)
        for size in shape[1:3]:
            if size is not None and size % factor:
                raise ValueError(
                    f"UNet input 'x' of shape {shape}: height and width must be "
                    f"divisible by {factor}."
                )

    def call(self, inputs, training=None):
        self._check_inputs(inputs)
        x, t = inputs["x"], inputs["t"]
        emb = self.time_embedding(t)
        if self.class_embedding is not None:
            y = inputs.get("y")
            if y is None:
                y = ops.full((ops.shape(x)[0],), self.num_classes, dtype="int32")
            emb = emb + self.class_embedding(ops.cast(y, "int32"))

        h = self.conv_in(x)
        skips = [h]
        for res_block, attn_block, down in self.down_blocks:
            if res_block is not None:
                h = self._stage([res_block, attn_block], h, emb, training)
            if down is not None:
                h = down(h)
            skips.append(h)
        h = self._stage([self.mid_res_1, self.mid_attn, self.mid_res_2], h, emb, training)
        for res_block, attn_block, up in self.up_blocks:
            h = ops.concatenate([h, skips.pop()], axis=-1)
            h = self._stage([res_block, attn_block], h, emb, training)
            if up is not None:
                h = ops.repeat(ops.repeat(h, 2, axis=1), 2, axis=2)
                h = up(h)
        h = self.conv_out(ops.silu(self.norm_out(h)))
        # The loss is computed in float32 even under mixed precision.
        return ops.cast(h, "float32")

    def _stage(self, blocks, h, emb, training):
        """Residual and attention blocks in order (None skipped), as one unit that
        ``gradient_checkpointing`` recomputes in the backward pass."""
        blocks = [block for block in blocks if block is not None]
        seeds = [None] * len(blocks)
        if self.gradient_checkpointing and training and self.dropout > 0:
            # Drawn outside the recomputed unit, so both passes drop the same units.
            seeds = [DrawnSeed(b.drop.seed_generator.next())
                     if isinstance(b, UNetResBlock) else None for b in blocks]

        def stage(h, emb):
            for block, seed in zip(blocks, seeds):
                if isinstance(block, UNetResBlock):
                    h = block(h, emb, training=training, dropout_seed=seed)
                else:
                    h = block(h)
            return h

        return rematerialized(stage, self.gradient_checkpointing)(h, emb)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "image_shape": self.image_shape,
                "base_channels": self.base_channels,
                "channel_multipliers": self.channel_multipliers,
                "num_res_blocks": self.num_res_blocks,
                "attention_resolutions": self.attention_resolutions,
                "num_heads": self.num_heads,
                "dropout": self.dropout,
                "num_classes": self.num_classes,
                "use_scale_shift_norm": self.use_scale_shift_norm,
                "num_groups": self.num_groups,
                "gradient_checkpointing": self.gradient_checkpointing,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


PRESETS = {
    "unet_cifar10": {
        "class": UNet,
        "config": {
            "image_shape": (32, 32, 3),
            "base_channels": 128,
            "channel_multipliers": (1, 2, 2, 2),
            "num_res_blocks": 2,
            "attention_resolutions": (16,),
            "num_heads": 1,
            "dropout": 0.1,
            "num_classes": None,
            # DDPM adds the timestep embedding; scale-shift would add ~2.6M parameters.
            "use_scale_shift_norm": False,
        },
        "description": (
            "DDPM's CIFAR-10 UNet (Ho et al. 2020): 32x32x3, 128 base channels, "
            "multipliers (1, 2, 2, 2), 2 res blocks, attention at 16x16, dropout 0.1, "
            "timestep embedding added (no scale-shift), unconditional."
        ),
        "paper_params": 35_700_000,
    },
    "unet_64": {
        "class": UNet,
        "config": {
            "image_shape": (64, 64, 3),
            "base_channels": 128,
            "channel_multipliers": (1, 2, 3, 4),
            "num_res_blocks": 3,
            "attention_resolutions": (32, 16, 8),
            "num_heads": 4,
            "dropout": 0.1,
            "num_classes": None,
            "use_scale_shift_norm": True,
        },
        "description": (
            "ADM-style 64x64x3 UNet at the scale of the Min-SNR paper's CelebA-64 UNet: "
            "128 base channels, multipliers (1, 2, 3, 4), 3 res blocks, attention at "
            "32/16/8 with 4 heads, scale-shift norm, dropout 0.1, unconditional "
            "(override num_classes for class conditioning)."
        ),
        "paper_params": None,
    },
}
