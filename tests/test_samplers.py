"""Samplers against the exact answer for Gaussian data under the optimal denoiser.

For data ``x0 ~ N(μ, v)`` (independently per pixel) the optimal denoiser is affine in
``x_t``: ``E[x0 | x_t] = μ + α v / (α² v + σ²) · (x_t − α μ)``. Every sampler step is then
affine in its input (plus independent Gaussian noise for DDPM), so the distribution of the
samples is a Gaussian whose mean and variance follow from the update rules of the papers
(DDIM: Song et al. 2021 eq. 12; DDPM: Ho et al. 2020 eq. 7; EDM-Heun: Karras et al. 2022
Algorithm 1), propagated here in float64. The samplers module runs with a `keras.ops`
denoiser (no network), so these tests are fast.
"""

import math

import keras
import numpy as np
import pytest
from keras import ops

import keras_minsnr as kms
from keras_minsnr import samplers

T = 1000
MEAN, STD = 0.5, 0.3
# 64 × 32 × 32 = 65536 values: the sample std of the starting noise is within ~0.3% of
# its true value (one standard error), the sample mean within |scale| / 256.
SHAPE = (64, 32, 32, 1)
N = int(np.prod(SHAPE))
STD_RTOL = 0.015  # ~5 standard errors of a sample std from 65536 values
EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO = 0.002, 80.0, 7.0


def reference_alphas_cumprod_cosine(T):
    """ᾱ of the improved-DDPM cosine schedule, float64 (Nichol & Dhariwal 2021 eq. 17)."""
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    return np.cumprod(1 - np.array(betas))


ABAR = reference_alphas_cumprod_cosine(T)


def make_denoise(abar=ABAR):
    """``denoise(params, x_t, t) -> (x̂0, ε̂)``, the exact posterior mean, in keras.ops."""
    alpha = ops.convert_to_tensor(np.sqrt(abar), "float32")
    sigma = ops.convert_to_tensor(np.sqrt(1 - abar), "float32")
    var = STD**2

    def denoise(params, x, t):
        a = ops.reshape(ops.take(alpha, t), (-1, 1, 1, 1))
        s = ops.reshape(ops.take(sigma, t), (-1, 1, 1, 1))
        x0 = MEAN + a * var / (a * a * var + s * s) * (x - a * MEAN)
        return x0, (x - a * x0) / s

    return denoise


def optimal_x0(abar_t):
    """``E[x0 | x_t] = k x_t + c`` for the Gaussian data, as the pair (k, c)."""
    a, s2 = np.sqrt(abar_t), 1 - abar_t
    k = a * STD**2 / (a * a * STD**2 + s2)
    return k, MEAN * (1 - a * k)


def reference_karras_levels(abar, n, sigma_min=EDM_SIGMA_MIN, sigma_max=EDM_SIGMA_MAX,
                            rho=EDM_RHO):
    """EDM's ρ-spaced σ levels (Karras et al. 2022 eq. 5), clamped to the schedule's finite
    σ = sqrt((1 − ᾱ)/ᾱ) range and snapped to the nearest discrete step in log σ."""
    finite = np.nonzero(abar < 1)[0]
    finite = finite[abar[finite] > 0]
    log_sigma = 0.5 * np.log((1 - abar[finite]) / abar[finite])
    lo, hi = math.exp(log_sigma.min()), math.exp(log_sigma.max())
    s_max = min(max(sigma_max, lo), hi)
    s_min = min(max(sigma_min, lo), hi)
    levels = []
    for i in range(n):
        ramp = i / (n - 1) if n > 1 else 0.0
        sigma = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        t = int(finite[np.argmin(np.abs(log_sigma - math.log(sigma)))])
        if t not in levels:
            levels.append(t)
    return levels


