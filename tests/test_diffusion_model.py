"""DiffusionModel: the loss, one optimizer step, EMA, guidance, samplers and saving."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras import ops

import keras_minsnr as kms
from tests.tiny_backbones import GaussianOptimalDenoiser
from tests.tiny_backbones import PixelLinearBackbone
from tests.tiny_backbones import TinyConvBackbone
from tests.tiny_backbones import TinyContextBackbone

T = 1000


def reference_alphas_cumprod_cosine(T):
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    i = np.arange(T, dtype=np.float64)
    betas = np.minimum(1 - f((i + 1) / T) / f(i / T), 0.999)
    return np.cumprod(1 - betas)


def min_snr_weight(s, target, gamma=5.0):
    """The paper's Min-SNR-γ weight in each target's space."""
    return {
        "epsilon": np.minimum(s, gamma) / s,
        "sample": np.minimum(s, gamma),
        "v_prediction": np.minimum(s, gamma) / (s + 1),
    }[target]


def fixed_batch(batch=4, shape=(2, 2, 1), seed=0):
    rng = np.random.default_rng(seed)
    return {
        "images": rng.uniform(-1, 1, size=(batch, *shape)).astype("float32"),
        "timesteps": np.array([3, 250, 600, 990][:batch], dtype="int32"),
        "noise": rng.normal(size=(batch, *shape)).astype("float32"),
    }


def numpy_loss_and_grads(batch, a, b, target_type):
    """Weighted loss of pred = a x_t + b and its gradient, in float64."""
    ac = reference_alphas_cumprod_cosine(T)[batch["timesteps"]]
    alpha = np.sqrt(ac)[:, None, None, None]
    sigma = np.sqrt(1 - ac)[:, None, None, None]
    x0 = batch["images"].astype(np.float64)
    eps = batch["noise"].astype(np.float64)
    x_t = alpha * x0 + sigma * eps
    target = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[target_type]
    residual = a * x_t + b - target
    w = min_snr_weight(ac / (1 - ac), target_type)
    loss = np.mean(w * np.mean(residual**2, axis=(1, 2, 3)))
    grad_a = np.mean(w * np.mean(2 * residual * x_t, axis=(1, 2, 3)))
    grad_b = np.mean(w * np.mean(2 * residual, axis=(1, 2, 3)))
    return loss, grad_a, grad_b


@pytest.mark.parametrize("target", kms.PREDICTION_TYPES)
def test_loss_matches_numpy(target):
    batch = fixed_batch()
    model = kms.DiffusionModel(
        PixelLinearBackbone(), "cosine", prediction_type=target, weighting="min_snr", gamma=5.0
    )
    loss, mse = model.diffusion_loss_terms(
        batch["images"], None, batch["timesteps"], batch["noise"]
    )
    expected, _, _ = numpy_loss_and_grads(batch, 0.5, 0.1, target)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert mse.shape == (4,)


@pytest.mark.parametrize("target", kms.PREDICTION_TYPES)
def test_one_sgd_step_and_ema_follow_closed_forms(target):
    batch = fixed_batch()
    model = kms.DiffusionModel(
        PixelLinearBackbone(), "cosine", prediction_type=target, ema_decay=0.9999
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    a, b = 0.5, 0.1
    ema_a, ema_b = a, b
    for n in range(1, 4):
        loss, grad_a, grad_b = numpy_loss_and_grads(batch, a, b, target)
        logs = model.train_on_batch(batch, return_dict=True)
        np.testing.assert_allclose(logs["loss"], loss, rtol=1e-5)
        a, b = a - 0.05 * grad_a, b - 0.05 * grad_b
        got = [float(ops.convert_to_numpy(v)) for v in model.backbone.trainable_variables]
        np.testing.assert_allclose(got, [a, b], rtol=1e-5)
        # EMA with warm-up: decay_n = min(0.9999, (1 + n) / (10 + n)).
        decay = min(0.9999, (1 + n) / (10 + n))
        ema_a, ema_b = decay * ema_a + (1 - decay) * a, decay * ema_b + (1 - decay) * b
        ema = [float(ops.convert_to_numpy(v)) for v in model.ema_weights]
        np.testing.assert_allclose(ema, [ema_a, ema_b], rtol=1e-5)


CROSS_BACKEND_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, keras
    sys.path.insert(0, {root!r})
    import keras_minsnr as kms
    from tests.tiny_backbones import TinyConvBackbone
    backbone = TinyConvBackbone((8, 8, 1), num_classes=10, width=8)
    model = kms.DiffusionModel(backbone, "cosine", prediction_type="v_prediction",
                               weighting="min_snr", ema_decay=0.9)
    rng = np.random.default_rng(0)
    for v in backbone.trainable_variables:
        v.assign(rng.normal(scale=0.2, size=v.shape).astype("float32"))
    model.reset_ema()
    model.compile(optimizer=keras.optimizers.AdamW(1e-2, weight_decay=0.03, clipnorm=1.0))
    batch = {{
        "images": rng.uniform(-1, 1, size=(6, 8, 8, 1)).astype("float32"),
        "labels": rng.integers(0, 10, size=6).astype("int32"),
        "timesteps": np.array([0, 100, 400, 700, 900, 999], dtype="int32"),
        "noise": rng.normal(size=(6, 8, 8, 1)).astype("float32"),
    }}
    logs = model.train_on_batch(batch, return_dict=True)
    weights = [np.asarray(keras.ops.convert_to_numpy(v)).tolist()
               for v in backbone.trainable_variables + model.ema_weights]
    json.dump({{"loss": float(logs["loss"]), "weights": weights}}, open(sys.argv[1], "w"))
    """
)


