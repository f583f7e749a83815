"""Gradient checkpointing: blocks whose activations are recomputed in the backward pass.

A block called through `rematerialized` keeps only its inputs for the backward pass and
runs its forward again there (`keras.remat`: ``jax.checkpoint`` on JAX,
``tf.recompute_grad`` on TensorFlow). The activations held between the forward and the
backward pass shrink from every block's to the block boundaries plus one block's, for
about one more forward pass of compute (≈ +1/3 of a step's FLOPs). Losses and gradients
are those of the plain blocks.

Each backbone chooses its own boundaries (the transformer blocks, the UNet's stages) and
reads its ``gradient_checkpointing`` attribute when it is traced, so the setting can
change between sessions of a run without touching the weights
(`keras_minsnr.backbones.contract.set_gradient_checkpointing`).
"""

import keras
import numpy as np


def check_flag(value):
    """``value`` as a bool; `ValueError` unless it is True or False."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"gradient_checkpointing must be True or False, got {value!r}.")
    return bool(value)


def rematerialized(layer, enabled, **call_kwargs):
    """``layer`` (a layer or a function of layers) called on positional tensors,
    recomputed in the backward pass when ``enabled``.

    Every tensor that needs a gradient must be a positional argument: TensorFlow's
    ``recompute_grad`` gives gradients to its arguments and the variables read inside,
    not to tensors the function closes over. ``call_kwargs`` (``training``, a
    `DrawnSeed`) are fixed for the call.
    """

    def call(*tensors):
        return layer(*tensors, **call_kwargs)

    return keras.remat(call) if enabled else call


class DrawnSeed(keras.random.SeedGenerator):
    """A seed drawn outside a recomputed block, handed to the random ops inside it.

    A seed generator advanced inside the block would give the recomputation a different
    dropout mask from the forward pass (and, on JAX, leak the new state out of
    ``jax.checkpoint``). Drawing the seed once before the block and returning it on every
    `next()` gives both passes the mask the plain block would draw: ``Dropout`` draws
    ``seed_generator.next()`` too.

    Args:
        seed: the seed tensor, e.g. ``dropout_layer.seed_generator.next()``.

    Example:
    ```python
    seed = DrawnSeed(dropout_layer.seed_generator.next())
    keras.random.dropout(x, 0.1, seed=seed)  # the mask dropout_layer(x) would draw
    ```
    """

    def __init__(self, seed):  # no state variable: nothing to advance
        self._drawn = seed

    def next(self, ordered=True):
        return self._drawn
