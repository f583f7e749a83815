"""Denoiser backbones and their presets.

The backbone contract
---------------------
A backbone is a `keras.Model` called with a dict::

    backbone({"x": x_t, "t": t, "y": y})

- ``x``: noisy images or latents, float, shape ``(B, H, W, C)``;
- ``t``: integer timesteps, int32, shape ``(B,)``, in ``[0, num_timesteps)``;
- ``y``: the condition, absent for unconditional models; int32 class labels of shape
  ``(B,)`` in ``[0, num_classes]`` (the value ``num_classes`` is the null class used by
  classifier-free guidance), or a float text context ``(B, L, D)``.

It returns one tensor shaped like ``x``: the prediction of the diffusion model's target
(epsilon, x0, v or a flow velocity). A plain functional model with these inputs works as
it is: `DiffusionModel` reads the image shape from ``x``, the conditioning kind from
``y`` (integer: class labels, float ``(L, D)``: a text context) and takes
``num_classes`` as its own argument when the inputs cannot tell. These attributes, where
a backbone has them, take precedence (every built-in backbone sets them):

- ``image_shape``: ``(H, W, C)`` it was built for;
- ``conditioning``: ``None``, ``"class"`` or ``"context"``;
- ``num_classes``: the number of real classes (class-conditional backbones only);
- ``context_shape``: ``(L, D)`` of the text context (context-conditional only).

Every built-in backbone has ``get_config()`` so `.keras` files round-trip.

A backbone class owns what is specific to it: the constructor arguments it takes from
the data, its LoRA target groups and its `keras.distribution` layout rules
(classmethods; see `keras_minsnr.backbones.contract`). Adding a backbone is a module
here and its test; docs/architecture.md lists the steps.
"""

from keras_minsnr.backbones import dit
from keras_minsnr.backbones import mlp
from keras_minsnr.backbones import sd3
from keras_minsnr.backbones import stable_diffusion
from keras_minsnr.backbones import unet
from keras_minsnr.backbones import vit
from keras_minsnr.backbones import autoencoders  # noqa: E402  (after sd3, stable_diffusion)

PRESETS = {
    **dit.PRESETS, **vit.PRESETS, **unet.PRESETS, **stable_diffusion.PRESETS, **sd3.PRESETS,
    **mlp.PRESETS,
}


def get(name, **overrides):
    """Builds a randomly initialised backbone from a preset name.

    Args:
        name: one of `keras_minsnr.backbones.PRESETS`.
        **overrides: constructor arguments that replace the preset's values
            (for example ``depth=2, hidden_size=64`` for a tiny test model).

    Example:
    ```python
    backbone = kms.backbones.get("dit_s_2")
    tiny = kms.backbones.get("dit_s_2", depth=2, hidden_size=64, num_heads=2)
    ```
    """
    if name not in PRESETS:
        raise ValueError(
            f"Unknown backbone preset {name!r}. Available presets: "
            f"{', '.join(sorted(PRESETS))}."
        )
    preset = PRESETS[name]
    kwargs = {**preset["config"], **overrides}
    return preset["class"](**kwargs)


__all__ = ["PRESETS", "autoencoders", "get"]