def test_one_step_is_the_same_on_tensorflow_and_jax(tmp_path):
    # Both backends run in children; what this process runs on changes nothing.
    if keras.backend.backend() != "tensorflow":
        pytest.skip("its children run on both backends: run once, in the TensorFlow pass")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "step.py"
    script.write_text(CROSS_BACKEND_SCRIPT.format(root=root))
    results = {}
    for backend in ("tensorflow", "jax"):
        out = tmp_path / f"{backend}.json"
        env = {**os.environ, "KERAS_BACKEND": backend}
        subprocess.run(
            [sys.executable, str(script), str(out)], env=env, check=True, capture_output=True
        )
        results[backend] = json.loads(out.read_text())
    tf_res, jax_res = results["tensorflow"], results["jax"]
    np.testing.assert_allclose(tf_res["loss"], jax_res["loss"], rtol=1e-5)
    for w_tf, w_jax in zip(tf_res["weights"], jax_res["weights"]):
        np.testing.assert_allclose(w_tf, w_jax, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "sampler, num_steps, target",
    [
        ("ddim", 250, "epsilon"),
        ("ddim", 250, "v_prediction"),
        ("ddpm", 250, "epsilon"),
        ("ddpm", 250, "sample"),
        ("edm_heun", 80, "epsilon"),
        ("edm_heun", 80, "v_prediction"),
    ],
)
def test_samplers_reproduce_a_gaussian_with_the_optimal_denoiser(sampler, num_steps, target):
    mean, std = 0.5, 0.3
    schedule = kms.NoiseSchedule("cosine")
    backbone = GaussianOptimalDenoiser(schedule, mean, std, (8, 8, 1), prediction_type=target)
    # Gaussian data is unbounded: sample without clipping x0 (as a latent model does).
    model = kms.DiffusionModel(backbone, schedule, prediction_type=target, ema_decay=0,
                               clip_denoised=False)
    samples = model.generate(256, num_steps=num_steps, sampler=sampler, seed=0)
    assert samples.dtype == np.float32 and samples.shape == (256, 8, 8, 1)
    # 16384 values: standard error of the mean ~0.0023, of the std ~0.0017. The step
    # counts keep the samplers' own discretisation error under ~2% (see the next test).
    assert abs(samples.mean() - mean) < 0.015
    assert abs(samples.std() - std) < 0.03 * std