def reference_edm_heun(abar, steps):
    """Mean and std of EDM Algorithm 1 (deterministic Heun) on the discrete levels."""
    sig = np.sqrt((1 - abar[steps]) / abar[steps])
    alpha = np.sqrt(abar[steps])

    def denoised(i):  # D(x; σ_i) = x̂0(α_i x) as (slope, offset) in x
        k, c = optimal_x0(abar[steps[i]])
        return k * alpha[i], c

    scale, offset = sig[0], 0.0  # x = scale · z + offset, z ~ N(0, 1)
    for i in range(len(steps)):
        s, s_next = sig[i], (sig[i + 1] if i + 1 < len(steps) else 0.0)
        k, c = denoised(i)
        d = ((1 - k) / s, -c / s)  # d = (x − D(x)) / σ, affine in x
        euler = (1 + (s_next - s) * d[0], (s_next - s) * d[1])
        if s_next > 0:
            k2, c2 = denoised(i + 1)
            d2 = ((1 - k2) * euler[0] / s_next, ((1 - k2) * euler[1] - c2) / s_next)
            step = (1 + (s_next - s) * (d[0] + d2[0]) / 2, (s_next - s) * (d[1] + d2[1]) / 2)
        else:
            step = euler
        scale, offset = step[0] * scale, step[0] * offset + step[1]
    return offset, abs(scale)


def reference_trailing_timesteps(T, n):
    """diffusers' "trailing" spacing: ``round(T − i·T/n) − 1``, starting at ``T − 1``."""
    return [int(round(T - i * T / n)) - 1 for i in range(n)]


def reference_ddim_or_ddpm(abar, steps, sampler):
    """Mean and std after DDIM (η = 0, Song et al. 2021 eq. 12) or ancestral DDPM steps
    (the posterior q(x_s | x_t, x̂0) of Ho et al. 2020 eq. 7 on the respaced steps), from
    ``x ~ N(0, 1)``; the last step goes to ᾱ = 1."""
    mean, var = 0.0, 1.0
    for i, t in enumerate(steps):
        abar_t = abar[t]
        abar_s = abar[steps[i + 1]] if i + 1 < len(steps) else 1.0
        k, c = optimal_x0(abar_t)
        if sampler == "ddim":
            # x_s = sqrt(ᾱ_s) x̂0 + sqrt(1 − ᾱ_s) ε̂,  ε̂ = (x − sqrt(ᾱ_t) x̂0) / sqrt(1 − ᾱ_t)
            r = math.sqrt((1 - abar_s) / (1 - abar_t))
            slope = math.sqrt(abar_s) * k + r * (1 - math.sqrt(abar_t) * k)
            offset = math.sqrt(abar_s) * c - r * math.sqrt(abar_t) * c
            noise_var = 0.0
        else:
            beta = 1 - abar_t / abar_s
            c_x0 = math.sqrt(abar_s) * beta / (1 - abar_t)
            c_xt = math.sqrt(1 - beta) * (1 - abar_s) / (1 - abar_t)
            slope, offset = c_x0 * k + c_xt, c_x0 * c
            noise_var = beta * (1 - abar_s) / (1 - abar_t)
        mean, var = slope * mean + offset, slope**2 * var + noise_var
    return mean, math.sqrt(var)


def run(sampler, num_steps, abar=ABAR, seed=0, **kwargs):
    schedule = kms.NoiseSchedule("cosine", num_timesteps=T)
    step_functions = samplers.make_step_functions(make_denoise(abar))
    return samplers.sample(
        step_functions, None, schedule, SHAPE, sampler=sampler, num_steps=num_steps,
        seed=seed, **kwargs
    )


def assert_gaussian(samples, mean, std):
    assert samples.dtype == np.float32 and samples.shape == SHAPE
    assert np.all(np.isfinite(samples))
    assert abs(samples.mean() - mean) < 5 * std / math.sqrt(N) + 1e-4, (samples.mean(), mean)
    assert abs(samples.std() - std) < STD_RTOL * std + 1e-5, (samples.std(), std)


@pytest.mark.parametrize("num_steps", [10, 20, 50])
def test_edm_heun_matches_the_exact_answer_on_edm_sigma_range(num_steps):
    steps = reference_karras_levels(ABAR, num_steps)
    mean, std = reference_edm_heun(ABAR, steps)
    assert_gaussian(run("edm_heun", num_steps), mean, std)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("num_steps", [10, 20, 50])
