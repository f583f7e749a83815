"""Discrete-time noise schedules and the conversions between prediction targets.

Notation: ``alphas_cumprod[t] = ᾱ_t``, ``α_t = sqrt(ᾱ_t)``,
``σ_t = sqrt(1 - ᾱ_t)``, ``SNR(t) = ᾱ_t / (1 - ᾱ_t)`` and ``x_t = α_t x_0 + σ_t ε``.
The tables are float64 numpy; tensor inputs get float32 tensors gathered from them.
"""

import math

import keras
import numpy as np
from keras import ops

SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def check_prediction_type(prediction_type):
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"Unknown prediction_type {prediction_type!r}. "
            f"Allowed: {', '.join(PREDICTION_TYPES)}."
        )
    return prediction_type


def make_betas(name, num_timesteps):
    """The betas of a named schedule, float64 numpy of shape ``(num_timesteps,)``."""
    if name not in SCHEDULES:
        raise ValueError(
            f"Unknown noise schedule {name!r}. Allowed: {', '.join(SCHEDULES)}."
        )
    if int(num_timesteps) != num_timesteps or num_timesteps < 2:
        raise ValueError(
            f"num_timesteps must be an integer >= 2, got {num_timesteps!r}."
        )
    T = int(num_timesteps)
    if name == "linear":
        scale = 1000.0 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    if name == "scaled_linear":
        return np.linspace(0.00085**0.5, 0.012**0.5, T, dtype=np.float64) ** 2

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1.0 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)],
        dtype=np.float64,
    )


def rescale_zero_terminal_snr(alphas_cumprod):
    """Shifts and scales ``sqrt(ᾱ)`` so the last step has SNR 0 and the first keeps its value.

    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Algorithm 1.
    """
    root = np.sqrt(np.asarray(alphas_cumprod, dtype=np.float64))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    return root**2


