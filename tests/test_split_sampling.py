"""The split DDIM sampler and the per-noise-level x₀ error (the issue-26 diagnostics)."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_minsnr as kms
from keras_minsnr import samplers
from keras_minsnr.split_sampling import split_ddim_sample
from tests.tiny_backbones import TinyConvBackbone


def _toy_denoiser(schedule):
    """A closed-form denoiser with params (g, m): x̂₀ = m·tanh(g·x) + (1 − m)·g·sqrt(ᾱ_t)·x."""
    abar = ops.convert_to_tensor(schedule.alphas_cumprod.astype("float32"))

    def denoise(params, x, t):
        gain, mix = params[0], params[1]
        a = ops.reshape(ops.take(abar, t), (-1, 1, 1, 1))
        x0 = mix * ops.tanh(gain * x) + (1.0 - mix) * gain * ops.sqrt(a) * x
        return x0, (x - ops.sqrt(a) * x0) / ops.sqrt(1.0 - a)

    return denoise


def _toy_numpy(params, x, abar_t):
    gain, mix = params
    x0 = mix * np.tanh(gain * x) + (1.0 - mix) * gain * np.sqrt(abar_t) * x
    return x0, (x - np.sqrt(abar_t) * x0) / np.sqrt(1.0 - abar_t)


def _numpy_split_ddim(params_noisy, params_clean, abar, shape, t_split, num_steps, seed):
    """Float64 deterministic DDIM (Song et al. 2021, eq. 12 with σ = 0), trailing steps."""
    num_timesteps = len(abar)
    x = np.random.default_rng(seed).standard_normal(shape).astype("float32").astype("float64")
    steps = [int(round(num_timesteps - i * num_timesteps / num_steps)) - 1
             for i in range(num_steps)]
    for i, t in enumerate(steps):
        abar_next = abar[steps[i + 1]] if i + 1 < num_steps else 1.0
        params = params_noisy if t >= t_split else params_clean
        x0, eps = _toy_numpy(params, x, abar[t])
        x = np.sqrt(abar_next) * x0 + np.sqrt(1.0 - abar_next) * eps
    return x


def test_split_ddim_matches_float64_numpy_with_two_toy_denoisers():
    schedule = kms.NoiseSchedule("cosine", num_timesteps=1000)
    fns = samplers.make_step_functions(_toy_denoiser(schedule))
    noisy, clean = (1.5, 0.0), (0.7, 1.0)
    tensor = lambda p: ops.convert_to_tensor(np.asarray(p, "float32"))  # noqa: E731
    shape = (3, 2, 2, 1)
    for t_split in (500, 0, 1000):
        got = split_ddim_sample(fns, tensor(noisy), tensor(clean), schedule, shape, t_split,
                                num_steps=10, seed=7)
        want = _numpy_split_ddim(noisy, clean, schedule.alphas_cumprod, shape, t_split, 10, 7)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The switch matters: the t_split = 500 result differs from either model alone.
    half = _numpy_split_ddim(noisy, clean, schedule.alphas_cumprod, shape, 500, 10, 7)
    for t_split in (0, 1000):
        other = _numpy_split_ddim(noisy, clean, schedule.alphas_cumprod, shape, t_split, 10, 7)
        assert np.abs(half - other).max() > 1e-2
    with pytest.raises(ValueError, match=r"t_split must be an integer in \[0, 1000\]"):
        split_ddim_sample(fns, tensor(noisy), tensor(clean), schedule, shape, 1001)


def _tiny_model(seed):
    keras.utils.set_random_seed(seed)
    backbone = TinyConvBackbone(image_shape=(4, 4, 1), num_classes=3, width=8)
    model = kms.DiffusionModel(backbone, kms.NoiseSchedule("cosine", num_timesteps=1000),
                               prediction_type="sample", ema_decay=0.9)
    return model


def test_generate_split_is_the_library_ddim_when_both_models_agree():
    a, b = _tiny_model(0), _tiny_model(1)
    labels = np.array([0, 1, 2, 1])
    kwargs = dict(labels=labels, num_steps=6, seed=3)
    plain_a = a.generate(sampler="ddim", **kwargs)
    np.testing.assert_array_equal(kms.generate_split(a, a, 500, **kwargs), plain_a)
    # t_split = 0: the noisy-steps model throughout; T: the clean-steps model throughout.
    np.testing.assert_array_equal(kms.generate_split(a, b, 0, **kwargs), plain_a)
    np.testing.assert_array_equal(kms.generate_split(a, b, 1000, **kwargs),
                                  b.generate(sampler="ddim", **kwargs))
    mixed = kms.generate_split(a, b, 500, **kwargs)
    assert np.abs(mixed - plain_a).max() > 1e-4
    eps_model = kms.DiffusionModel(TinyConvBackbone(image_shape=(4, 4, 1), num_classes=3,
                                                    width=8),
                                   kms.NoiseSchedule("cosine", num_timesteps=1000),
                                   prediction_type="epsilon")
    with pytest.raises(ValueError, match="same prediction_type; got 'sample'"):
        kms.generate_split(a, eps_model, 500, **kwargs)


class _LinearDenoiser(keras.Model):
    """Output ``w·x + b·t/1000``: a backbone whose prediction is known in closed form."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.image_shape = (4, 4, 1)
        self.w = self.add_weight(shape=(), initializer="ones", name="w")
        self.b = self.add_weight(shape=(), initializer="zeros", name="b")

    def call(self, inputs):
        t = ops.cast(ops.reshape(inputs["t"], (-1, 1, 1, 1)), "float32")
        return self.w * inputs["x"] + self.b * t / 1000.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_error_by_timestep_matches_float64_numpy(prediction_type):
    schedule = kms.NoiseSchedule("cosine", num_timesteps=1000)
    model = kms.DiffusionModel(_LinearDenoiser(), schedule, prediction_type=prediction_type,
                               ema_decay=0.9)
    # The EMA weights differ from the live ones: the diagnostics must read the EMA.
    ema_w, ema_b = 0.3, -0.2
    for weight, value in zip(model.backbone.trainable_variables, (ema_w, ema_b)):
        model.ema.average_of(weight).assign(value)
    images = np.random.default_rng(5).uniform(-1, 1, size=(5, 4, 4, 1)).astype("float32")
    timesteps = (10, 300, 700, 990)
    result = kms.x0_error_by_timestep(model, images, timesteps, seed=11, batch_size=2)

    abar = schedule.alphas_cumprod
    noise = np.random.default_rng(11).standard_normal(images.shape).astype("float32")
    x0 = images.astype("float64")
    for i, t in enumerate(timesteps):
        alpha, sigma = np.sqrt(abar[t]), np.sqrt(1.0 - abar[t])
        x_t = alpha * x0 + sigma * noise.astype("float64")
        pred = ema_w * x_t + ema_b * t / 1000.0
        x0_hat = (x_t - sigma * pred) / alpha if prediction_type == "epsilon" else (
            alpha * x_t - sigma * pred)
        want = np.mean((x0_hat - x0) ** 2)
        assert result["x0_mse"][i] == pytest.approx(want, rel=2e-4)
        assert result["snr"][i] == pytest.approx(abar[t] / (1.0 - abar[t]), rel=1e-12)
    assert result["timesteps"] == list(timesteps)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\), got \[1000\]"):
        kms.x0_error_by_timestep(model, images, (10, 1000))
