"""The optimizer of a training run: AdamW with the config's learning-rate schedule.

A *step* is one optimizer update; with ``grad_accum`` N an update averages N
micro-batches, and the schedule counts updates (`PerUpdateSchedule`).
"""

import keras

from keras_minsnr import backend as backend_lib
from keras_minsnr.lr_schedules import PerUpdateSchedule
from keras_minsnr.lr_schedules import WarmupDecaySchedule


@keras.saving.register_keras_serializable(package="keras_minsnr")
class AdamW(keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` whose per-weight update on TensorFlow is one fused kernel.

    The arithmetic is Keras' AdamW, in Keras' order: TensorFlow's ``ApplyAdam`` kernel
    computes ``m += (g - m)(1 - β₁)``, ``v += (g² - v)(1 - β₂)`` and
    ``w -= α·m / (√v + ε)`` with ``α = lr·√(1 - β₂ᵗ) / (1 - β₁ᵗ)``, as
    `keras.optimizers.Adam.update_step` writes them (``1 - β`` is formed in float32
    there, in float64 by Keras: results agree to float32 rounding). It does so in one pass over the
    weight and its two slots, where Keras' ops make about ten (TensorFlow runs them
    unfused outside XLA), and as one op in the traced step instead of about twenty, which
    matters for models with hundreds of weights (the SD UNet has 684). The step counter,
    β powers and learning rate are computed once per update, not once per weight. On JAX,
    and with ``amsgrad``, it is Keras' AdamW unchanged. The configuration is Keras'
    AdamW's, so everything that builds one from a config builds this.

    Args:
        Those of `keras.optimizers.AdamW`.

    Example:

    ```python
    model.compile(optimizer=kms.optimizers.AdamW(1e-4, weight_decay=0.03))
    ```
    """

    def _fused(self):
        return keras.backend.backend() == "tensorflow" and not self.amsgrad

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if self._fused():
            # The scalars every weight's kernel takes, once per update (Keras' update_step
            # recomputes them for each weight).
            self._adam_scalars = backend_lib.adam_scalars_tensorflow(self, learning_rate)
        try:
            super()._backend_update_step(grads, trainable_variables, learning_rate)
        finally:
            self._adam_scalars = None

    def update_step(self, gradient, variable, learning_rate):
        scalars = getattr(self, "_adam_scalars", None)
        if scalars is None:
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        backend_lib.adam_update_tensorflow(
            variable, self._momentums[index], self._velocities[index], gradient, scalars)

    def _apply_weight_decay(self, variables):
        if not self._fused() or self.weight_decay is None:
            return super()._apply_weight_decay(variables)
        # lr·wd once per update; Keras reads the (scheduled) learning rate per weight.
        backend_lib.decay_weights_tensorflow(
            self, [v for v in variables if self._use_weight_decay(v)])


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
    return AdamW(
        learning_rate,
        beta_1=config["beta_1"],
        beta_2=config["beta_2"],
        weight_decay=config["weight_decay"],
        clipnorm=config["clipnorm"],
        gradient_accumulation_steps=accumulation if accumulation > 1 else None,
    )
