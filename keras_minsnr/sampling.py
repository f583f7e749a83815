"""`DiffusionModel.generate`: the denoiser samplers call, its conditions and the loop."""

import collections

import keras
import numpy as np
from keras import ops

from keras_minsnr import batches
from keras_minsnr import flow
from keras_minsnr import samplers


class SamplingParams(collections.namedtuple(
    "SamplingParams",
    "trainable non_trainable condition null_condition guidance_scale clip",
)):
    """What every sampling step reads, passed through compiled loops as one pytree.

    Args:
        trainable: the backbone's trainable weight values.
        non_trainable: its non-trainable weight values.
        condition: labels or text context ``(B, ...)``, or None (unconditional).
        null_condition: the null condition, or None (no guidance).
        guidance_scale: the classifier-free guidance scale (float32 tensor).
        clip: a 0/1 float32 tensor clipping x̂₀ to [-1, 1], or None (never).
    """

    def __new__(cls, trainable, non_trainable, condition, null_condition, guidance_scale,
                clip=None):
        return super().__new__(
            cls, trainable, non_trainable, condition, null_condition, guidance_scale, clip
        )


def _per_sample(values, like):
    """Per-sample scalars ``(B,)`` shaped to broadcast against ``like`` (B, ...)."""
    shape = (-1,) + (1,) * (len(like.shape) - 1)
    return ops.cast(ops.reshape(values, shape), like.dtype)


def denoise(model, params, x_t, t):
    """x̂₀ and ε̂ at ``x_t`` with classifier-free guidance; a pure function of
    ``params`` (`SamplingParams`)."""
    params = SamplingParams(*params)
    x_t = ops.cast(x_t, "float32")
    prediction = guided_prediction(model, params, x_t, t)
    schedule = model.schedule
    x0, eps = schedule.predict_x0_and_epsilon(x_t, prediction, t, model.prediction_type)
    if params.clip is not None:
        clip = params.clip
        x0 = ops.where(clip > 0, ops.clip(x0, -1.0, 1.0), x0)
        alpha = _per_sample(schedule.alpha(t), x_t)
        sigma = _per_sample(schedule.sigma(t), x_t)
        eps = ops.where(clip > 0, (x_t - alpha * x0) / ops.maximum(sigma, 1e-8), eps)
    return x0, eps


def guided_prediction(model, params, x_t, t):
    """The backbone's output at integer steps ``t``, with classifier-free guidance.

    ``params``: `SamplingParams` (its ``clip`` is not read); a None null condition
    disables guidance.
    """
    params = SamplingParams(*params)
    trainable, non_trainable = params.trainable, params.non_trainable
    condition, null, guidance_scale = (
        params.condition, params.null_condition, params.guidance_scale
    )

    def predict(y, x, tt):
        inputs = {"x": x, "t": tt}
        if y is not None:
            inputs["y"] = y
        out, _ = model.backbone.stateless_call(trainable, non_trainable, inputs)
        return ops.cast(out, "float32")

    if null is None:
        return predict(condition, x_t, t)
    both = predict(
        ops.concatenate([condition, null], axis=0),
        ops.concatenate([x_t, x_t], axis=0),
        ops.concatenate([t, t], axis=0),
    )
    cond, uncond = ops.split(both, 2, axis=0)
    return uncond + guidance_scale * (cond - uncond)


def flow_velocity(model, params, x, time):
    """``dx/dt`` of a flow model at continuous times ``time`` (float32, (B,)), guided.

    The backbone gets the nearest training step (`FlowMatchingSchedule.timestep_index`);
    guidance combines its raw outputs (as for the other samplers) and the result is turned
    into a velocity at ``time`` itself. ``params`` as for `denoise`; with the clip flag
    set, x̂₀ = x − t·û is clipped to [-1, 1] and the velocity re-derived from it,
    ``û = (x − x̂₀)/t`` (as DDIM re-derives ε̂), so the last Euler step lands in [-1, 1].
    """
    params = SamplingParams(*params)
    x = ops.cast(x, "float32")
    steps = model.schedule.timestep_index(time)
    prediction = guided_prediction(model, params, x, steps)
    u = model.schedule.velocity_at_time(x, prediction, time, model.prediction_type)
    clip = params.clip
    if clip is None:
        return u
    t = ops.reshape(ops.cast(time, "float32"), (-1,) + (1,) * (len(x.shape) - 1))
    x0 = ops.clip(x - t * u, -1.0, 1.0)
    return ops.where(clip > 0, (x - x0) / ops.maximum(t, 1e-8), u)


