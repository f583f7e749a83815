"""Loss weightings as functions of the signal-to-noise ratio.

Every strategy is defined once as a weight ``w₀(s)`` on the x₀-space error, then moved to
the space of the training target with the identities ``‖ε̂−ε‖² = s·‖x̂₀−x₀‖²`` and
``‖v̂−v‖² = (s+1)·‖x̂₀−x₀‖²``::

    w_sample = w₀(s)      w_epsilon = w₀(s) / s      w_v_prediction = w₀(s) / (s + 1)

| strategy       | w₀(s)               | with the ε target     |
|----------------|---------------------|-----------------------|
| constant       | (1 in every space)  | 1                     |
| snr            | s                   | 1                     |
| trunc_snr      | max(s, 1)           | max(s, 1) / s         |
| max_snr        | max(s, γ)           | max(s, γ) / s         |
| min_snr        | min(s, γ)           | min(1, γ / s)         |
| soft_min_snr   | s·γ / (s + γ)       | γ / (s + γ)           |
| inv_snr        | 1 / s               | 1 / s²                |
| p2             | s / (k + s)^g       | 1 / (k + s)^g         |
| debiased       | sqrt(s)             | 1 / sqrt(s)           |

At ``s = 0`` (the last step of a zero-terminal-SNR schedule) the weights take their limits
where one exists (min_snr and soft_min_snr with ε → 1; every bounded w₀ with v → w₀(0)).
Where the weight truly diverges (trunc_snr, max_snr, inv_snr, debiased with ε as s → 0;
inv_snr in every space) it is clamped at ``max_weight`` (default 1e5). The weight is a
per-sample constant: no gradient flows through it.
"""

import keras
import numpy as np
from keras import ops

from keras_minsnr.schedules import check_prediction_type

STRATEGIES = (
    "constant",
    "snr",
    "trunc_snr",
    "max_snr",
    "min_snr",
    "soft_min_snr",
    "inv_snr",
    "p2",
    "debiased",
)
DEFAULT_MAX_WEIGHT = 1e5
# Divisions use max(s, _TINY) so the branch that `where` discards never makes inf/NaN.
_TINY = 1e-20


def _x0_weight(strategy, s, xp, gamma, p2_k, p2_gamma):
    """``w₀(s)``; finite at ``s = 0`` for every strategy but inv_snr (clamped later)."""
    if strategy == "snr":
        return s
    if strategy == "trunc_snr":
        return xp.maximum(s, 1.0)
    if strategy == "max_snr":
        return xp.maximum(s, gamma)
    if strategy == "min_snr":
        return xp.minimum(s, gamma)
    if strategy == "soft_min_snr":
        return s * gamma / (s + gamma)
    if strategy == "inv_snr":
        return 1.0 / xp.maximum(s, _TINY)
    if strategy == "p2":
        return s / xp.power(p2_k + s, p2_gamma)
    if strategy == "debiased":
        return xp.sqrt(s)
    raise AssertionError(strategy)


def _epsilon_weight(strategy, s, xp, gamma, p2_k, p2_gamma):
    """``w₀(s) / s`` written in forms that stay finite wherever a limit exists.

    ``s`` arrives floored at _TINY, so the divergent forms give huge, finite numbers.
    """
    if strategy == "snr":
        return xp.ones_like(s)
    if strategy == "trunc_snr":
        return xp.maximum(1.0, 1.0 / s)
    if strategy == "max_snr":
        return xp.maximum(1.0, gamma / s)
    if strategy == "min_snr":
        return xp.minimum(1.0, gamma / s)
    if strategy == "soft_min_snr":
        return gamma / (s + gamma)
    if strategy == "inv_snr":
        return 1.0 / (s * s)
    if strategy == "p2":
        return 1.0 / xp.power(p2_k + s, p2_gamma)
    if strategy == "debiased":
        return 1.0 / xp.sqrt(s)
    raise AssertionError(strategy)


def _validate(strategy, prediction_type, gamma, p2_k, p2_gamma, max_weight):
    if strategy not in STRATEGIES:
        raise ValueError(
            f"Unknown loss weighting strategy {strategy!r}. "
            f"Allowed: {', '.join(STRATEGIES)}."
        )
    if prediction_type is not None:
        check_prediction_type(prediction_type)
    for name, value in (("gamma", gamma), ("p2_k", p2_k), ("max_weight", max_weight)):
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    if not (np.isfinite(p2_gamma) and p2_gamma >= 0):
        raise ValueError(f"p2_gamma must be a finite number >= 0, got {p2_gamma!r}.")


