"""loss_weight against the table in `keras_minsnr.weighting`, written out by hand for every target."""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

import keras_minsnr as kms

G = 5.0  # gamma
K, PG = 1.0, 1.0  # p2_k, p2_gamma

# Hand-derived weights in each target's own space (float64, for s > 0).
EXPECTED = {
    "constant": {
        "sample": lambda s: np.ones_like(s),
        "epsilon": lambda s: np.ones_like(s),
        "v_prediction": lambda s: np.ones_like(s),
    },
    "snr": {
        "sample": lambda s: s,
        "epsilon": lambda s: np.ones_like(s),
        "v_prediction": lambda s: s / (s + 1),
    },
    "trunc_snr": {
        "sample": lambda s: np.maximum(s, 1),
        "epsilon": lambda s: np.maximum(s, 1) / s,
        "v_prediction": lambda s: np.maximum(s, 1) / (s + 1),
    },
    "max_snr": {
        "sample": lambda s: np.maximum(s, G),
        "epsilon": lambda s: np.maximum(s, G) / s,
        "v_prediction": lambda s: np.maximum(s, G) / (s + 1),
    },
    "min_snr": {
        "sample": lambda s: np.minimum(s, G),
        "epsilon": lambda s: np.minimum(1, G / s),
        "v_prediction": lambda s: np.minimum(s, G) / (s + 1),
    },
    "soft_min_snr": {
        "sample": lambda s: s * G / (s + G),
        "epsilon": lambda s: G / (s + G),
        "v_prediction": lambda s: s * G / ((s + G) * (s + 1)),
    },
    "inv_snr": {
        "sample": lambda s: 1 / s,
        "epsilon": lambda s: 1 / s**2,
        "v_prediction": lambda s: 1 / (s * (s + 1)),
    },
    "p2": {
        "sample": lambda s: s / (K + s) ** PG,
        "epsilon": lambda s: 1 / (K + s) ** PG,
        "v_prediction": lambda s: s / ((K + s) ** PG * (s + 1)),
    },
    "debiased": {
        "sample": lambda s: np.sqrt(s),
        "epsilon": lambda s: 1 / np.sqrt(s),
        "v_prediction": lambda s: np.sqrt(s) / (s + 1),
    },
}

# A spread of SNRs where no clamp is active (weights stay far below 1e5).
SNRS = np.geomspace(1e-2, 1e4, 61)


@pytest.mark.parametrize("strategy", kms.STRATEGIES)
@pytest.mark.parametrize("target", kms.PREDICTION_TYPES)
def test_every_strategy_and_target_matches_table(strategy, target):
    got = kms.loss_weight(SNRS, strategy, target, gamma=G)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    np.testing.assert_allclose(got, EXPECTED[strategy][target](SNRS), rtol=1e-12)

    # Same numbers from tensors, in float32.
    got_t = kms.loss_weight(ops.convert_to_tensor(SNRS, "float32"), strategy, target, gamma=G)
    assert ops.is_tensor(got_t)
    assert keras.backend.standardize_dtype(got_t.dtype) == "float32"
    np.testing.assert_allclose(
        ops.convert_to_numpy(got_t), EXPECTED[strategy][target](SNRS), rtol=2e-5
    )


def test_paper_values_on_cosine_schedule():
    # Min-SNR-5 with epsilon: min(SNR, 5) / SNR, over the real cosine SNRs.
    snr = kms.NoiseSchedule("cosine").snr(np.arange(1000))
    w = kms.loss_weight(snr, "min_snr", "epsilon", gamma=5.0)
    assert np.all(w[snr <= 5] == 1.0)
    np.testing.assert_allclose(w[snr > 5], 5.0 / snr[snr > 5], rtol=1e-12)


positive_snr = st.floats(min_value=1e-3, max_value=1e5, allow_nan=False)
gammas = st.floats(min_value=0.1, max_value=50.0)