def test_ddim_and_ddpm_match_the_exact_answer(sampler, num_steps):
    # DDPM adds fresh noise at every step; the reference variance includes it, and the
    # sample std still has the standard error of 65536 independent Gaussian values.
    steps = reference_trailing_timesteps(T, num_steps)
    mean, std = reference_ddim_or_ddpm(ABAR, steps, sampler)
    assert_gaussian(run(sampler, num_steps), mean, std)


def test_spacing_is_trailing_and_starts_at_the_last_step():
    for n in (1, 2, 3, 7, 10, 50, 333, 999, 1000):
        got = samplers.spaced_timesteps(T, n)
        assert got.tolist() == reference_trailing_timesteps(T, n)
        assert got[0] == T - 1 and len(set(got.tolist())) == n
    schedule = kms.NoiseSchedule("cosine", num_timesteps=T)
    assert samplers.num_progress_steps(schedule, "ddim", 1) == 1


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "edm_heun"])
def test_one_step_gives_the_optimal_denoisers_answer(sampler):
    """One step is one denoiser call from pure noise: x̂0 = k·x + c at the noisiest level."""
    if sampler == "edm_heun":
        t = reference_karras_levels(ABAR, 1)[0]
        start_std = math.sqrt((1 - ABAR[t]) / ABAR[t])  # x_edm = σ z; the net sees α x_edm
        input_std = math.sqrt(ABAR[t]) * start_std
    else:
        t, input_std = T - 1, 1.0
    k, c = optimal_x0(ABAR[t])
    samples = run(sampler, 1)
    assert_gaussian(samples, c, k * input_std)
    # The starting noise (std 1, or 80 for EDM) would be what a step at t = 0 returns.
    assert samples.std() < 0.01


def test_edm_heun_makes_two_calls_per_level_but_one_on_the_last(monkeypatch):
    """EDM Algorithm 1: the last step (to σ = 0) is a plain Euler step: 2·levels − 1 calls."""
    calls = []
    denoise = make_denoise()

    def counting_denoise(params, x, t):
        calls.append(1)
        return denoise(params, x, t)

    # Run the per-step path eagerly so every call to the denoiser is a Python call (a
    # compiled loop traces its body once); the looped path gives the same images
    # (test_compiled_loop_gives_the_per_step_images).
    monkeypatch.setattr(samplers, "compile_function", lambda fn: fn)
    schedule = kms.NoiseSchedule("cosine", num_timesteps=T)
    for num_steps in (1, 2, 7):
        calls.clear()
        step_functions = samplers.make_step_functions(counting_denoise)
        samplers.sample(
            step_functions, None, schedule, (2, 4, 4, 1), sampler="edm_heun",
            num_steps=num_steps, seed=0, loop=False,
        )
        levels = len(reference_karras_levels(ABAR, num_steps))
        assert len(calls) == 2 * levels - 1
        calls.clear()
        samplers.sample(
            step_functions, None, schedule, (2, 4, 4, 1), sampler="ddim",
            num_steps=num_steps, seed=0, loop=False,
        )
        assert len(calls) == num_steps


@pytest.mark.parametrize("num_steps, rtol", [(20, 0.06), (50, 0.015)])
def test_edm_heun_reaches_the_data_distribution(num_steps, rtol):
    """EDM's σ range gives 4.5% std error at 20 steps and 0.6% at 50 (analytic, above);
    spacing the levels up to the cosine schedule's σ_max ≈ 2·10⁴ gave 36% and 4.7%."""
    samples = run("edm_heun", num_steps)
    assert abs(samples.mean() - MEAN) < 0.01
    assert abs(samples.std() - STD) < rtol * STD