def loss_weight(
    snr,
    strategy="min_snr",
    prediction_type="epsilon",
    gamma=5.0,
    p2_k=1.0,
    p2_gamma=1.0,
    max_weight=DEFAULT_MAX_WEIGHT,
):
    """Per-sample loss weight for a batch of SNR values.

    Args:
        snr: SNR values, shape ``(B,)`` (or any shape). Numpy/Python input gives a float64
            numpy answer; a tensor gives a float32 tensor with no gradient.
        strategy: one of `STRATEGIES` (see the module docstring for the formulas).
        prediction_type: the training target: ``"epsilon"``, ``"sample"`` or
            ``"v_prediction"``.
        gamma: γ of ``max_snr``, ``min_snr`` and ``soft_min_snr`` (ignored by the others).
        p2_k, p2_gamma: ``k`` and the exponent of the ``p2`` weighting.
        max_weight: clamp for weights that truly diverge (see the module docstring).

    Example:
    ```python
    kms.loss_weight(np.array([0.1, 5.0, 100.0]), "min_snr", "epsilon", gamma=5.0)
    # array([1.  , 1.  , 0.05])
    ```

    Reference:
        Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy",
        ICCV 2023 (arXiv 2303.09556).
    """
    _validate(strategy, prediction_type, gamma, p2_k, p2_gamma, max_weight)
    if ops.is_tensor(snr):
        s = ops.cast(ops.stop_gradient(snr), "float32")
        xp = ops
    else:
        s = np.asarray(snr, dtype=np.float64)
        if np.any(np.isnan(s)) or np.any(s < 0):
            bad = s[np.isnan(s) | (s < 0)]
            raise ValueError(
                f"SNR values must be >= 0 and not NaN, got {bad[:5].tolist()}."
            )
        xp = np

    if strategy == "constant":
        return xp.ones_like(s)

    params = dict(gamma=float(gamma), p2_k=float(p2_k), p2_gamma=float(p2_gamma))
    if prediction_type == "epsilon":
        weight = _epsilon_weight(strategy, xp.maximum(s, _TINY), xp, **params)
    else:
        weight = _x0_weight(strategy, s, xp, **params)
        if prediction_type == "v_prediction":
            weight = weight / (s + 1.0)
    weight = xp.minimum(weight, max_weight)
    return ops.stop_gradient(weight) if xp is ops else weight


@keras.saving.register_keras_serializable(package="keras_minsnr")
class LossWeighting:
    """A loss weighting strategy with its parameters, callable and serialisable.

    Args:
        strategy: one of `STRATEGIES`.
        gamma: γ of ``max_snr``, ``min_snr`` and ``soft_min_snr``.
        p2_k, p2_gamma: parameters of ``p2``.
        max_weight: clamp for weights that diverge.

    Example:
    ```python
    weighting = kms.weighting.get("min_snr", gamma=5.0)
    w = weighting(snr, "v_prediction")    # min(s, 5) / (s + 1)
    ```
    """

    def __init__(
        self,
        strategy="min_snr",
        gamma=5.0,
        p2_k=1.0,
        p2_gamma=1.0,
        max_weight=DEFAULT_MAX_WEIGHT,
    ):
        _validate(strategy, None, gamma, p2_k, p2_gamma, max_weight)
        self.strategy = strategy
        self.gamma = float(gamma)
        self.p2_k = float(p2_k)
        self.p2_gamma = float(p2_gamma)
        self.max_weight = float(max_weight)

    def __call__(self, snr, prediction_type):
        return loss_weight(snr, prediction_type=prediction_type, **self.get_config())

    def get_config(self):
        return {
            "strategy": self.strategy,
            "gamma": self.gamma,
            "p2_k": self.p2_k,
            "p2_gamma": self.p2_gamma,
            "max_weight": self.max_weight,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"LossWeighting({args})"


def get(identifier, **params):
    """A `LossWeighting` from a strategy name, a config dict or an instance.

    Example: ``kms.weighting.get("min_snr", gamma=5.0)``.
    """
    if isinstance(identifier, LossWeighting):
        if params:
            return LossWeighting(**{**identifier.get_config(), **params})
        return identifier
    if isinstance(identifier, dict):
        return LossWeighting(**{**identifier, **params})
    if isinstance(identifier, str):
        allowed = ("gamma", "p2_k", "p2_gamma", "max_weight")
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(
                f"Unknown weighting parameter(s) {unknown}. Allowed: {', '.join(allowed)}."
            )
        return LossWeighting(identifier, **params)
    raise ValueError(
        f"Cannot interpret {identifier!r} as a loss weighting: give a strategy name "
        f"({', '.join(STRATEGIES)}), a config dict or a LossWeighting."
    )
