"""DiffusionModel with a rectified-flow schedule and non-uniform timestep densities."""

import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_minsnr as kms
from keras_minsnr import flow
from keras_minsnr import sampling
from keras_minsnr.timestep_sampling import KINDS
from tests.tiny_backbones import TinyConvBackbone

T = 1000


def tiny_flow_model(num_classes=None, **kwargs):
    kwargs.setdefault("prediction_type", "flow")
    kwargs.setdefault("ema_decay", 0)
    backbone = TinyConvBackbone((4, 4, 1), num_classes=num_classes, width=4)
    return kms.DiffusionModel(backbone, kms.FlowMatchingSchedule(T), **kwargs)


def tiny_images(n=16, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 4, 4, 1)).astype("float32")


# -- construction ------------------------------------------------------------------------


def test_flow_prediction_needs_a_flow_schedule():
    backbone = TinyConvBackbone((4, 4, 1), width=4)
    with pytest.raises(ValueError, match="'flow'.*FlowMatchingSchedule"):
        kms.DiffusionModel(backbone, "cosine", prediction_type="flow")
    with pytest.raises(ValueError, match="Unknown prediction_type 'x0'.*flow, epsilon"):
        kms.DiffusionModel(backbone, kms.FlowMatchingSchedule(), prediction_type="x0")


@pytest.mark.parametrize("prediction_type", flow.FLOW_PREDICTION_TYPES)
def test_the_flow_schedule_accepts_its_prediction_types(prediction_type):
    model = tiny_flow_model(prediction_type=prediction_type)
    assert model.is_flow and model.prediction_type == prediction_type
    assert isinstance(kms.DiffusionModel(model.backbone, "flow").schedule, kms.FlowMatchingSchedule)


def test_bad_timestep_sampling_names_the_allowed_kinds():
    with pytest.raises(ValueError, match="'gauss'.*uniform, logit_normal, mode, laplace"):
        tiny_flow_model(timestep_sampling="gauss")


# -- training draws ----------------------------------------------------------------------


def test_uniform_sampling_keeps_the_old_draws():
    """The default density draws exactly what `keras.random.randint` drew before it existed."""
    model = kms.DiffusionModel(TinyConvBackbone((4, 4, 1), width=4), "cosine", seed=7)
    _, (_, steps) = model.compute_training_loss(tiny_images(64))
    old = keras.random.randint((64,), 0, T, seed=keras.random.SeedGenerator(7))
    np.testing.assert_array_equal(ops.convert_to_numpy(steps), ops.convert_to_numpy(old))


@pytest.mark.parametrize("schedule", ["flow", "cosine"])
def test_the_training_step_draws_from_the_laplace_density(schedule):
    """Laplace(0, 1/2) in log SNR puts 1 − e⁻⁴ = 0.982 of the draws at |log SNR| ≤ 2."""
    model = kms.DiffusionModel(
        TinyConvBackbone((4, 4, 1), width=4), schedule, timestep_sampling="laplace", seed=3,
        ema_decay=0,
    )
    _, (_, steps) = model.compute_training_loss(tiny_images(1000))
    steps = ops.convert_to_numpy(steps)
    if schedule == "flow":
        t = (steps + 1.0) / T
        log_snr = 2 * np.log((1 - t) / t)
    else:
        f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        i = np.arange(T, dtype=np.float64)
        abar = np.cumprod(1 - np.minimum(1 - f((i + 1) / T) / f(i / T), 0.999))
        log_snr = np.log(abar / (1 - abar))[steps]
    inside = np.mean(np.abs(log_snr) <= 2)
    # Binomial std at p = 0.982, n = 1000 is 0.004; the cells straddling ±2 add < 0.01.
    assert abs(inside - (1 - np.exp(-4))) < 0.02, inside
    # ...where uniform steps would give 0.46 (flow) / 0.56 (cosine).


