"""Timestep densities: tables against closed-form CDFs, draws against tables."""

import math

import keras
import numpy as np
import pytest
from keras import ops
from scipy import optimize
from scipy import stats

import keras_minsnr as kms
from keras_minsnr.flow import FlowMatchingSchedule
from keras_minsnr.timestep_sampling import TimestepSampling
from keras_minsnr.timestep_sampling import get

T = 40
SCHEDULES = {
    "flow": FlowMatchingSchedule(num_timesteps=T),
    "flow_shift3": FlowMatchingSchedule(num_timesteps=T, shift=3.0),
    "cosine": kms.NoiseSchedule("cosine", num_timesteps=T),
    "linear_zero_snr": kms.NoiseSchedule("linear", num_timesteps=T, zero_terminal_snr=True),
}


def normal_cdf(z):
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def logit_normal_cdf(u, m, s):
    if u <= 0.0:
        return 0.0
    if u >= 1.0:
        return 1.0
    return normal_cdf((math.log(u / (1.0 - u)) - m) / s)


def mode_cdf(u, scale):
    """P(f(V) <= u) = 1 - f^-1(u) for V uniform; f inverted with scipy's brentq."""
    f = lambda v: 1 - v - scale * (math.cos(math.pi * v / 2) ** 2 - 1 + v)  # noqa: E731
    if u <= 0.0:
        return 0.0
    if u >= 1.0:
        return 1.0
    return 1.0 - optimize.brentq(lambda v: f(v) - u, 0.0, 1.0, xtol=1e-15, rtol=1e-15)


def laplace_cdf(x, mu, b):
    if x == -math.inf:
        return 0.0
    if x == math.inf:
        return 1.0
    if x < mu:
        return 0.5 * math.exp((x - mu) / b)
    return 1.0 - 0.5 * math.exp(-(x - mu) / b)


def reference_table(kind, schedule, **p):
    """Probability of each step's cell, from plain-Python CDFs (see the module docstring)."""
    n = schedule.num_timesteps
    if kind == "uniform":
        return np.full(n, 1.0 / n)
    if kind == "laplace":
        lam = [math.log(s) if s > 0 else -math.inf for s in schedule.snr(np.arange(n))]
        hi = [math.inf] + lam[:-1]
        lo = lam[:-1] + [-math.inf]
        F = lambda x: laplace_cdf(x, p["laplace_mu"], p["laplace_b"])  # noqa: E731
        return np.array([F(h) - F(l_) for l_, h in zip(lo, hi)])
    if kind == "logit_normal":
        F = lambda u: logit_normal_cdf(u, p["logit_mean"], p["logit_std"])  # noqa: E731
    else:
        F = lambda u: mode_cdf(u, p["mode_scale"])  # noqa: E731
    return np.array([F((i + 1) / n) - F(i / n) for i in range(n)])


CASES = [
    ("uniform", {}),
    ("logit_normal", {"logit_mean": 0.0, "logit_std": 1.0}),
    ("logit_normal", {"logit_mean": -0.7, "logit_std": 0.4}),
    ("mode", {"mode_scale": 1.29}),
    ("mode", {"mode_scale": -0.5}),
    ("laplace", {"laplace_mu": 0.0, "laplace_b": 0.5}),
    ("laplace", {"laplace_mu": 2.0, "laplace_b": 1.5}),
]


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("kind,params", CASES)
def test_table_matches_closed_form_cdf(kind, params, schedule_name):
    schedule = SCHEDULES[schedule_name]
    got = TimestepSampling(kind, **params).probabilities(schedule)
    assert got.dtype == np.float64 and got.shape == (schedule.num_timesteps,)
    want = reference_table(kind, schedule, **params)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(got >= 0)


def test_logit_normal_on_the_flow_is_a_normal_in_log_snr():
    """logit(t) = −λ/2, so logit-normal(m, s) in t is N(−2m, (2s)²) in log SNR."""
    schedule = FlowMatchingSchedule(num_timesteps=T)
    got = TimestepSampling("logit_normal", logit_mean=0.3, logit_std=0.8).probabilities(schedule)
    lam = np.concatenate([[np.inf], schedule.log_snr(np.arange(T))])
    lam[-1] = -np.inf
    cdf = stats.norm(loc=-0.6, scale=1.6).cdf
    np.testing.assert_allclose(got, cdf(lam[:-1]) - cdf(lam[1:]), rtol=1e-9, atol=1e-15)