def test_karras_levels_use_edm_range_clamped_to_the_schedule():
    schedule = kms.NoiseSchedule("cosine", num_timesteps=T)
    for n in (1, 2, 10, 20, 50):
        got = samplers.karras_timesteps(schedule, n)
        assert got.tolist() == reference_karras_levels(ABAR, n)
    sigma = lambda t: math.sqrt((1 - ABAR[t]) / ABAR[t])  # noqa: E731
    levels = samplers.karras_timesteps(schedule, 20)
    assert abs(math.log(sigma(levels[0]) / 80.0)) < 0.05  # starts at σ_max = 80
    # cosine's smallest σ (≈0.006 at t = 0) is above EDM's 0.002, so the clamp ends there.
    assert levels[-1] == 0
    custom = samplers.karras_timesteps(schedule, 12, sigma_min=0.1, sigma_max=10.0, rho=3.0)
    assert custom.tolist() == reference_karras_levels(ABAR, 12, 0.1, 10.0, 3.0)
    assert abs(math.log(sigma(custom[0]) / 10.0)) < 0.05
    assert abs(math.log(sigma(custom[-1]) / 0.1)) < 0.05


def test_sample_passes_the_sigma_range_to_edm_heun():
    kwargs = dict(sigma_min=0.05, sigma_max=5.0, rho=3.0)
    steps = reference_karras_levels(ABAR, 15, **kwargs)
    mean, std = reference_edm_heun(ABAR, steps)
    assert_gaussian(run("edm_heun", 15, **kwargs), mean, std)
    schedule = kms.NoiseSchedule("cosine", num_timesteps=T)
    assert samplers.num_progress_steps(schedule, "edm_heun", 15, **kwargs) == len(steps)


def test_zero_terminal_schedule_never_uses_infinite_sigma():
    schedule = kms.NoiseSchedule("cosine", num_timesteps=T, zero_terminal_snr=True)
    levels = samplers.karras_timesteps(schedule, 20, sigma_max=1e30)
    assert T - 1 not in levels.tolist()
    assert levels[0] == T - 2  # the largest finite σ


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sigma_min=0.0), "sigma_min.*> 0.*0.0"),
        (dict(sigma_max=float("inf")), "sigma_max.*inf"),
        (dict(rho=-1.0), "rho.*-1.0"),
        (dict(sigma_min=5.0, sigma_max=1.0), "sigma_min must be < sigma_max.*5.0.*1.0"),
    ],
)
def test_bad_sigma_range(kwargs, match):
    schedule = kms.NoiseSchedule("cosine", num_timesteps=T)
    with pytest.raises(ValueError, match=match):
        samplers.karras_timesteps(schedule, 10, **kwargs)
    with pytest.raises(ValueError, match=match):
        samplers.sample({}, None, schedule, SHAPE, sampler="edm_heun", **kwargs)


# -- the compiled loop ------------------------------------------------------------------


def make_nonlinear_denoise(abar=ABAR):
    """The exact Gaussian denoiser plus a term that is not affine in x or t, so that a
    wrong step index, scalar or noise draw in the loop changes the result."""
    exact = make_denoise(abar)
    alpha = ops.convert_to_tensor(np.sqrt(abar), "float32")
    sigma = ops.convert_to_tensor(np.sqrt(1 - abar), "float32")

    def denoise(params, x, t):
        x0, _ = exact(params, x, t)
        tt = ops.reshape(ops.cast(t, "float32"), (-1, 1, 1, 1)) / T
        x0 = x0 + 0.05 * ops.sin(2.0 * x + 3.0 * tt)
        a = ops.reshape(ops.take(alpha, t), (-1, 1, 1, 1))
        s = ops.reshape(ops.take(sigma, t), (-1, 1, 1, 1))
        return x0, (x - a * x0) / s

    return denoise


nonlinear_denoise = make_nonlinear_denoise()


class CountingProgress:
    def __init__(self):
        self.seen = []

    def update(self, current):
        self.seen.append(current)


