"""
Title: Sample from the Min-SNR paper's ImageNet ViT-XL/2 in Keras
Author: keras_minsnr
Date created: 2026-11-24
Last modified: 2026-12-06
Description: Convert the paper's released PyTorch checkpoint of its in-context ViT into a Keras model and sample from it with the paper's EDM Heun settings, on TensorFlow or JAX.
Accelerator: None for this offline run (a tiny random checkpoint, under a minute on a CPU); a GPU for the real 452M-parameter model
"""

"""
## Introduction

Hang et al. (ICCV 2023) released the EMA weights of two models trained with Min-SNR-5:

| file | official model | data | target | paper FID |
|---|---|---|---|---|
| `ema_0.9999_xl.pt` | `vit_xl_patch2_32`, 28 layers | ImageNet-256 as 32x32x4 SD-VAE latents | x0 | 2.06 (EDM Heun, 50 steps, guidance 1.5) |
| `ema_0.9999_large.pt` | `vit_large_patch4_64`, 21 layers | ImageNet-64 pixels | ε | 2.28 (20 steps, guidance 1.5) |

Both are state dicts of the official `VisionTransformer`
(`guided_diffusion/vision_transformer.py` in `TiankaiHang/Min-SNR-Diffusion-Training`):
the timestep and the class label are two tokens in front of the patch tokens, the
timestep token is a row of a learned 4000-row table, there is no LayerNorm before the
head. `keras_minsnr.official` maps that state dict onto the `InContextViT` backbone in
exactly that layout (`timestep_embedding="table"`, `final_norm=False`), so the Keras model computes the same function as the PyTorch one,
on TensorFlow or JAX.

This guide runs offline: it builds a *tiny random* checkpoint with the official names
and shapes, converts it and samples from it with the paper's settings. Point
`KMS_OFFICIAL_CHECKPOINT` at the real file to run the same code on the real model.
"""

"""
## Setup

`keras_minsnr` is not published on PyPI: install it from a checkout of its source tree
(`make venv` there installs it with the versions its tests passed with). From this
notebook's folder, `guides/`:
"""

"""shell
pip install -q -e "..[guides]"
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras
import matplotlib.pyplot as plt
import numpy as np

from keras_minsnr import official
from keras_minsnr.visualization import image_grid


def show_figure(name):
    """Shows the figure inline in a notebook; saves it as NAME.png when run as a script.

    A script runs matplotlib without a display (Agg, where `plt.show()` draws nothing), so
    the figure goes to a file instead of being lost.
    """
    try:
        get_ipython  # noqa: B018, F821 -- defined only under IPython / Jupyter
    except NameError:
        plt.savefig(f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close()
        print(f"saved {name}.png")
    else:
        plt.show()


"""
## Getting the checkpoint

The official inference script (`configs/in256/inference.sh`) downloads the XL model from
the repository's release `v0.0.0`:

```shell
wget https://github.com/TiankaiHang/Min-SNR-Diffusion-Training/releases/download/v0.0.0/ema_0.9999_xl.pt
```

Reading a `.pt` file needs PyTorch: `pip install "keras_minsnr[official]"`. Then one
command writes a Keras model:

```shell
keras-minsnr convert-official ema_0.9999_xl.pt vit_xl_2.keras --config vit_xl_patch2_32
```

or, in Python, `official.load_official_checkpoint(path)` (a dict of numpy arrays) and
`official.convert_official_state_dict(state_dict, "vit_xl_patch2_32")`. Without torch in
your Keras environment, save the state dict once as `.npz` where torch is installed
(`numpy.savez("ema_xl.npz", **{k: v.float().numpy() for k, v in sd.items()})`) and pass
the `.npz` instead. A file that does not fit the config is reported key by key: the
missing, the unexpected and the mis-shaped ones.

What the converter expects for ViT-XL/2: 371 tensors, 452,390,416 values (the paper
says 451M; the Keras model adds a zero k bias of 1152 values per block, which softmax
ignores).
"""

print("download:", official.RELEASE_URL + official.PAPER_SETTINGS["vit_xl_patch2_32"]["checkpoint"])
xl_shapes = official.expected_shapes(
    **official.OFFICIAL_CONFIGS["vit_xl_patch2_32"], num_classes=1000,
    timestep_table_size=4000,
)
print(f"{len(xl_shapes)} tensors, {sum(int(np.prod(s)) for s in xl_shapes.values()):,} "
      "values")
for key in ("pos_embed", "patch_embed.proj.weight", "time_embedding.weight",
            "class_embedding.weight", "blocks.0.attn.qkv.weight", "linear_projection.weight"):
    print(f"  {key:28s} {xl_shapes[key]}")

"""
## A stand-in checkpoint