def test_laplace_tails_keep_relative_precision():
    """A cell far in the upper tail: the table must not lose it to 1 − (1 − tiny)."""
    schedule = kms.NoiseSchedule("cosine", num_timesteps=1000)
    table = TimestepSampling("laplace", laplace_b=0.25).probabilities(schedule)
    lam = schedule.log_snr(np.arange(2))
    want = 0.5 * (math.exp(-lam[1] / 0.25) - math.exp(-lam[0] / 0.25))  # step 1's cell
    assert table[1] == pytest.approx(want, rel=1e-9)


class DrawSteps(keras.layers.Layer):
    """Draws steps inside a compiled `predict` (a traced function on both backends)."""

    def __init__(self, sampling, **kwargs):
        super().__init__(**kwargs)
        self.sampling = sampling
        self.seed_generator = keras.random.SeedGenerator(7)

    def call(self, x):
        return self.sampling.sample(ops.shape(x)[0], self.seed_generator)


@pytest.mark.parametrize(
    "kind,params,schedule_name",
    [
        ("logit_normal", {"logit_mean": 0.5, "logit_std": 1.0}, "flow_shift3"),
        ("mode", {"mode_scale": 1.29}, "flow"),
        ("laplace", {"laplace_mu": 0.0, "laplace_b": 0.5}, "cosine"),
        ("uniform", {}, "cosine"),
    ],
)
def test_draws_inside_a_compiled_step_follow_the_table(kind, params, schedule_name):
    schedule = SCHEDULES[schedule_name]
    sampling = TimestepSampling(kind, **params).build(schedule)
    model = keras.Sequential([keras.Input((1,)), DrawSteps(sampling)])
    n, batch = 20000, 2000
    steps = model.predict(np.zeros((n, 1), "float32"), batch_size=batch, verbose=0)
    steps = np.asarray(steps).reshape(-1)
    assert steps.dtype == np.int32 and steps.shape == (n,)
    # Each batch is a fresh draw (the seed generator advances inside the traced step).
    assert not np.array_equal(steps[:batch], steps[batch : 2 * batch])

    table = sampling.probabilities(schedule)
    counts = np.bincount(steps, minlength=schedule.num_timesteps)
    assert np.all(counts[table == 0] == 0)
    # Chi-square on cells merged until each expects >= 20 draws; fixed seed, so the
    # verdict is deterministic. p > 1e-3: drawing from the mirrored table fails it for
    # the asymmetric densities here (logit_normal with mean 0.5, laplace).
    expected = table * n
    groups, acc = np.zeros_like(expected, dtype=int), 0.0
    g = 0
    for i, e in enumerate(expected):
        groups[i] = g
        acc += e
        if acc >= 20:
            g, acc = g + 1, 0.0
    groups[groups == g] = max(g - 1, 0)  # fold a small remainder into the last group
    obs = np.bincount(groups, weights=counts)
    exp = np.bincount(groups, weights=expected)
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    # The step CDF against the table's CDF too (KS distance, 1.63/sqrt(n) is its 1% level).
    assert np.max(np.abs(np.cumsum(counts) / n - np.cumsum(table))) < 1.63 / math.sqrt(n)


def test_serialisation_round_trip():
    sampling = TimestepSampling("laplace", laplace_mu=1.0, laplace_b=0.75)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(sampling))
    assert isinstance(restored, TimestepSampling)
    assert restored.get_config() == {"kind": "laplace", "laplace_mu": 1.0, "laplace_b": 0.75}
    schedule = SCHEDULES["cosine"]
    want = sampling.probabilities(schedule)
    np.testing.assert_array_equal(restored.probabilities(schedule), want)
    assert get(sampling.get_config()).get_config() == sampling.get_config()
    assert get("mode").get_config() == {"kind": "mode", "mode_scale": 1.29}


def test_bad_arguments_say_what_is_allowed():
    with pytest.raises(ValueError, match="kind 'normal'. Allowed: uniform, logit_normal"):
        TimestepSampling("normal")
    with pytest.raises(ValueError, match=r"\['b'\] for timestep sampling 'laplace'.*laplace_b"):
        TimestepSampling("laplace", b=0.5)
    with pytest.raises(ValueError, match="logit_std must be > 0, got 0.0"):
        TimestepSampling("logit_normal", logit_std=0)
    with pytest.raises(ValueError, match="mode_scale must lie in .* got 2.0"):
        TimestepSampling("mode", mode_scale=2.0)
    with pytest.raises(ValueError, match="call build"):
        TimestepSampling("mode").sample(4, keras.random.SeedGenerator(0))
    with pytest.raises(ValueError, match="Cannot interpret 3"):
        get(3)
