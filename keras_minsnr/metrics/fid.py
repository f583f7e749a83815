"""Fréchet distance between Gaussians fitted to features (FID).

FID (Heusel et al. 2017) fits a Gaussian to each set of features and reports the squared
2-Wasserstein distance between them:

    FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

Everything here is float64 numpy. The only delicate term is tr((S1 S2)^(1/2)). `S1 S2` is
not symmetric, and `scipy.linalg.sqrtm` of it can return complex values or fail when the
covariances are singular (always the case when there are fewer samples than feature
dimensions). We avoid it: with `R = S1^(1/2)` (symmetric, from `eigh`), `S1 S2` is similar
to the symmetric positive semi-definite `R S2 R`, so both have the same eigenvalues and

    tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(R S2 R)).

`eigh` of a symmetric matrix is backward stable, its eigenvalues are real, and the tiny
negative ones that rounding produces (true value 0) are clipped to 0 before the square
root. No eps offset and no discarded imaginary part are needed.

Sample-size policy (see `compute_statistics`): fewer than 2 samples is an error (no
covariance exists); `n <= d` samples gives a rank-deficient covariance, so FID is still
defined but strongly biased -- that is a `FewSamplesWarning`, not an error, so quick
checks on small sets remain possible.
"""

import warnings

import numpy as np

__all__ = [
    "FewSamplesWarning",
    "check_features",
    "compute_statistics",
    "frechet_distance",
    "fid_from_features",
]


class FewSamplesWarning(UserWarning):
    """Too few samples for a full-rank covariance: FID/KID are biased (upwards)."""


def check_features(features, name="features"):
    """`features` as a float64 `(N, D)` array with N >= 2 and finite values, or ValueError."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array (num_samples, feature_dim), "
            f"got shape {features.shape}."
        )
    if features.shape[0] < 2:
        raise ValueError(
            f"{name} needs at least 2 samples to estimate a covariance, got "
            f"{features.shape[0]}. Use more samples (ideally more than the feature "
            f"dimension, {features.shape[1]})."
        )
    if not np.all(np.isfinite(features)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return features


def compute_statistics(features, name="features"):
    """Mean and covariance of features, in float64.

    Args:
        features: array `(N, D)` with `N >= 2`.
        name: how the array is called in error and warning messages.

    Returns:
        `(mu, sigma)`: float64 `(D,)` mean and `(D, D)` unbiased (ddof=1) covariance.

    Warns:
        FewSamplesWarning: when `N <= D` (the covariance is rank-deficient).
    """
    features = check_features(features, name)
    num, dim = features.shape
    if num <= dim:
        warnings.warn(
            f"{name} has {num} samples for {dim} feature dimensions: the covariance is "
            f"rank-deficient and FID is biased. Use more than {dim} samples (FID is "
            "usually reported on 10k-50k).",
            FewSamplesWarning,
            stacklevel=2,
        )
    mu = features.mean(axis=0)
    sigma = np.cov(features, rowvar=False, ddof=1)
    return mu, np.atleast_2d(sigma)


def _check_gaussian(mu, sigma, name):
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1:
        raise ValueError(f"mu{name} must be 1-D, got shape {mu.shape}.")
    dim = mu.shape[0]
    if sigma.shape != (dim, dim):
        raise ValueError(
            f"sigma{name} must have shape ({dim}, {dim}) to match mu{name}, "
            f"got {sigma.shape}."
        )
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"mu{name} / sigma{name} contain NaN or infinite values.")
    scale = max(np.abs(sigma).max(), 1e-300)
    if np.abs(sigma - sigma.T).max() > 1e-8 * scale:
        raise ValueError(f"sigma{name} must be symmetric (a covariance matrix).")
    return mu, (sigma + sigma.T) / 2.0


def _check_psd(eigvals, name):
    # Rounding leaves eigenvalues ~1e-16 * max below 0; a real negative one means the
    # matrix is not a covariance.
    tol = 1e-6 * max(np.abs(eigvals).max(), 1e-300)
    if eigvals.min() < -tol:
        raise ValueError(
            f"sigma{name} is not positive semi-definite (smallest eigenvalue "
            f"{eigvals.min():.3g}); pass a covariance matrix."
        )


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet (2-Wasserstein²) distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
        mu1, mu2: means, shape `(D,)`.
        sigma1, sigma2: symmetric positive semi-definite covariances, shape `(D, D)`.

    Returns:
        Python float >= 0, computed in float64 (see the module docstring for the matrix
        square root; a result a rounding error below 0 is reported as 0).

    Example:
        >>> frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2))
        4.0

    Reference:
        Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
        Nash Equilibrium", NeurIPS 2017; Dowson & Landau 1982 for the closed form.
    """
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "1")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"the two feature dimensions differ: mu1 {mu1.shape} vs mu2 {mu2.shape}."
        )
    eig1, vec1 = np.linalg.eigh(sigma1)
    _check_psd(eig1, "1")
    _check_psd(np.linalg.eigvalsh(sigma2), "2")
    root1 = (vec1 * np.sqrt(np.clip(eig1, 0.0, None))) @ vec1.T
    product = root1 @ sigma2 @ root1
    product = (product + product.T) / 2.0
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(product), 0.0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(value, 0.0))


def fid_from_features(features1, features2):
    """FID between two sets of features `(N1, D)` and `(N2, D)` (float64).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> fid_from_features(rng.normal(size=(500, 8)), rng.normal(size=(500, 8)) + 1)
    """
    mu1, sigma1 = compute_statistics(features1, "features1")
    mu2, sigma2 = compute_statistics(features2, "features2")
    if mu1.shape != mu2.shape:
        raise ValueError(
            "features1 and features2 must have the same feature dimension, got "
            f"{mu1.shape[0]} and {mu2.shape[0]}."
        )
    return frechet_distance(mu1, sigma1, mu2, sigma2)
