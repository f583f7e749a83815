"""FID / KID / feature extractors, checked against float64 references written here."""

import json
import os
import warnings

import numpy as np
import pytest
import scipy.linalg
from sklearn.datasets import load_digits as sk_load_digits

from keras_minsnr import metrics
from keras_minsnr.metrics import feature_extractors as fe


# ---------------------------------------------------------------- references (float64)


def reference_fid(f1, f2):
    """The textbook FID with scipy.linalg.sqrtm, everything float64."""
    f1 = np.asarray(f1, np.float64)
    f2 = np.asarray(f2, np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    with warnings.catch_warnings():
        # Singular products (dead ReLU features) make sqrtm warn; its result is still
        # accurate enough for the tolerances used below.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    assert np.abs(np.imag(covmean)).max() < 1e-6
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def reference_mmd2_unbiased(x, y):
    """Unbiased MMD² with k(a, b) = (a·b/d + 1)^3, written with explicit pair loops."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    d = x.shape[1]

    def k(a, b):
        return (np.dot(a, b) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def correlated_gaussian(rng, n, d, shift=0.0, scale=1.0):
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing * scale + shift


# ---------------------------------------------------------------- FID


def test_fid_matches_scipy_sqrtm_reference():
    rng = np.random.default_rng(1)
    f1 = correlated_gaussian(rng, 400, 12)
    f2 = correlated_gaussian(rng, 300, 12, shift=0.3, scale=1.5)
    expected = reference_fid(f1, f2)
    assert expected > 0.5
    np.testing.assert_allclose(metrics.fid_from_features(f1, f2), expected, rtol=1e-9)
    # float32 input is promoted, not computed in float32.
    np.testing.assert_allclose(
        metrics.fid_from_features(f1.astype(np.float32), f2.astype(np.float32)),
        reference_fid(f1.astype(np.float32), f2.astype(np.float32)),
        rtol=1e-9,
    )


def test_frechet_distance_closed_form_diagonal_gaussians():
    rng = np.random.default_rng(2)
    d = 10
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    var1 = rng.uniform(0.1, 3.0, size=d)
    var2 = rng.uniform(0.1, 3.0, size=d)
    var2[:3] = 0.0  # singular covariance: where sqrtm(S1 S2) is fragile
    expected = ((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * np.sqrt(var1 * var2)).sum()
    got = metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # A rotation of both Gaussians leaves the distance unchanged (non-diagonal case).
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    got_rotated = metrics.frechet_distance(
        q @ mu1, q @ np.diag(var1) @ q.T, q @ mu2, q @ np.diag(var2) @ q.T
    )
    # After rotation the zero variances come back as ~1e-16 rounding, whose square roots
    # (~1e-8) enter the trace: 1e-7 is the honest precision here, not 1e-12.
    np.testing.assert_allclose(got_rotated, expected, rtol=1e-7)


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric():
    rng = np.random.default_rng(3)
    f1 = correlated_gaussian(rng, 200, 16, scale=5.0)
    f2 = correlated_gaussian(rng, 150, 16, shift=1.0)
    assert abs(metrics.fid_from_features(f1, f1)) < 1e-9 * np.trace(np.cov(f1.T))
    np.testing.assert_allclose(
        metrics.fid_from_features(f1, f2), metrics.fid_from_features(f2, f1), rtol=1e-10
    )
    # Same covariance, shifted mean: FID is exactly the squared shift.
    shift = rng.normal(size=16)
    np.testing.assert_allclose(
        metrics.fid_from_features(f1, f1 + shift), shift @ shift, rtol=1e-9
    )


def test_compute_statistics_is_unbiased_mean_and_covariance():
    rng = np.random.default_rng(4)
    f = rng.normal(size=(50, 3))
    mu, sigma = metrics.compute_statistics(f)
    centred = f - f.sum(0) / 50
    np.testing.assert_allclose(mu, f.sum(0) / 50, rtol=1e-12)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12)


def test_fid_few_samples_warns_but_stays_finite():
    rng = np.random.default_rng(5)
    f1, f2 = rng.normal(size=(10, 32)), rng.normal(size=(10, 32))
    with pytest.warns(metrics.FewSamplesWarning, match="rank-deficient"):
        value = metrics.fid_from_features(f1, f2)
    assert np.isfinite(value) and value > 0


def test_fid_bad_input_errors():
    rng = np.random.default_rng(6)
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.fid_from_features(rng.normal(size=(1, 4)), rng.normal(size=(9, 4)))
    with pytest.raises(ValueError, match="same feature dimension"):
        metrics.fid_from_features(rng.normal(size=(9, 4)), rng.normal(size=(9, 5)))
    with pytest.raises(ValueError, match="2-D"):
        metrics.fid_from_features(rng.normal(size=(9, 4, 1)), rng.normal(size=(9, 4)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.fid_from_features(np.full((9, 4), np.nan), rng.normal(size=(9, 4)))
    with pytest.raises(ValueError, match="positive semi-definite"):
        metrics.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="shape"):
        metrics.frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


# ---------------------------------------------------------------- KID


def test_kid_matches_independent_mmd_and_is_positive_for_different_gaussians():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(40, 6))
    y = rng.normal(size=(30, 6)) * 1.5 + 0.5
    expected = reference_mmd2_unbiased(x[:30], y)
    # subset_size = min(N1, N2) with one subset: a permutation of y, 30 of the 40 x.
    mean, std = metrics.kid_from_features(x[:30], y, num_subsets=1, subset_size=30, seed=0)
    np.testing.assert_allclose(mean, expected, rtol=1e-10)
    assert std == 0.0
    assert expected > 0
    np.testing.assert_allclose(metrics.mmd2_unbiased(x, y), reference_mmd2_unbiased(x, y),
                               rtol=1e-10)
    # Many subsets of two clearly different distributions: clearly positive.
    big_x = rng.normal(size=(600, 6))
    big_y = rng.normal(size=(600, 6)) * 1.5 + 0.5
    mean, std = metrics.kid_from_features(big_x, big_y, num_subsets=20, subset_size=100,
                                          seed=0)
    assert mean > 5 * std / np.sqrt(20) and mean > 0


def test_kid_is_unbiased_on_identical_distributions():
    # Independent sample pairs from one distribution: the mean estimate must be 0 within
    # its standard error. The biased V-statistic (diagonal terms kept) fails this check,
    # so the test has power.
    rng = np.random.default_rng(8)
    m, d, repeats = 30, 8, 300
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    unbiased, biased = [], []
    for r in range(repeats):
        x = rng.normal(size=(m, d)) @ mixing + 0.2
        y = rng.normal(size=(m, d)) @ mixing + 0.2
        unbiased.append(
            metrics.kid_from_features(x, y, num_subsets=1, subset_size=m, seed=r)[0]
        )
        k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
        biased.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    unbiased, biased = np.asarray(unbiased), np.asarray(biased)
    standard_error = unbiased.std(ddof=1) / np.sqrt(repeats)
    assert abs(unbiased.mean()) < 3 * standard_error
    assert biased.mean() > 3 * biased.std(ddof=1) / np.sqrt(repeats)


def test_kid_bad_input_errors():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(10, 4))
    with pytest.raises(ValueError, match="num_subsets"):
        metrics.kid_from_features(x, x, num_subsets=0)
    with pytest.raises(ValueError, match="subset_size"):
        metrics.kid_from_features(x, x, subset_size=1)
    with pytest.raises(ValueError, match="same feature dimension"):
        metrics.kid_from_features(x, rng.normal(size=(10, 3)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.kid_from_features(x[:1], x)


# ---------------------------------------------------------------- digits extractor


def held_out_digits():
    """The classifier's held-out split, rebuilt here from scikit-learn: a fixed
    permutation (seed 0) of the 1797 images, the first 10% (180) are the test set."""
    bunch = sk_load_digits()
    order = np.random.RandomState(0).permutation(len(bunch.images))
    test = np.sort(order[:180])
    images = (bunch.images[test][..., None] / 8.0 - 1.0).astype(np.float32)
    return images, bunch.target[test], np.sort(order[180:])


@pytest.fixture(scope="module")
def digits_extractor():
    return metrics.get_feature_extractor("digits")


def test_digits_extractor_shipped_weights_reach_95_percent(digits_extractor):
    assert os.path.getsize(fe.DIGITS_WEIGHTS_PATH) <= 1_000_000
    images, labels, train_index = held_out_digits()
    assert len(set(train_index)) + len(labels) == 1797
    accuracy = np.mean(digits_extractor.predict_labels(images) == labels)
    assert accuracy >= 0.95
    with open(fe.DIGITS_RECORD_PATH) as f:
        record = json.load(f)
    # Same number as the training script measured: the file loads identically here.
    assert record["num_test"] == 180
    np.testing.assert_allclose(accuracy, record["test_accuracy"], atol=1e-12)
    # Other sizes are resized to 8x8: upsampled 16x16 digits still classify.
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)
    assert np.mean(digits_extractor.predict_labels(big) == labels) >= 0.9
    features = digits_extractor(images[:5])
    assert features.shape == (5, 64) == (5, digits_extractor.feature_dim)
    assert digits_extractor.input_shape == (8, 8, 1) and digits_extractor.name == "digits"


def test_evaluate_samples_digits(digits_extractor):
    images, _, _ = held_out_digits()
    bunch = sk_load_digits()
    _, _, train_index = held_out_digits()
    real = (bunch.images[train_index][:400, ..., None] / 8.0 - 1.0).astype(np.float32)
    noise = np.random.default_rng(0).uniform(-1, 1, size=(180, 8, 8, 1)).astype("float32")
    result = metrics.evaluate_samples(
        real, images, digits_extractor, batch_size=128, num_subsets=10, subset_size=100,
        progress=False,
    )
    assert set(result) >= {"fid", "kid_mean", "kid_std", "num_real", "num_fake",
                           "extractor"}
    assert (result["num_real"], result["num_fake"], result["extractor"]) == (400, 180,
                                                                             "digits")
    # Against the float64 scipy reference on the extractor's own features.
    np.testing.assert_allclose(
        result["fid"],
        reference_fid(digits_extractor(real), digits_extractor(images)),
        rtol=1e-5,
    )
    bad = metrics.evaluate_samples(real, noise, "digits", num_subsets=10, subset_size=100,
                                   progress=False)
    assert bad["fid"] > 5 * result["fid"]
    assert bad["kid_mean"] > result["kid_mean"] + 3 * bad["kid_std"]


def test_extractor_input_errors(digits_extractor, tmp_path):
    images, _, _ = held_out_digits()
    with pytest.raises(ValueError, match=r"\[-1, 1\].*0, 255"):
        digits_extractor((images + 1) * 127.5)
    with pytest.raises(ValueError, match="channels"):
        digits_extractor(np.repeat(images, 3, axis=-1))
    with pytest.raises(ValueError, match="batch shaped"):
        digits_extractor(images[:, :, :, 0])
    with pytest.raises(ValueError, match="dtype"):
        digits_extractor(np.zeros((2, 8, 8, 1), np.uint8))
    # A rounding error outside [-1, 1] is tolerated.
    assert digits_extractor(np.full((2, 8, 8, 1), 1.0 + 1e-5, np.float32)).shape == (2, 64)
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.evaluate_samples(images[:1], images, digits_extractor, progress=False)
    with pytest.raises(FileNotFoundError, match="train_digits_classifier.py"):
        metrics.DigitsFeatureExtractor(weights_path=str(tmp_path / "nope.weights.h5"))
    with pytest.raises(ValueError, match="unknown feature extractor"):
        metrics.get_feature_extractor("vgg")


# ---------------------------------------------------------------- Inception extractor


def test_inception_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        metrics.InceptionFeatureExtractor()
    message = str(info.value)
    assert fe.INCEPTION_WEIGHTS_FILENAME in message
    assert os.path.join(str(tmp_path), "models") in message
    missing = tmp_path / "inception.h5"
    with pytest.raises(FileNotFoundError, match="inception.h5"):
        metrics.InceptionFeatureExtractor(weights_path=str(missing))
    with pytest.raises(ValueError, match="weights must be"):
        metrics.InceptionFeatureExtractor(weights="places365")


@pytest.mark.large  # building InceptionV3 on JAX compiles ~55 initializers: 20-90 s
def test_inception_preprocessing_and_forward_pass_random_init():
    extractor = metrics.InceptionFeatureExtractor(weights=None)
    assert extractor.input_shape == (299, 299, 3) and extractor.feature_dim == 2048
    rng = np.random.default_rng(10)
    grey = rng.uniform(-1, 1, size=(2, 16, 16, 1)).astype(np.float32)
    grey[1] = 0.25  # a constant image stays constant through a bilinear resize
    prepared = np.asarray(extractor.preprocess(grey))
    assert prepared.shape == (2, 299, 299, 3)
    np.testing.assert_allclose(prepared[..., 0], prepared[..., 2])
    np.testing.assert_allclose(prepared[1], 0.25, atol=1e-6)
    assert prepared.min() >= -1.0 - 1e-6 and prepared.max() <= 1.0 + 1e-6
    features = extractor(grey)
    assert features.shape == (2, 2048) and np.all(np.isfinite(features))
    with pytest.raises(ValueError, match="channels"):
        extractor(np.zeros((1, 16, 16, 2), np.float32))
