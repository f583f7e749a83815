"""Loss weightings as functions of the signal-to-noise ratio.

Every strategy is defined once as a weight ``w₀(s)`` on the x₀-space error, then moved to
the space of the training target with the identities ``‖ε̂−ε‖² = s·‖x̂₀−x₀‖²`` and
``‖v̂−v‖² = (s+1)·‖x̂₀−x₀‖²``::

    w_sample = w₀(s)      w_epsilon = w₀(s) / s      w_v_prediction = w₀(s) / (s + 1)

| strategy       | w₀(s)               | with the ε target  | "limit" at s = 0 (x₀, v / ε) |
|----------------|---------------------|--------------------|------------------------------|
| constant       | (1 in every space)  | 1                  | 1 / 1                        |
| snr            | s                   | 1                  | 0 / 1                        |
| trunc_snr      | max(s, 1)           | max(s, 1) / s      | 1 / ∞ → max_weight           |
| max_snr        | max(s, γ)           | max(s, γ) / s      | γ / ∞ → max_weight           |
| min_snr        | min(s, γ)           | min(1, γ / s)      | 0 / 1                        |
| soft_min_snr   | s·γ / (s + γ)       | γ / (s + γ)        | 0 / 1                        |
| inv_snr        | 1 / s               | 1 / s²             | ∞ / ∞ → max_weight           |
| p2             | s / (k + s)^g       | 1 / (k + s)^g      | 0 / k^-g                     |
| debiased       | sqrt(s)             | 1 / sqrt(s)        | 0 / ∞ → max_weight           |

Rectified flow trains the velocity ``u = ε − x₀``, where the same ``w₀`` becomes
``w₀(s) / (1 + √s)²`` (`flow_weight`; docs/flow_matching.md derives it).

Terminal weight: at ``s = 0`` exactly (the last step of a zero-terminal-SNR schedule) every
strategy uses ``terminal_weight``, in the target's own space: 1 by default, as the paper's
official code does (otherwise Min-SNR with the x₀ or v target would give the step that
sampling starts from weight 0 and never train it). ``terminal_weight="limit"`` uses the
last column instead (v's limit equals x₀'s since s + 1 → 1). For ``s > 0`` weights that
grow without bound as s → 0 are clamped at ``max_weight`` (default 1e5). The weight is a
per-sample constant: no gradient flows through it. Each strategy is one entry of `_TABLE`.
"""

import collections
import math
import types

import keras
import numpy as np
from keras import ops

from keras_minsnr.schedules import check_prediction_type


class _Strategy(
    collections.namedtuple("_Strategy", "x0 epsilon at_zero flow_at_infinity in_x0_space")
):
    """One weighting, as functions of ``s`` (an array module ``xp``, parameters ``p``).

    ``x0``: ``w₀(s)``. ``epsilon``: ``w₀(s)/s`` in a form finite for ``s ≥ _TINY``.
    ``at_zero``: the limits of ``w₀`` and ``w₀/s`` as ``s → 0⁺`` (``inf`` where they
    diverge). ``flow_at_infinity``: the limit of the flow weight ``w₀(s) / (1 + √s)²``
    as ``s → ∞`` (``t = 0``). ``in_x0_space=False``: the weight is meant in the target's
    own space.
    """

    def __new__(cls, x0, epsilon, at_zero, flow_at_infinity, in_x0_space=True):
        return super().__new__(cls, x0, epsilon, at_zero, flow_at_infinity, in_x0_space)