@pytest.mark.parametrize("steps", [5, 20])
def test_ddim_matches_the_exact_discrete_map_at_few_steps(steps):
    """With few steps DDIM under-disperses; the exact linear map of each step predicts by how much.

    At 5 steps the spacing matters: the old ``linspace(T-1, 0, n)`` grid predicts a std
    10 % lower (0.165 vs 0.183), so this also pins the trailing spacing.
    """
    mean, std = 0.0, 0.3
    schedule = kms.NoiseSchedule("cosine")
    backbone = GaussianOptimalDenoiser(schedule, mean, std, (8, 8, 1))
    model = kms.DiffusionModel(backbone, schedule, ema_decay=0, clip_denoised=False)
    samples = model.generate(256, num_steps=steps, sampler="ddim", seed=2)
    # For N(0, v) data the optimal x0_hat = k x and eps_hat = e x, so one DDIM step scales x by
    # m = sqrt(abar_s) k + sqrt(1 - abar_s) e; the final std is the product of the |m|'s.
    abar = reference_alphas_cumprod_cosine(T)
    # "Trailing" spacing (diffusers; docs/fidelity.md): t_i = round(T - i*T/n) - 1, from T-1 down.
    ts = np.array([int(round(T - i * T / steps)) - 1 for i in range(steps)])
    assert ts[0] == T - 1 and ts[-1] == T // steps - 1
    scale, v = 1.0, std**2
    for i, t in enumerate(ts):
        a, s = np.sqrt(abar[t]), np.sqrt(1 - abar[t])
        abar_s = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        k = a * v / (a * a * v + s * s)
        e = (1 - a * k) / s
        scale *= np.sqrt(abar_s) * k + np.sqrt(1 - abar_s) * e
    assert scale < 0.9 * std  # the discretisation error is real at 20 steps...
    assert abs(samples.std() - scale) < 0.03 * scale  # ...and reproduced exactly


def test_ddim_with_eta_one_matches_ddpm_statistics():
    schedule = kms.NoiseSchedule("cosine")
    backbone = GaussianOptimalDenoiser(schedule, -0.2, 0.5, (4, 4, 1))
    model = kms.DiffusionModel(backbone, schedule, ema_decay=0, clip_denoised=False)
    samples = model.generate(512, num_steps=250, sampler="ddim", eta=1.0, seed=1)
    assert abs(samples.mean() + 0.2) < 0.02
    assert abs(samples.std() - 0.5) < 0.03 * 0.5


def tiny_conditional_model(**kwargs):
    backbone = TinyConvBackbone((8, 8, 1), num_classes=10, width=8)
    return kms.DiffusionModel(backbone, "cosine", **kwargs)


def test_guidance_scale_one_is_the_conditional_model_and_zero_the_unconditional():
    model = tiny_conditional_model(ema_decay=0)
    x = ops.convert_to_tensor(np.random.default_rng(0).normal(size=(3, 8, 8, 1)), "float32")
    t = ops.convert_to_tensor([10, 500, 900], "int32")
    labels = ops.convert_to_tensor([1, 2, 3], "int32")
    weights = [v.value for v in model.backbone.trainable_variables]
    null = model.null_condition(3)
    np.testing.assert_array_equal(ops.convert_to_numpy(null), [10, 10, 10])

    def x0(condition, null_condition, scale):
        params = (weights, [], condition, null_condition, ops.convert_to_tensor(scale), None)
        return ops.convert_to_numpy(model.denoise(params, x, t)[0])

    conditional = x0(labels, None, 1.0)
    unconditional = x0(null, None, 1.0)
    np.testing.assert_allclose(x0(labels, null, 1.0), conditional, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x0(labels, null, 0.0), unconditional, rtol=1e-5, atol=1e-5)
    # scale 3: uncond + 3 (cond - uncond), checked on the x0 it implies (linear in the output)
    np.testing.assert_allclose(
        x0(labels, null, 3.0), unconditional + 3 * (conditional - unconditional), rtol=1e-3, atol=1e-3
    )


