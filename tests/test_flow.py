"""Rectified flow against float64 references written here from the formulas.

x_t = (1 − t)·x₀ + t·ε, u = ε − x₀, SNR = (1 − t)²/t² (Liu et al. 2023; Esser et al. 2024).
"""

import inspect
import math

import keras
import numpy as np
import pytest
from keras import ops

import keras_minsnr as kms
from keras_minsnr import flow
from keras_minsnr import samplers
from keras_minsnr import weighting
from keras_minsnr.flow import FlowMatchingSchedule
from tests.test_samplers import count_compiled_calls


def reference_times(T, shift):
    return [shift * ((i + 1) / T) / (1 + (shift - 1) * ((i + 1) / T)) for i in range(T)]


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


# -- the schedule -------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_grid_snr_and_log_snr_match_formulas(shift):
    T = 50
    sched = FlowMatchingSchedule(num_timesteps=T, shift=shift)
    t = np.array(reference_times(T, shift))
    steps = np.arange(T)
    np.testing.assert_allclose(sched.time(steps), t, rtol=1e-14)
    assert sched.time(T - 1) == 1.0 and sched.snr(T - 1) == 0.0
    assert sched.log_snr(T - 1) == -np.inf
    expected_snr = [(1 - ti) ** 2 / ti**2 for ti in t]
    np.testing.assert_allclose(sched.snr(steps), expected_snr, rtol=1e-12)
    expected_log = [2 * math.log((1 - ti) / ti) for ti in t[:-1]]
    np.testing.assert_allclose(sched.log_snr(steps[:-1]), expected_log, rtol=1e-12, atol=1e-13)
    if shift == 1.0:
        assert sched.time(0) == pytest.approx(1 / T, rel=1e-15)
    # Shift divides the SNR by shift² (SD3's resolution shift).
    plain = FlowMatchingSchedule(num_timesteps=T)
    np.testing.assert_allclose(sched.snr(steps[:-1]), plain.snr(steps[:-1]) / shift**2, rtol=1e-12)

    # Tensor steps give float32 tensors with the same numbers.
    got = sched.snr(ops.convert_to_tensor(steps[:-1], "int32"))
    assert ops.is_tensor(got) and keras.backend.standardize_dtype(got.dtype) == "float32"
    np.testing.assert_allclose(to_numpy(got), expected_snr[:-1], rtol=1e-5)


def test_timestep_index_inverts_the_grid():
    sched = FlowMatchingSchedule(num_timesteps=40, shift=2.5)
    steps = np.arange(40)
    np.testing.assert_array_equal(sched.timestep_index(sched.time(steps)), steps)
    got = sched.timestep_index(ops.convert_to_tensor(sched.time(steps), "float32"))
    assert keras.backend.standardize_dtype(got.dtype) == "int32"
    np.testing.assert_array_equal(ops.convert_to_numpy(got), steps)
    assert sched.timestep_index(np.array([0.0]))[0] == 0


def random_batch(seed, shape=(6, 3, 2, 2)):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape), rng.standard_normal(shape), rng.standard_normal(shape)


STEPS = np.array([0, 3, 10, 17, 25, 31])  # includes the last step (t = 1) of T = 32


