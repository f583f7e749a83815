"""`DiffusionModel.generate`: the denoiser samplers call, its conditions and the loop."""

import keras
import numpy as np
from keras import ops

from keras_minsnr import batches
from keras_minsnr import samplers


def denoise(model, params, x_t, t):
    """x̂₀ and ε̂ at ``x_t`` with classifier-free guidance; a pure function of params.

    ``params = (trainable, non_trainable, condition, null_condition, guidance_scale,
    clip)``: backbone weight values, the condition (or None), the null condition (None
    disables guidance), the guidance scale and a 0/1 flag clipping x̂₀ to [-1, 1]
    (tensors).
    """
    trainable, non_trainable, condition, null, guidance_scale, clip = params
    x_t = ops.cast(x_t, "float32")

    def predict(y, x, tt):
        inputs = {"x": x, "t": tt}
        if y is not None:
            inputs["y"] = y
        out, _ = model.backbone.stateless_call(trainable, non_trainable, inputs)
        return ops.cast(out, "float32")

    if null is None:
        prediction = predict(condition, x_t, t)
    else:
        both = predict(
            ops.concatenate([condition, null], axis=0),
            ops.concatenate([x_t, x_t], axis=0),
            ops.concatenate([t, t], axis=0),
        )
        cond, uncond = ops.split(both, 2, axis=0)
        prediction = uncond + guidance_scale * (cond - uncond)
    schedule = model.schedule
    x0, eps = schedule.predict_x0_and_epsilon(x_t, prediction, t, model.prediction_type)
    if clip is not None:
        clipped = ops.clip(x0, -1.0, 1.0)
        x0 = ops.where(clip > 0, clipped, x0)
        alpha, sigma = schedule._scales(t, x_t)
        eps = ops.where(clip > 0, (x_t - alpha * x0) / ops.maximum(sigma, 1e-8), eps)
    return x0, eps


def generate(
    model,
    num_samples,
    num_steps,
    sampler,
    labels,
    guidance_scale,
    seed,
    context,
    eta,
    use_ema,
    clip_denoised,
    batch_size,
    verbose,
):
    """See `DiffusionModel.generate`."""
    samplers.check_sampler(sampler)
    condition, num_samples = sampling_condition(model, num_samples, labels, context, seed)
    if model._step_functions is None:
        model._step_functions = samplers.make_step_functions(model.denoise)
    trainable, non_trainable = model.sampling_weights(use_ema)
    guided = model.conditioning is not None and guidance_scale != 1.0
    chunk = batch_size or num_samples
    outputs = []
    for start in range(0, num_samples, chunk):
        size = min(chunk, num_samples - start)
        cond = None if condition is None else condition[start : start + size]
        params = (
            trainable,
            non_trainable,
            cond,
            model.null_condition(size) if guided else None,
            ops.convert_to_tensor(float(guidance_scale), "float32"),
            ops.convert_to_tensor(1.0 if clip_denoised else 0.0, "float32"),
        )
        progress = None
        if verbose:
            total = samplers.num_progress_steps(model.schedule, sampler, num_steps)
            progress = keras.utils.Progbar(total, unit_name="step")
        chunk_seed = None if seed is None else [seed, start]
        outputs.append(
            samplers.sample(
                model._step_functions,
                params,
                model.schedule,
                (size,) + model.image_shape,
                sampler=sampler,
                num_steps=num_steps,
                eta=eta,
                seed=chunk_seed,
                progress=progress,
            )
        )
    return np.concatenate(outputs, axis=0)


def sampling_condition(model, num_samples, labels, context, seed):
    """The condition tensor for `generate` and the number of samples it implies."""
    contract = model.contract
    if contract.conditioning == "class":
        if labels is None:
            if num_samples is None:
                raise ValueError("Give num_samples or labels.")
            rng = np.random.default_rng(None if seed is None else [seed, 1])
            labels = rng.integers(0, contract.num_classes, size=num_samples)
        labels = np.asarray(labels).reshape(-1)
        batches.check_labels(labels, contract)
        if num_samples is not None and num_samples != len(labels):
            raise ValueError(f"num_samples={num_samples} but {len(labels)} labels were given.")
        return ops.convert_to_tensor(labels.astype("int32")), len(labels)
    if contract.conditioning == "context":
        if context is None:
            raise ValueError("This backbone is text-conditional: pass context=.")
        context = ops.convert_to_tensor(np.asarray(context, dtype="float32"))
        batches.check_condition(context, contract)
        return context, int(context.shape[0])
    if labels is not None or context is not None:
        raise ValueError("This backbone is unconditional: labels/context are not used.")
    if num_samples is None or num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples!r}.")
    return None, int(num_samples)
