"""NoiseSchedule against float64 references written here from the papers' formulas."""

import math

import keras
import numpy as np
import pytest
from keras import ops

import keras_minsnr as kms


def reference_betas(name, T):
    """Plain-Python float64 betas (DDPM, Stable Diffusion, improved DDPM)."""
    if name == "linear":
        lo, hi = 1e-4 * 1000 / T, 0.02 * 1000 / T
        return [lo + (hi - lo) * i / (T - 1) for i in range(T)]
    if name == "scaled_linear":
        lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
        return [(lo + (hi - lo) * i / (T - 1)) ** 2 for i in range(T)]
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]


def reference_alphas_cumprod(name, T):
    out, acc = [], 1.0
    for beta in reference_betas(name, T):
        acc *= 1.0 - beta
        out.append(acc)
    return np.array(out)


@pytest.mark.parametrize("name", kms.SCHEDULES)
@pytest.mark.parametrize("T", [1000, 37])
def test_alphas_cumprod_match_reference(name, T):
    sched = kms.NoiseSchedule(name, num_timesteps=T)
    assert sched.alphas_cumprod.dtype == np.float64
    assert sched.alphas_cumprod.shape == (T,)
    np.testing.assert_allclose(
        sched.alphas_cumprod, reference_alphas_cumprod(name, T), rtol=1e-12, atol=0
    )
    ac = reference_alphas_cumprod(name, T)
    t = np.arange(T)
    np.testing.assert_allclose(sched.snr(t), ac / (1 - ac), rtol=1e-10)


def test_known_values():
    # DDPM linear: beta_0 = 1e-4, beta_999 = 0.02.
    sched = kms.NoiseSchedule("linear")
    assert sched.betas[0] == pytest.approx(1e-4, rel=1e-12)
    assert sched.betas[-1] == pytest.approx(0.02, rel=1e-12)
    # SD scaled_linear ends at 0.012, starts at 0.00085.
    sd = kms.NoiseSchedule("scaled_linear")
    assert sd.betas[0] == pytest.approx(0.00085, rel=1e-12)
    assert sd.betas[-1] == pytest.approx(0.012, rel=1e-12)
    # Cosine: the last beta hits the 0.999 clip.
    cos = kms.NoiseSchedule("cosine")
    assert cos.betas[-1] == pytest.approx(0.999)


@pytest.mark.parametrize("name", kms.SCHEDULES)
@pytest.mark.parametrize("T", [1000, 50])
def test_zero_terminal_snr(name, T):
    plain = kms.NoiseSchedule(name, num_timesteps=T)
    zt = kms.NoiseSchedule(name, num_timesteps=T, zero_terminal_snr=True)
    assert zt.snr(T - 1) == 0.0
    np.testing.assert_allclose(zt.snr(0), plain.snr(0), rtol=1e-9)
    # Lin et al. Algorithm 1, written out: shift sqrt(abar) to end at 0, rescale to keep
    # the first value.
    root = np.sqrt(reference_alphas_cumprod(name, T))
    expected = ((root - root[-1]) * root[0] / (root[0] - root[-1])) ** 2
    np.testing.assert_allclose(zt.alphas_cumprod, expected, rtol=1e-10, atol=1e-300)
    assert np.all(np.diff(zt.alphas_cumprod) < 0)
    # betas stay consistent with the rescaled cumulative product
    np.testing.assert_allclose(np.cumprod(1 - zt.betas), zt.alphas_cumprod, atol=1e-12)


def test_tensor_in_tensor_out():
    sched = kms.NoiseSchedule("cosine")
    t = np.array([0, 10, 500, 999])
    out_np = sched.snr(t)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float64
    out_tensor = sched.snr(ops.convert_to_tensor(t, dtype="int32"))
    assert ops.is_tensor(out_tensor)
    assert keras.backend.standardize_dtype(out_tensor.dtype) == "float32"
    ac = reference_alphas_cumprod("cosine", 1000)[t]
    np.testing.assert_allclose(ops.convert_to_numpy(out_tensor), ac / (1 - ac), rtol=1e-6)


def test_add_noise_target_and_conversions():
    rng = np.random.default_rng(0)
    sched = kms.NoiseSchedule("cosine", num_timesteps=1000)
    t = np.array([0, 123, 600, 998])
    x0 = rng.normal(size=(4, 3, 3, 2))
    eps = rng.normal(size=(4, 3, 3, 2))
    ac = reference_alphas_cumprod("cosine", 1000)[t][:, None, None, None]
    a, s = np.sqrt(ac), np.sqrt(1 - ac)
    x_t = a * x0 + s * eps
    v = a * eps - s * x0
    np.testing.assert_allclose(sched.add_noise(x0, eps, t), x_t, rtol=1e-12)
    np.testing.assert_allclose(sched.target(x0, eps, t, "epsilon"), eps)
    np.testing.assert_allclose(sched.target(x0, eps, t, "sample"), x0)
    np.testing.assert_allclose(sched.target(x0, eps, t, "v_prediction"), v, rtol=1e-12)
    truths = {"epsilon": eps, "sample": x0, "v_prediction": v}
    for src, pred in truths.items():
        for dst, want in truths.items():
            got = sched.convert_prediction(x_t, pred, t, src, dst)
            np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-7, err_msg=f"{src}->{dst}")
    # The same through keras tensors (float32).
    got = sched.convert_prediction(
        ops.convert_to_tensor(x_t, "float32"),
        ops.convert_to_tensor(v, "float32"),
        ops.convert_to_tensor(t, "int32"),
        "v_prediction",
        "epsilon",
    )
    np.testing.assert_allclose(ops.convert_to_numpy(got), eps, atol=1e-4)


def test_config_round_trip():
    sched = kms.NoiseSchedule("scaled_linear", num_timesteps=100, zero_terminal_snr=True)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(sched))
    np.testing.assert_array_equal(restored.alphas_cumprod, sched.alphas_cumprod)
    assert restored.get_config() == sched.get_config()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="sigmoid"), "sigmoid.*linear, scaled_linear, cosine"),
        (dict(name="cosine", num_timesteps=1), "num_timesteps.*>= 2"),
        (dict(name="cosine", num_timesteps=10.5), "num_timesteps"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kms.NoiseSchedule(**kwargs)


def test_bad_timesteps_and_prediction_type():
    sched = kms.NoiseSchedule("cosine", num_timesteps=10)
    with pytest.raises(ValueError, match=r"\[0, 9\].*10"):
        sched.snr([3, 10])
    with pytest.raises(ValueError, match="-1"):
        sched.snr(-1)
    with pytest.raises(ValueError, match="integers"):
        sched.snr(2.5)
    with pytest.raises(ValueError, match="'x0'.*epsilon, sample, v_prediction"):
        sched.target(np.zeros((1, 2)), np.zeros((1, 2)), [0], "x0")
