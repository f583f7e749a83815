"""Rectified flow: the schedule and ODE samplers.

Notation: ``x_t = (1 − t)·x₀ + t·ε`` for ``t ∈ [0, 1]`` (``t = 1`` is pure
noise), velocity ``u = ε − x₀``, ``α_t = 1 − t``, ``σ_t = t``, ``SNR(t) = (1 − t)² / t²``.
Because ``x̂₀ = x_t − t·û`` and ``ε̂ = x_t + (1 − t)·û``::

    ‖x̂₀ − x₀‖² = t²·‖û − u‖²        ‖ε̂ − ε‖² = (1 − t)²·‖û − u‖²

so an x₀-space weight ``w₀(SNR)`` is ``w_u = t²·w₀(SNR(t))`` in velocity space, and with
``t = 1 / (1 + √SNR)`` that is ``w₀(s) / (1 + √s)²``: Min-SNR-γ becomes
``min((1 − t)², γ·t²)`` (`keras_minsnr.weighting.flow_weight`). See
docs/flow_matching.md.
"""

import keras
import numpy as np
from keras import ops

from keras_minsnr.backend import compile_function
from keras_minsnr.samplers import compiled_loop
from keras_minsnr.samplers import run_loop
from keras_minsnr.schedules import epsilon_sample_or_v
from keras_minsnr.schedules import gather_steps

FLOW_PREDICTION_TYPES = ("flow", "epsilon", "sample", "v_prediction")
FLOW_SAMPLERS = ("euler", "heun")


def check_flow_prediction_type(prediction_type):
    if prediction_type not in FLOW_PREDICTION_TYPES:
        raise ValueError(
            f"Unknown prediction_type {prediction_type!r} for a flow-matching schedule. "
            f"Allowed: {', '.join(FLOW_PREDICTION_TYPES)}."
        )
    return prediction_type


def _check_shift(shift):
    if not (np.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}.")
    return float(shift)


def shift_time(t, shift):
    """SD3's time shift ``t' = shift·t / (1 + (shift − 1)·t)`` (numpy or tensor).

    It maps [0, 1] onto itself and multiplies the noise-to-signal ratio ``t / (1 − t)``
    by ``shift``: ``SNR(t') = SNR(t) / shift²``, so ``shift > 1`` spends more steps at
    high noise (Esser et al. 2024, §5.3.2).
    """
    return shift * t / (1.0 + (shift - 1.0) * t)


def unshift_time(t, shift):
    """The inverse of `shift_time`: ``t = t' / (shift − (shift − 1)·t')``."""
    return t / (shift - (shift - 1.0) * t)


