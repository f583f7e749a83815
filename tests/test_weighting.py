"""loss_weight against the DESIGN.md §2 table, written out by hand for every target."""

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


LIMITS_AT_ZERO = {
    # (strategy, target): the limit as s -> 0+
    ("min_snr", "epsilon"): 1.0,
    ("soft_min_snr", "epsilon"): 1.0,
    ("min_snr", "v_prediction"): 0.0,
    ("min_snr", "sample"): 0.0,
    ("snr", "epsilon"): 1.0,
    ("snr", "v_prediction"): 0.0,
    ("trunc_snr", "v_prediction"): 1.0,
    ("max_snr", "v_prediction"): G,
    ("soft_min_snr", "v_prediction"): 0.0,
    ("p2", "epsilon"): 1.0 / K**PG,
    ("p2", "v_prediction"): 0.0,
    ("debiased", "v_prediction"): 0.0,
    ("constant", "epsilon"): 1.0,
}
DIVERGENT_AT_ZERO = [
    ("trunc_snr", "epsilon"),
    ("max_snr", "epsilon"),
    ("inv_snr", "epsilon"),
    ("inv_snr", "sample"),
    ("inv_snr", "v_prediction"),
    ("debiased", "epsilon"),
]


@pytest.mark.parametrize("strategy", kms.STRATEGIES)
@pytest.mark.parametrize("target", kms.PREDICTION_TYPES)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_finite_at_zero_and_huge_snr(strategy, target, as_tensor):
    snr = np.array([0.0, 1e-30, 1e12])
    x = ops.convert_to_tensor(snr, "float32") if as_tensor else snr
    w = ops.convert_to_numpy(kms.loss_weight(x, strategy, target, gamma=G))
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    if (strategy, target) in LIMITS_AT_ZERO:
        assert w[0] == pytest.approx(LIMITS_AT_ZERO[(strategy, target)], abs=1e-12)
    if (strategy, target) in DIVERGENT_AT_ZERO:
        assert w[0] == kms.weighting.DEFAULT_MAX_WEIGHT


def test_zero_terminal_schedule_gives_finite_weights():
    sched = kms.NoiseSchedule("scaled_linear", zero_terminal_snr=True)
    snr = sched.snr(np.arange(1000))
    assert snr[-1] == 0
    for strategy in kms.STRATEGIES:
        for target in kms.PREDICTION_TYPES:
            w = kms.loss_weight(snr, strategy, target)
            assert np.all(np.isfinite(w)), (strategy, target)


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
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
