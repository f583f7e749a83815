"""The optimizer of a training run: AdamW with the config's learning-rate schedule.

A *step* is one optimizer update; with ``grad_accum`` N an update averages N
micro-batches, and the schedule counts updates (`PerUpdateSchedule`).
"""

import keras

from keras_minsnr.lr_schedules import PerUpdateSchedule
from keras_minsnr.lr_schedules import WarmupDecaySchedule


def grad_accum(config):
    """Micro-batches per optimizer update (``grad_accum``; 1 in configs from before it)."""
    return int(config.get("grad_accum", 1))


def learning_rate_schedule(config):
    """The run's learning rate over updates: a float when it is constant without warm-up,
    else a `WarmupDecaySchedule` (``lr_schedule``, ``warmup_steps``, ``lr_num_cycles``,
    ``lr_power`` over ``steps`` updates)."""
    kind = config.get("lr_schedule", "constant")
    if kind == "constant" and not config["warmup_steps"]:
        return config["learning_rate"]
    return WarmupDecaySchedule(
        config["learning_rate"],
        total_steps=config["steps"],
        kind=kind,
        warmup_steps=config["warmup_steps"],
        num_cycles=config.get("lr_num_cycles", 1),
        power=config.get("lr_power", 1.0),
    )


def make_optimizer(config):
    """AdamW with the config's learning-rate schedule, betas, decay and clipping.

    With ``grad_accum`` N > 1 the optimizer accumulates N micro-batches per update, and
    the schedule counts updates.
    """
    learning_rate = learning_rate_schedule(config)
    accumulation = grad_accum(config)
    if accumulation > 1 and not isinstance(learning_rate, float):
        learning_rate = PerUpdateSchedule(learning_rate, accumulation)
    return keras.optimizers.AdamW(
        learning_rate,
        beta_1=config["beta_1"],
        beta_2=config["beta_2"],
        weight_decay=config["weight_decay"],
        clipnorm=config["clipnorm"],
        gradient_accumulation_steps=accumulation if accumulation > 1 else None,
    )
