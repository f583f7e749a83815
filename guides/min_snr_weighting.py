"""
Title: Faster diffusion training with Min-SNR-γ loss weighting
Author: keras_minsnr
Date created: 2026-11-23
Last modified: 2026-12-06
Description: Train a class-conditional diffusion model on the 8x8 digits with Min-SNR-γ, on TensorFlow or JAX, and look at what the weighting does.
Accelerator: None (CPU, a few minutes)
"""

"""
## Introduction

A diffusion model is trained on every noise level at once. Hang et al. (ICCV 2023) showed
that these levels are *conflicting tasks*: the low-noise steps, which have a high
signal-to-noise ratio (SNR), dominate the gradient although they matter least for sample
quality. **Min-SNR-γ** caps the weight of each step at γ in x₀-space:

```
w₀(t) = min(SNR(t), γ)
```

and converts it to the space the network predicts in (`min(1, γ/SNR)` for an
ε-prediction). This guide trains a small model with it, using `keras_minsnr` and plain
`model.fit()`. Everything runs offline on a CPU: the data are the 1797 handwritten 8x8
digits that scikit-learn ships.

Pick the backend before importing Keras: `KERAS_BACKEND=jax` or `tensorflow`.
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

import keras_minsnr as kms
from keras_minsnr.data import make_dataset
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


STEPS = int(os.environ.get("KMS_GUIDE_STEPS", 4000))

"""
## The weightings

Every strategy is a function of the SNR of the sampled timestep. On the cosine schedule the
SNR spans ten orders of magnitude; Min-SNR-5 keeps ε-weights at 1 for noisy steps and
decays them as `5 / SNR` for clean ones.
"""

schedule = kms.NoiseSchedule("cosine", num_timesteps=1000)
t = np.arange(999)
snr = schedule.snr(t)
plt.figure(figsize=(6, 3.5))
for strategy in ("constant", "min_snr", "soft_min_snr", "max_snr"):
    plt.semilogy(np.log(snr), kms.loss_weight(snr, strategy, "epsilon", gamma=5.0), label=strategy)
plt.xlabel("log SNR(t)")
plt.ylabel("weight (ε target)")
plt.legend()
show_figure("weightings")

"""
## Data

`make_dataset("digits")` yields batches `{"images": (B, 8, 8, 1) in [-1, 1], "labels": (B,)}`
from a seeded, repeating `tf.data` pipeline.
"""

dataset, info = make_dataset("digits", image_size=8, batch_size=128, repeat=True, seed=0)
print(info)

"""
## The model

The backbone is any Keras model that takes `{"x": x_t, "t": t, "y": labels}` and returns a
tensor shaped like `x_t`. For 8x8 images a residual MLP over the 64 pixels is the fastest
choice on a CPU. `DiffusionModel` owns the schedule, the target and the weighting; its
`train_step` is the same loss on both backends. `label_dropout` trains the null class
that classifier-free guidance needs.
"""

backbone = kms.backbones.get("mlp_digits", num_classes=info.num_classes)
model = kms.DiffusionModel(
    backbone,
    schedule,
    prediction_type="epsilon",
    weighting="min_snr",
    gamma=5.0,
    label_dropout=0.15,
    ema_decay=0.999,
    seed=0,
)
model.compile(
    optimizer=keras.optimizers.AdamW(learning_rate=1e-3, beta_2=0.99, weight_decay=0.03)
)

"""
## Training

The logs show the weighted `loss` and the *unweighted* MSE on each quarter of the timestep
range (`mse_q1` the cleanest, `mse_q4` the noisiest), so you can see where the model learns.
"""

history = model.fit(dataset, epochs=4, steps_per_epoch=max(STEPS // 4, 1), verbose=2)

"""
## Sampling

`generate()` uses the EMA weights, a compiled sampler (DDIM here; also DDPM and the EDM
Heun sampler the paper reports with) and classifier-free guidance. One row per digit:
"""

labels = np.repeat(np.arange(10), 10)
images = model.generate(labels=labels, num_steps=50, sampler="ddim", guidance_scale=2.0,
                        seed=0, clip_denoised=True)
plt.figure(figsize=(5, 5))
plt.imshow(image_grid(images, columns=10))
plt.axis("off")
show_figure("digit_samples")

"""
## Measuring quality

`keras_minsnr.metrics` computes FID and KID with a small digits classifier shipped with the
package (InceptionV3 for natural images).
"""

from keras_minsnr.data.digits import digits_arrays  # noqa: E402
from keras_minsnr.metrics import evaluate_samples  # noqa: E402

real = digits_arrays("test")[0][..., None] / 8.0 - 1.0
print(evaluate_samples(real, images, extractor="digits", progress=False))

"""
## Saving

The `.keras` file holds the backbone, schedule, weighting, EMA and optimizer state.
"""

model.save("digits_min_snr.keras")
restored = keras.models.load_model("digits_min_snr.keras")

"""
## Where next

- `keras-minsnr train RECIPE` runs the paper's configurations (`docs/recipes.md`).
- Compare weightings: `--set weighting=constant`, `--set prediction_type=v_prediction`.
"""
