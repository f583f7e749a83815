"""DDIM with two denoisers: one for the noisy steps, another for the clean ones.

Where does a loss weighting spend its capacity? Sample with model A for the steps with
``t >= t_split`` (the noisy half, where the coarse layout is decided) and with model B for
the rest (the fine detail): the FID of each combination says which model is better at
which noise level (`benchmarks/diagnostics.py` uses it for the ``--diagnose`` matrix).
Both models go through the same compiled DDIM loop of `keras_minsnr.samplers`; only the
weights passed to it change at ``t_split``, so with A == B this is exactly the plain DDIM
sampler.
"""

import numpy as np
from keras import ops

from keras_minsnr import samplers
from keras_minsnr import sampling


def check_t_split(t_split, num_timesteps):
    if int(t_split) != t_split or not 0 <= t_split <= num_timesteps:
        raise ValueError(
            f"t_split must be an integer in [0, {num_timesteps}] (the model for the noisy "
            f"steps runs every t >= t_split), got {t_split!r}."
        )
    return int(t_split)


def split_ddim_sample(step_functions, params_noisy, params_clean, schedule, shape, t_split,
                      num_steps=50, seed=None):
    """Deterministic DDIM (η = 0) from pure noise, switching denoisers at ``t_split``.

    Args:
        step_functions: `samplers.make_step_functions(denoise)`; both parameter sets are
            passed to the same ``denoise``, so the two models share an architecture.
        params_noisy: ``denoise``'s params for the steps with ``t >= t_split``.
        params_clean: its params for the steps with ``t < t_split``.
        schedule: the `NoiseSchedule` both models were trained with.
        shape: ``(B, H, W, C)``.
        t_split: integer in ``[0, T]``; 0 samples with ``params_noisy`` throughout and
            ``T`` with ``params_clean`` throughout.
        num_steps: DDIM steps ("trailing" spacing, see `samplers.spaced_timesteps`).
        seed: seeds the starting noise as `samplers.sample` does.

    Returns:
        float32 numpy samples of ``shape``.

    Example:

    >>> fns = samplers.make_step_functions(model.denoise)   # doctest: +SKIP
    >>> x = split_ddim_sample(fns, params_a, params_b, model.schedule, (16, 8, 8, 1), 500)
    """
    t_split = check_t_split(t_split, schedule.num_timesteps)
    shape = tuple(int(d) for d in shape)
    x = np.random.default_rng(seed).standard_normal(shape).astype("float32")
    steps = samplers.spaced_timesteps(schedule.num_timesteps, num_steps)
    abar = schedule.alphas_cumprod
    abar_s = np.append(abar[steps[1:]], 1.0)
    num_noisy = int(np.sum(steps >= t_split))  # the trailing steps run from T-1 down
    for params, part in ((params_noisy, slice(0, num_noisy)),
                         (params_clean, slice(num_noisy, len(steps)))):
        count = part.stop - part.start
        if count == 0:
            continue
        scalars = (steps[part].astype("int32"), abar_s[part].astype("float32"),
                   np.zeros(count, "float32"))
        x = samplers.run_loop(step_functions["ddim_loop"], params, x, scalars, count,
                              lambda m: None, None)
    return ops.convert_to_numpy(x).astype("float32")


def _same_denoiser_family(model_noisy, model_clean):
    """Refuses a pair the shared compiled denoiser cannot serve, naming what differs."""
    checks = (
        ("prediction_type", model_noisy.prediction_type, model_clean.prediction_type),
        ("schedule", repr(model_noisy.schedule), repr(model_clean.schedule)),
        ("backbone weight shapes",
         [tuple(w.shape) for w in model_noisy.backbone.weights],
         [tuple(w.shape) for w in model_clean.backbone.weights]),
    )
    for what, a, b in checks:
        if a != b:
            raise ValueError(
                f"Split sampling needs two models with the same {what}; got {a!r} for the "
                f"noisy steps and {b!r} for the clean steps."
            )


def generate_split(model_noisy, model_clean, t_split, num_samples=None, labels=None,
                   num_steps=50, seed=None, use_ema=True, clip_denoised=None,
                   batch_size=None):
    """Samples with `model_noisy` for ``t >= t_split`` and `model_clean` below (DDIM, η=0).

    Guidance 1 (the plain conditional models). Labels, chunking and seeds as in
    `DiffusionModel.generate`, so ``generate_split(m, m, ...)`` returns the same images as
    ``m.generate(..., sampler="ddim")``.

    Args:
        model_noisy, model_clean: `DiffusionModel`s with the same backbone architecture,
            prediction type and schedule.
        t_split: the first (lowest) timestep sampled by `model_noisy`.
        num_samples, labels, num_steps, seed, use_ema, clip_denoised, batch_size: as in
            `DiffusionModel.generate`.

    Returns:
        float32 numpy images ``(num_samples, H, W, C)``.
    """
    _same_denoiser_family(model_noisy, model_clean)
    check_t_split(t_split, model_noisy.schedule.num_timesteps)
    if clip_denoised is None:
        clip_denoised = model_noisy.clip_denoised
    condition, num_samples = sampling.sampling_condition(model_noisy, num_samples, labels,
                                                         None, seed)
    if model_noisy._step_functions is None:
        model_noisy._step_functions = samplers.make_step_functions(model_noisy.denoise)
    weights = {id(m): m.sampling_weights(use_ema) for m in (model_noisy, model_clean)}
    chunk = batch_size or num_samples
    outputs = []
    for start in range(0, num_samples, chunk):
        size = min(chunk, num_samples - start)
        cond = None if condition is None else condition[start : start + size]

        def params(model):
            trainable, non_trainable = weights[id(model)]
            return sampling.SamplingParams(
                trainable=trainable,
                non_trainable=non_trainable,
                condition=cond,
                null_condition=None,
                guidance_scale=ops.convert_to_tensor(1.0, "float32"),
                clip=ops.convert_to_tensor(1.0 if clip_denoised else 0.0, "float32"),
            )

        outputs.append(split_ddim_sample(
            model_noisy._step_functions, params(model_noisy), params(model_clean),
            model_noisy.schedule, (size,) + model_noisy.image_shape, t_split,
            num_steps=num_steps, seed=None if seed is None else [seed, start],
        ))
    return np.concatenate(outputs, axis=0)
