"""The run's AdamW (`keras_minsnr.optimizers.AdamW`): Keras' AdamW, with TensorFlow's fused
Adam kernel for each weight on TensorFlow; checked against AdamW written out in float64."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_minsnr import optimizers
from keras_minsnr import run_config

LR, WD, BETAS, EPS, CLIP = 0.05, 0.03, (0.9, 0.99), 1e-7, 1.0
WARMUP, TOTAL, STEPS = 2, 6, 5


def _rate(step):
    """The run config's warm-up + cosine schedule at update ``step`` (0-based), float64."""
    if step < WARMUP:
        return LR * step / WARMUP
    progress = min((step - WARMUP) / (TOTAL - WARMUP), 1.0)
    return LR * 0.5 * (1.0 + np.cos(np.pi * progress))


def reference_adamw(weights, gradients, decayed):
    """AdamW in float64, as the optimizer documents it: decoupled decay with the update's
    learning rate, per-weight norm clipping, Adam with bias correction."""
    weights = [w.astype("float64") for w in weights]
    m = [np.zeros_like(w) for w in weights]
    v = [np.zeros_like(w) for w in weights]
    for step, grads in enumerate(gradients):
        lr, t = _rate(step), step + 1
        alpha = lr * np.sqrt(1 - BETAS[1] ** t) / (1 - BETAS[0] ** t)
        for i, g in enumerate(grads):
            g = g.astype("float64")
            g = g * CLIP / max(np.sqrt(np.sum(g * g)), CLIP)
            if decayed[i]:
                weights[i] = weights[i] - weights[i] * WD * lr
            m[i] = m[i] + (g - m[i]) * (1 - BETAS[0])
            v[i] = v[i] + (g * g - v[i]) * (1 - BETAS[1])
            weights[i] = weights[i] - alpha * m[i] / (np.sqrt(v[i]) + EPS)
    return weights


def _run(optimizer, weights, gradients, in_graph):
    variables = [keras.Variable(w, name=name) for w, name in zip(weights, ("kernel", "bias"))]
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    optimizer.build(variables)

    def apply(grads):
        optimizer.apply(grads, variables)

    if in_graph:  # as the TensorFlow train step applies it
        import tensorflow as tf

        apply = tf.function(apply)
    for grads in gradients:
        apply([ops.convert_to_tensor(g) for g in grads])
    return [ops.convert_to_numpy(v) for v in variables], apply


@pytest.mark.parametrize("in_graph", [False, True], ids=["eager", "graph"])
def test_adamw_is_float64_adamw_with_schedule_decay_and_clipping(in_graph):
    if in_graph and keras.backend.backend() != "tensorflow":
        pytest.skip("a tf.function is TensorFlow's graph mode")
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(6, 5)).astype("float32"), rng.normal(size=(5,)).astype("float32")]
    # Gradients with norms above and below the clipping norm, large and tiny entries.
    gradients = [[(rng.normal(size=w.shape) * scale).astype("float32") for w in weights]
                 for scale in (3.0, 0.05, 1e-4, 0.3, 2.0)]
    config = run_config.resolve_config({}, {
        "learning_rate": LR, "steps": TOTAL, "warmup_steps": WARMUP, "lr_schedule": "cosine",
        "beta_1": BETAS[0], "beta_2": BETAS[1], "weight_decay": WD, "clipnorm": CLIP})
    optimizer = optimizers.make_optimizer(config)
    assert type(optimizer) is optimizers.AdamW and optimizer.epsilon == EPS
    got, apply = _run(optimizer, weights, gradients, in_graph)
    want = reference_adamw(weights, gradients, decayed=[True, False])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=1e-7)
    assert int(ops.convert_to_numpy(optimizer.iterations)) == STEPS
    # Keras' own AdamW on the same updates agrees to float32 rounding.
    keras_adamw = keras.optimizers.AdamW.from_config(optimizer.get_config())
    theirs, _ = _run(keras_adamw, weights, gradients, in_graph)
    for g, k in zip(got, theirs, strict=True):
        np.testing.assert_allclose(g, k, rtol=1e-6, atol=1e-7)
    if in_graph:
        # TensorFlow: one fused Adam op per weight in the traced update, no per-weight
        # element-wise Adam ops (Keras' update makes ~20 per weight).
        graph = apply.get_concrete_function(
            [ops.convert_to_tensor(g) for g in gradients[0]]).graph
        kinds = [op.type for op in graph.get_operations()]
        assert kinds.count("ResourceApplyAdam") == len(weights)
        assert kinds.count("Pow") == 2  # β₁ᵗ and β₂ᵗ once per update, not per weight


def test_adamw_round_trips_through_its_config_and_saved_models(tmp_path):
    optimizer = optimizers.AdamW(1e-3, weight_decay=0.02, beta_2=0.95)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(again) is optimizers.AdamW
    assert again.get_config() == optimizer.get_config()
    # A model compiled with it saves and loads with its optimizer's state.
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer=optimizer, loss="mse")
    x = np.arange(12, dtype="float32").reshape(4, 3)
    model.fit(x, np.ones((4, 2), "float32"), epochs=2, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is optimizers.AdamW
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
