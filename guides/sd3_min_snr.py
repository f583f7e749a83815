"""
Title: Fine-tune Stable Diffusion 3 with Min-SNR in Keras
Author: keras_minsnr
Date created: 2026-11-24
Last modified: 2026-12-06
Description: Fine-tune the MMDiT of a KerasHub Stable Diffusion 3 preset with the rectified-flow target and Min-SNR-γ weighting, on TensorFlow or JAX.
Accelerator: None here (a tiny random preset on a CPU); a GPU or TPU for the real preset
"""

"""
## Introduction

KerasHub ships Stable Diffusion 3 with `from_preset`, but its `fit()` is not implemented:
there is no training loop. `keras_minsnr` supplies one. SD3 is a *rectified flow*: the
noisy latent is `x_t = (1 − t)·x₀ + t·ε` and the MMDiT predicts the velocity `u = ε − x₀`.
Min-SNR-γ (Hang et al., ICCV 2023) carries over through the flow's signal-to-noise ratio
`SNR(t) = (1 − t)²/t²`: in velocity space its weight is

```
w(t) = min((1 − t)², γ·t²)
```

so the nearly clean steps, whose velocity error hardly changes the image, no longer
dominate the gradient.

This guide runs offline on a CPU with a **tiny, randomly initialised SD3 preset** (the
real architecture at toy size, written with KerasHub's own `save_to_preset` and loaded
back through `from_preset`). With the real weights only the preset changes; the commands
for that are at the end.
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
import tensorflow as tf

import keras_minsnr as kms
from keras_minsnr.backbones import autoencoders
from keras_minsnr.backbones import sd3
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


STEPS = int(os.environ.get("KMS_GUIDE_STEPS", 300))
IMAGE_SIZE = 32

"""
## A preset

`sd3.save_tiny_preset` writes a preset directory: `config.json`, `model.weights.h5`,
`preprocessor.json` and the tokenizer assets, exactly what
`sd3.download_preset("stable_diffusion_3_medium", dir)` writes for the real model.
Everything below takes the preset as a path, a KerasHub preset name that is already in
the kagglehub cache, or a `kaggle://` handle; nothing is downloaded unless you pass
`allow_download=True`.
"""

PRESET = "tiny_sd3_preset"
if not os.path.exists(PRESET):
    sd3.save_tiny_preset(PRESET, image_size=IMAGE_SIZE)
print(sorted(os.listdir(PRESET)))

"""
## Data: captioned images

Use your own images with captions (a folder with `metadata.jsonl` works with the
`sd3_captions` recipe). Here we draw coloured squares and name them.
"""

COLORS = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "yellow": (1, 1, -1)}
rng = np.random.default_rng(0)
images, captions = [], []
for _ in range(32):
    name = rng.choice(list(COLORS))
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), -1.0, "float32")
    x, y = rng.integers(0, IMAGE_SIZE // 2, size=2)
    image[y : y + IMAGE_SIZE // 2, x : x + IMAGE_SIZE // 2] = COLORS[name]
    images.append(image)
    captions.append(f"a {name} square")
images = np.stack(images)

"""
## Frozen encoders, encoded once

`autoencoders.StableDiffusion3Autoencoder` wraps the preset's VAE and its CLIP-L/G (and
T5) text encoders, which stay frozen. Images become SD3 latents (16 channels, the VAE's
shift and scale applied, once, by the autoencoder). Captions become SD3's two text tensors, the token context and the pooled
projection, **packed** into one `(L + 1, W)` array so that label dropout and guidance swap
them together. The empty caption's embedding is the null condition of classifier-free
guidance. Encoding once and training on the cache is what the `sd3_captions` recipe does
too.
"""

encoders = autoencoders.StableDiffusion3Autoencoder(PRESET)
latents = encoders.encode_images(images)
context = encoders.encode_text(captions)
null_context = encoders.encode_text([""])[0]
print("latents", latents.shape, "context", context.shape)

dataset = (
    tf.data.Dataset.from_tensor_slices({"images": latents, "context": context})
    .shuffle(len(latents), seed=0)
    .repeat()
    .batch(8)
)

"""
## The model

`StableDiffusion3MMDiT` loads the preset's MMDiT behind the `keras_minsnr` backbone
contract. `backbone.flow_schedule()` is the flow schedule whose step `i` has time
`t_i = shift·u/(1 + (shift − 1)·u)`, `u = (i + 1)/1000` — KerasHub's training sigmas —
and the backbone feeds the MMDiT SD3's timestep `1000·t_i`. Logit-normal timesteps are
SD3's training density; Min-SNR-5 multiplies it.
"""

def sd3_model():
    """A fresh DiffusionModel over the preset's MMDiT."""
    backbone = sd3.StableDiffusion3MMDiT(PRESET)
    model = kms.DiffusionModel(
        backbone,
        backbone.flow_schedule(),
        prediction_type="flow",
        weighting="min_snr",
        gamma=5.0,
        timestep_sampling="logit_normal",
        label_dropout=0.1,
        null_context=null_context,
        ema_decay=0.0,
        clip_denoised=False,
        seed=0,
    )
    return model


