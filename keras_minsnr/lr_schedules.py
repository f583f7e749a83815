"""Learning-rate schedules: warm-up and decay (diffusers' kinds), counted in optimizer
updates under gradient accumulation."""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_minsnr")
class PerUpdateSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule stepped by optimizer updates under gradient accumulation.

    Keras evaluates a schedule at its count of micro-batches; an update that accumulates
    ``accumulation_steps`` of them reads the schedule at the update's own index instead,
    so a warm-up of W steps lasts W updates whatever the accumulation.

    Args:
        schedule: the `LearningRateSchedule` over updates.
        accumulation_steps: the optimizer's ``gradient_accumulation_steps``.

    Example:
    ```python
    warmup = keras.optimizers.schedules.CosineDecay(0.0, 1, warmup_target=1e-4,
                                                    warmup_steps=5000)
    optimizer = keras.optimizers.AdamW(PerUpdateSchedule(warmup, 4),
                                       gradient_accumulation_steps=4)
    ```

    Reference:
        `keras.optimizers.Optimizer(gradient_accumulation_steps=...)`, whose
        ``iterations`` counts updates while its schedule sees every micro-batch.
    """

    def __init__(self, schedule, accumulation_steps):
        if int(accumulation_steps) != accumulation_steps or accumulation_steps < 1:
            raise ValueError(
                f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}."
            )
        self.schedule = schedule
        self.accumulation_steps = int(accumulation_steps)

    def __call__(self, step):
        return self.schedule(ops.floor_divide(step, self.accumulation_steps))

    def get_config(self):
        return {
            "schedule": keras.optimizers.schedules.serialize(self.schedule),
            "accumulation_steps": self.accumulation_steps,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schedule"] = keras.optimizers.schedules.deserialize(config["schedule"])
        return cls(**config)


LR_SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")


@keras.saving.register_keras_serializable(package="keras_minsnr")
class WarmupDecaySchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A linear warm-up to ``learning_rate``, then one of diffusers' decays to the end.

    At update ``s`` (0-based) the rate is ``learning_rate · s / warmup_steps`` during the
    warm-up; after it, with the progress ``p = (s − W) / (total_steps − W)`` clipped to
    [0, 1], it is ``learning_rate`` times

    - ``constant``: 1;
    - ``linear``: ``1 − p``;
    - ``cosine``: ``(1 + cos(π p)) / 2``;
    - ``cosine_with_restarts``: ``(1 + cos(π · frac(num_cycles · p))) / 2`` for p < 1,
      then 0 (``num_cycles`` hard restarts);
    - ``polynomial``: ``(1 − e) · (1 − p)^power + e`` with
      ``e = end_learning_rate / learning_rate``.

    Args:
        learning_rate: the peak rate, reached at the end of the warm-up.
        total_steps: the run's optimizer updates (where the decays reach their end).
        kind: one of `LR_SCHEDULES`.
        warmup_steps: updates of the linear warm-up from 0.
        num_cycles: restarts of ``cosine_with_restarts``.
        power: exponent of ``polynomial``.
        end_learning_rate: the last rate of ``polynomial``.

    Example:
    ```python
    schedule = WarmupDecaySchedule(1e-4, total_steps=10_000, kind="cosine",
                                   warmup_steps=500)
    optimizer = keras.optimizers.AdamW(schedule)
    ```

    Reference:
        diffusers' ``get_scheduler`` (``--lr_scheduler``, ``--lr_warmup_steps``,
        ``--lr_num_cycles``, ``--lr_power``), whose definitions these follow.
    """

    def __init__(self, learning_rate, total_steps, kind="constant", warmup_steps=0,
                 num_cycles=1, power=1.0, end_learning_rate=1e-7):
        if kind not in LR_SCHEDULES:
            raise ValueError(
                f"Unknown lr_schedule {kind!r}. Allowed: {', '.join(LR_SCHEDULES)}."
            )
        if kind == "polynomial" and not end_learning_rate < learning_rate:
            raise ValueError(
                f"The polynomial schedule decays to end_learning_rate={end_learning_rate}, "
                f"which must be below learning_rate={learning_rate}."
            )
        self.learning_rate = float(learning_rate)
        self.total_steps = int(total_steps)
        self.kind = kind
        self.warmup_steps = int(warmup_steps)
        self.num_cycles = int(num_cycles)
        self.power = float(power)
        self.end_learning_rate = float(end_learning_rate)

    def _decay(self, progress):
        if self.kind == "constant":
            return ops.ones_like(progress)
        if self.kind == "linear":
            return 1.0 - progress
        if self.kind == "cosine":
            return 0.5 * (1.0 + ops.cos(math.pi * progress))
        if self.kind == "cosine_with_restarts":
            phase = ops.mod(self.num_cycles * progress, 1.0)
            return ops.where(progress < 1.0, 0.5 * (1.0 + ops.cos(math.pi * phase)), 0.0)
        end = self.end_learning_rate / self.learning_rate
        return (1.0 - end) * ops.power(1.0 - progress, self.power) + end

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = float(self.warmup_steps)
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        progress = ops.clip((step - warmup) / decay_steps, 0.0, 1.0)
        ramp = step / max(warmup, 1.0)
        factor = ops.where(step < warmup, ramp, self._decay(progress))
        return self.learning_rate * factor

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "total_steps": self.total_steps,
            "kind": self.kind,
            "warmup_steps": self.warmup_steps,
            "num_cycles": self.num_cycles,
            "power": self.power,
            "end_learning_rate": self.end_learning_rate,
        }
