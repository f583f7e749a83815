"""DiT: the diffusion transformer with adaLN-Zero conditioning (Peebles & Xie 2023).

The summed timestep and class embeddings regress a per-block shift / scale / gate for the
attention and MLP branches; the regressors and the output projection start at zero, so
every block starts as the identity and the model starts by predicting zeros. Fixed 2-D
sin-cos positions. The Min-SNR paper's in-context ViT, over the same layers, is
`keras_minsnr.backbones.vit.InContextViT`.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_minsnr.backbones.patch_transformer import PatchTransformer
from keras_minsnr.backbones.transformer_layers import AdaLNFinalLayer
from keras_minsnr.backbones.transformer_layers import DiTBlock
from keras_minsnr.backbones.transformer_layers import sincos_position_embedding_2d
from keras_minsnr.backbones.vit import InContextViT

CONDITIONING_MODES = ("adaln_zero", "in_context")


def _reference_initializers(fan_in, hidden_size, depth, head_init_scale):
    """DiT's ``initialize_weights`` (docs/backbones.md): xavier_uniform on every linear
    layer and on the patch conv kernel seen as a ``(p*p*C, D)`` matrix (Keras' glorot on
    a conv kernel would count ``p*p*D`` as fan-out), normal(0.02) on the label table and
    the timestep MLP. The zero-initialised adaLN layers set theirs where they are made."""
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
class DiT(PatchTransformer):
    """Diffusion transformer with adaLN-Zero conditioning over image or latent patches.

    Called with the backbone-contract dict ``{"x": (B, H, W, C) float, "t": (B,) int,
    "y": (B,) int}`` and returns a float32 tensor shaped like ``x``. The class table has
    ``num_classes + 1`` rows; label ``num_classes`` is the null class of classifier-free
    guidance, and a missing ``"y"`` means the null class. With ``num_classes`` ``None`` or
    0 the model is unconditional and ignores ``"y"``.

    Args:
        image_shape: ``(H, W, C)`` of the inputs; ``H`` and ``W`` divisible by
            ``patch_size``.
        patch_size: side of the square patches (a stride-``p`` convolution embeds them).
        hidden_size: token width; divisible by 4 (2-D sin-cos positions).
        depth: number of transformer blocks.
        num_heads: attention heads; must divide ``hidden_size``.
        mlp_ratio: MLP hidden width as a multiple of ``hidden_size``.
        num_classes: number of real classes, or ``None`` / 0 for an unconditional model.
        frequency_dim: sinusoidal timestep features fed to the timestep MLP.
        timestep_embedding: ``"mlp"`` (sinusoidal features and a two-layer SiLU MLP) or
            ``"table"`` (a learned table indexed by the integer timestep).
        timestep_table_size: rows of the ``"table"`` embedding.
        conditioning_mode: only ``"adaln_zero"``; kept so that configs written when one
            class held both transformers load (an ``"in_context"`` one loads as
            `InContextViT`).
        **kwargs: `keras.Model` arguments (``name``, ``dtype``) and
            ``gradient_checkpointing`` (recompute each block in the backward pass;
            see `PatchTransformer`).

    Example:
    ```python
    model = DiT(image_shape=(32, 32, 4), patch_size=2, hidden_size=384, depth=12,
                num_heads=6, num_classes=1000)          # DiT-S/2
    eps = model({"x": x_t, "t": t, "y": labels})       # (B, 32, 32, 4)
    ```

    Reference:
        Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023
        (arXiv 2212.09748).
    """

    INITIALIZERS = staticmethod(_reference_initializers)
    BLOCK = DiTBlock
    num_extra_tokens = 0  # every token is a patch

    def __init__(
        self,
        image_shape=(32, 32, 4),
        patch_size=2,
        hidden_size=384,
        depth=12,
        num_heads=6,
        mlp_ratio=4.0,
        num_classes=1000,
        frequency_dim=256,
        timestep_embedding="mlp",
        timestep_table_size=4000,
        conditioning_mode="adaln_zero",
        head_init_scale=1e-3,
        final_norm=True,
        **kwargs,
    ):
        if conditioning_mode not in CONDITIONING_MODES:
            raise ValueError(
                f"Unknown conditioning_mode {conditioning_mode!r}; expected one of "
                f"{CONDITIONING_MODES}."
            )
        if conditioning_mode == "in_context":
            raise ValueError(
                "DiT is the adaLN-Zero transformer; the in-context ViT is "
                "keras_minsnr.backbones.vit.InContextViT (conditioning_mode='in_context' "
                "only loads configs saved when one class held both)."
            )
        if not isinstance(final_norm, (bool, np.bool_)):
            raise ValueError(f"final_norm must be True or False, got {final_norm!r}.")
        if not final_norm:
            raise ValueError(
                "final_norm=False applies to conditioning_mode='in_context' only: the "
                "adaLN-Zero final layer always normalises before its modulation."
            )
        self.conditioning_mode = "adaln_zero"
        super().__init__(
            image_shape, patch_size, hidden_size, depth, num_heads, mlp_ratio,
            num_classes, frequency_dim, timestep_embedding, timestep_table_size,
            head_init_scale, **kwargs,
        )

    @classmethod
    def from_config(cls, config):
        if config.get("conditioning_mode") == "in_context":
            # Saved when `DiT` held both transformers.
            config = {k: v for k, v in config.items() if k != "conditioning_mode"}
            return InContextViT.from_config(config)
        config = {k: v for k, v in config.items() if k not in ("head_init_scale",)}
        return cls(**config)

    def _check_config(self):
        if self.hidden_size % 4:
            raise ValueError(
                f"adaln_zero uses a 2-D sin-cos position embedding, so hidden_size must "
                f"be divisible by 4; got hidden_size={self.hidden_size}."
            )

    def _make_output_layers(self, init):
        self.final_layer = AdaLNFinalLayer(
            self.hidden_size,
            self.patch_size * self.patch_size * self.image_shape[2],
            dtype=self.dtype_policy,
            name="final_layer",
        )

    def _build_trunk(self):
        hidden = self.hidden_size
        self.pos_embed = self.add_weight(
            shape=(1, self.num_patches, hidden),
            initializer="zeros",
            trainable=False,
            name="pos_embed",
        )
        self.pos_embed.assign(
            sincos_position_embedding_2d(hidden, *self.grid_shape)[None].astype("float32")
        )
        for block in self.blocks:
            block.build((None, None, hidden), (None, hidden))
        self.final_layer.build((None, None, hidden), (None, hidden))

    def _run_trunk(self, h, t_emb, y_emb):
        cond = t_emb if y_emb is None else t_emb + y_emb  # (B, D)
        h = h + ops.cast(self.pos_embed, h.dtype)  # (B, N, D)
        for block in self.blocks:
            h = self.block_call(block)(h, cond)  # (B, N, D)
        return self.final_layer(h, cond)  # (B, N, p*p*C)

    def get_config(self):
        return {**super().get_config(), "conditioning_mode": "adaln_zero"}


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
        },
        "description": description,
        "paper_params": paper_params,
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
}