_INF = math.inf
_TABLE = {
    "constant": _Strategy(
        x0=lambda s, xp, p: xp.ones_like(s),
        epsilon=lambda s, xp, p: xp.ones_like(s),
        at_zero=lambda p: (1.0, 1.0),
        flow_at_infinity=lambda p: 1.0,
        in_x0_space=False,
    ),
    "snr": _Strategy(
        x0=lambda s, xp, p: s,
        epsilon=lambda s, xp, p: xp.ones_like(s),
        at_zero=lambda p: (0.0, 1.0),
        flow_at_infinity=lambda p: 1.0,
    ),
    "trunc_snr": _Strategy(
        x0=lambda s, xp, p: xp.maximum(s, 1.0),
        epsilon=lambda s, xp, p: xp.maximum(1.0, 1.0 / s),
        at_zero=lambda p: (1.0, _INF),
        flow_at_infinity=lambda p: 1.0,
    ),
    "max_snr": _Strategy(
        x0=lambda s, xp, p: xp.maximum(s, p.gamma),
        epsilon=lambda s, xp, p: xp.maximum(1.0, p.gamma / s),
        at_zero=lambda p: (p.gamma, _INF),
        flow_at_infinity=lambda p: 1.0,
    ),
    "min_snr": _Strategy(
        x0=lambda s, xp, p: xp.minimum(s, p.gamma),
        epsilon=lambda s, xp, p: xp.minimum(1.0, p.gamma / s),
        at_zero=lambda p: (0.0, 1.0),
        flow_at_infinity=lambda p: 0.0,
    ),
    "soft_min_snr": _Strategy(
        x0=lambda s, xp, p: s * p.gamma / (s + p.gamma),
        epsilon=lambda s, xp, p: p.gamma / (s + p.gamma),
        at_zero=lambda p: (0.0, 1.0),
        flow_at_infinity=lambda p: 0.0,
    ),
    "inv_snr": _Strategy(
        x0=lambda s, xp, p: 1.0 / xp.maximum(s, _TINY),
        epsilon=lambda s, xp, p: 1.0 / (s * s),
        at_zero=lambda p: (_INF, _INF),
        flow_at_infinity=lambda p: 0.0,
    ),
    "p2": _Strategy(
        x0=lambda s, xp, p: s / xp.power(p.p2_k + s, p.p2_gamma),
        epsilon=lambda s, xp, p: 1.0 / xp.power(p.p2_k + s, p.p2_gamma),
        at_zero=lambda p: (0.0, p.p2_k**-p.p2_gamma),
        flow_at_infinity=lambda p: 1.0 if p.p2_gamma == 0 else 0.0,
    ),
    "debiased": _Strategy(
        x0=lambda s, xp, p: xp.sqrt(s),
        epsilon=lambda s, xp, p: 1.0 / xp.sqrt(s),
        at_zero=lambda p: (0.0, _INF),
        flow_at_infinity=lambda p: 0.0,
    ),
}
STRATEGIES = tuple(_TABLE)
DEFAULT_MAX_WEIGHT = 1e5
# The official code sets the weight at SNR = 0 to 1 (see docs/fidelity.md).
DEFAULT_TERMINAL_WEIGHT = 1.0
# Divisions use max(s, _TINY) so no form makes inf/NaN next to s = 0.
_TINY = 1e-20


def _validate(strategy, prediction_type, gamma, p2_k, p2_gamma, max_weight, terminal_weight):
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
    if isinstance(terminal_weight, str):
        if terminal_weight != "limit":
            raise ValueError(
                f"terminal_weight must be a number >= 0 or 'limit', got {terminal_weight!r}."
            )
    elif not (
        isinstance(terminal_weight, (int, float, np.number))
        and np.isfinite(terminal_weight)
        and terminal_weight >= 0
    ):
        raise ValueError(
            f"terminal_weight must be a finite number >= 0 or 'limit', got {terminal_weight!r}."
        )


def loss_weight(
    snr,
    strategy="min_snr",
    prediction_type="epsilon",
    gamma=5.0,
    p2_k=1.0,
    p2_gamma=1.0,
    max_weight=DEFAULT_MAX_WEIGHT,
    terminal_weight=DEFAULT_TERMINAL_WEIGHT,
):
    """Per-sample loss weight for a batch of SNR values.

    Args:
        snr: SNR values, shape ``(B,)`` (or any shape). Numpy/Python input gives a float64
            numpy answer; a tensor gives a float32 tensor with no gradient.
        strategy: one of `STRATEGIES` (see the module docstring for the formulas).
        prediction_type: the training target: ``"epsilon"``, ``"sample"``,
            ``"v_prediction"``, or ``"flow"`` (the velocity ``ε − x₀`` of a rectified flow,
            weighted ``w₀(s) / (1 + √s)² = t²·w₀``; see `flow_weight`).
        gamma: γ of ``max_snr``, ``min_snr`` and ``soft_min_snr`` (ignored by the others).
        p2_k, p2_gamma: ``k`` and the exponent of the ``p2`` weighting.
        max_weight: clamp for weights that truly diverge (see the module docstring).
        terminal_weight: the weight, in the target's own space, where ``SNR == 0`` (the
            last step of a zero-terminal-SNR schedule): a number >= 0 (default 1, as in
            the official code) or ``"limit"`` for the formula's limit as ``s → 0⁺``.

    Example:
    ```python
    kms.loss_weight(np.array([0.1, 5.0, 100.0]), "min_snr", "epsilon", gamma=5.0)
    # array([1.  , 1.  , 0.05])
    ```

    Reference:
        Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy",
        ICCV 2023 (arXiv 2303.09556).
    """
    if prediction_type == "flow":
        return flow_weight(snr, strategy, max_weight=max_weight, gamma=gamma, p2_k=p2_k,
                           p2_gamma=p2_gamma, terminal_weight=terminal_weight)
    _validate(strategy, prediction_type, gamma, p2_k, p2_gamma, max_weight, terminal_weight)
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

    entry = _TABLE[strategy]
    params = types.SimpleNamespace(gamma=float(gamma), p2_k=float(p2_k), p2_gamma=float(p2_gamma))
    if prediction_type == "epsilon":
        weight = entry.epsilon(xp.maximum(s, _TINY), xp, params)
    else:
        weight = entry.x0(s, xp, params)
        if prediction_type == "v_prediction" and entry.in_x0_space:
            weight = weight / (s + 1.0)
    if terminal_weight == "limit":
        x0_limit, epsilon_limit = entry.at_zero(params)
        at_zero = min(epsilon_limit if prediction_type == "epsilon" else x0_limit, max_weight)
    else:
        at_zero = float(terminal_weight)
    weight = xp.where(s == 0, at_zero, xp.minimum(weight, max_weight))
    return ops.stop_gradient(weight) if xp is ops else weight[()]


