"""Comparing the whole state of saved models (weights, EMA, seed states, optimizer)."""

import keras
import numpy as np


def all_weights(path):
    """``[(name, float64 array)]`` of every variable of the model saved at ``path``."""
    model = keras.models.load_model(path)
    values = [*model.trainable_variables, *model.non_trainable_variables,
              *model.optimizer.variables]
    return [(v.name, np.asarray(keras.ops.convert_to_numpy(v), "float64")) for v in values]


def assert_same_weights(got, want):
    """Equal to float32 rounding: several devices only reorder the float32 sums of one
    global batch (the same timesteps and noise). Variables are matched by position:
    optimizer slot names carry the layer names Keras made unique in their process
    (``di_t`` or ``di_t_1``)."""
    assert len(got) == len(want)
    for (name, a), (_, b) in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