@settings(max_examples=200, deadline=None)
@given(s=positive_snr, gamma=gammas, strategy=st.sampled_from(kms.STRATEGIES[1:]))
def test_target_space_identities(s, gamma, strategy):
    """w_epsilon * s == w_sample and w_v * (s + 1) == w_sample (away from the clamp)."""
    kw = dict(gamma=gamma, max_weight=1e300)
    w_sample = kms.loss_weight(s, strategy, "sample", **kw)
    w_eps = kms.loss_weight(s, strategy, "epsilon", **kw)
    w_v = kms.loss_weight(s, strategy, "v_prediction", **kw)
    np.testing.assert_allclose(w_eps * s, w_sample, rtol=1e-10)
    np.testing.assert_allclose(w_v * (s + 1), w_sample, rtol=1e-10)


@settings(max_examples=100, deadline=None)
@given(s=positive_snr, gamma=gammas)
def test_min_snr_v_prediction_is_not_the_shipped_wrong_forms(s, gamma):
    ours = kms.loss_weight(s, "min_snr", "v_prediction", gamma=gamma)
    np.testing.assert_allclose(ours, min(s, gamma) / (s + 1), rtol=1e-12)
    wrong_a = min(s + 1, gamma) / (s + 1)
    wrong_b = min(s, gamma) / s + 1
    # wrong_b always exceeds ours by more than 1; wrong_a differs wherever s < gamma.
    assert wrong_b - ours > 1
    # wrong_a overweights every step with s < gamma by min(1, gamma - s) / (s + 1).
    if s < gamma:
        assert wrong_a - ours >= min(1.0, gamma - s) / (s + 1) * (1 - 1e-9)


def test_wrong_forms_differ_at_a_known_point():
    # s = 1, gamma = 5: ours 1/2; min(s+1, g)/(s+1) = 1; min(s, g)/s + 1 = 2.
    assert kms.loss_weight(1.0, "min_snr", "v_prediction", gamma=5.0) == 0.5


# The limit of every weight as s -> 0+, derived by hand from the table above (inf where
# the weight diverges; the code clamps those at max_weight).
LIMITS_AT_ZERO = {
    ("constant", "sample"): 1.0, ("constant", "epsilon"): 1.0,
    ("constant", "v_prediction"): 1.0,
    ("snr", "sample"): 0.0, ("snr", "epsilon"): 1.0, ("snr", "v_prediction"): 0.0,
    ("trunc_snr", "sample"): 1.0, ("trunc_snr", "epsilon"): np.inf,
    ("trunc_snr", "v_prediction"): 1.0,
    ("max_snr", "sample"): G, ("max_snr", "epsilon"): np.inf, ("max_snr", "v_prediction"): G,
    ("min_snr", "sample"): 0.0, ("min_snr", "epsilon"): 1.0, ("min_snr", "v_prediction"): 0.0,
    ("soft_min_snr", "sample"): 0.0, ("soft_min_snr", "epsilon"): 1.0,
    ("soft_min_snr", "v_prediction"): 0.0,
    ("inv_snr", "sample"): np.inf, ("inv_snr", "epsilon"): np.inf,
    ("inv_snr", "v_prediction"): np.inf,
    ("p2", "sample"): 0.0, ("p2", "epsilon"): 1.0 / K**PG, ("p2", "v_prediction"): 0.0,
    ("debiased", "sample"): 0.0, ("debiased", "epsilon"): np.inf,
    ("debiased", "v_prediction"): 0.0,
}


@pytest.mark.parametrize("strategy", kms.STRATEGIES)
@pytest.mark.parametrize("target", kms.PREDICTION_TYPES)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_finite_at_zero_and_huge_snr(strategy, target, as_tensor):
    snr = np.array([0.0, 1e-30, 1e12])
    x = ops.convert_to_tensor(snr, "float32") if as_tensor else snr
    w = ops.convert_to_numpy(
        kms.loss_weight(x, strategy, target, gamma=G, terminal_weight="limit")
    )
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    limit = min(LIMITS_AT_ZERO[(strategy, target)], kms.weighting.DEFAULT_MAX_WEIGHT)
    assert w[0] == pytest.approx(limit, abs=1e-12)