@keras.saving.register_keras_serializable(package="keras_minsnr")
class FlowMatchingSchedule:
    """A discrete rectified-flow (flow-matching) schedule with the `NoiseSchedule` interface.

    Step ``i ∈ {0 … T−1}`` has time ``t_i = shift_time((i + 1) / T, shift)`` — the grid of
    SD3's 1000-step training: the first step is slightly noisy (``t_0 = 1/T`` unshifted)
    and the last is pure noise (``t_{T−1} = 1``, SNR 0). The backbone receives the integer
    step ``i`` (int32), as with `NoiseSchedule`; `timestep_index` maps a continuous time
    back to the nearest step for samplers.

    Prediction types: ``"flow"`` (velocity ``u = ε − x₀``), ``"epsilon"``, ``"sample"`` and
    ``"v_prediction"``. For ``v`` the flow's ``α_t = 1 − t``, ``σ_t = t`` are normalised by
    ``c_t = √(α_t² + σ_t²)``: ``v = (α_t·ε − σ_t·x₀) / c_t``, which is diffusers' ``v`` of the
    variance-preserving latent ``x_t / c_t`` (same SNR). So ``‖v̂ − v‖² = (SNR + 1)·‖x̂₀ − x₀‖²``
    holds as for `NoiseSchedule` and `loss_weight(..., "v_prediction")` applies unchanged.

    Args:
        num_timesteps: number of discrete steps ``T`` (>= 2).
        shift: SD3's time shift (``1.0`` = none; SD3 trains with 3.0 at 1024²).

    Example:
    ```python
    sched = FlowMatchingSchedule(num_timesteps=1000, shift=3.0)
    sched.snr([0, 500, 999])                            # float64 numpy; SNR(999) = 0
    x_t = sched.add_noise(x0, noise, t)                 # (1 − t)·x₀ + t·ε
    u = sched.target(x0, noise, t, "flow")              # ε − x₀
    ```

    Reference:
        Liu et al. 2023, "Flow Straight and Fast" (rectified flow); Esser et al. 2024,
        "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3).
    """

    name = "flow"
    # The last step is pure noise: SNR(T − 1) = 0, as for a zero-terminal-SNR schedule.
    zero_terminal_snr = True

    def __init__(self, num_timesteps=1000, shift=1.0):
        if int(num_timesteps) != num_timesteps or num_timesteps < 2:
            raise ValueError(
                f"num_timesteps must be an integer >= 2, got {num_timesteps!r}."
            )
        self.num_timesteps = int(num_timesteps)
        self.shift = _check_shift(shift)
        T = self.num_timesteps
        self.times = shift_time(np.arange(1, T + 1, dtype=np.float64) / T, self.shift)
        self.times[-1] = 1.0  # exact, whatever the rounding of the shift
        with np.errstate(divide="ignore"):
            self._snr_table = (1.0 - self.times) ** 2 / self.times**2
            self._log_snr_table = 2.0 * (np.log1p(-self.times) - np.log(self.times))

    # -- tables -----------------------------------------------------------------------

    def _gather(self, table, t):
        return gather_steps(table, t, " (for a continuous time use `timestep_index`)")

    def time(self, t):
        """The flow time ``t_i ∈ (0, 1]`` of integer steps."""
        return self._gather(self.times, t)

    def snr(self, t):
        """``SNR = (1 − t_i)² / t_i²`` at integer steps (0 at the last step)."""
        return self._gather(self._snr_table, t)

    def log_snr(self, t):
        """``2·log((1 − t_i) / t_i)`` (``-inf`` at the last step)."""
        return self._gather(self._log_snr_table, t)

    def alpha(self, t):
        """Signal scale ``α = 1 − t_i``."""
        return self._gather(1.0 - self.times, t)

    def sigma(self, t):
        """Noise scale ``σ = t_i``."""
        return self._gather(self.times, t)

    def timestep_index(self, time):
        """The step whose time is nearest (in unshifted time) to a continuous ``time``.

        Numpy in gives int64 numpy; a tensor gives an int32 tensor (usable when a sampler
        hands continuous times to a backbone that embeds integer steps).
        """
        xp = ops if ops.is_tensor(time) else np
        u = unshift_time(xp.clip(time, 0.0, 1.0), self.shift)
        index = xp.clip(xp.round(u * self.num_timesteps - 1.0), 0, self.num_timesteps - 1)
        return ops.cast(index, "int32") if xp is ops else index.astype(np.int64)

    # -- the forward process and targets ----------------------------------------------

    def _scales(self, t, like):
        """``α = 1 − t`` and ``σ = t`` shaped to broadcast against ``like`` (B, ...)."""
        sigma = self.sigma(t)
        shape = (-1,) + (1,) * (len(like.shape) - 1)
        if ops.is_tensor(like) or ops.is_tensor(sigma):
            sigma = ops.cast(ops.reshape(sigma, shape), like.dtype)
        else:
            sigma = sigma.reshape(shape)
        return 1.0 - sigma, sigma

    def add_noise(self, x0, noise, t):
        """The forward process ``x_t = (1 − t)·x₀ + t·ε`` for a batch (B, ...)."""
        alpha, sigma = self._scales(t, x0)
        return alpha * x0 + sigma * noise

    def flow_velocity(self, x0, noise, t=None):
        """The rectified-flow velocity ``u = ε − x₀ = dx_t/dt`` (independent of ``t``)."""
        return noise - x0

    def velocity(self, x0, noise, t):
        """``v = ((1 − t)·ε − t·x₀) / √((1 − t)² + t²)`` (see the class docstring)."""
        alpha, sigma = self._scales(t, x0)
        c = (alpha * alpha + sigma * sigma) ** 0.5
        return (alpha * noise - sigma * x0) / c

    def target(self, x0, noise, t, prediction_type):
        """What a backbone trained for ``prediction_type`` should output at ``x_t``."""
        if check_flow_prediction_type(prediction_type) == "flow":
            return self.flow_velocity(x0, noise)
        return epsilon_sample_or_v(self, x0, noise, t, prediction_type)

    def predict_x0_and_epsilon(self, x_t, prediction, t, prediction_type):
        """Both ``x̂₀`` and ``ε̂`` implied by a prediction of any target.

        From ``û``: ``x̂₀ = x_t − t·û``, ``ε̂ = x_t + (1 − t)·û`` (exact at every step). From
        an ε-prediction ``x̂₀ = (x_t − t·ε̂) / (1 − t)`` is undefined at the last step
        (``t = 1``); there ``1 − t`` is floored at 1e-8, as `NoiseSchedule` does.
        """
        check_flow_prediction_type(prediction_type)
        alpha, sigma = self._scales(t, x_t)
        return _invert(x_t, prediction, alpha, sigma, prediction_type)

    def velocity_at_time(self, x_t, prediction, time, prediction_type):
        """The velocity ``û = ε̂ − x̂₀`` implied by a prediction at continuous times.

        For the flow samplers, which integrate at times between the training steps:
        ``time`` is a float tensor of shape (B,) and the inversions of
        `predict_x0_and_epsilon` are taken at ``t = time`` itself (the backbone still gets
        the nearest integer step, `timestep_index`). A ``"flow"`` prediction is returned
        unchanged.
        """
        check_flow_prediction_type(prediction_type)
        if prediction_type == "flow":
            return prediction
        sigma = ops.reshape(ops.cast(time, x_t.dtype), (-1,) + (1,) * (len(x_t.shape) - 1))
        x0, eps = _invert(x_t, prediction, 1.0 - sigma, sigma, prediction_type)
        return eps - x0

    def convert_prediction(self, x_t, prediction, t, from_type, to_type):
        """Re-expresses a prediction of ``from_type`` as one of ``to_type``."""
        check_flow_prediction_type(to_type)
        x0, eps = self.predict_x0_and_epsilon(x_t, prediction, t, from_type)
        return self.target(x0, eps, t, to_type)

    # -- serialisation -----------------------------------------------------------------

    def get_config(self):
        return {"num_timesteps": self.num_timesteps, "shift": self.shift}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"FlowMatchingSchedule(num_timesteps={self.num_timesteps}, shift={self.shift})"