@pytest.mark.parametrize(
    "sampler, num_steps, kwargs",
    [
        ("ddim", 13, {}),
        ("ddim", 13, {"eta": 0.6}),
        ("ddpm", 13, {}),
        ("edm_heun", 9, {}),
        ("edm_heun", 1, {}),
    ],
)
@pytest.mark.parametrize("with_progress", [False, True])
def test_compiled_loop_gives_the_per_step_images(sampler, num_steps, kwargs, with_progress):
    """The whole loop compiled once draws the same noise from the same seed and applies
    the same steps as one compiled call per step: equal to float32 round-off."""
    schedule = kms.NoiseSchedule("cosine", num_timesteps=T)
    step_functions = samplers.make_step_functions(nonlinear_denoise)
    shape = (3, 4, 4, 2)
    common = dict(sampler=sampler, num_steps=num_steps, seed=7, **kwargs)
    reference = samplers.sample(step_functions, None, schedule, shape, loop=False, **common)
    progress = CountingProgress() if with_progress else None
    looped = samplers.sample(
        step_functions, None, schedule, shape, progress=progress, **common
    )
    assert looped.dtype == np.float32 and looped.shape == shape
    scale = max(1.0, float(np.abs(reference).max()))
    np.testing.assert_allclose(looped, reference, rtol=0, atol=2e-5 * scale)
    # Another seed gives other images (the noise really comes from the seed).
    other = samplers.sample(step_functions, None, schedule, shape, **{**common, "seed": 8})
    assert np.abs(other - reference).max() > 1e-2
    if with_progress:
        total = samplers.num_progress_steps(schedule, sampler, num_steps)
        assert progress.seen[-1] == total
        assert progress.seen == sorted(set(progress.seen)) and len(progress.seen) >= min(total, 2)


def count_compiled_calls(monkeypatch, *modules):
    """Makes each module's `compile_function` record the name of each compiled function
    called (in the returned list)."""
    calls = []
    for module in modules:
        _record_compiled_calls(monkeypatch, module, calls)
    return calls


def _record_compiled_calls(monkeypatch, module, calls):
    real_compile = module.compile_function

    def counting_compile(fn):
        compiled = real_compile(fn)

        def call(*args):
            calls.append(fn.__name__)
            return compiled(*args)

        return call

    monkeypatch.setattr(module, "compile_function", counting_compile)


def test_sampling_is_one_compiled_call_not_one_per_step(monkeypatch):
    """Without a progress bar the loop over steps runs inside one compiled call (EDM: plus
    its last Euler step), however many steps there are."""
    calls = count_compiled_calls(monkeypatch, samplers)
    schedule = kms.NoiseSchedule("cosine", num_timesteps=T)
    step_functions = samplers.make_step_functions(nonlinear_denoise)
    for sampler, num_steps, expected in (("ddim", 40, 1), ("ddpm", 40, 1), ("edm_heun", 30, 2)):
        calls.clear()
        samplers.sample(
            step_functions, None, schedule, (2, 4, 4, 1), sampler=sampler,
            num_steps=num_steps, seed=0,
        )
        assert len(calls) == expected, (sampler, calls)


def test_noisy_loop_runs_in_chunks_that_bound_the_pre_drawn_noise(monkeypatch):
    """DDPM pre-draws its per-step noise; with a small budget it runs in several chunks
    and still gives the per-step images."""
    schedule = kms.NoiseSchedule("cosine", num_timesteps=T)
    step_functions = samplers.make_step_functions(nonlinear_denoise)
    shape = (2, 4, 4, 1)
    reference = samplers.sample(
        step_functions, None, schedule, shape, sampler="ddpm", num_steps=11, seed=3, loop=False
    )
    # Room for the noise of 4 steps: 11 steps run as chunks of 4, 4 and 3.
    monkeypatch.setattr(samplers, "NOISE_BUDGET_BYTES", 4 * 4 * int(np.prod(shape)))
    assert samplers.loop_chunk_size(11, shape, noisy=True, progress=False) == 4
    looped = samplers.sample(
        step_functions, None, schedule, shape, sampler="ddpm", num_steps=11, seed=3
    )
    np.testing.assert_allclose(looped, reference, rtol=0, atol=2e-5)


# -- XLA on TensorFlow --------------------------------------------------------------------

