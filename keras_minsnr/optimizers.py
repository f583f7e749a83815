"""The optimizer of a training run: AdamW with warm-up, clipping and accumulation."""

import keras

from keras_minsnr.lr_schedules import PerUpdateSchedule


def grad_accum(config):
    """Micro-batches per optimizer update (``grad_accum``; 1 in configs from before it)."""
    return int(config.get("grad_accum", 1))


def make_optimizer(config):
    """AdamW with the config's rate (after a linear warm-up), betas, decay and clipping.

    With ``grad_accum`` N > 1 the optimizer accumulates N micro-batches per update, and
    the warm-up counts updates.
    """
    learning_rate = config["learning_rate"]
    accumulation = grad_accum(config)
    if config["warmup_steps"]:
        learning_rate = keras.optimizers.schedules.CosineDecay(
            0.0,
            decay_steps=1,
            alpha=1.0,
            warmup_target=learning_rate,
            warmup_steps=config["warmup_steps"],
        )
        if accumulation > 1:
            learning_rate = PerUpdateSchedule(learning_rate, accumulation)
    return keras.optimizers.AdamW(
        learning_rate,
        beta_1=config["beta_1"],
        beta_2=config["beta_2"],
        weight_decay=config["weight_decay"],
        clipnorm=config["clipnorm"],
        gradient_accumulation_steps=accumulation if accumulation > 1 else None,
    )
