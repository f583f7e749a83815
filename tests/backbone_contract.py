"""Checks every backbone must pass, written once and applied in each backbone's tests.

Like keras-hub's ``run_backbone_test``: each ``run_*`` helper takes a built model (or a
function that builds one) and inputs in the backbone-contract dict, and asserts one
property of the contract in `keras_minsnr.backbones`.
"""

import os

import keras
import numpy as np
import pytest


def predict(model, inputs):
    """Forward pass as numpy; one jit-compiled call on JAX (eager JAX compiles every op
    on its own, and a UNet has hundreds), eager elsewhere."""
    if keras.backend.backend() == "jax":
        return np.asarray(model.predict_on_batch(inputs))
    return keras.ops.convert_to_numpy(model(inputs))


def randomize(model, seed=1, scale=0.1):
    """Replaces every weight by N(0, scale²) noise so zero-initialised paths carry signal."""
    rng = np.random.default_rng(seed)
    model.set_weights(
        [scale * rng.standard_normal(w.shape).astype("float32") for w in model.get_weights()]
    )


def run_round_trip_test(model, inputs, tmp_path):
    """`.keras` save/load gives the same class, config, contract attributes and outputs."""
    expected = predict(model, inputs)
    path = os.path.join(tmp_path, "backbone.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert type(restored) is type(model)
    assert restored.get_config() == model.get_config()
    for name in ("image_shape", "conditioning", "num_classes", "context_shape"):
        assert getattr(restored, name, None) == getattr(model, name, None), name
    np.testing.assert_array_equal(predict(restored, inputs), expected)
    return restored


def run_mixed_bfloat16_test(build, inputs, tolerance=0.05, reference=None):
    """Under ``mixed_bfloat16``: bfloat16 compute, float32 weights and float32 output,
    within ``tolerance`` (relative to the largest output) of the float32 model with the
    same weights. bfloat16 keeps ~3 significant digits.

    ``build()`` makes the model; the float32 ``reference`` is a randomised ``build()``
    unless one with non-trivial weights is given (saves a build of a slow model).
    """
    if reference is None:
        reference = build()
        randomize(reference)
    expected = predict(reference, inputs)
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model = build()
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert model.compute_dtype == "bfloat16"
    assert all(w.dtype == "float32" for w in model.weights)
    model.set_weights(reference.get_weights())
    out = model(inputs)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    out = keras.ops.convert_to_numpy(out)
    assert out.shape == expected.shape and np.all(np.isfinite(out))
    assert np.abs(out - expected).max() < tolerance * np.abs(expected).max() + 1e-3


def _raises(fn, words, match, error):
    with pytest.raises(error, match=match) as info:
        fn()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def run_bad_construction_test(cls, kwargs, words=(), match=None, error=ValueError):
    """``cls(**kwargs)`` raises ``error`` whose message names each of ``words`` and
    matches the regex ``match`` (the bad value and what is allowed)."""
    _raises(lambda: cls(**kwargs), words, match, error)


def run_bad_call_test(model, inputs, words=(), match=None, error=ValueError):
    """Calling ``model`` on bad ``inputs`` raises ``error`` naming each of ``words`` and
    matching the regex ``match``."""
    _raises(lambda: model(inputs), words, match, error)


def run_parameter_count_test(model, expected):
    """``count_params()`` equals a count written independently from the architecture."""
    assert model.count_params() == expected


def tensorflow_gradient_op_kinds(layer, x):
    """The op types of TensorFlow's graph for the gradient of ``sum(layer(x)²)`` with
    respect to ``x`` and the layer's weights (skips on other backends)."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("a tf.function graph is TensorFlow's")
    import tensorflow as tf

    layer(x)

    @tf.function
    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [x, *layer.trainable_variables])

    graph = gradient.get_concrete_function(tf.constant(x)).graph
    return [op.type for op in graph.get_operations()]
