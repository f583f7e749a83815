"""Samplers for discrete-time diffusion models: DDPM, DDIM and EDM-Heun.

Each sampler is one small update rule written with `keras.ops`. They all call a pure
function::

    denoise(params, x_t, t) -> (x0_hat, eps_hat)

where ``t`` is an int32 tensor of shape ``(B,)`` and ``params`` is whatever the function
needs (model weights, labels, guidance scale). Starting noise and per-step noise come
from a seeded numpy generator, so the same seed gives the same images on every backend.

The loop over steps is compiled once (`keras.ops.fori_loop` inside one `jax.jit` /
`tf.function`): the per-step scalars go in as tensors of shape ``(num_steps,)`` and the
per-step noise is drawn up front, so a run of ``n`` steps is one compiled call rather than
``n`` calls from Python. With a progress bar the loop runs in chunks of about
``n / PROGRESS_UPDATES`` steps, and the bar moves once per chunk. The per-step path
(``sample(..., loop=False)``, one compiled call per step) gives the same images.

DDIM and DDPM visit "trailing" timesteps, so every run starts at ``t = T−1``; EDM-Heun
uses EDM's σ range [0.002, 80] clamped to the schedule's levels (docs/fidelity.md).
"""

import numpy as np
from keras import ops

from keras_minsnr.backend import compile_function

SAMPLERS = ("ddpm", "ddim", "edm_heun")


def check_sampler(sampler):
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}. Allowed: {', '.join(SAMPLERS)}.")
    return sampler


def spaced_timesteps(num_timesteps, num_steps):
    """``num_steps`` integer timesteps from ``T-1`` down, "trailing" spacing.

    ``t_i = round(T − i·T/n) − 1`` for ``i = 0 … n−1`` (diffusers' ``"trailing"``): the first
    step is always ``T−1``, the last is ``round(T/n) − 1``, from which one step goes to
    the clean sample. Every ``n`` in ``[1, T]`` gives ``n`` distinct steps.
    """
    if int(num_steps) != num_steps or not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"num_steps must be an integer in [1, {num_timesteps}] for this schedule, "
            f"got {num_steps!r}."
        )
    i = np.arange(int(num_steps))
    return np.round(num_timesteps - i * num_timesteps / num_steps).astype(int) - 1


EDM_SIGMA_MIN = 0.002
EDM_SIGMA_MAX = 80.0
EDM_RHO = 7.0


def check_karras_args(sigma_min, sigma_max, rho):
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    if sigma_min >= sigma_max:
        raise ValueError(
            f"sigma_min must be < sigma_max, got sigma_min={sigma_min!r}, "
            f"sigma_max={sigma_max!r}."
        )