Without the real file, we write a random state dict with the official names for a tiny
ViT (2 blocks, width 64, 8x8x4 latents, 10 classes plus the null class, a 1000-row
timestep table) and save it as `.npz`, as you would the real one.
"""

checkpoint = os.environ.get("KMS_OFFICIAL_CHECKPOINT")
config_name = "vit_xl_patch2_32"
if checkpoint:
    overrides = {}
else:
    rng = np.random.default_rng(0)
    tiny = dict(image_shape=(8, 8, 4), patch_size=2, hidden_size=64, num_heads=4,
                depth=2, num_classes=10, timestep_table_size=1000)
    shapes = official.expected_shapes(**tiny)
    state_dict = {
        key: (0.02 * rng.standard_normal(shape)).astype("float32")
        for key, shape in shapes.items()
    }
    for key in state_dict:  # LayerNorm scales start at one
        if ".norm" in key and key.endswith(".weight"):
            state_dict[key] += 1.0
    checkpoint = "ema_tiny_random.npz"
    np.savez(checkpoint, **state_dict)
    overrides = {k: tiny[k] for k in ("image_shape", "hidden_size", "num_heads", "depth")}

"""
## Conversion

`convert_official_state_dict` reads the depth, the number of classes and the size of
the timestep table from the state dict (the official code takes them from its command
line), checks every key and shape, and fills the Keras layers.
"""

state_dict = official.load_official_checkpoint(checkpoint)
backbone = official.convert_official_state_dict(state_dict, config_name, **overrides)
print(
    f"converted {checkpoint}: depth {backbone.depth}, width {backbone.hidden_size}, "
    f"{backbone.num_classes} classes, {backbone.count_params():,} parameters"
)

"""
## The paper's settings

`official_diffusion_model` wraps the backbone in a `DiffusionModel` with what the
checkpoint was trained with: the cosine schedule over 1000 steps, the x0 target (ε for
the ImageNet-64 model), Min-SNR-5 and label dropout 0.15 (should you fine-tune it). The
EMA copies start equal to the converted weights. `sampling_settings` gives the paper's
evaluation: the EDM Heun sampler (Karras et al. 2022) with 50 steps and classifier-free
guidance 1.5; the official sampler maps each EDM noise level to the nearest of the 1000
training steps, as `keras_minsnr`'s `edm_heun` does.
"""

model = official.official_diffusion_model(backbone, config_name)
settings = official.sampling_settings(config_name)
print(settings)

"""
## Sampling

Eight classes (ImageNet ids: golden retriever, otter, red panda, geyser, macaw, valley,
balloon, arctic fox; taken modulo the tiny model's 10 classes).
"""

labels = np.array([207, 360, 387, 974, 88, 979, 417, 279]) % backbone.num_classes
latents = model.generate(labels=labels, seed=0, **settings)
print("latents", latents.shape, "std", float(latents.std()))

"""
The XL model's samples are SD-VAE latents scaled by 0.18215. The paper decodes them with
the `stabilityai/sd-vae-ft-mse` VAE (diffusers). In Keras, KerasCV's Stable Diffusion
decoder (the original SD v1 VAE decoder, a close relative: ft-mse fine-tuned only the
decoder) gives 256x256 images:

```python
from keras_minsnr.backbones.stable_diffusion import latent_decoder

decoder = latent_decoder("v1", "kcv_decoder.h5", 256, 256)  # undoes the 0.18215
images = decoder.predict_on_batch(latents)
```

Here, with random weights, we only look at the first three latent channels.
"""

plt.figure(figsize=(8, 1.5))
plt.imshow(image_grid(np.clip(latents[..., :3], -1, 1), columns=8))
plt.axis("off")
show_figure("official_vit_latents")

"""
## Saving

The converted model saves like any Keras model; the `.keras` file needs neither torch nor
the official code.
"""

model.save("official_vit.keras")
restored = keras.models.load_model("official_vit.keras")
print("restored", type(restored.backbone).__name__, restored.backbone.timestep_embedding)

"""
## Where next

- Fine-tune the converted model on your own latents with `model.fit()` (it is a
  `DiffusionModel` with the paper's Min-SNR-5 loss).
- `docs/backbones.md` describes the converter and the official layout.
"""
