"""Offset noise and input perturbation (issue 24, item 1), checked in float64.

A probe backbone predicts zeros and keeps the ``x_t`` it was given; with ``x₀ = 0`` that
input is ``σ_t`` times the noise the model was fed, and the loss is the weighted mean
square of the target alone, so both can be compared with closed forms.
"""

import os

import numpy as np
import pytest

import keras_minsnr as kms
from keras_minsnr import run_config
from keras_minsnr import builders
from tests.test_diffusion_model import min_snr_weight
from tests.test_diffusion_model import reference_alphas_cumprod_cosine
from tests.tiny_backbones import PixelLinearBackbone

T = 1000


class ProbeBackbone(PixelLinearBackbone):
    """Predicts ``0·x_t + 0`` and keeps the last ``x_t`` (eager calls only)."""

    def call(self, inputs):
        self.seen = np.asarray(inputs["x"], dtype="float64")
        return 0.0 * inputs["x"]


def _batch(batch, shape, timestep, seed=0, with_noise=True):
    rng = np.random.default_rng(seed)
    data = {"images": np.zeros((batch, *shape), "float32"),
            "timesteps": np.full((batch,), timestep, "int32")}
    if with_noise:
        data["noise"] = rng.normal(size=(batch, *shape)).astype("float32")
    return data


def _sigma_and_weight(timestep):
    ac = reference_alphas_cumprod_cosine(T)[timestep]
    return np.sqrt(1.0 - ac), min_snr_weight(np.array([ac / (1.0 - ac)]), "epsilon")[0]


def _model(shape, **kwargs):
    return kms.DiffusionModel(ProbeBackbone(image_shape=shape), "cosine", ema_decay=0.0,
                              seed=3, **kwargs)


def test_input_perturbation_changes_the_input_and_keeps_the_target():
    shape, timestep, lam = (16, 16, 1), 500, 0.3
    model = _model(shape, input_perturbation=lam)
    data = _batch(8, shape, timestep)
    loss, _ = model.compute_training_loss(data, training=True)
    sigma, weight = _sigma_and_weight(timestep)
    eps = data["noise"].astype("float64")
    # The target is ε itself: with a zero prediction the loss is w·mean(ε²) exactly.
    np.testing.assert_allclose(float(loss), weight * np.mean(eps**2), rtol=1e-5)
    # The input carries ε + λ·ξ with ξ ~ N(0, I): (x_t/σ − ε)/λ has unit variance.
    xi = (model.backbone.seen / sigma - eps) / lam
    assert abs(np.mean(xi)) < 0.1 and abs(np.std(xi) - 1.0) < 0.06
    # Off at evaluation: the input is made with ε alone.
    model.compute_training_loss(data, training=False)
    np.testing.assert_allclose(model.backbone.seen / sigma, eps, atol=1e-5)


def test_input_perturbation_loss_terms_match_numpy():
    """The deterministic core with an explicit input noise, against float64 numpy."""
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-1, 1, (4, 2, 2, 1))
    eps, xi = rng.normal(size=(2, 4, 2, 2, 1))
    t = np.array([3, 250, 600, 990])
    model = kms.DiffusionModel(PixelLinearBackbone(), "cosine", ema_decay=0.0)
    loss, _ = model.diffusion_loss_terms(x0.astype("float32"), None, t, eps.astype("float32"),
                                         input_noise=(eps + 0.1 * xi).astype("float32"))
    ac = reference_alphas_cumprod_cosine(T)[t][:, None, None, None]
    x_t = np.sqrt(ac) * x0 + np.sqrt(1 - ac) * (eps + 0.1 * xi)
    residual = 0.5 * x_t + 0.1 - eps  # PixelLinearBackbone: a = 0.5, b = 0.1
    w = min_snr_weight((ac / (1 - ac))[:, 0, 0, 0], "epsilon")
    np.testing.assert_allclose(float(loss), np.mean(w * np.mean(residual**2, axis=(1, 2, 3))),
                               rtol=1e-5)


def test_noise_offset_shifts_each_image_and_channel():
    shape, timestep, c = (8, 8, 3), 500, 1.0
    model = _model(shape, noise_offset=c)
    data = _batch(64, shape, timestep, with_noise=False)
    loss, _ = model.compute_training_loss(data, training=True)
    sigma, weight = _sigma_and_weight(timestep)
    noise = model.backbone.seen / sigma  # ε + c·δ, δ per image and channel
    # The target is the same offset noise: the loss is w·mean((ε + cδ)²).
    np.testing.assert_allclose(float(loss), weight * np.mean(noise**2), rtol=1e-4)
    means = noise.mean(axis=(1, 2))  # (64, 3): ε̄ + cδ, variance c² + 1/64
    assert abs(np.var(means) / (c**2 + 1 / 64) - 1.0) < 0.25
    within = noise - means[:, None, None, :]  # what is left is ε's spread, variance 63/64
    assert abs(np.var(within) / (63 / 64) - 1.0) < 0.05
    plain = _model(shape)
    plain.compute_training_loss(data, training=True)
    assert np.var((plain.backbone.seen / sigma).mean(axis=(1, 2))) < 0.05  # ≈ 1/64


def test_knobs_are_run_keys_and_survive_saving(tmp_path):
    from keras_minsnr.data import DatasetInfo
    from recipes.digits import RECIPE

    config = run_config.resolve_config(RECIPE, {"noise_offset": 0.1, "input_perturbation": 0.05,
                                              "backbone_args.hidden_size": 16,
                                              "backbone_args.depth": 1})
    model = builders.build_model(config, DatasetInfo(name="digits", image_shape=(8, 8, 1),
                                                     num_classes=10))
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    import keras

    again = keras.models.load_model(path)
    assert (again.noise_offset, again.input_perturbation) == (0.1, 0.05)
    defaults = run_config.resolve_config({}, {})
    assert (defaults["noise_offset"], defaults["input_perturbation"]) == (0.0, 0.0)


@pytest.mark.parametrize("key", ["noise_offset", "input_perturbation"])
def test_negative_knobs_are_refused(key):
    with pytest.raises(ValueError, match=f"{key}: -0.1. Allowed: a number >= 0"):
        run_config.resolve_config({}, {key: -0.1})
    with pytest.raises(ValueError, match=f"{key} must be a number >= 0"):
        kms.DiffusionModel(PixelLinearBackbone(), "cosine", **{key: -0.1})