def karras_timesteps(
    schedule, num_steps, sigma_min=EDM_SIGMA_MIN, sigma_max=EDM_SIGMA_MAX, rho=EDM_RHO
):
    """Discrete timesteps whose σ levels follow the EDM ρ-spacing (Karras et al. 2022).

    EDM's σ is ``σ_t / α_t = 1 / sqrt(SNR)``. ``sigma_min`` and ``sigma_max`` (EDM's
    defaults 0.002 and 80) are first clamped to the schedule's smallest and largest finite
    σ; the levels ``(σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ`` are then snapped
    to the nearest discrete step (in log σ) and de-duplicated, so there can be fewer than
    ``num_steps`` levels. A zero-terminal step (σ = ∞) is never used.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
    check_karras_args(sigma_min, sigma_max, rho)
    snr = schedule.snr(np.arange(schedule.num_timesteps))
    valid = np.nonzero(snr > 0)[0]
    log_sigma = -0.5 * np.log(snr[valid])
    lo, hi = np.exp(log_sigma.min()), np.exp(log_sigma.max())
    s_min, s_max = np.clip(sigma_min, lo, hi), np.clip(sigma_max, lo, hi)
    ramp = np.linspace(0.0, 1.0, int(num_steps))
    sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    nearest = np.abs(np.log(sigmas)[:, None] - log_sigma[None, :]).argmin(axis=1)
    steps = valid[nearest]
    _, first = np.unique(steps, return_index=True)
    return steps[np.sort(first)]


# -- update rules (pure functions of tensors) --------------------------------------------


def ddim_update(x0, eps, noise, abar_s, eta_sigma):
    """``x_s = sqrt(ᾱ_s) x̂₀ + sqrt(1 − ᾱ_s − c²) ε̂ + c z`` (Song et al. 2021, eq. 12)."""
    direction = ops.sqrt(ops.maximum(1.0 - abar_s - eta_sigma**2, 0.0))
    return ops.sqrt(abar_s) * x0 + direction * eps + eta_sigma * noise


def ddim_noise_scale(abar_t, abar_s, eta):
    """``c = η sqrt((1 − ᾱ_s)/(1 − ᾱ_t)) sqrt(1 − ᾱ_t/ᾱ_s)``: η=0 deterministic, η=1 DDPM."""
    return eta * np.sqrt((1 - abar_s) / (1 - abar_t)) * np.sqrt(1 - abar_t / abar_s)


def ddpm_update(x_t, x0, noise, abar_t, abar_s):
    """One ancestral step: a draw from the posterior ``q(x_s | x_t, x̂₀)`` (Ho et al. 2020)."""
    beta = 1.0 - abar_t / abar_s
    mean = (ops.sqrt(abar_s) * beta / (1 - abar_t)) * x0 + (
        ops.sqrt(1 - beta) * (1 - abar_s) / (1 - abar_t)
    ) * x_t
    std = ops.sqrt(beta * (1 - abar_s) / (1 - abar_t))
    return mean + std * noise


# -- the loop ----------------------------------------------------------------------------


def _as_tensor(value, dtype="float32"):
    return ops.convert_to_tensor(np.asarray(value, dtype=dtype))


# How often a progress bar moves: the looped path runs in about this many chunks when a
# bar is asked for (each chunk one compiled call; the bar cannot move inside one).
PROGRESS_UPDATES = 20
# The pre-drawn per-step noise (DDPM, DDIM with η > 0) of one chunk stays under this size;
# more steps run as further chunks of one compiled program.
NOISE_BUDGET_BYTES = 256 * 2**20


def loop_chunk_size(num_steps, shape, noisy, progress):
    """Steps per compiled call of the looped path (see `PROGRESS_UPDATES` and
    `NOISE_BUDGET_BYTES`); every chunk of one run has this length, the last one padded."""
    size = max(int(num_steps), 1)
    if progress:
        size = min(size, -(-size // PROGRESS_UPDATES))
    if noisy:
        size = min(size, max(1, NOISE_BUDGET_BYTES // (4 * int(np.prod(shape)))))
    return size


def compiled_loop(step, noisy=False):
    """``step`` run over steps ``start … stop−1`` as one compiled `keras.ops.fori_loop`.

    The result is called as ``run(params, x, start, stop, scalars, noise)``: step ``i``
    gets ``scalars[k][i]`` for each ``k`` and, when ``noisy``, ``noise[i − start]``
    (``noise=None``: zero). Discrete and flow samplers share it, so `run_loop` drives both.
    """

    def run(params, x, start, stop, scalars, noise):
        def body(i, x):
            args = [ops.take(s, i) for s in scalars]
            if noisy:
                args.append(0.0 if noise is None else ops.take(noise, i - start, axis=0))
            return step(params, x, *args)

        return ops.fori_loop(start, stop, body, x)

    run.__name__ = step.__name__ + "_loop"
    return compile_function(run)


def make_step_functions(denoise):
    """Compiled samplers sharing one traced ``denoise``: single steps and whole loops.

    The scalars of each step (``ᾱ`` values, noise scales, σ levels) are tensor arguments
    so a compiled function serves every timestep without retracing. The ``*_loop``
    entries run steps ``start … stop−1`` with `keras.ops.fori_loop`, reading step ``i``'s
    scalars from tensors of shape ``(num_steps,)`` and its noise from
    ``noise[i − start]`` (``None``: no noise).
    """

    def batch_t(x, t):
        return ops.full((ops.shape(x)[0],), t, dtype="int32")

    def ddim_step(params, x, t, abar_s, eta_sigma, noise):
        x0, eps = denoise(params, x, batch_t(x, t))
        return ddim_update(x0, eps, noise, abar_s, eta_sigma)

    def ddpm_step(params, x, t, abar_t, abar_s, noise):
        x0, _ = denoise(params, x, batch_t(x, t))
        return ddpm_update(x, x0, noise, abar_t, abar_s)

    def edm_denoised(params, x_edm, t, alpha):
        x0, _ = denoise(params, x_edm * alpha, batch_t(x_edm, t))
        return x0

    def heun_step(params, x, t, t_next, alpha, alpha_next, sigma, sigma_next):
        d = (x - edm_denoised(params, x, t, alpha)) / sigma
        x_euler = x + (sigma_next - sigma) * d
        d_next = (x_euler - edm_denoised(params, x_euler, t_next, alpha_next)) / sigma_next
        return x + (sigma_next - sigma) * 0.5 * (d + d_next)

    def euler_step(params, x, t, alpha, sigma, sigma_next):
        # EDM's last step (to σ = 0) takes no Heun correction: one network call.
        d = (x - edm_denoised(params, x, t, alpha)) / sigma
        return x + (sigma_next - sigma) * d

    return {
        "ddim": compile_function(ddim_step),
        "ddpm": compile_function(ddpm_step),
        "edm_heun": compile_function(heun_step),
        "edm_euler": compile_function(euler_step),
        "ddim_loop": compiled_loop(ddim_step, noisy=True),
        "ddpm_loop": compiled_loop(ddpm_step, noisy=True),
        "edm_heun_loop": compiled_loop(heun_step, noisy=False),
    }


def run_loop(loop_fn, params, x, scalars, num_steps, draw_noise, progress, done=0):
    """Runs steps ``0 … num_steps−1`` through a compiled loop in equal-length chunks.

    ``draw_noise(m)`` returns ``m`` steps of noise stacked on a leading axis (or None for
    a noiseless sampler); it is called in step order so the random stream is the
    per-step path's. ``done`` offsets what the progress bar is told.
    """
    noisy = draw_noise(0) is not None
    size = loop_chunk_size(num_steps, ops.shape(x), noisy, progress is not None)
    scalars = tuple(_as_tensor(s, np.asarray(s).dtype.name) for s in scalars)
    for start in range(0, num_steps, size):
        stop = min(start + size, num_steps)
        noise = draw_noise(stop - start)
        if noise is not None and stop - start < size:
            # Keep every chunk the same shape, so it is compiled once.
            pad = np.zeros((size - (stop - start),) + noise.shape[1:], "float32")
            noise = np.concatenate([noise, pad], axis=0)
        x = loop_fn(
            params,
            x,
            _as_tensor(start, "int32"),
            _as_tensor(stop, "int32"),
            scalars,
            None if noise is None else _as_tensor(noise),
        )
        if progress is not None:
            progress.update(done + stop)
    return x


def sample(
    step_functions,
    params,
    schedule,
    shape,
    sampler="ddim",
    num_steps=50,
    eta=0.0,
    seed=None,
    progress=None,
    sigma_min=EDM_SIGMA_MIN,
    sigma_max=EDM_SIGMA_MAX,
    rho=EDM_RHO,
    loop=True,
):
    """Runs a sampler from pure noise to ``x_0``.

    Args:
        step_functions: the dict from `make_step_functions(denoise)`.
        params: passed to ``denoise`` unchanged.
        schedule: the `NoiseSchedule` the model was trained with.
        shape: ``(B, H, W, C)`` of the samples.
        sampler: ``"ddpm"`` (ancestral), ``"ddim"`` (η-DDIM) or ``"edm_heun"`` (Karras et al.
            2022 second-order Heun on the schedule's discrete σ levels).
        num_steps: sampling steps (DDPM/DDIM: timesteps visited, "trailing" spacing from
            ``T−1``, see `spaced_timesteps`; EDM-Heun: σ levels, with
            2·levels − 1 model evaluations).
        eta: DDIM stochasticity (0 deterministic, 1 ≡ DDPM).
        seed: seeds the numpy generator of the starting and per-step noise.
        progress: an optional `keras.utils.Progbar`-like object with ``update(i)``; the
            looped path updates it once per chunk of steps (`PROGRESS_UPDATES`).
        sigma_min, sigma_max, rho: EDM-Heun's σ range and ρ-spacing (EDM's defaults 0.002,
            80 and 7), clamped to the schedule's finite σ range; see `karras_timesteps`.
        loop: ``True`` (default) compiles the loop over steps once; ``False`` makes one
            compiled call per step from Python (same images, for comparison).

    Returns:
        float32 numpy samples of ``shape``.
    """
    check_sampler(sampler)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}.")
    check_karras_args(sigma_min, sigma_max, rho)
    rng = np.random.default_rng(seed)
    shape = tuple(int(d) for d in shape)
    normal = lambda: rng.standard_normal(shape).astype("float32")  # noqa: E731
    abar = schedule.alphas_cumprod
    x = normal()

    if sampler in ("ddim", "ddpm"):
        steps = spaced_timesteps(schedule.num_timesteps, num_steps)
        abar_t = abar[steps]
        abar_s = np.append(abar[steps[1:]], 1.0)
        noisy = sampler == "ddpm" or eta > 0
        if loop:
            if sampler == "ddim":
                scalars = (steps, abar_s, ddim_noise_scale(abar_t, abar_s, eta))
            else:
                scalars = (steps, abar_t, abar_s)
            scalars = (scalars[0].astype("int32"),) + tuple(
                s.astype("float32") for s in scalars[1:]
            )

            def draw_noise(m):
                if not noisy:
                    return None
                return rng.standard_normal((m,) + shape).astype("float32")

            x = run_loop(
                step_functions[sampler + "_loop"], params, x, scalars, len(steps),
                draw_noise, progress,
            )
            return ops.convert_to_numpy(x).astype("float32")
        for i, t in enumerate(steps):
            noise = _as_tensor(normal()) if noisy else ops.zeros(shape)
            if sampler == "ddim":
                c = ddim_noise_scale(abar_t[i], abar_s[i], eta)
                x = step_functions["ddim"](
                    params, x, _as_tensor(t, "int32"), _as_tensor(abar_s[i]), _as_tensor(c),
                    noise,
                )
            else:
                x = step_functions["ddpm"](
                    params, x, _as_tensor(t, "int32"), _as_tensor(abar_t[i]),
                    _as_tensor(abar_s[i]), noise,
                )
            if progress is not None:
                progress.update(i + 1)
        return ops.convert_to_numpy(x).astype("float32")

    steps = karras_timesteps(schedule, num_steps, sigma_min, sigma_max, rho)
    sigma = np.sqrt((1 - abar[steps]) / abar[steps])
    alpha = np.sqrt(abar[steps])
    x = (x * sigma[0]).astype("float32")
    last = len(steps) - 1
    if loop:
        if last > 0:
            # Heun steps from level i to i + 1 for i < last, as one compiled loop.
            scalars = (
                steps[:-1].astype("int32"),
                steps[1:].astype("int32"),
                alpha[:-1].astype("float32"),
                alpha[1:].astype("float32"),
                sigma[:-1].astype("float32"),
                sigma[1:].astype("float32"),
            )
            x = run_loop(
                step_functions["edm_heun_loop"], params, x, scalars, last,
                lambda m: None, progress,
            )
        first_heun = last
    else:
        first_heun = 0
    for i in range(first_heun, last + 1):
        t = steps[i]
        if i < last:
            x = step_functions["edm_heun"](
                params,
                x,
                _as_tensor(t, "int32"),
                _as_tensor(steps[i + 1], "int32"),
                _as_tensor(alpha[i]),
                _as_tensor(alpha[i + 1]),
                _as_tensor(sigma[i]),
                _as_tensor(sigma[i + 1]),
            )
        else:
            x = step_functions["edm_euler"](
                params,
                x,
                _as_tensor(t, "int32"),
                _as_tensor(alpha[i]),
                _as_tensor(sigma[i]),
                _as_tensor(0.0),
            )
        if progress is not None:
            progress.update(i + 1)
    return ops.convert_to_numpy(x).astype("float32")


def num_progress_steps(schedule, sampler, num_steps, **karras_args):
    """How many loop iterations `sample` will report (for a progress bar's target).

    ``karras_args`` (``sigma_min``, ``sigma_max``, ``rho``) as given to `sample`.
    """
    if sampler == "edm_heun":
        return len(karras_timesteps(schedule, num_steps, **karras_args))
    return len(spaced_timesteps(schedule.num_timesteps, num_steps))