def conditions_seen_in_one_step(model, batch):
    """The condition the backbone receives in one training step (after label dropout)."""
    seen = []
    original_call = model.backbone.call

    def spy(inputs):
        seen.append(ops.convert_to_numpy(inputs["y"]))
        return original_call(inputs)

    model.backbone.call = spy
    try:
        model.compute_training_loss(batch, training=True)
    finally:
        model.backbone.call = original_call
    return seen[-1]


def test_label_dropout_reaches_the_null_class():
    model = tiny_conditional_model(label_dropout=0.5, seed=3)
    labels = np.arange(200) % 10
    images = np.zeros((200, 8, 8, 1), "float32")
    seen = conditions_seen_in_one_step(model, {"images": images, "labels": labels})
    dropped = np.mean(seen == 10)
    assert 0.35 < dropped < 0.65
    kept = seen != 10
    np.testing.assert_array_equal(seen[kept], labels[kept])


def test_null_context_is_used_by_label_dropout_and_saved(tmp_path):
    empty = np.array([[0.25, -1.0], [2.0, 0.5], [-0.75, 1.5]], "float32")
    model = kms.DiffusionModel(TinyContextBackbone(), "cosine", label_dropout=0.5, seed=4,
                               ema_decay=0, null_context=empty)
    np.testing.assert_array_equal(ops.convert_to_numpy(model.null_condition(2)),
                                  np.stack([empty, empty]))
    context = np.random.default_rng(0).normal(size=(200, 3, 2)).astype("float32")
    images = np.zeros((200, 8, 8, 1), "float32")
    seen = conditions_seen_in_one_step(model, {"images": images, "context": context})
    dropped = np.all(seen == empty, axis=(1, 2))
    assert 0.35 < dropped.mean() < 0.65
    np.testing.assert_array_equal(seen[~dropped], context[~dropped])

    path = str(tmp_path / "context.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded.null_context), empty)


def test_null_context_errors_name_the_problem():
    model = kms.DiffusionModel(TinyContextBackbone(), "cosine", ema_decay=0)
    # Zeros until set.
    np.testing.assert_array_equal(ops.convert_to_numpy(model.null_condition(1)),
                                  np.zeros((1, 3, 2)))
    model.set_null_context(np.ones((1, 3, 2)))  # a batch of one is accepted
    np.testing.assert_array_equal(ops.convert_to_numpy(model.null_context), np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"shape \(3, 2\).*got \(77, 768\)"):
        model.set_null_context(np.zeros((77, 768)))
    with pytest.raises(ValueError, match="NaN"):
        model.set_null_context(np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="conditioning 'context'.*'class'"):
        kms.DiffusionModel(TinyConvBackbone((8, 8, 1), num_classes=10, width=8),
                           null_context=np.zeros((3, 2)))


def test_fit_lowers_the_loss_and_evaluation_is_deterministic():
    rng = np.random.default_rng(0)
    # Data: vertical bars, a structure a small conv net can learn quickly.
    images = np.where(np.arange(8)[None, None, :, None] % 2 == 0, 0.8, -0.8)
    images = np.broadcast_to(images, (256, 8, 8, 1)).astype("float32")
    labels = rng.integers(0, 10, size=256)
    model = tiny_conditional_model(prediction_type="epsilon", seed=0)
    model.compile(optimizer=keras.optimizers.AdamW(3e-3))
    before = model.evaluate(images, labels, batch_size=64, verbose=0, return_dict=True)
    again = model.evaluate(images, labels, batch_size=64, verbose=0, return_dict=True)
    assert before["loss"] == pytest.approx(again["loss"], rel=1e-6)
    history = model.fit(images, labels, batch_size=32, epochs=4, verbose=0)
    after = model.evaluate(images, labels, batch_size=64, verbose=0, return_dict=True)
    assert after["loss"] < 0.8 * before["loss"]
    assert set(history.history) == {"loss", "mse_q1", "mse_q2", "mse_q3", "mse_q4"}


def test_save_and_load_round_trip(tmp_path):
    model = tiny_conditional_model(prediction_type="v_prediction", weighting="soft_min_snr",
                                   gamma=2.0, label_dropout=0.15, ema_decay=0.5)
    model.compile(optimizer=keras.optimizers.AdamW(1e-2))
    images = np.random.default_rng(0).uniform(-1, 1, size=(32, 8, 8, 1)).astype("float32")
    model.fit(images, np.arange(32) % 10, batch_size=16, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored, kms.DiffusionModel)
    assert restored.weighting.get_config() == model.weighting.get_config()
    assert restored.schedule.get_config() == model.schedule.get_config()
    assert restored.prediction_type == "v_prediction" and restored.label_dropout == 0.15
    for a, b in zip(model.ema_weights, restored.ema_weights):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
    # EMA differs from the raw weights after training, and generate uses it by default.
    raw_vs_ema = [
        np.abs(ops.convert_to_numpy(v) - ops.convert_to_numpy(e)).max()
        for v, e in zip(model.backbone.trainable_variables, model.ema_weights)
    ]
    assert max(raw_vs_ema) > 0
    for kwargs in (dict(), dict(use_ema=False, sampler="ddpm"), dict(sampler="edm_heun")):
        first = model.generate(labels=[0, 5], num_steps=8, seed=7, guidance_scale=1.5, **kwargs)
        second = restored.generate(labels=[0, 5], num_steps=8, seed=7, guidance_scale=1.5, **kwargs)
        np.testing.assert_array_equal(first, second)
    third = model.generate(labels=[0, 5], num_steps=8, seed=8, guidance_scale=1.5)
    assert not np.array_equal(first, third)
    # The optimizer state came back too.
    assert int(ops.convert_to_numpy(restored.optimizer.iterations)) == 2


def test_non_finite_loss_stops_training_and_keeps_every_variable():
    model = kms.DiffusionModel(PixelLinearBackbone(), "cosine", ema_decay=0.9)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    good = np.random.default_rng(0).uniform(-1, 1, size=(8, 2, 2, 1)).astype("float32")
    model.fit(good, batch_size=4, epochs=1, verbose=0)

    def state():
        # Weights, EMA copies and every optimizer slot (the seed generator may advance).
        variables = model.trainable_variables + model.ema_weights + model.optimizer.variables
        return {v.path: ops.convert_to_numpy(v).copy() for v in variables}

    before = state()
    assert len(before) == 2 + 2 + len(model.optimizer.variables)
    bad = good.copy()
    bad[1] = np.nan  # the first batch of the next fit() is bad
    with pytest.raises(FloatingPointError, match=r"nan at step 3 \(epoch 1, batch 1\)"):
        model.fit(bad, batch_size=4, epochs=1, verbose=0, shuffle=False)
    after = state()
    assert after.keys() == before.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 2


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_sgd_step_equals_the_float32_closed_form(policy):
    keras.mixed_precision.set_dtype_policy(policy)
    batch = fixed_batch()
    model = kms.DiffusionModel(PixelLinearBackbone(), "cosine", ema_decay=0.9)
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    if policy == "mixed_float16":
        # The loss is scaled by 2**15 before the gradient; the update must undo it.
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    logs = model.train_on_batch(batch, return_dict=True)
    loss, grad_a, grad_b = numpy_loss_and_grads(batch, 0.5, 0.1, "epsilon")
    expected = np.array([0.5 - 0.05 * grad_a, 0.1 - 0.05 * grad_b])
    got = np.array([float(ops.convert_to_numpy(v)) for v in model.backbone.trainable_variables])
    # Half precision in the backbone: ~3 significant digits (bfloat16: ~2).
    tol = 2e-2 if policy == "mixed_bfloat16" else 2e-3
    np.testing.assert_allclose(logs["loss"], loss, rtol=tol)
    np.testing.assert_allclose(got - [0.5, 0.1], expected - [0.5, 0.1], rtol=tol, atol=1e-6)
    decay = 2 / 11  # the warm-up decay at update 1
    ema = np.array([float(ops.convert_to_numpy(v)) for v in model.ema_weights])
    np.testing.assert_allclose(ema, decay * np.array([0.5, 0.1]) + (1 - decay) * got, rtol=1e-6)
    snr = model.schedule.snr(ops.convert_to_tensor([1, 2], "int32"))
    w = model.weighting(snr, model.prediction_type)
    assert keras.backend.standardize_dtype(w.dtype) == "float32"


def test_jit_compiled_steps_follow_the_lr_schedule_and_clip_each_gradient():
    """Two jit-compiled SGD steps with per-weight ``clipnorm`` and a cosine schedule: a
    gradient far above the clip norm is rescaled to it, so each weight moves by exactly
    ``lr(step) * clipnorm``, with ``lr`` the closed-form cosine decay."""
    model = tiny_conditional_model(ema_decay=0)
    clip, base, decay_steps = 1e-4, 0.5, 10
    schedule = keras.optimizers.schedules.CosineDecay(base, decay_steps=decay_steps)
    model.compile(optimizer=keras.optimizers.SGD(schedule, clipnorm=clip), jit_compile=True)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (8, 8, 8, 1)).astype("float32")
    labels = np.arange(8) % 10
    weights = model.backbone.trainable_variables
    for step in range(2):
        before = [ops.convert_to_numpy(w).astype(np.float64) for w in weights]
        model.fit(images, labels, batch_size=8, epochs=1, verbose=0, shuffle=False)
        lr = base * 0.5 * (1 + np.cos(np.pi * step / decay_steps))
        moves = [np.linalg.norm(ops.convert_to_numpy(w) - b) for w, b in zip(weights, before)]
        moved = [m for m in moves if m > 0]
        assert len(moved) >= len(weights) - 1  # at most the null-class row's table is idle
        # float32 weights of size ~0.1 moved by ~1e-6 per element: rounding stays < 1%.
        np.testing.assert_allclose(moved, lr * clip, rtol=1e-2)


