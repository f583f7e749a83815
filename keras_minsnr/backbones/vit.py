"""The Min-SNR paper's in-context ViT (Hang et al. 2023, ``vision_transformer.py``).

The timestep and class embeddings are two extra tokens in front of the patch tokens;
learned absolute positions, pre-LN blocks with plain residuals, a final LayerNorm and a
linear head initialised very small. The extra tokens are dropped before unpatchifying.

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
from keras_minsnr.backbones.patch_transformer import PatchTransformer
from keras_minsnr.backbones.transformer_layers import LN_EPSILON
from keras_minsnr.backbones.transformer_layers import PreLNBlock


def _reference_initializers(fan_in, hidden_size, depth, head_init_scale):
    """The Min-SNR ViT's initialisers (docs/backbones.md): timm ``trunc_normal_(std=.02)``
    (absolute ±2 bounds) on every linear layer and the positions; attention-out / fc2
    shrunk with depth (``fix_init_weight``); head × ``init_scale``; the patch conv keeps
    PyTorch's default U(±1/√fan_in) for kernel and bias; ``nn.Embedding``'s N(0, 1)
    class table."""
    bound = 1.0 / math.sqrt(fan_in)
    trunc = initializers.TruncatedNormal
    return {
        "patch_kernel": keras.initializers.RandomUniform(-bound, bound),
        "patch_bias": keras.initializers.RandomUniform(-bound, bound),
        # The ViT's timestep is a learned table; ours is DiT's MLP (no reference).
        "timestep": "glorot_uniform",
        "labels": keras.initializers.RandomNormal(stddev=1.0),
        "block_kernel": [trunc(stddev=0.02) for _ in range(depth)],
        "block_output": [trunc(stddev=0.02 / math.sqrt(2.0 * (i + 1))) for i in range(depth)],
        "head": trunc(stddev=0.02 * head_init_scale),
        "positions": trunc(stddev=0.02),
    }


@keras.saving.register_keras_serializable(package="keras_minsnr")
class InContextViT(PatchTransformer):
    """The Min-SNR paper's ViT: timestep and class as two extra tokens, no adaLN.

    Called with the backbone-contract dict ``{"x": (B, H, W, C) float, "t": (B,) int,
    "y": (B,) int}`` and returns a float32 tensor shaped like ``x``. The class table has
    ``num_classes + 1`` rows (the last is the null class of classifier-free guidance; a
    missing ``"y"`` means it). With ``num_classes`` ``None`` or 0 only the timestep token
    is added.

    Args:
        image_shape: ``(H, W, C)``; ``H`` and ``W`` divisible by ``patch_size``.
        patch_size: side of the square patches.
        hidden_size: token width.
        depth: number of pre-LN blocks.
        num_heads: attention heads; must divide ``hidden_size``.
        mlp_ratio: MLP hidden width as a multiple of ``hidden_size``.
        num_classes: number of real classes, or ``None`` / 0 (unconditional).
        frequency_dim: sinusoidal timestep features of the ``"mlp"`` embedding.
        head_init_scale: the head's kernel starts as timm's truncated normal with std
            ``0.02 * head_init_scale`` (the ViT's ``init_scale=0.001``).
        timestep_embedding: ``"mlp"`` (sinusoidal features and a two-layer SiLU MLP) or
            ``"table"`` (a learned table indexed by the integer timestep, as the official
            ViT; rows start as ``N(0, 1)``).
        timestep_table_size: rows of the ``"table"`` embedding (the official ViT has 4000
            although it is trained with 1000 timesteps); timesteps must be below it.
        final_norm: LayerNorm before the head. The official ViT has none
            (``use_mean_pooling=True`` makes its final norm an identity); ``False``
            matches it.
        **kwargs: `keras.Model` arguments (``name``, ``dtype``) and
            ``gradient_checkpointing`` (recompute each block in the backward pass;
            see `PatchTransformer`).

    Example:
    ```python
    vit = InContextViT(image_shape=(64, 64, 3), patch_size=4, hidden_size=1024,
                       depth=21, num_heads=16, num_classes=1000)   # ViT-L/4
    # The official ViT's exact layout (what keras_minsnr.official converts into):
    official = InContextViT(image_shape=(32, 32, 4), patch_size=2, hidden_size=1152,
                            depth=28, num_heads=16, num_classes=1000,
                            timestep_embedding="table", final_norm=False)
    ```

    Reference:
        Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", ICCV
        2023 (arXiv 2303.09556); Dosovitskiy et al., "An Image is Worth 16x16 Words",
        ICLR 2021.
    """

    INITIALIZERS = staticmethod(_reference_initializers)
    BLOCK = PreLNBlock

    def __init__(
        self,
        image_shape=(32, 32, 4),
        patch_size=2,
        hidden_size=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        num_classes=1000,
        frequency_dim=256,
        head_init_scale=1e-3,
        timestep_embedding="mlp",
        timestep_table_size=4000,
        final_norm=True,
        **kwargs,
    ):
        if not isinstance(final_norm, (bool, np.bool_)):
            raise ValueError(f"final_norm must be True or False, got {final_norm!r}.")
        self.final_norm_enabled = bool(final_norm)
        self.conditioning_mode = "in_context"
        super().__init__(
            image_shape, patch_size, hidden_size, depth, num_heads, mlp_ratio,
            num_classes, frequency_dim, timestep_embedding, timestep_table_size,
            head_init_scale, **kwargs,
        )

    @property
    def num_extra_tokens(self):
        """The timestep token, and the class token when class-conditional."""
        return 1 + (self.num_classes is not None)

    def _make_output_layers(self, init):
        self._positions_initializer = init["positions"]
        self.final_norm = None
        if self.final_norm_enabled:
            self.final_norm = keras.layers.LayerNormalization(
                epsilon=LN_EPSILON, dtype=self.dtype_policy, name="final_norm"
            )
        self.head = keras.layers.Dense(
            self.patch_size * self.patch_size * self.image_shape[2],
            kernel_initializer=init["head"],
            dtype=self.dtype_policy,
            name="head",
        )

    def _build_trunk(self):
        tokens = (None, None, self.hidden_size)
        self.pos_embed = self.add_weight(
            shape=(1, self.num_extra_tokens + self.num_patches, self.hidden_size),
            initializer=self._positions_initializer,
            name="pos_embed",
        )
        for block in self.blocks:
            block.build(tokens)
        if self.final_norm is not None:
            self.final_norm.build(tokens)
        self.head.build(tokens)

    def _run_trunk(self, h, t_emb, y_emb):
        extra = [ops.expand_dims(t_emb, 1)]  # [(B, 1, D)]
        if y_emb is not None:
            extra.append(ops.expand_dims(y_emb, 1))
        pos = ops.cast(self.pos_embed, h.dtype)  # (1, extra + N, D)
        h = ops.concatenate(extra + [h], axis=1) + pos  # (B, extra + N, D)
        for block in self.blocks:
            h = self.block_call(block)(h)
        if self.final_norm is not None:
            h = self.final_norm(h)
        return self.head(h[:, self.num_extra_tokens :])  # (B, N, p*p*C)

    def get_config(self):
        return {
            **super().get_config(),
            "head_init_scale": self.head_init_scale,
            "final_norm": self.final_norm_enabled,
        }


def _vit(image_shape, patch_size, hidden_size, depth, num_heads, description, paper):
    return {
        "class": InContextViT,
        "config": {
            "image_shape": image_shape,
            "patch_size": patch_size,
            "hidden_size": hidden_size,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": 4.0,
            "num_classes": 1000,
        },
        "description": description,
        "paper_params": paper,
    }



PRESETS = {
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