def epsilon_sample_or_v(schedule, x0, noise, t, prediction_type):
    """ε, x₀ or ``schedule.velocity`` (v) as the training target of ``prediction_type``."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    return schedule.velocity(x0, noise, t)


def gather_steps(table, t, hint=""):
    """``table[t]`` for integer steps ``t``: float64 numpy for numpy input (checked against
    the table's length), a float32 tensor for tensor input."""
    if ops.is_tensor(t):
        return ops.take(ops.convert_to_tensor(table, dtype="float32"), ops.cast(t, "int32"))
    t = np.asarray(t)
    if not np.issubdtype(t.dtype, np.integer):
        if not np.all(np.equal(np.mod(t, 1), 0)):
            raise ValueError(f"Timesteps must be integers (step indices), got {t!r}{hint}.")
        t = t.astype(np.int64)
    if t.size and (t.min() < 0 or t.max() >= len(table)):
        raise ValueError(
            f"Timesteps must lie in [0, {len(table) - 1}], got values from {t.min()} to "
            f"{t.max()}."
        )
    return table[t]


@keras.saving.register_keras_serializable(package="keras_minsnr")
class NoiseSchedule:
    """A discrete diffusion noise schedule.

    Args:
        name: ``"linear"`` (DDPM/ADM), ``"scaled_linear"`` (Stable Diffusion) or
            ``"cosine"`` (improved DDPM; the Min-SNR paper's choice).
        num_timesteps: number of discrete steps ``T`` (>= 2).
        zero_terminal_snr: rescale so that ``SNR(T-1) == 0`` exactly (pair it with the
            ``v_prediction`` or ``sample`` target: an ε-prediction carries no information
            about ``x_0`` at SNR 0).

    Methods taking timesteps ``t`` accept numpy/Python integers (and answer in float64
    numpy) or integer tensors (and answer in float32 tensors, usable inside compiled
    train steps). Out-of-range numpy timesteps raise; tensor timesteps are not checked
    because the check cannot run inside a compiled graph.

    Example:
    ```python
    sched = NoiseSchedule("cosine", num_timesteps=1000)
    sched.snr([0, 500, 999])           # float64 numpy
    x_t = sched.add_noise(x0, noise, t)  # keras tensors
    ```

    Reference:
        Ho et al. 2020 (linear); Nichol & Dhariwal 2021 (cosine); Rombach et al. 2022
        (scaled_linear); Lin et al. 2023 (zero terminal SNR).
    """

    def __init__(self, name="cosine", num_timesteps=1000, zero_terminal_snr=False):
        betas = make_betas(name, num_timesteps)
        self.name = name
        self.num_timesteps = int(num_timesteps)
        self.zero_terminal_snr = bool(zero_terminal_snr)
        alphas_cumprod = np.cumprod(1.0 - betas)
        if self.zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
            betas = 1.0 - alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self._snr_table = alphas_cumprod / (1.0 - alphas_cumprod)

    # -- tables -----------------------------------------------------------------------

    def _gather(self, table, t):
        return gather_steps(table, t)

    def snr(self, t):
        """Signal-to-noise ratio ``ᾱ_t / (1 - ᾱ_t)`` at integer timesteps."""
        return self._gather(self._snr_table, t)

    def log_snr(self, t):
        """Natural log of the SNR (``-inf`` at a zero-terminal step)."""
        with np.errstate(divide="ignore"):
            return self._gather(np.log(self._snr_table), t)

    def alpha(self, t):
        """Signal scale ``α_t = sqrt(ᾱ_t)``."""
        return self._gather(np.sqrt(self.alphas_cumprod), t)

    def sigma(self, t):
        """Noise scale ``σ_t = sqrt(1 - ᾱ_t)``."""
        return self._gather(np.sqrt(1.0 - self.alphas_cumprod), t)

    # -- the forward process and targets ----------------------------------------------

    def _scales(self, t, like):
        """``α_t`` and ``σ_t`` shaped to broadcast against ``like`` (B, ...)."""
        alpha, sigma = self.alpha(t), self.sigma(t)
        shape = (-1,) + (1,) * (len(like.shape) - 1)
        if ops.is_tensor(like) or ops.is_tensor(alpha):
            return (
                ops.cast(ops.reshape(alpha, shape), like.dtype),
                ops.cast(ops.reshape(sigma, shape), like.dtype),
            )
        return alpha.reshape(shape), sigma.reshape(shape)

    def add_noise(self, x0, noise, t):
        """The forward process ``x_t = α_t x_0 + σ_t ε`` for a batch (B, ...)."""
        alpha, sigma = self._scales(t, x0)
        return alpha * x0 + sigma * noise

    def velocity(self, x0, noise, t):
        """``v = α_t ε − σ_t x_0`` (Salimans & Ho 2022)."""
        alpha, sigma = self._scales(t, x0)
        return alpha * noise - sigma * x0

    def target(self, x0, noise, t, prediction_type):
        """What a backbone trained for ``prediction_type`` should output at ``x_t``."""
        return epsilon_sample_or_v(self, x0, noise, t, check_prediction_type(prediction_type))

    # -- conversions between the three parameterisations ------------------------------

    def predict_x0_and_epsilon(self, x_t, prediction, t, prediction_type):
        """Both ``x̂_0`` and ``ε̂`` implied by a prediction of any target.

        From an ε-prediction ``x̂_0 = (x_t − σ ε̂) / α`` is undefined where ``α = 0`` (a
        zero-terminal step); there ``α`` is floored at 1e-8 (document: pair zero
        terminal SNR with ``v_prediction``). From an x₀-prediction ``σ > 0`` always holds.
        """
        check_prediction_type(prediction_type)
        alpha, sigma = self._scales(t, x_t)
        xp = ops if ops.is_tensor(alpha) else np
        if prediction_type == "epsilon":
            eps = prediction
            x0 = (x_t - sigma * eps) / xp.maximum(alpha, 1e-8)
        elif prediction_type == "sample":
            x0 = prediction
            eps = (x_t - alpha * x0) / xp.maximum(sigma, 1e-8)
        else:
            x0 = alpha * x_t - sigma * prediction
            eps = sigma * x_t + alpha * prediction
        return x0, eps

    def convert_prediction(self, x_t, prediction, t, from_type, to_type):
        """Re-expresses a prediction of ``from_type`` as one of ``to_type``."""
        check_prediction_type(to_type)
        x0, eps = self.predict_x0_and_epsilon(x_t, prediction, t, from_type)
        if to_type == "sample":
            return x0
        if to_type == "epsilon":
            return eps
        return self.velocity(x0, eps, t)

    # -- serialisation -----------------------------------------------------------------

    def get_config(self):
        return {
            "name": self.name,
            "num_timesteps": self.num_timesteps,
            "zero_terminal_snr": self.zero_terminal_snr,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return (
            f"NoiseSchedule({self.name!r}, num_timesteps={self.num_timesteps}, "
            f"zero_terminal_snr={self.zero_terminal_snr})"
        )