TINY_BACKBONES = {
    "dit": ("dit_s_2", dict(image_shape=(8, 8, 2), num_classes=3, depth=1, hidden_size=32,
                            num_heads=2, patch_size=2)),
    "vit": ("vit_b_2_in256", dict(image_shape=(8, 8, 2), num_classes=3, depth=1,
                                  hidden_size=32, num_heads=2, patch_size=2)),
    "unet": ("unet_cifar10", dict(image_shape=(8, 8, 2), num_classes=3, base_channels=8,
                                  channel_multipliers=(1, 2), num_res_blocks=1,
                                  attention_resolutions=(4,), dropout=0.0, num_groups=4)),
    "mlp": ("mlp_digits", dict(image_shape=(8, 8, 2), num_classes=3)),
}


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="JAX always compiles with XLA; the choice exists on TensorFlow only",
)
@pytest.mark.parametrize("name", sorted(TINY_BACKBONES))
def test_tensorflow_samples_with_xla_and_equals_sampling_without(name, monkeypatch):
    """generate() compiles its loops with XLA on TensorFlow; the images equal those of
    tf.function without XLA to float32 round-off (XLA fuses and reorders float work)."""
    from keras_minsnr import backbones
    from keras_minsnr import backend
    from keras_minsnr import flow

    preset, overrides = TINY_BACKBONES[name]
    keras.utils.set_random_seed(0)
    backbone = backbones.get(preset, **overrides)
    # Non-zero output weights (the presets start at zero), so the network shapes the images.
    for v in backbone.trainable_variables:
        v.assign(np.random.default_rng(1).standard_normal(v.shape).astype("float32") * 0.05)
    schedule = "flow" if name == "mlp" else "cosine"
    if schedule == "flow":
        schedule = flow.FlowMatchingSchedule(1000)
    model = kms.DiffusionModel(backbone, schedule, ema_decay=0.0,
                               prediction_type="flow" if name == "mlp" else "epsilon")
    kwargs = dict(labels=[0, 1, 2], num_steps=6, seed=3, guidance_scale=2.0)
    # One loop per backbone keeps the XLA compiles few (they are slow on TensorFlow).
    samplers_to_check = ("heun",) if name == "mlp" else ("ddim",)
    with_xla = {s: model.generate(sampler=s, **kwargs) for s in samplers_to_check}
    compiled = model._flow_step_functions if name == "mlp" else model._step_functions
    loop = compiled[samplers_to_check[0] + "_loop"]
    assert getattr(loop, "uses_xla", False) is True

    plain = lambda fn: backend.compile_function(fn, jit_compile=False)  # noqa: E731
    monkeypatch.setattr(samplers, "compile_function", plain)
    monkeypatch.setattr(flow, "compile_function", plain)
    model._step_functions = model._flow_step_functions = None
    for sampler, images in with_xla.items():
        without = model.generate(sampler=sampler, **kwargs)
        assert np.all(np.isfinite(images)) and np.abs(images).max() > 0.1
        np.testing.assert_allclose(images, without, rtol=0, atol=1e-4 * np.abs(without).max())


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="JAX always compiles with XLA; the fallback exists on TensorFlow only",
)
def test_a_function_xla_cannot_compile_runs_without_xla_after_one_warning():
    import tensorflow as tf

    from keras_minsnr import backend

    def host_square(x):  # a host callback: XLA has no kernel for it
        return tf.numpy_function(lambda a: a * a, [x], tf.float32) + 1.0

    compiled = backend.compile_function(host_square)
    with pytest.warns(UserWarning, match="XLA cannot compile host_square"):
        out = compiled(tf.constant([2.0, 3.0]))
    np.testing.assert_array_equal(out.numpy(), [5.0, 10.0])
    assert compiled.uses_xla is False
    np.testing.assert_array_equal(compiled(tf.constant([4.0])).numpy(), [17.0])
    # Errors that are not XLA's still reach the caller.
    bad = backend.compile_function(lambda x: tf.reshape(x, (3,)))
    bad.__name__ = "bad"
    with pytest.raises(ValueError, match="Cannot reshape"):
        bad(tf.constant([1.0, 2.0]))
    assert bad.uses_xla is True
