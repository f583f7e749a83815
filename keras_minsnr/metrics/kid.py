"""Kernel Inception Distance: unbiased MMD² with a cubic polynomial kernel.

KID (Bińkowski et al. 2018) is the squared maximum mean discrepancy between two feature
sets under the kernel `k(x, y) = (x·y / d + 1)^3`, estimated without bias:

    MMD² = 1/(m(m-1)) Σ_{i≠j} k(x_i, x_j) + 1/(n(n-1)) Σ_{i≠j} k(y_i, y_j)
           - 2/(mn) Σ_{i,j} k(x_i, y_j).

Unlike FID it has an unbiased estimator, so its expectation is 0 for two samples of the
same distribution (single estimates can be negative). As in the paper and the common
implementations, it is averaged over random subsets (drawn without replacement) and the
mean and standard deviation over the subsets are reported.
"""

import numpy as np

from keras_minsnr.metrics.fid import check_features

__all__ = ["polynomial_kernel", "mmd2_unbiased", "kid_from_features"]


def polynomial_kernel(x, y, degree=3, gamma=None, coef0=1.0):
    """`(x y^T * gamma + coef0) ** degree` in float64; `gamma` defaults to `1 / d`."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if gamma is None:
        gamma = 1.0 / x.shape[1]
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(x, y, degree=3, gamma=None, coef0=1.0):
    """Unbiased MMD² estimate between samples `x (m, d)` and `y (n, d)`, m, n >= 2."""
    m, n = x.shape[0], y.shape[0]
    k_xx = polynomial_kernel(x, x, degree, gamma, coef0)
    k_yy = polynomial_kernel(y, y, degree, gamma, coef0)
    k_xy = polynomial_kernel(x, y, degree, gamma, coef0)
    term_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2.0 * k_xy.mean())


def kid_from_features(
    features1, features2, num_subsets=100, subset_size=1000, seed=None
):
    """KID between two feature sets: mean and std of unbiased MMD² over random subsets.

    Args:
        features1: array `(N1, D)`, e.g. real-image features.
        features2: array `(N2, D)`, e.g. generated-image features.
        num_subsets: number of random subset pairs (>= 1).
        subset_size: samples per subset, drawn without replacement from each set;
            capped at `min(N1, N2)` (which must be >= 2).
        seed: seed of the subset draws (None: fresh randomness).

    Returns:
        `(kid_mean, kid_std)` Python floats; `kid_std` is the population standard
        deviation (ddof=0) of the per-subset estimates, 0.0 for a single subset.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> kid_from_features(rng.normal(size=(300, 16)), rng.normal(size=(300, 16)),
        ...                   num_subsets=10, subset_size=100, seed=0)

    Reference:
        Bińkowski et al., "Demystifying MMD GANs", ICLR 2018.
    """
    features1 = check_features(features1, "features1")
    features2 = check_features(features2, "features2")
    if features1.shape[1] != features2.shape[1]:
        raise ValueError(
            "features1 and features2 must have the same feature dimension, got "
            f"{features1.shape[1]} and {features2.shape[1]}."
        )
    if int(num_subsets) != num_subsets or num_subsets < 1:
        raise ValueError(f"num_subsets must be a positive integer, got {num_subsets!r}.")
    if int(subset_size) != subset_size or subset_size < 2:
        raise ValueError(f"subset_size must be an integer >= 2, got {subset_size!r}.")
    size = min(int(subset_size), features1.shape[0], features2.shape[0])
    rng = np.random.default_rng(seed)
    estimates = np.empty(int(num_subsets))
    for i in range(int(num_subsets)):
        x = features1[rng.choice(features1.shape[0], size, replace=False)]
        y = features2[rng.choice(features2.shape[0], size, replace=False)]
        estimates[i] = mmd2_unbiased(x, y)
    return float(estimates.mean()), float(estimates.std())