@pytest.mark.parametrize(
    "make_call, match",
    [
        (lambda m: m.fit(np.zeros((4, 8, 8, 3), "float32"), np.zeros(4), verbose=0),
         r"\(batch, 8, 8, 1\).*\(4, 8, 8, 3\)"),
        (lambda m: m.fit(np.zeros((4, 8, 8, 1), "float32"), np.array([0, 1, 10, 12]), verbose=0),
         r"\[0, 9\].*\[10, 12\]"),
        (lambda m: m.fit(np.zeros((4, 8, 8, 1), "float32"), verbose=0), "labels"),
        (lambda m: m.generate(labels=[3], sampler="euler"), "'euler'.*ddpm, ddim, edm_heun"),
        (lambda m: m.generate(labels=[11]), r"\[0, 9\].*11"),
        (lambda m: m.generate(labels=[1], num_steps=0), "num_steps"),
        (lambda m: m.fit({"pixels": np.zeros((4, 8, 8, 1))}, verbose=0), "'images'"),
        (lambda m: m.compile(loss="mse"), "own weighted loss"),
    ],
)
def test_bad_input_is_caught_before_any_step(make_call, match):
    model = tiny_conditional_model()
    model.compile(optimizer="adamw")
    with pytest.raises(ValueError, match=match):
        make_call(model)
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 0