def flow_weight(snr, strategy="min_snr", max_weight=DEFAULT_MAX_WEIGHT, **params):
    """Per-sample weight of the velocity loss ``‖û − u‖²`` for a rectified-flow model.

    ``w_flow(s) = w₀(s) / (1 + √s)² = t²·w₀(SNR(t))`` where ``w₀`` is the strategy's
    x₀-space weight (`loss_weight` with ``prediction_type="sample"``). ``"constant"`` stays 1
    (uniform in the target's own space, the flow-matching baseline). Finite on all of
    ``[0, ∞]``: at ``s = ∞`` (``t = 0``) the limit is taken explicitly; at ``s = 0``
    (``t = 1``) ``t² = 1`` and the weight is ``w₀(0)`` as `loss_weight` defines it (its
    ``terminal_weight`` rule, where it has one, applies unchanged).

    Args:
        snr: SNR values (numpy/Python → float64 numpy; tensor → float32 tensor, no gradient).
        strategy: one of `STRATEGIES`.
        max_weight: clamp for weights that truly diverge (``inv_snr`` at ``t = 1``).
        **params: the strategy's parameters (``gamma``, ``p2_k``, ``p2_gamma`` and any
            other `loss_weight` option such as ``terminal_weight``), passed on to it.

    Example:
    ```python
    t = np.array([0.1, 0.5, 0.9])
    flow_weight(((1 - t) / t) ** 2, "min_snr", gamma=5.0)   # min((1 − t)², 5·t²)
    ```

    Reference:
        Hang et al., ICCV 2023 (Min-SNR-γ); Esser et al. 2024 (SD3, rectified flow).
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"Unknown loss weighting strategy {strategy!r}. "
            f"Allowed: {', '.join(STRATEGIES)}."
        )
    if not (np.isfinite(max_weight) and max_weight > 0):
        raise ValueError(f"max_weight must be a finite number > 0, got {max_weight!r}.")
    tensor = ops.is_tensor(snr)
    xp = ops if tensor else np
    s = ops.cast(ops.stop_gradient(snr), "float32") if tensor else np.asarray(snr, np.float64)
    if strategy == "constant":
        loss_weight(s, "constant", "sample", **params)  # validates s and the parameters
        return xp.ones_like(s)
    infinite = xp.equal(s, np.inf)
    finite_s = xp.where(infinite, xp.ones_like(s), s)
    # No clamp on w₀: snr-like weights grow like s but t² shrinks like 1/s, so only the
    # product may be clamped. float32's largest value keeps the inner clamp a no-op.
    w0 = loss_weight(
        finite_s, strategy, "sample", max_weight=float(np.finfo(np.float32).max), **params
    )
    t = 1.0 / (1.0 + xp.sqrt(finite_s))
    limit = _TABLE[strategy].flow_at_infinity(types.SimpleNamespace(
        p2_gamma=float(params.get("p2_gamma", 1.0))))
    weight = xp.where(infinite, limit, w0 * t * t)
    weight = xp.minimum(weight, max_weight)
    return ops.stop_gradient(weight) if tensor else weight


@keras.saving.register_keras_serializable(package="keras_minsnr")
class LossWeighting:
    """A loss weighting strategy with its parameters, callable and serialisable.

    Args:
        strategy: one of `STRATEGIES`.
        gamma: γ of ``max_snr``, ``min_snr`` and ``soft_min_snr``.
        p2_k, p2_gamma: parameters of ``p2``.
        max_weight: clamp for weights that diverge.
        terminal_weight: the weight where ``SNR == 0``: a number (default 1, the official
            code's choice) or ``"limit"`` (see `loss_weight`).

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
        terminal_weight=DEFAULT_TERMINAL_WEIGHT,
    ):
        _validate(strategy, None, gamma, p2_k, p2_gamma, max_weight, terminal_weight)
        self.strategy = strategy
        self.gamma = float(gamma)
        self.p2_k = float(p2_k)
        self.p2_gamma = float(p2_gamma)
        self.max_weight = float(max_weight)
        self.terminal_weight = (
            terminal_weight if isinstance(terminal_weight, str) else float(terminal_weight)
        )

    def __call__(self, snr, prediction_type):
        return loss_weight(snr, prediction_type=prediction_type, **self.get_config())

    def get_config(self):
        return {
            "strategy": self.strategy,
            "gamma": self.gamma,
            "p2_k": self.p2_k,
            "p2_gamma": self.p2_gamma,
            "max_weight": self.max_weight,
            "terminal_weight": self.terminal_weight,
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
        allowed = ("gamma", "p2_k", "p2_gamma", "max_weight", "terminal_weight")
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