def _invert(x_t, prediction, alpha, sigma, prediction_type):
    """``(x̂₀, ε̂)`` from a prediction, given ``α = 1 − t`` and ``σ = t`` shaped like ``x_t``."""
    xp = ops if ops.is_tensor(alpha) else np
    if prediction_type == "flow":
        return x_t - sigma * prediction, x_t + alpha * prediction
    if prediction_type == "epsilon":
        return (x_t - sigma * prediction) / xp.maximum(alpha, 1e-8), prediction
    if prediction_type == "sample":
        return prediction, (x_t - alpha * prediction) / xp.maximum(sigma, 1e-8)
    # v of the variance-preserving latent z = x_t / c: x₀ = a·z − b·v, ε = b·z + a·v.
    c = (alpha * alpha + sigma * sigma) ** 0.5
    a, b, z = alpha / c, sigma / c, x_t / c
    return a * z - b * prediction, b * z + a * prediction


# -- ODE samplers -----------------------------------------------------------------------


def check_flow_sampler(sampler):
    if sampler not in FLOW_SAMPLERS:
        raise ValueError(
            f"Unknown flow sampler {sampler!r}. Allowed: {', '.join(FLOW_SAMPLERS)}."
        )
    return sampler


def flow_time_grid(num_steps, shift=1.0):
    """``num_steps + 1`` float64 times from 1 (noise) to 0 (data), shifted as in SD3."""
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
    return shift_time(np.linspace(1.0, 0.0, int(num_steps) + 1), _check_shift(shift))