def test_bad_construction():
    backbone = TinyConvBackbone((8, 8, 1))
    with pytest.raises(ValueError, match="'x0'.*epsilon"):
        kms.DiffusionModel(backbone, prediction_type="x0")
    with pytest.raises(ValueError, match="'minsnr'"):
        kms.DiffusionModel(backbone, weighting="minsnr")
    with pytest.raises(ValueError, match="label_dropout.*conditional"):
        kms.DiffusionModel(backbone, label_dropout=0.1)
    with pytest.raises(ValueError, match="ema_decay"):
        kms.DiffusionModel(backbone, ema_decay=1.5)
    with pytest.raises(ValueError, match="unconditional"):
        kms.DiffusionModel(backbone).fit(np.zeros((2, 8, 8, 1)), np.zeros(2), verbose=0)


def test_unsupported_backend_is_named(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    with pytest.raises(RuntimeError, match="tensorflow, jax.*'torch'"):
        kms.DiffusionModel(PixelLinearBackbone())


class _SlightlyWrongDenoiser(GaussianOptimalDenoiser):
    """The optimal ε for Gaussian data plus a constant error of 0.05."""

    def call(self, inputs):
        return super().call(inputs) + 0.05


def test_generate_clips_pixel_models_by_default_and_records_the_choice():
    schedule = kms.NoiseSchedule("cosine")
    backbone = _SlightlyWrongDenoiser(schedule, 0.5, 0.2, (4, 4, 1))
    pixel = kms.DiffusionModel(backbone, schedule, ema_decay=0)
    samples = pixel.generate(64, num_steps=20, seed=0)
    # Clipping x0_hat keeps the first steps' 1/alpha ~ 2e4 amplification out: the samples
    # stay near N(0.5, 0.2^2) (the 0.05 error in eps moves them a little).
    assert np.abs(samples).max() <= 1.0 + 1e-6
    assert abs(samples.mean() - 0.5) < 0.1 and samples.std() < 0.4
    latent = kms.DiffusionModel(backbone, schedule, ema_decay=0, clip_denoised=False)
    unclipped = latent.generate(64, num_steps=20, seed=0)
    np.testing.assert_array_equal(unclipped, pixel.generate(64, num_steps=20, seed=0,
                                                            clip_denoised=False))
    assert np.abs(unclipped).max() > 10  # the garbage a latent model must live with
    config = kms.DiffusionModel(TinyConvBackbone(), ema_decay=0, clip_denoised=False).get_config()
    assert config["clip_denoised"] is False
    assert kms.DiffusionModel.from_config(config).clip_denoised is False


def test_gradient_accumulation_equals_one_step_on_the_whole_batch():
    """4 micro-batches of 2 = one SGD step on 8; the EMA and the step count advance once."""
    batch = fixed_batch(batch=4)
    batch = {k: np.concatenate([v, v[::-1]]) for k, v in batch.items()}  # 8 samples
    batch["images"][4:] *= -0.5  # keep the two halves different
    model = kms.DiffusionModel(PixelLinearBackbone(), "cosine", ema_decay=0.9)
    model.compile(optimizer=keras.optimizers.SGD(0.05, gradient_accumulation_steps=4))
    for i in range(4):
        model.train_on_batch({k: v[2 * i : 2 * i + 2] for k, v in batch.items()})
        weights = [float(ops.convert_to_numpy(v)) for v in model.backbone.trainable_variables]
        ema = [float(ops.convert_to_numpy(v)) for v in model.ema_weights]
        if i < 3:  # no update, no EMA step before the 4th micro-batch
            np.testing.assert_array_equal(weights, np.float32([0.5, 0.1]))
            np.testing.assert_array_equal(ema, np.float32([0.5, 0.1]))
    _, grad_a, grad_b = numpy_loss_and_grads(batch, 0.5, 0.1, "epsilon")
    expected = np.array([0.5 - 0.05 * grad_a, 0.1 - 0.05 * grad_b])
    np.testing.assert_allclose(weights, expected, rtol=1e-5)
    decay = 2 / 11  # warm-up decay of update 1: the EMA stepped once
    np.testing.assert_allclose(ema, decay * np.array([0.5, 0.1]) + (1 - decay) * expected,
                               rtol=1e-5)
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 1


def test_the_first_fit_traces_the_train_step_once(monkeypatch):
    # TensorFlow traces a step that creates variables twice; with the optimizer's slots
    # made inside the step, a fresh model's first fit built its graph two times.
    model = tiny_conditional_model()
    model.compile(optimizer="adamw")
    traced = []
    original = kms.DiffusionModel.train_step
    monkeypatch.setattr(kms.DiffusionModel, "train_step",
                        lambda self, *args: traced.append(1) or original(self, *args))
    batch = {"images": np.zeros((4, 8, 8, 1), "float32"), "labels": np.arange(4)}
    model.fit(batch, batch_size=4, epochs=2, verbose=0)
    assert len(traced) == 1
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 2