# Every strategy once, the densities in turn: each density trains with two or three.
STRATEGY_AND_DENSITY = [
    (strategy, KINDS[i % len(KINDS)]) for i, strategy in enumerate(kms.STRATEGIES)
]


@pytest.mark.parametrize("strategy,density", STRATEGY_AND_DENSITY)
def test_a_flow_model_trains_with_every_weighting_and_density(strategy, density):
    model = tiny_flow_model(weighting=strategy, timestep_sampling=density, seed=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = [w.copy() for w in model.backbone.get_weights()]
    history = model.fit(tiny_images(32), batch_size=16, epochs=2, verbose=0)
    losses = history.history["loss"]
    assert all(np.isfinite(losses)), losses
    moved = [not np.allclose(a, b) for a, b in zip(before, model.backbone.get_weights())]
    assert any(moved)


# -- saving ------------------------------------------------------------------------------


def test_save_and_load_keep_the_schedule_prediction_type_and_density(tmp_path):
    model = kms.DiffusionModel(
        TinyConvBackbone((4, 4, 1), width=4),
        kms.FlowMatchingSchedule(200, shift=3.0),
        prediction_type="v_prediction",
        timestep_sampling={"kind": "logit_normal", "logit_mean": 0.5, "logit_std": 0.7},
        ema_decay=0,
    )
    path = os.path.join(tmp_path, "flow.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.schedule, kms.FlowMatchingSchedule)
    assert (loaded.schedule.num_timesteps, loaded.schedule.shift) == (200, 3.0)
    assert loaded.prediction_type == "v_prediction"
    assert loaded.timestep_sampling.get_config() == {
        "kind": "logit_normal", "logit_mean": 0.5, "logit_std": 0.7,
    }
    # The loaded density's table is rebuilt for the loaded schedule: logit-normal cells.
    from scipy.special import ndtr

    edges = np.arange(201) / 200.0
    with np.errstate(divide="ignore"):
        cdf = ndtr((np.log(edges) - np.log1p(-edges) - 0.5) / 0.7)
    np.testing.assert_allclose(
        np.exp(loaded.timestep_sampling._logits[0]), np.diff(cdf), rtol=1e-5, atol=1e-12
    )


# -- sampling ----------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", flow.FLOW_SAMPLERS)
def test_flow_generate_shapes_and_seeds(sampler):
    model = tiny_flow_model(num_classes=3)
    kwargs = dict(num_steps=4, sampler=sampler, guidance_scale=2.0, shift=3.0)
    a = model.generate(labels=[0, 1, 2, 0, 1], seed=5, batch_size=3, **kwargs)
    b = model.generate(labels=[0, 1, 2, 0, 1], seed=5, batch_size=3, **kwargs)
    c = model.generate(labels=[0, 1, 2, 0, 1], seed=6, batch_size=3, **kwargs)
    assert a.shape == (5, 4, 4, 1) and a.dtype == np.float32
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_discrete_and_flow_samplers_refuse_the_other_schedule():
    flow_model = tiny_flow_model()
    for sampler in kms.SAMPLERS:
        with pytest.raises(ValueError, match=f"{sampler}.*flow sampler: euler, heun"):
            flow_model.generate(2, num_steps=2, sampler=sampler)
    ddpm_model = kms.DiffusionModel(TinyConvBackbone((4, 4, 1), width=4), "cosine", ema_decay=0)
    for sampler in flow.FLOW_SAMPLERS:
        with pytest.raises(ValueError, match=f"{sampler}.*ddpm, ddim, edm_heun"):
            ddpm_model.generate(2, num_steps=2, sampler=sampler)
    with pytest.raises(ValueError, match="shift=2.0 is for the flow samplers"):
        ddpm_model.generate(2, num_steps=2, shift=2.0)
    with pytest.raises(ValueError, match="sigma_min must be < sigma_max"):
        ddpm_model.generate(2, num_steps=2, sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="rho must be a finite number > 0, got -1"):
        ddpm_model.generate(2, num_steps=2, sampler="edm_heun", rho=-1.0)


def test_flow_guidance_combines_the_velocities():
    """Guidance on a flow output is ``u_uncond + s·(u_cond − u_uncond)``."""
    model = tiny_flow_model(num_classes=3)
    x = ops.convert_to_tensor(np.random.default_rng(0).normal(size=(3, 4, 4, 1)), "float32")
    time = ops.convert_to_tensor([0.9, 0.5, 0.123], "float32")
    labels = ops.convert_to_tensor([0, 1, 2], "int32")
    weights = [v.value for v in model.backbone.trainable_variables]
    null = model.null_condition(3)

    def u(condition, null_condition, scale):
        params = (weights, [], condition, null_condition, ops.convert_to_tensor(scale))
        return ops.convert_to_numpy(sampling.flow_velocity(model, params, x, time))

    cond, uncond = u(labels, None, 1.0), u(null, None, 1.0)
    np.testing.assert_allclose(u(labels, null, 3.0), uncond + 3 * (cond - uncond), atol=1e-4)


def test_flow_clipping_clips_x0_and_rederives_the_velocity():
    """With the clip flag û becomes ``(x − clip(x − t·û, −1, 1)) / t``; samples end in [-1, 1]."""
    model = tiny_flow_model()
    rng = np.random.default_rng(1)
    x = ops.convert_to_tensor(3 * rng.normal(size=(2, 4, 4, 1)), "float32")
    time = ops.convert_to_tensor([0.7, 0.2], "float32")
    weights = [v.value for v in model.backbone.trainable_variables]

    def u(clip):
        params = (weights, [], None, None, ops.convert_to_tensor(1.0), clip)
        return ops.convert_to_numpy(sampling.flow_velocity(model, params, x, time))

    raw, t, xn = u(None), np.array([0.7, 0.2])[:, None, None, None], ops.convert_to_numpy(x)
    expected = (xn - np.clip(xn - t * raw, -1, 1)) / t
    assert np.any(np.abs(xn - t * raw) > 1)  # the clip is active somewhere
    np.testing.assert_allclose(u(ops.convert_to_tensor(1.0)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(u(ops.convert_to_tensor(0.0)), raw, rtol=1e-6, atol=1e-6)
    clipped = model.generate(8, num_steps=3, seed=0, clip_denoised=True)
    assert clipped.min() >= -1 and clipped.max() <= 1


def test_edm_arguments_reach_the_sampler():
    """sigma_max = 1 (instead of 80) starts EDM-Heun at σ = 1: the first step changes."""
    model = kms.DiffusionModel(TinyConvBackbone((4, 4, 1), width=4), "cosine", ema_decay=0)
    default = model.generate(4, num_steps=3, sampler="edm_heun", seed=0)
    narrow = model.generate(4, num_steps=3, sampler="edm_heun", seed=0, sigma_max=1.0)
    assert not np.allclose(default, narrow)


# -- the closed form ---------------------------------------------------------------------

MU, SIGMA = 0.4, 0.3


def optimal_velocity_backbone(image_shape=(8, 8, 1)):
    """A functional model returning ``u*(x, t_i) = E[ε − x₀ | x_t = x]`` for N(μ, σ²) data.

    ``x_t ~ N((1 − t)μ, v_t)`` with ``v_t = (1 − t)²σ² + t²``, so
    ``u* = (t − (1 − t)σ²)/v_t · (x − (1 − t)μ) − μ``; step ``i`` has ``t_i = (i + 1)/T``.
    """
    x = keras.Input(image_shape, name="x")
    step = keras.Input((), dtype="int32", name="t")
    t = ops.reshape((ops.cast(step, "float32") + 1.0) / T, (-1, 1, 1, 1))
    v = (1 - t) ** 2 * SIGMA**2 + t**2
    u = (t - (1 - t) * SIGMA**2) / v * (x - (1 - t) * MU) - MU
    return keras.Model({"x": x, "t": step}, u)


def reference_flow_scale(sampler, num_steps):
    """Float64 mean and std after integrating the optimal (affine) velocity from N(0, 1)."""
    times = np.linspace(1.0, 0.0, num_steps + 1)

    def slope_and_offset(t):  # u*(x, t) = A·x + B
        a = (t - (1 - t) * SIGMA**2) / ((1 - t) ** 2 * SIGMA**2 + t**2)
        return a, -a * (1 - t) * MU - MU

    mean, std = 0.0, 1.0
    for i in range(num_steps):
        t, h = times[i], times[i + 1] - times[i]
        a, b = slope_and_offset(t)
        if sampler == "euler" or i == num_steps - 1:
            mean, std = mean + h * (a * mean + b), std * (1 + h * a)
        else:
            a2, b2 = slope_and_offset(times[i + 1])
            # x + h/2·(u(x) + u(x + h·u(x))) with u = A·x + B, still affine in x.
            m_mid = mean + h * (a * mean + b)
            mean = mean + 0.5 * h * (a * mean + b + a2 * m_mid + b2)
            std = std * (1 + 0.5 * h * (a + a2 * (1 + h * a)))
    return mean, std


@pytest.mark.parametrize("sampler,num_steps", [("euler", 20), ("heun", 20)])
def test_generate_with_the_optimal_velocity_reproduces_gaussian_data(sampler, num_steps):
    model = kms.DiffusionModel(
        optimal_velocity_backbone(), kms.FlowMatchingSchedule(T), prediction_type="flow",
        ema_decay=0, clip_denoised=False,
    )
    samples = model.generate(512, num_steps=num_steps, sampler=sampler, seed=0).astype(np.float64)
    mean, std = reference_flow_scale(sampler, num_steps)
    # The map is affine in the starting noise: its sample mean/std (32768 values) differ
    # from 0/1 by ~0.6 %; the discretisation is in `mean`, `std` exactly.
    assert abs(samples.mean() - mean) < 0.02 * SIGMA
    assert abs(samples.std() / std - 1) < 0.02
    if sampler == "heun":  # second order: at 20 steps the data itself
        assert abs(samples.mean() - MU) < 0.02 * SIGMA
        assert abs(samples.std() / SIGMA - 1) < 0.03


# -- the run config ----------------------------------------------------------------------


def test_the_run_config_builds_a_flow_model_with_its_density():
    from keras_minsnr import builders
    from keras_minsnr import training
    from keras_minsnr.run_config import resolve_config
    from recipes.digits_flow import RECIPE

    config = resolve_config(RECIPE, {
        "flow_shift": 3.0, "timestep_sampling": "laplace",
        "timestep_sampling_args": {"laplace_b": 0.25},
        "backbone_args": {"hidden_size": 16, "depth": 1},
    })
    _, info = training.build_dataset(config)
    model = builders.build_model(config, info)
    assert isinstance(model.schedule, kms.FlowMatchingSchedule) and model.schedule.shift == 3.0
    assert model.prediction_type == "flow" and model.weighting.strategy == "min_snr"
    assert model.timestep_sampling.get_config() == {
        "kind": "laplace", "laplace_mu": 0.0, "laplace_b": 0.25,
    }


@pytest.mark.parametrize("overrides,message", [
    ({"sampler": "ddim"}, "sampler 'ddim' is for discrete schedules.*euler or heun"),
    ({"schedule": "cosine"}, "prediction_type 'flow' needs schedule 'flow'"),
    ({"schedule": "cosine", "prediction_type": "epsilon"}, "sampler 'euler' needs schedule"),
    ({"timestep_sampling": "gauss"}, "gauss"),
    ({"flow_shift": 0}, "flow_shift"),
])
def test_the_run_config_checks_the_flow_keys_up_front(overrides, message):
    from keras_minsnr.run_config import resolve_config
    from recipes.digits_flow import RECIPE

    with pytest.raises(ValueError, match=message):
        resolve_config(RECIPE, overrides)
