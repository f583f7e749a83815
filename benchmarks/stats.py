"""Statistics of convergence curves: the paper's speed-up and intervals over seeds.

A run's FID curve is measured at a grid of steps; the speed-up of one weighting over a
baseline is the ratio of the steps each needs to reach the baseline's final FID (Hang et
al. 2023, Fig. 1 and Table 1). Intervals over seeds are Student-t by default, or a
percentile bootstrap; a speed-up's interval is taken on its logarithm.
"""

def steps_to_reach(steps, fids, target):
    """First step at which the curve ``(steps, fids)`` reaches ``fids <= target``.

    Linear interpolation between the two checkpoints around the first crossing; a curve
    already at or below `target` at its first checkpoint returns that checkpoint. ``None``
    when the curve never reaches `target`.
    """
    if len(steps) != len(fids) or not steps:
        raise ValueError(
            f"steps and fids must be non-empty and of equal length, got {len(steps)} and "
            f"{len(fids)}."
        )
    if fids[0] <= target:
        return float(steps[0])
    for i in range(1, len(steps)):
        if fids[i] <= target:
            s0, s1, f0, f1 = steps[i - 1], steps[i], fids[i - 1], fids[i]
            return float(s0 + (f0 - target) / (f0 - f1) * (s1 - s0))
    return None


def speedup(steps, baseline_fids, candidate_fids):
    """The paper's convergence speed-up of `candidate` over `baseline` on one step grid.

    Returns ``(speedup, baseline_steps, candidate_steps, target_fid)``; `speedup` and
    `candidate_steps` are ``None`` when the candidate never reaches the baseline's final FID.
    """
    target = float(baseline_fids[-1])
    base = steps_to_reach(steps, baseline_fids, target)
    cand = steps_to_reach(steps, candidate_fids, target)
    return (None if cand is None else base / cand), base, cand, target


INTERVAL_METHODS = ("t", "bootstrap")
CONFIDENCE = 0.95


def _checked_sample(values, confidence):
    """``values`` as a float64 1-D array and its mean; bad input raises naming it."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {values.shape}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}.")
    return values, float(values.mean())


def t_interval(values, confidence=CONFIDENCE):
    """Student-t interval for the mean of `values` (independent seeds).

    ``mean ± t_{(1+confidence)/2, n-1} · s / sqrt(n)`` with ``s`` the sample standard
    deviation (ddof 1). Returns ``(mean, low, high)``; the bounds are ``None`` for fewer
    than two values.
    """
    import numpy as np
    from scipy import stats

    values, mean = _checked_sample(values, confidence)
    if values.size < 2:
        return mean, None, None
    quantile = stats.t.ppf(0.5 + confidence / 2.0, df=values.size - 1)
    half = float(quantile * values.std(ddof=1) / np.sqrt(values.size))
    return mean, mean - half, mean + half


def bootstrap_interval(values, confidence=CONFIDENCE, num_resamples=10_000, seed=0):
    """Percentile-bootstrap interval for the mean of `values` (resampling seeds).

    Draws `num_resamples` samples of ``len(values)`` seeds with replacement (fixed `seed`)
    and returns ``(mean, low, high)`` with the ``(1 ∓ confidence)/2`` quantiles of the
    resampled means. With 3 seeds there are only 10 distinct resamples, so this interval is
    too narrow; the t-interval is the default for that reason.
    """
    import numpy as np

    values, mean = _checked_sample(values, confidence)
    if values.size < 2:
        return mean, None, None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, values.size, size=(num_resamples, values.size))
    means = values[picks].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return mean, float(low), float(high)


def interval(values, method="t"):
    if method == "t":
        return t_interval(values)
    if method == "bootstrap":
        return bootstrap_interval(values)
    raise ValueError(f"Unknown interval method {method!r}; expected one of {INTERVAL_METHODS}.")


def speedup_interval(per_seed, method="t"):
    """Interval of the speed-up from the per-seed speed-ups ``{seed: value or None}``.

    A speed-up is a ratio, so the interval is taken on ``log(speed-up)`` and mapped back
    (the centre is the geometric mean over seeds). ``(None, None, None)`` when a seed never
    reached the baseline's FID (its speed-up is undefined) or there are no seeds.
    """
    import numpy as np

    values = list(per_seed.values())
    if not values or any(v is None or not v > 0 for v in values):
        return None, None, None
    centre, low, high = interval(np.log(values), method)
    if low is None:
        return float(np.exp(centre)), None, None
    return float(np.exp(centre)), float(np.exp(low)), float(np.exp(high))
