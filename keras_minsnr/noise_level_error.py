"""How well a model predicts x₀ at each noise level: where a weighting spent its capacity.

A loss weighting decides which timesteps the model learns first. Min-SNR-γ lowers the
weight of the noisiest steps (SNR < 1 in x₀ space) next to constant weighting, so its
x₀ error there can stay higher while the nearly clean steps improve. `x0_error_by_timestep`
measures that per timestep on fixed images and fixed noise, so two checkpoints or two
weightings are compared on the same inputs.
"""

import numpy as np
from keras import ops

from keras_minsnr import sampling

# The grid of the issue-26 diagnostics: from nearly clean (t = 10) to nearly pure noise.
DIAGNOSTIC_TIMESTEPS = (10, 100, 300, 500, 700, 850, 950, 990)


def x0_error_by_timestep(model, images, timesteps=DIAGNOSTIC_TIMESTEPS, labels=None, seed=0,
                         use_ema=True, batch_size=256):
    """Mean squared x₀ error of `model` at each of `timesteps`, on fixed noise.

    ``x_t = sqrt(ᾱ_t) x₀ + sqrt(1 − ᾱ_t) ε`` with one draw of ε (from `seed`) shared by
    every timestep, the backbone's prediction turned into x̂₀ for the model's prediction
    type (no clipping, guidance 1), and the error ``mean((x̂₀ − x₀)²)`` over images and
    pixels, accumulated in float64.

    Args:
        model: a discrete-time `DiffusionModel`.
        images: float ``(N, H, W, C)`` in the model's data range (held-out images).
        timesteps: integer timesteps in ``[0, T)``.
        labels: class ids ``(N,)`` for a class-conditional model.
        seed: seeds the noise.
        use_ema: use the EMA weights (what sampling uses).
        batch_size: images per backbone call.

    Returns:
        ``{"timesteps": [...], "snr": [...], "x0_mse": [...]}`` (floats).
    """
    if model.is_flow:
        raise ValueError("x0_error_by_timestep is for discrete-time models; this one is a "
                         f"rectified flow ({model.schedule!r}).")
    num_timesteps = model.schedule.num_timesteps
    timesteps = [int(t) for t in timesteps]
    bad = [t for t in timesteps if not 0 <= t < num_timesteps]
    if bad:
        raise ValueError(f"timesteps must lie in [0, {num_timesteps}), got {bad}.")
    images = np.asarray(images, dtype="float32")
    if model.conditioning == "class" and labels is None:
        raise ValueError("This model is class-conditional: pass the images' labels.")
    noise = np.random.default_rng(seed).standard_normal(images.shape).astype("float32")
    trainable, non_trainable = model.sampling_weights(use_ema)
    abar = model.schedule.alphas_cumprod
    errors = []
    for t in timesteps:
        total = 0.0
        for start in range(0, len(images), batch_size):
            x0 = images[start : start + batch_size]
            x_t = (np.sqrt(abar[t]) * x0 + np.sqrt(1.0 - abar[t]) * noise[start : start + len(x0)])
            condition = None
            if labels is not None:
                condition = ops.convert_to_tensor(
                    np.asarray(labels[start : start + len(x0)], dtype="int32"))
            params = sampling.SamplingParams(
                trainable, non_trainable, condition, None,
                ops.convert_to_tensor(1.0, "float32"), None,
            )
            x0_hat, _ = model.denoise(params, ops.convert_to_tensor(x_t.astype("float32")),
                                      ops.full((len(x0),), t, dtype="int32"))
            diff = ops.convert_to_numpy(x0_hat).astype("float64") - x0.astype("float64")
            total += float(np.sum(diff**2))
        errors.append(total / images.size)
    snr = model.schedule.snr(np.asarray(timesteps))
    return {"timesteps": timesteps, "snr": [float(s) for s in snr], "x0_mse": errors}
