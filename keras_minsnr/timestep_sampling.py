"""Timestep densities: which training steps a batch draws, for any discrete schedule.

Every density lives on a continuous variable and is turned into a probability table over
the ``T`` discrete steps by integrating it over each step's cell:

- ``uniform``, ``logit_normal``, ``mode``: on the training fraction ``u ∈ (0, 1]``; step
  ``i`` owns the cell ``(i/T, (i+1)/T]`` (``u = (i+1)/T`` is its right edge, which is the
  unshifted time of `FlowMatchingSchedule`'s step ``i``). This is what drawing a continuous
  ``u`` and taking step ``⌈u·T⌉ − 1`` does, the rule of SD3-style trainers, so a shifted
  flow grid shifts the density exactly as SD3's training shift does.
- ``laplace``: on ``λ = log SNR``; step ``i`` owns ``[λ_i, λ_{i−1})`` with
  ``λ_{−1} = +∞`` and the last cell reaching ``−∞``. These are the images of the
  ``u``-cells under the schedule's ``λ``, so it is the same rule: draw ``λ``, take the
  first step at least as noisy.

Integrating over cells (instead of evaluating the density at the steps and normalising)
makes the table the exact distribution of "draw the continuous variable, round to a
step", whatever the spacing of the steps, sums to 1 without renormalisation and stays
right where the density changes within a cell (the Laplace cusp; the end cells, which
reach ±∞ in log SNR). See docs/flow_matching.md.
"""

import math

import keras
import numpy as np
from keras import ops
from scipy import special

KINDS = ("uniform", "logit_normal", "mode", "laplace")
DEFAULT_PARAMS = {
    "uniform": {},
    # SD3's best (Esser et al. 2024, §5.1): logit-normal with mean 0 and std 1.
    "logit_normal": {"logit_mean": 0.0, "logit_std": 1.0},
    # SD3's mode density with the scale of diffusers' default.
    "mode": {"mode_scale": 1.29},
    # Hang et al. 2024's Laplace in log-SNR: location 0 (SNR = 1), scale 0.5.
    "laplace": {"laplace_mu": 0.0, "laplace_b": 0.5},
}
# The mode density's map is monotone (a proper density) only for -1 <= scale <= 2/(π-2).
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))


def _mode_map(v, scale):
    """SD3's ``f_mode(v) = 1 − v − scale·(cos²(πv/2) − 1 + v)``, decreasing from 1 to 0."""
    return 1.0 - v - scale * (np.cos(np.pi * v / 2.0) ** 2 - 1.0 + v)


def _mode_inverse(u, scale, iterations=60):
    """``f_mode⁻¹(u)`` by bisection (float64; 60 halvings reach the last bit)."""
    lo, hi = np.zeros_like(u), np.ones_like(u)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        above = _mode_map(mid, scale) > u  # f decreases: the root lies right of mid
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return 0.5 * (lo + hi)


def _laplace_cell_mass(lo, hi, mu, b):
    """``P(lo ≤ λ < hi)`` for Laplace(mu, b), each side computed from its own tail."""
    cdf = lambda x: 0.5 * np.exp(np.minimum(x - mu, 0.0) / b)  # noqa: E731  (x <= mu)
    sf = lambda x: 0.5 * np.exp(-np.maximum(x - mu, 0.0) / b)  # noqa: E731  (x >= mu)
    below = np.where(hi <= mu, cdf(hi) - cdf(lo), 0.0)
    above = np.where(lo >= mu, sf(lo) - sf(hi), 0.0)
    across = np.where((lo < mu) & (hi > mu), 1.0 - cdf(lo) - sf(hi), 0.0)
    return below + above + across


def _logit_normal_cell_mass(lo, hi, mean, std):
    """``P(lo < u ≤ hi)`` for a logit-normal, from the lower or upper tail."""
    with np.errstate(divide="ignore"):
        z = lambda u: (np.log(u) - np.log1p(-u) - mean) / std  # noqa: E731
        z_lo, z_hi = z(lo), z(hi)
    lower = special.ndtr(z_hi) - special.ndtr(z_lo)
    upper = special.ndtr(-z_lo) - special.ndtr(-z_hi)
    return np.where(z_lo >= 0, upper, lower)