def test_zero_terminal_schedule_gives_finite_weights():
    sched = kms.NoiseSchedule("scaled_linear", zero_terminal_snr=True)
    snr = sched.snr(np.arange(1000))
    assert snr[-1] == 0
    for strategy in kms.STRATEGIES:
        for target in kms.PREDICTION_TYPES:
            w = kms.loss_weight(snr, strategy, target)
            assert np.all(np.isfinite(w)), (strategy, target)


def reference_weights(snr, strategy, target, terminal_weight, gamma=G, max_weight=1e5):
    """float64: the table's weight for s > 0 clamped at max_weight; at s = 0 the official
    code's 1 (or the given number), or the hand-derived limit of `LIMITS_AT_ZERO`."""
    snr = np.asarray(snr, dtype=np.float64)
    expected = EXPECTED[strategy][target]
    if gamma != G:  # only the official-default check below uses another γ
        raise AssertionError("the EXPECTED table is written for γ = 5")
    out = np.empty_like(snr)
    pos = snr > 0
    out[pos] = np.minimum(expected(snr[pos]), max_weight)
    if terminal_weight == "limit":
        out[~pos] = min(LIMITS_AT_ZERO[(strategy, target)], max_weight)
    else:
        out[~pos] = terminal_weight
    return out


ZERO_TERMINAL_SNRS = [
    kms.NoiseSchedule(name, num_timesteps=1000, zero_terminal_snr=True).snr(np.arange(1000))
    for name in ("cosine", "scaled_linear")
]


@pytest.mark.parametrize("strategy", kms.STRATEGIES)
@pytest.mark.parametrize("target", kms.PREDICTION_TYPES)
@pytest.mark.parametrize("terminal_weight", [None, "limit", 0.25])
def test_terminal_weight_on_zero_terminal_schedules(strategy, target, terminal_weight):
    """Default (None here): weight 1 at SNR = 0, as the official code sets it
    (``mse_loss_weight[snr == 0] = 1.0`` in its training_losses); "limit" gives the
    formula's own limit (clamped at max_weight where it diverges)."""
    kwargs = {} if terminal_weight is None else {"terminal_weight": terminal_weight}
    want_terminal = 1.0 if terminal_weight is None else terminal_weight
    for snr in ZERO_TERMINAL_SNRS:
        assert snr[-1] == 0 and np.all(snr[:-1] > 0)
        want = reference_weights(snr, strategy, target, want_terminal)
        got = kms.loss_weight(snr, strategy, target, gamma=G, **kwargs)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
        got_t = kms.loss_weight(ops.convert_to_tensor(snr, "float32"), strategy, target, **kwargs)
        got_t = ops.convert_to_numpy(got_t)
        assert np.all(np.isfinite(got_t))
        # float32 SNRs: relative error ~1e-7 per operation, a few operations deep.
        np.testing.assert_allclose(got_t, want, rtol=2e-5, atol=0)
        weighting = kms.weighting.get(strategy, gamma=G, **kwargs)
        np.testing.assert_allclose(weighting(snr, target), want, rtol=1e-12, atol=0)


def test_min_snr_trains_the_terminal_step_by_default():
    """Min-SNR-5 with the x0 or v target: weight 1 at SNR = 0 (official code), 0 as a limit."""
    snr = np.array([0.0, 2.0])
    for target in ("sample", "v_prediction"):
        assert kms.loss_weight(snr, "min_snr", target)[0] == 1.0
        assert kms.loss_weight(snr, "min_snr", target, terminal_weight="limit")[0] == 0.0
    assert kms.loss_weight(snr, "min_snr", "v_prediction")[1] == 2.0 / 3.0