@pytest.mark.parametrize("prediction_type", flow.FLOW_PREDICTION_TYPES)
def test_add_noise_targets_and_their_inversion(prediction_type):
    sched = FlowMatchingSchedule(num_timesteps=32, shift=2.0)
    x0, eps, _ = random_batch(1)
    t = np.array(reference_times(32, 2.0))[STEPS].reshape(-1, 1, 1, 1)
    x_t = sched.add_noise(x0, eps, STEPS)
    np.testing.assert_allclose(x_t, (1 - t) * x0 + t * eps, rtol=1e-13, atol=1e-13)
    c = np.sqrt((1 - t) ** 2 + t**2)
    expected = {
        "flow": eps - x0,
        "epsilon": eps,
        "sample": x0,
        "v_prediction": ((1 - t) * eps - t * x0) / c,
    }[prediction_type]
    target = sched.target(x0, eps, STEPS, prediction_type)
    np.testing.assert_allclose(target, expected, rtol=1e-13, atol=1e-13)

    # The true target gives back x₀ and ε (ε cannot give x₀ at t = 1: skip that step).
    keep = slice(None) if prediction_type != "epsilon" else slice(0, -1)
    x0_hat, eps_hat = sched.predict_x0_and_epsilon(x_t, target, STEPS, prediction_type)
    np.testing.assert_allclose(x0_hat[keep], x0[keep], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(eps_hat, eps, rtol=1e-10, atol=1e-10)

    # Same on tensors in float32.
    tx0, teps = (ops.convert_to_tensor(a, "float32") for a in (x0, eps))
    tsteps = ops.convert_to_tensor(STEPS, "int32")
    tx_t = sched.add_noise(tx0, teps, tsteps)
    ttarget = sched.target(tx0, teps, tsteps, prediction_type)
    np.testing.assert_allclose(to_numpy(ttarget), expected, rtol=1e-5, atol=1e-5)
    tx0_hat, teps_hat = sched.predict_x0_and_epsilon(tx_t, ttarget, tsteps, prediction_type)
    np.testing.assert_allclose(to_numpy(tx0_hat)[keep], x0[keep], atol=2e-5)
    np.testing.assert_allclose(to_numpy(teps_hat), eps, atol=2e-5)


def sq(a):
    return np.sum(np.reshape(a, (a.shape[0], -1)) ** 2, axis=1)


@pytest.mark.parametrize("use_tensors", [False, True])
def test_error_identities_between_parameterisations(use_tensors):
    """‖x̂₀−x₀‖² = t²‖û−u‖², ‖ε̂−ε‖² = (1−t)²‖û−u‖² = SNR·‖x̂₀−x₀‖², ‖v̂−v‖² = (SNR+1)‖x̂₀−x₀‖²."""
    sched = FlowMatchingSchedule(num_timesteps=32)
    x0, eps, u_hat = random_batch(2)
    steps = STEPS
    conv = (lambda a: ops.convert_to_tensor(a, "float32")) if use_tensors else (lambda a: a)
    tsteps = ops.convert_to_tensor(steps, "int32") if use_tensors else steps
    x_t = sched.add_noise(conv(x0), conv(eps), tsteps)
    x0_hat, eps_hat = (
        to_numpy(a) for a in sched.predict_x0_and_epsilon(x_t, conv(u_hat), tsteps, "flow")
    )
    v = sched.velocity(x0, eps, steps)
    v_hat = to_numpy(sched.velocity(conv(x0_hat), conv(eps_hat), tsteps))
    t = (steps + 1) / 32
    snr = (1 - t) ** 2 / t**2
    err_u = sq(u_hat - (eps - x0))
    rtol = 1e-4 if use_tensors else 1e-10
    np.testing.assert_allclose(sq(x0_hat - x0), t**2 * err_u, rtol=rtol)
    np.testing.assert_allclose(sq(eps_hat - eps), (1 - t) ** 2 * err_u, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(sq(eps_hat - eps), snr * sq(x0_hat - x0), rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(sq(v_hat - v), (snr + 1) * sq(x0_hat - x0), rtol=rtol)


def test_convert_prediction_round_trip():
    sched = FlowMatchingSchedule(num_timesteps=32, shift=3.0)
    x0, eps, _ = random_batch(3)
    steps = STEPS[:-1]
    x0, eps = x0[:-1], eps[:-1]
    x_t = sched.add_noise(x0, eps, steps)
    u = eps - x0
    for to_type, want in (("sample", x0), ("epsilon", eps), ("flow", u)):
        got = sched.convert_prediction(x_t, u, steps, "flow", to_type)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    v = sched.convert_prediction(x_t, u, steps, "flow", "v_prediction")
    back = sched.convert_prediction(x_t, v, steps, "v_prediction", "flow")
    np.testing.assert_allclose(back, u, rtol=1e-10, atol=1e-10)


def test_serialisation_round_trip():
    sched = FlowMatchingSchedule(num_timesteps=64, shift=3.0)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(sched))
    assert isinstance(restored, FlowMatchingSchedule)
    assert restored.get_config() == {"num_timesteps": 64, "shift": 3.0}
    np.testing.assert_array_equal(restored.times, sched.times)


def test_bad_arguments_say_what_is_allowed():
    with pytest.raises(ValueError, match="shift must be .* got -1"):
        FlowMatchingSchedule(shift=-1)
    with pytest.raises(ValueError, match="num_timesteps .* got 1"):
        FlowMatchingSchedule(num_timesteps=1)
    sched = FlowMatchingSchedule(num_timesteps=10)
    with pytest.raises(ValueError, match="'velocity'.*Allowed: flow, epsilon"):
        sched.target(np.zeros((1, 2)), np.zeros((1, 2)), [0], "velocity")
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        sched.snr([10])
    with pytest.raises(ValueError, match="integers \\(step indices\\)"):
        sched.snr([0.5])
    with pytest.raises(ValueError, match="Unknown loss weighting strategy 'minsnr'"):
        weighting.flow_weight(np.array([1.0]), "minsnr")
    with pytest.raises(ValueError, match="Unknown flow sampler 'rk4'.*euler, heun"):
        flow.check_flow_sampler("rk4")


# -- the weight in velocity space --------------------------------------------------------

G, K, PG, MAX = 5.0, 1.0, 1.0, 1e5


def reference_flow_weight(strategy, t, gamma=G, p2_k=K, p2_gamma=PG):
    """``t²·w₀((1−t)²/t²)`` simplified by hand into forms that are finite at t = 0."""
    a, b = (1 - t) ** 2, t**2  # a = t²·SNR, b = t²
    if strategy == "constant":
        return 1.0
    if strategy == "snr":
        return a
    if strategy == "trunc_snr":
        return max(a, b)
    if strategy == "max_snr":
        return max(a, gamma * b)
    if strategy == "min_snr":
        return min(a, gamma * b)
    if strategy == "soft_min_snr":
        return gamma * a * b / (a + gamma * b)
    if strategy == "inv_snr":
        return MAX if a == 0 else min(b * b / a, MAX)
    if strategy == "p2":
        return a * b**p2_gamma / (p2_k * b + a) ** p2_gamma
    if strategy == "debiased":
        return t * (1 - t)
    raise AssertionError(strategy)


EDGE_TIMES = [0.0, 1e-6, 0.5, 1 - 1e-6, 1.0]
# `loss_weight` may set the weight at SNR == 0 by a `terminal_weight` rule; at t = 1 the
# flow weight is w₀(0), so the pure limits below need its "limit" setting where it exists.
HAS_TERMINAL = "terminal_weight" in inspect.signature(kms.loss_weight).parameters
LIMIT = {"terminal_weight": "limit"} if HAS_TERMINAL else {}


def snr_of(t):
    with np.errstate(divide="ignore"):
        return (1 - np.asarray(t, np.float64)) ** 2 / np.asarray(t, np.float64) ** 2


@pytest.mark.parametrize("strategy", kms.STRATEGIES)
def test_flow_weight_matches_float64_reference_at_the_edges(strategy):
    times = np.array(EDGE_TIMES + list(np.linspace(0.01, 0.99, 23)))
    want = np.array([reference_flow_weight(strategy, t) for t in times])
    got = weighting.flow_weight(snr_of(times), strategy, gamma=G, **LIMIT)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-300)

    got_t = weighting.flow_weight(
        ops.convert_to_tensor(snr_of(times), "float32"), strategy, gamma=G, **LIMIT
    )
    assert keras.backend.standardize_dtype(got_t.dtype) == "float32"
    got_t = to_numpy(got_t)
    assert np.all(np.isfinite(got_t))
    np.testing.assert_allclose(got_t, want, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
def test_min_snr_in_velocity_space_is_min_of_squares(gamma):
    t = np.linspace(0.0, 1.0, 101)
    got = weighting.flow_weight(snr_of(t), "min_snr", gamma=gamma, **LIMIT)
    want = np.minimum((1 - t) ** 2, gamma * t**2)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("p2_gamma", [0.0, 0.5, 2.0])
def test_p2_limit_at_t_zero_follows_its_exponent(p2_gamma):
    times = np.array(EDGE_TIMES)
    want = [reference_flow_weight("p2", t, p2_k=2.0, p2_gamma=p2_gamma) for t in times]
    got = weighting.flow_weight(snr_of(times), "p2", p2_k=2.0, p2_gamma=p2_gamma, **LIMIT)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-300)


@pytest.mark.skipif(not HAS_TERMINAL, reason="loss_weight has no terminal_weight option")
@pytest.mark.parametrize("strategy", kms.STRATEGIES)
def test_terminal_weight_carries_over_to_t_one(strategy):
    """At t = 1 the velocity and x₀ errors coincide (t² = 1): the terminal rule applies as is."""
    snr = snr_of([0.5, 1.0])
    got = weighting.flow_weight(snr, strategy, terminal_weight=0.7)
    want_last = 1.0 if strategy == "constant" else 0.7
    np.testing.assert_allclose(got, [reference_flow_weight(strategy, 0.5), want_last], rtol=1e-12)


# -- ODE samplers ---------------------------------------------------------------------------


def gaussian_velocity(params, x, t):
    """The exact optimal velocity E[ε − x₀ | x_t = x] for data x₀ ~ N(μ, σ²).

    x_t is Gaussian with mean m_t = (1−t)μ and variance v_t = (1−t)²σ² + t²;
    Cov(ε, x_t) = t and Cov(x₀, x_t) = (1−t)σ², so
    u*(x, t) = (t − (1−t)σ²)/v_t · (x − m_t) − μ, and x(t) = m_t + √v_t·z solves dx/dt = u*.
    """
    mu, sigma = params
    t = ops.reshape(t, (-1, 1))
    var = (1 - t) ** 2 * sigma**2 + t**2
    return (t - (1 - t) * sigma**2) / var * (x - (1 - t) * mu) - mu


def gaussian_slope(t, sigma):
    return (t - (1 - t) * sigma**2) / ((1 - t) ** 2 * sigma**2 + t**2)


def standard_noise(n=4096):
    """Exactly mean 0 and std 1: the ODE map is affine, so the outcome has no sampling error."""
    z = np.random.default_rng(0).standard_normal((n, 1))
    return (z - z.mean()) / z.std()


GAUSSIANS = [(1.5, 0.3), (-0.5, 2.0)]


@pytest.fixture(scope="module")
def gaussian_steps():
    return flow.make_flow_step_functions(gaussian_velocity)


def run_gaussian(steps, mu, sigma, sampler, num_steps, shift):
    params = (ops.convert_to_tensor(mu, "float32"), ops.convert_to_tensor(sigma, "float32"))
    x = flow.sample_flow(
        steps, params, (4096, 1), sampler, num_steps, shift, noise=standard_noise()
    )
    assert x.dtype == np.float32 and x.shape == (4096, 1)
    return x.astype(np.float64)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("mu,sigma", GAUSSIANS)
def test_euler_and_heun_reproduce_gaussian_mean_and_std(gaussian_steps, mu, sigma, shift):
    errors = {}
    for sampler in flow.FLOW_SAMPLERS:
        for n in (16, 32):
            x = run_gaussian(gaussian_steps, mu, sigma, sampler, n, shift)
            # The mean follows dm/dt = −μ exactly, which Euler integrates without error.
            assert abs(x.mean() - mu) < 1e-5 * (1 + abs(mu))
            errors[sampler, n] = abs(x.std() - sigma) / sigma
    # Tolerances at 32 steps (measured: Euler 4-13 %, Heun 0.06-4.3 %, the larger values
    # with shift 3, which spends its steps near the noise while these data are sharp).
    assert errors["euler", 32] < 0.15
    assert errors["heun", 32] < 0.05
    assert errors["heun", 32] < 0.5 * errors["euler", 32]
    if shift == 1.0:
        # Orders: halving the step halves Euler's error and quarters Heun's.
        assert 1.6 < errors["euler", 16] / errors["euler", 32] < 2.4
        assert errors["heun", 16] / errors["heun", 32] > 3.0


@pytest.mark.parametrize("sampler", flow.FLOW_SAMPLERS)
def test_steps_match_the_float64_recursion(gaussian_steps, sampler):
    """Each step scales the spread by 1 + h·a(t) (Euler) or 1 + h/2·(a + a'(1 + h·a)) (Heun)."""
    mu, sigma, n, shift = 1.5, 0.3, 8, 3.0
    times = [shift * u / (1 + (shift - 1) * u) for u in np.linspace(1.0, 0.0, n + 1)]
    scale = 1.0
    for k in range(n):
        t, t_next = times[k], times[k + 1]
        h, a = t_next - t, gaussian_slope(t, sigma)
        if sampler == "euler" or k == n - 1:
            scale *= 1 + h * a
        else:
            scale *= 1 + 0.5 * h * (a + gaussian_slope(t_next, sigma) * (1 + h * a))
    x = run_gaussian(gaussian_steps, mu, sigma, sampler, n, shift)
    assert x.std() == pytest.approx(abs(scale), rel=1e-5)


def test_velocity_is_never_asked_at_t_zero():
    def velocity(params, x, t):
        t = ops.reshape(t, (-1, 1))
        return ops.where(t == 0.0, float("nan"), -x)

    steps = flow.make_flow_step_functions(velocity)
    for sampler in flow.FLOW_SAMPLERS:
        x = flow.sample_flow(steps, None, (3, 2), sampler, num_steps=4, seed=0)
        assert np.all(np.isfinite(x))
    assert flow.num_flow_calls("heun", 4) == 7 and flow.num_flow_calls("euler", 4) == 4


def test_time_grid_is_shifted_from_one_to_zero():
    grid = flow.flow_time_grid(4, shift=3.0)
    want = [3 * u / (1 + 2 * u) for u in (1.0, 0.75, 0.5, 0.25, 0.0)]
    np.testing.assert_allclose(grid, want, rtol=1e-15)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1, got 0"):
        flow.flow_time_grid(0)


# -- the compiled loop ----------------------------------------------------------------------


def wavy_velocity(params, x, t):
    """Not affine in x or t, so a wrong time, step or step count changes the result."""
    scale = params
    t = ops.reshape(t, (-1,) + (1,) * (len(x.shape) - 1))
    return scale * (ops.sin(2.0 * x + 3.0 * t) - x)


def wavy_reference(x, sampler, num_steps, shift, scale):
    """Euler / Heun (last step Euler) in float64 numpy, written from the formulas."""
    u = lambda x, t: scale * (np.sin(2.0 * x + 3.0 * t) - x)  # noqa: E731
    grid = [shift * s / (1 + (shift - 1) * s) for s in np.linspace(1.0, 0.0, num_steps + 1)]
    for k in range(num_steps):
        t, t_next = grid[k], grid[k + 1]
        h, d = t_next - t, u(x, t)
        if sampler == "euler" or k == num_steps - 1:
            x = x + h * d
        else:
            x = x + 0.5 * h * (d + u(x + h * d, t_next))
    return x


class CountingProgress:
    def __init__(self):
        self.seen = []

    def update(self, current):
        self.seen.append(current)


@pytest.mark.parametrize("sampler", flow.FLOW_SAMPLERS)
@pytest.mark.parametrize("num_steps", [1, 2, 9])
def test_compiled_loop_and_per_step_path_match_the_float64_reference(sampler, num_steps):
    steps = flow.make_flow_step_functions(wavy_velocity)
    shape = (3, 4, 2)
    noise = np.random.default_rng(4).standard_normal(shape)
    scale = ops.convert_to_tensor(0.7, "float32")
    want = wavy_reference(noise, sampler, num_steps, 3.0, 0.7)
    for loop in (True, False):
        for progress in (None, CountingProgress()):
            x = flow.sample_flow(steps, scale, shape, sampler, num_steps, shift=3.0,
                                 noise=noise, progress=progress, loop=loop)
            assert x.dtype == np.float32 and x.shape == shape
            np.testing.assert_allclose(x, want, rtol=0, atol=2e-5)
            if progress is not None:
                assert progress.seen[-1] == num_steps
                assert progress.seen == sorted(set(progress.seen))


def test_flow_sampling_is_one_compiled_loop_not_one_call_per_step(monkeypatch):
    """Euler: one compiled call for any number of steps; Heun: its loop and the last
    (Euler) step."""
    calls = count_compiled_calls(monkeypatch, flow, samplers)
    steps = flow.make_flow_step_functions(wavy_velocity)
    scale = ops.convert_to_tensor(0.5, "float32")
    for sampler, expected in (("euler", ["euler_step_loop"]),
                              ("heun", ["heun_step_loop", "euler_step"])):
        calls.clear()
        flow.sample_flow(steps, scale, (2, 3), sampler, num_steps=30, seed=0)
        assert calls == expected, (sampler, calls)