@keras.saving.register_keras_serializable(package="keras_minsnr")
class TimestepSampling:
    """A timestep density for training, turned into a table over a schedule's steps.

    Args:
        kind: ``"uniform"`` (every step equally often: the DDPM / Min-SNR default),
            ``"logit_normal"`` (SD3: ``logit(u) ~ N(logit_mean, logit_std²)``), ``"mode"``
            (SD3's mode density: ``u = f_mode(v)`` with ``v`` uniform and
            ``f_mode(v) = 1 − v − mode_scale·(cos²(πv/2) − 1 + v)``, ``mode_scale`` in
            ``[−1, 2/(π−2)]``) or ``"laplace"`` (Hang et al. 2024: ``log SNR ~
            Laplace(laplace_mu, laplace_b)``).
        **params: the kind's parameters (defaults in `DEFAULT_PARAMS`).

    The module docstring says how a density becomes step probabilities. `build` fixes the
    table for a schedule; `sample` then draws steps inside a compiled train step.

    Example:
    ```python
    sampling = TimestepSampling("logit_normal", logit_mean=0.0, logit_std=1.0)
    sampling.probabilities(FlowMatchingSchedule())   # float64 (T,), sums to 1
    sampling.build(schedule)
    t = sampling.sample(batch_size, seed_generator)  # int32 (B,)
    ```

    Reference:
        Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
        Synthesis" (§3.1: logit-normal and mode); Hang et al. 2024, "Improved Noise
        Schedule for Diffusion Training" (Laplace in log SNR).
    """

    def __init__(self, kind="uniform", **params):
        if kind not in KINDS:
            raise ValueError(
                f"Unknown timestep sampling kind {kind!r}. Allowed: {', '.join(KINDS)}."
            )
        allowed = DEFAULT_PARAMS[kind]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(
                f"Unknown parameter(s) {unknown} for timestep sampling {kind!r}. "
                f"Allowed: {', '.join(allowed) or 'none'}."
            )
        self.kind = kind
        self.params = {name: float(params.get(name, value)) for name, value in allowed.items()}
        for name, value in self.params.items():
            if not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
        for name in ("logit_std", "laplace_b"):
            if name in self.params and self.params[name] <= 0:
                raise ValueError(f"{name} must be > 0, got {self.params[name]!r}.")
        if kind == "mode":
            lo, hi = MODE_SCALE_RANGE
            if not lo <= self.params["mode_scale"] <= hi:
                raise ValueError(
                    f"mode_scale must lie in [{lo}, {hi:.6f}] (outside, SD3's map is not "
                    f"monotone), got {self.params['mode_scale']!r}."
                )
        self.num_timesteps = None
        self._logits = None

    def probabilities(self, schedule):
        """Float64 probabilities of the schedule's ``T`` steps (they sum to 1)."""
        T = int(schedule.num_timesteps)
        if self.kind == "uniform":
            return np.full(T, 1.0 / T)
        if self.kind == "laplace":
            lam = np.asarray(schedule.log_snr(np.arange(T)), dtype=np.float64)
            if np.any(np.diff(lam) >= 0):
                raise ValueError(
                    f"laplace sampling needs a log-SNR that falls with the step; {schedule!r} "
                    "has one that does not."
                )
            hi = np.concatenate([[np.inf], lam[:-1]])
            lo = np.concatenate([lam[:-1], [-np.inf]])
            mass = _laplace_cell_mass(lo, hi, self.params["laplace_mu"], self.params["laplace_b"])
        else:
            edges = np.arange(T + 1, dtype=np.float64) / T
            if self.kind == "logit_normal":
                mass = _logit_normal_cell_mass(
                    edges[:-1], edges[1:], self.params["logit_mean"], self.params["logit_std"]
                )
            else:
                v = _mode_inverse(edges, self.params["mode_scale"])
                v[0], v[-1] = 1.0, 0.0  # f(1) = 0 and f(0) = 1 exactly
                mass = v[:-1] - v[1:]
        # Differences of CDF values can round to tiny negatives in empty tails.
        return np.maximum(mass, 0.0)

    def build(self, schedule):
        """Fixes the table for ``schedule``; returns ``self``."""
        probabilities = self.probabilities(schedule)
        self.num_timesteps = int(schedule.num_timesteps)
        with np.errstate(divide="ignore"):
            self._logits = np.log(probabilities)[None, :].astype("float32")
        return self

    def sample(self, batch_size, seed_generator):
        """``batch_size`` int32 steps drawn from the built table (traceable on both backends).

        ``uniform`` uses `keras.random.randint` (the same stream as plain uniform training);
        the other kinds `keras.random.categorical` over the log-probabilities.
        """
        if self.num_timesteps is None:
            raise ValueError(
                "TimestepSampling.sample needs a table: call build(schedule) first."
            )
        if self.kind == "uniform":
            return keras.random.randint(
                (batch_size,), 0, self.num_timesteps, seed=seed_generator, dtype="int32"
            )
        steps = keras.random.categorical(
            ops.convert_to_tensor(self._logits), batch_size, dtype="int32", seed=seed_generator
        )
        return ops.reshape(steps, (-1,))

    def get_config(self):
        return {"kind": self.kind, **self.params}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"TimestepSampling({self.kind!r}{args})"


def get(identifier, **params):
    """A `TimestepSampling` from a kind name, a config dict or an instance.

    Example: ``kms.timestep_sampling.get("laplace", laplace_b=0.5)``.
    """
    if isinstance(identifier, TimestepSampling):
        if params:
            return TimestepSampling(**{**identifier.get_config(), **params})
        return identifier
    if isinstance(identifier, dict):
        return TimestepSampling(**{**identifier, **params})
    if isinstance(identifier, str):
        return TimestepSampling(identifier, **params)
    if identifier is None:
        return TimestepSampling("uniform", **params)
    raise ValueError(
        f"Cannot interpret {identifier!r} as a timestep sampling: give a kind "
        f"({', '.join(KINDS)}), a config dict or a TimestepSampling."
    )
