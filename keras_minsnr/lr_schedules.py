"""Learning-rate schedules that count optimizer updates under gradient accumulation."""

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