def compile_sd3(model):
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-4, beta_1=0.9, beta_2=0.999, weight_decay=1e-4,
                                         clipnorm=1.0)
    )


def count(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


model = sd3_model()
compile_sd3(model)
print("trainable MMDiT parameters:", count(model.trainable_weights))

"""
## Full fine-tuning

Only the MMDiT's weights are in the model, so all of them train; the VAE and the text
encoders were used once, above.
"""

history = model.fit(dataset, epochs=1, steps_per_epoch=STEPS, verbose=2)
print("final loss:", history.history["loss"][-1])

"""
## LoRA

LoRA trains a low-rank update `(α/r)·A·B` of chosen kernels and freezes everything else,
so the optimizer state, the EMA and the file to share shrink to the adapters.
`enable_lora(rank)` adds them to the MMDiT's attention and MLP projections (the default
targets); the preset's own weights stay bit-for-bit as loaded. `save_lora` writes only
the adapters, and `load_lora` adds them to a fresh model built from the same preset.
"""

lora_model = sd3_model()
adapted = lora_model.enable_lora(rank=4, alpha=4)
compile_sd3(lora_model)
print(f"{len(adapted)} adapted layers, e.g. {adapted[0]}")
print("trainable LoRA parameters:", count(lora_model.trainable_weights),
      "of", count(lora_model.backbone.weights))
lora_model.fit(dataset, epochs=1, steps_per_epoch=STEPS, verbose=2)
size = lora_model.save_lora("sd3_lora.weights.h5")
print(f"adapter file: {size / 1024:.0f} KiB")

fresh = sd3_model()
fresh.load_lora("sd3_lora.weights.h5")
probe = {"x": latents[:2], "t": np.array([100, 700]), "y": context[:2]}
same = np.allclose(keras.ops.convert_to_numpy(fresh.backbone(probe)),
                   keras.ops.convert_to_numpy(lora_model.backbone(probe)), atol=1e-5)
print("preset + adapter file reproduces the fine-tuned MMDiT:", same)

"""
## Sampling with guidance

Euler steps on SD3's shifted time grid, with classifier-free guidance against the empty
caption; the latents decode through the preset's VAE.
"""

prompts = encoders.encode_text([f"a {name} square" for name in COLORS])
samples = model.generate(context=prompts, num_steps=8, sampler="euler", guidance_scale=4.0,
                         seed=0)
pictures = encoders.decode(samples)
plt.figure(figsize=(6, 2))
plt.imshow(image_grid(np.clip(pictures, -1, 1), columns=len(COLORS)))
plt.axis("off")
show_figure("sd3_samples")

"""
## Saving

The `.keras` file holds the MMDiT (its config and weights), the flow schedule, the
weighting and the null condition; loading it needs neither the preset nor a network.
"""

model.save("sd3_min_snr.keras")
restored = keras.models.load_model("sd3_min_snr.keras")

"""
## The real Stable Diffusion 3

On a machine with network access, accept the model's terms on Kaggle and save the preset
once:

```python
from keras_minsnr.backbones import sd3
sd3.download_preset("stable_diffusion_3_medium", "/weights/stable_diffusion_3_medium")
```

(`download_preset` loads it with KerasHub and writes it with `sd3.save_preset`: KerasHub
0.32's own `save_to_preset` of the SD3 preprocessor lets the nested CLIP preprocessors
overwrite `preprocessor.json`.)

Then, anywhere (offline), fine-tune on a caption folder (`metadata.jsonl` with
`{"file_name": ..., "text": ...}` per line):

```bash
keras-minsnr train sd3_captions --output-dir runs/sd3 \\
    --set encode.source=/data/pokemon_blip \\
    --set data=/data/latents/pokemon_sd3 \\
    --set backbone_args.preset=/weights/stable_diffusion_3_medium
```

A preset name (`--set backbone_args.preset=stable_diffusion_3_medium`) works when it is in
the kagglehub cache (`KAGGLEHUB_CACHE`); when it is not, the run stops at once with a
message naming the preset and these ways to place it. The 2B-parameter MMDiT needs an
accelerator with room for its weights, gradients and AdamW state (about 32 GB in float32);
see docs/sd3.md.
"""