def check_sampler_for(model, sampler):
    """The sampler to use (``None``: the schedule's default), checked against the schedule."""
    if model.is_flow:
        if sampler is None:
            return "euler"
        if sampler in samplers.SAMPLERS:
            raise ValueError(
                f"Sampler {sampler!r} is for discrete diffusion schedules; this model is a "
                f"rectified flow ({model.schedule!r}). Use a flow sampler: "
                f"{', '.join(flow.FLOW_SAMPLERS)}."
            )
        return flow.check_flow_sampler(sampler)
    if sampler is None:
        return "ddim"
    if sampler in flow.FLOW_SAMPLERS:
        raise ValueError(
            f"Sampler {sampler!r} is a rectified-flow sampler; this model's schedule is "
            f"{model.schedule!r}. Use one of: {', '.join(samplers.SAMPLERS)}."
        )
    return samplers.check_sampler(sampler)


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
    shift=None,
    sigma_min=samplers.EDM_SIGMA_MIN,
    sigma_max=samplers.EDM_SIGMA_MAX,
    rho=samplers.EDM_RHO,
):
    """See `DiffusionModel.generate`."""
    sampler = check_sampler_for(model, sampler)
    samplers.check_karras_args(sigma_min, sigma_max, rho)
    if shift is None:
        shift = getattr(model.schedule, "shift", 1.0)
    elif not model.is_flow:
        raise ValueError(
            f"shift={shift!r} is for the flow samplers (euler, heun); this model's schedule "
            f"is {model.schedule!r}."
        )
    check_guidance(model, guidance_scale)
    condition, num_samples = sampling_condition(model, num_samples, labels, context, seed)
    if model.is_flow and model._flow_step_functions is None:
        model._flow_step_functions = flow.make_flow_step_functions(
            lambda params, x, t: flow_velocity(model, params, x, t)
        )
    if not model.is_flow and model._step_functions is None:
        model._step_functions = samplers.make_step_functions(model.denoise)
    trainable, non_trainable = model.sampling_weights(use_ema)
    guided = model.conditioning is not None and guidance_scale != 1.0
    chunk = batch_size or num_samples
    outputs = []
    for start in range(0, num_samples, chunk):
        size = min(chunk, num_samples - start)
        cond = None if condition is None else condition[start : start + size]
        params = SamplingParams(
            trainable=trainable,
            non_trainable=non_trainable,
            condition=cond,
            null_condition=model.null_condition(size) if guided else None,
            guidance_scale=ops.convert_to_tensor(float(guidance_scale), "float32"),
            clip=ops.convert_to_tensor(1.0 if clip_denoised else 0.0, "float32"),
        )
        progress = None
        chunk_seed = None if seed is None else [seed, start]
        if model.is_flow:
            if verbose:
                progress = keras.utils.Progbar(num_steps, unit_name="step")
            outputs.append(
                flow.sample_flow(
                    model._flow_step_functions,
                    params,
                    (size,) + model.image_shape,
                    sampler=sampler,
                    num_steps=num_steps,
                    shift=shift,
                    seed=chunk_seed,
                    progress=progress,
                )
            )
            continue
        if verbose:
            total = samplers.num_progress_steps(
                model.schedule, sampler, num_steps,
                sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
            )
            progress = keras.utils.Progbar(total, unit_name="step")
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
                sigma_min=sigma_min,
                sigma_max=sigma_max,
                rho=rho,
            )
        )
    return np.concatenate(outputs, axis=0)


def check_guidance(model, guidance_scale):
    """Guidance needs a conditional model and a scale >= 0 (0: the unconditional model)."""
    scale = float(guidance_scale)
    if not scale >= 0:
        raise ValueError(
            f"guidance_scale={guidance_scale!r} is not allowed: it must be >= 0 (1: no "
            "guidance, 0: the unconditional prediction)."
        )
    if model.conditioning is None and scale != 1.0:
        raise ValueError(
            f"guidance_scale={guidance_scale!r} needs a conditional model; this one is "
            "unconditional, so only guidance_scale=1 (no guidance) applies."
        )


def sampling_condition(model, num_samples, labels, context, seed):
    """The condition tensor for `generate` and the number of samples it implies."""
    contract = model.contract
    if num_samples is not None and not num_samples >= 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples!r}.")
    if contract.conditioning == "class":
        if labels is not None and np.size(labels) == 0:
            raise ValueError("labels is empty: give at least one class id (or num_samples).")
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
        if int(context.shape[0]) < 1:
            raise ValueError("context is empty: give at least one text embedding.")
        return context, int(context.shape[0])
    if labels is not None or context is not None:
        raise ValueError("This backbone is unconditional: labels/context are not used.")
    if num_samples is None or num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples!r}.")
    return None, int(num_samples)