def make_flow_step_functions(velocity):
    """Compiled Euler and Heun steps around a pure ``velocity(params, x, t)``: single steps
    and whole loops.

    ``velocity`` gets the current samples ``x`` (B, ...) and the continuous flow time ``t``
    as a float32 tensor of shape (B,), and returns ``dx/dt`` shaped like ``x``. It does
    everything model-specific: classifier-free guidance (``u_uncond + w·(u_cond −
    u_uncond)``), conversion from another prediction type, or mapping ``t`` to integer
    steps with `FlowMatchingSchedule.timestep_index`.

    The ``*_loop`` entries run steps ``start … stop−1`` with `keras.ops.fori_loop`, step
    ``i`` going from ``t[i]`` to ``t_next[i]`` (float32 tensors of shape ``(num_steps,)``),
    so a whole run is one compiled call (see `keras_minsnr.samplers.make_step_functions`).

    Example (a flow backbone with classifier-free guidance):
    ```python
    def velocity(params, x, t):
        weights, labels, null, scale = params
        steps = schedule.timestep_index(t)
        both = backbone.stateless_call(weights, [], {
            "x": ops.concatenate([x, x]), "t": ops.concatenate([steps, steps]),
            "y": ops.concatenate([labels, null])})[0]
        cond, uncond = ops.split(both, 2)
        return uncond + scale * (cond - uncond)

    steps = make_flow_step_functions(velocity)
    images = sample_flow(steps, params, (16, 32, 32, 4), "heun", num_steps=28, shift=3.0)
    ```
    """

    def batch_t(x, t):
        return ops.full((ops.shape(x)[0],), t, dtype="float32")

    def euler_step(params, x, t, t_next):
        return x + (t_next - t) * velocity(params, x, batch_t(x, t))

    def heun_step(params, x, t, t_next):
        h = t_next - t
        d = velocity(params, x, batch_t(x, t))
        d_next = velocity(params, x + h * d, batch_t(x, t_next))
        return x + 0.5 * h * (d + d_next)

    return {
        "euler": compile_function(euler_step),
        "heun": compile_function(heun_step),
        "euler_loop": compiled_loop(euler_step),
        "heun_loop": compiled_loop(heun_step),
    }


def sample_flow(
    step_functions,
    params,
    shape,
    sampler="euler",
    num_steps=50,
    shift=1.0,
    seed=None,
    noise=None,
    progress=None,
    loop=True,
):
    """Integrates ``dx/dt = u(x, t)`` from ``t = 1`` (noise) to ``t = 0`` (data).

    Args:
        step_functions: the dict from `make_flow_step_functions(velocity)`.
        params: passed to ``velocity`` unchanged.
        shape: ``(B, ...)`` of the samples.
        sampler: ``"euler"`` (one velocity call per step) or ``"heun"`` (second order; two
            calls per step except the last, which is an Euler step into ``t = 0`` as in
            EDM, so ``2·num_steps − 1`` calls and the velocity is never asked at ``t = 0``).
        num_steps: integration steps on `flow_time_grid(num_steps, shift)`.
        shift: SD3's time shift of the grid (``> 1`` takes smaller steps near the noise).
        seed: seeds the numpy generator of the starting noise.
        noise: the starting point itself (overrides ``seed``), shaped ``shape``.
        progress: an optional `keras.utils.Progbar`-like object with ``update(i)``; the
            looped path updates it once per chunk of steps
            (`keras_minsnr.samplers.PROGRESS_UPDATES`).
        loop: ``True`` (default) compiles the loop over steps once (Heun: plus its last
            Euler step); ``False`` makes one compiled call per step from Python (same
            samples, for comparison).

    Returns:
        float32 numpy samples of ``shape``.
    """
    check_flow_sampler(sampler)
    times = flow_time_grid(num_steps, shift)
    if noise is None:
        noise = np.random.default_rng(seed).standard_normal(shape)
    x = ops.convert_to_tensor(np.asarray(noise, dtype="float32").reshape(shape))
    num_steps = len(times) - 1
    first = 0
    if loop:
        # Heun's last step is an Euler step (below); Euler loops over every step.
        looped = num_steps if sampler == "euler" else num_steps - 1
        if looped > 0:
            scalars = (times[:looped].astype("float32"), times[1 : looped + 1].astype("float32"))
            x = run_loop(
                step_functions[sampler + "_loop"], params, x, scalars, looped,
                lambda m: None, progress,
            )
        first = looped
    for i in range(first, num_steps):
        last = i + 1 == num_steps
        step = step_functions["euler" if last else sampler]
        x = step(
            params,
            x,
            ops.convert_to_tensor(times[i], "float32"),
            ops.convert_to_tensor(times[i + 1], "float32"),
        )
        if progress is not None:
            progress.update(i + 1)
    return ops.convert_to_numpy(x).astype("float32")


def num_flow_calls(sampler, num_steps):
    """Velocity evaluations `sample_flow` makes."""
    check_flow_sampler(sampler)
    return num_steps if sampler == "euler" else 2 * num_steps - 1