def test_terminal_weight_is_serialised():
    for value in ("limit", 0.5, 1.0):
        w = kms.weighting.get("min_snr", terminal_weight=value)
        assert w.get_config()["terminal_weight"] == value
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(w))
        assert restored.get_config() == w.get_config()
        assert restored(np.array([0.0]), "sample")[0] == (0.0 if value == "limit" else value)
    assert kms.weighting.LossWeighting().terminal_weight == 1.0


def test_no_gradient_flows_through_the_weight():
    snr = ops.convert_to_tensor([0.5, 2.0, 10.0], "float32")
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(snr)
            total = ops.sum(kms.loss_weight(snr, "min_snr", "sample") * snr)
        grad = tape.gradient(total, snr)
    else:
        import jax

        grad = jax.grad(lambda s: ops.sum(kms.loss_weight(s, "min_snr", "sample") * s))(snr)
    # d/ds [stop_gradient(w(s)) * s] = w(s) = min(s, 5).
    np.testing.assert_allclose(ops.convert_to_numpy(grad), [0.5, 2.0, 5.0], rtol=1e-6)


def test_weighting_object_and_serialisation():
    w = kms.weighting.get("min_snr", gamma=3.0)
    assert w(np.array([1.0, 6.0]), "epsilon").tolist() == [1.0, 0.5]
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(w))
    assert restored.get_config() == w.get_config()
    assert kms.weighting.get(w) is w
    assert kms.weighting.get({"strategy": "p2", "p2_k": 2.0}).p2_k == 2.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: kms.loss_weight(1.0, "minsnr"), "'minsnr'.*min_snr"),
        (lambda: kms.loss_weight(1.0, "min_snr", "eps"), "'eps'.*epsilon, sample, v_prediction"),
        (lambda: kms.loss_weight(1.0, "min_snr", gamma=0), "gamma.*> 0.*0"),
        (lambda: kms.loss_weight(1.0, "min_snr", gamma=-5), "gamma.*-5"),
        (lambda: kms.loss_weight(1.0, "p2", p2_k=0.0), "p2_k"),
        (lambda: kms.loss_weight(np.array([1.0, -2.0]), "min_snr"), r"-2\.0"),
        (lambda: kms.loss_weight(np.array([np.nan]), "min_snr"), "nan"),
        (lambda: kms.weighting.get("min_snr", gama=5), "gama.*gamma"),
        (lambda: kms.weighting.get(3), "3"),
        (lambda: kms.loss_weight(0.0, "min_snr", terminal_weight=-1.0), "terminal_weight.*-1.0"),
        (lambda: kms.loss_weight(0.0, "min_snr", terminal_weight="lim"), "'limit'.*'lim'"),
        (lambda: kms.weighting.get("min_snr", terminal_weight=np.nan), "terminal_weight.*nan"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("as_tensor", [False, True])
def test_flow_target_is_min_snr_in_velocity_space(as_tensor):
    # Rectified flow: SNR(t) = (1 − t)²/t² and Min-SNR-γ on the velocity is
    # min((1 − t)², γ·t²); t = 1 (SNR 0) takes the terminal weight.
    t = np.array([1e-6, 0.1, 0.3, 0.5, 0.9, 1 - 1e-6])
    snr = ((1 - t) / t) ** 2
    expected = np.minimum((1 - t) ** 2, 5.0 * t**2)
    weighting = kms.weighting.get("min_snr", gamma=5.0)
    value = weighting(ops.convert_to_tensor(snr, "float32") if as_tensor else snr, "flow")
    np.testing.assert_allclose(ops.convert_to_numpy(value), expected, rtol=1e-5 if as_tensor
                               else 1e-12, atol=1e-12)
    assert float(kms.loss_weight(np.array(0.0), "min_snr", "flow")) == 1.0
    assert float(kms.loss_weight(np.array(0.0), "min_snr", "flow", terminal_weight="limit")) == 0
