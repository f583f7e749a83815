"""ADM-style UNet: shapes, identity at init, float64 numpy references, round-trip, errors."""

import math

import keras
import numpy as np
import pytest

from keras_minsnr.backbones import unet as unet_lib
from keras_minsnr.backbones.unet import UNet
from keras_minsnr.backbones.unet import UNetAttentionBlock
from keras_minsnr.backbones.unet import UNetResBlock
from tests import backbone_contract as contract

TINY = dict(
    image_shape=(16, 16, 3),
    base_channels=16,
    channel_multipliers=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    num_heads=2,
    num_groups=4,
    dropout=0.1,
)


def _randomize(model):
    contract.randomize(model, scale=0.2)


def _inputs(batch=2, shape=(16, 16, 3), labels=None, seed=0):
    rng = np.random.default_rng(seed)
    out = {
        "x": rng.normal(size=(batch,) + shape).astype("float32"),
        "t": np.array([3, 871][:batch], dtype="int32"),
    }
    if labels is not None:
        out["y"] = np.array(labels, dtype="int32")
    return out


_predict = contract.predict


# ---------------------------------------------------------------- float64 references
def _group_norm(x, gamma, beta, groups, eps=1e-5):
    b, h, w, c = x.shape
    g = x.reshape(b, h * w, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * gamma + beta


def _conv3x3(x, kernel, bias):
    # 'same' padding, stride 1: sum over the nine shifted copies of the input.
    _, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = sum(
        padded[:, dy : dy + h, dx : dx + w, :] @ kernel[dy, dx]
        for dy in range(3)
        for dx in range(3)
    )
    return out + bias


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _weights(layer):
    return [np.asarray(keras.ops.convert_to_numpy(w), dtype="float64") for w in layer.weights]


@pytest.mark.parametrize("scale_shift", [True, False])
def test_res_block_matches_numpy_reference(scale_shift):
    # Same weight shapes as the tiny UNet's down_1_res_0 (shared compilations on JAX).
    block = UNetResBlock(32, dropout=0.0, use_scale_shift_norm=scale_shift, num_groups=4)
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 16))
    emb = np.random.default_rng(1).normal(size=(2, 64))
    block.build((None, 5, 5, 16), (None, 64))
    _randomize(block)
    got = keras.ops.convert_to_numpy(block(x.astype("float32"), emb.astype("float32")))

    W = {w.path.split("/", 1)[1]: np.asarray(keras.ops.convert_to_numpy(w), "float64")
         for w in block.weights}
    h = _group_norm(x, W["norm_1/gamma"], W["norm_1/beta"], 4)
    h = _conv3x3(_silu(h), W["conv_1/kernel"], W["conv_1/bias"])
    e = (_silu(emb) @ W["emb_proj/kernel"] + W["emb_proj/bias"])[:, None, None, :]
    if scale_shift:  # ADM: GroupNorm(h) * (1 + scale) + shift
        scale, shift = e[..., :32], e[..., 32:]
        h = _group_norm(h, W["norm_2/gamma"], W["norm_2/beta"], 4) * (1 + scale) + shift
    else:  # DDPM: h + emb before the second norm
        h = _group_norm(h + e, W["norm_2/gamma"], W["norm_2/beta"], 4)
    h = _conv3x3(_silu(h), W["conv_2/kernel"], W["conv_2/bias"])
    skip = x @ W["skip/kernel"][0, 0] + W["skip/bias"]
    np.testing.assert_allclose(got, skip + h, rtol=1e-4, atol=1e-4)


def test_attention_block_matches_numpy_reference():
    heads, c = 2, 32
    block = UNetAttentionBlock(num_heads=heads, num_groups=4)
    x = np.random.default_rng(0).normal(size=(2, 3, 4, c))
    block.build((None, 3, 4, c))
    _randomize(block)
    got = keras.ops.convert_to_numpy(block(x.astype("float32")))

    W = {w.path.split("/", 1)[1]: np.asarray(keras.ops.convert_to_numpy(w), "float64")
         for w in block.weights}
    h = _group_norm(x, W["norm/gamma"], W["norm/beta"], 4).reshape(2, 12, c)
    qkv = (h @ W["qkv/kernel"] + W["qkv/bias"]).reshape(2, 12, 3, heads, c // heads)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, heads, T, d)
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(c // heads)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(2, 12, c)
    expected = x + (out @ W["proj/kernel"] + W["proj/bias"]).reshape(x.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_attention_block_backward_writes_the_qkv_gradient_once():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 32)).astype("float32")
    kinds = contract.tensorflow_gradient_op_kinds(UNetAttentionBlock(num_heads=2, num_groups=4), x)
    assert "StridedSliceGrad" not in kinds


# ---------------------------------------------------------------- whole model
def test_zero_initialised_output_and_identity_blocks():
    model = UNet(**TINY, num_classes=5)
    out = _predict(model, _inputs(labels=[0, 5]))
    assert out.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(out, 0.0)
    # Same-width residual blocks and attention blocks start as the identity.
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 32)).astype("float32")
    emb = np.ones((2, 64), "float32")
    res = model.get_layer("down_1_res_0")
    assert res.out_channels == 32
    block = model.get_layer("mid_res_1")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(block(x, emb)), x)
    attn = model.get_layer("mid_attn")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(attn(x)), x)


def test_class_conditional_shapes_and_label_dependence():
    model = UNet(**TINY, num_classes=5)
    assert model.conditioning == "class" and model.num_classes == 5
    assert model.image_shape == (16, 16, 3)
    assert model.get_layer("class_embedding").input_dim == 6  # 5 classes + null
    _randomize(model)
    a = _predict(model, _inputs(labels=[1, 2]))
    b = _predict(model, _inputs(labels=[4, 5]))
    null = _predict(model, _inputs(labels=[5, 5]))
    missing = _predict(model, _inputs())
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.float32
    assert np.all(np.isfinite(a)) and np.abs(a).max() > 0
    assert np.abs(a - b).max() > 1e-3
    np.testing.assert_allclose(missing, null, rtol=1e-6, atol=1e-6)  # no y = null class


def test_unconditional_and_timestep_dependence():
    model = UNet(**TINY)
    assert model.conditioning is None and model.num_classes is None
    _randomize(model)
    inputs = _inputs()
    a = _predict(model, inputs)
    inputs["t"] = np.array([500, 10], "int32")
    b = _predict(model, inputs)
    assert np.all(np.isfinite(a)) and np.abs(a - b).max() > 1e-3


def test_keras_round_trip(tmp_path):
    model = UNet(**TINY, num_classes=5, use_scale_shift_norm=False)
    _randomize(model)
    contract.run_round_trip_test(model, _inputs(labels=[0, 3]), tmp_path)


def test_mixed_bfloat16():
    contract.run_mixed_bfloat16_test(
        lambda: UNet(**TINY, num_classes=5), _inputs(labels=[0, 5])
    )


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"image_shape": (18, 18, 3), "channel_multipliers": (1, 2, 2)}, ["18", "= 4"]),
        ({"base_channels": 12, "num_groups": 8}, ["num_groups=8", "12"]),
        ({"attention_resolutions": (4,)}, ["[4]", "[16, 8]"]),
        ({"num_heads": 3}, ["num_heads=3"]),
        ({"image_shape": (16, 16)}, ["(16, 16)"]),
        ({"dropout": 1.5}, ["1.5"]),
    ],
)
def test_bad_construction(overrides, words):
    contract.run_bad_construction_test(UNet, {**TINY, **overrides}, words)


def test_bad_call_inputs():
    model = UNet(**TINY)
    t = np.zeros((2,), "int32")
    for x, match in [
        (np.zeros((2, 16, 16), "float32"), r"rank 4.*\(2, 16, 16\)"),
        (np.zeros((2, 16, 16, 4), "float32"), "has 4 channels.*3 channels"),
        (np.zeros((2, 15, 15, 3), "float32"), "divisible by 2"),
    ]:
        contract.run_bad_call_test(model, {"x": x, "t": t}, match=match)
    contract.run_bad_call_test(model, np.zeros((2, 16, 16, 3), "float32"),
                               match="expects a dict")


# ---------------------------------------------------------------- parameter counts
def _ddpm_param_count(image_channels, base, mults, blocks, attn_levels, scale_shift,
                      num_classes=None):
    """Closed-form parameter count of the DDPM/ADM UNet layout, written from the paper."""
    emb = 4 * base
    e = 2 if scale_shift else 1

    def res(cin, cout):
        n = 2 * cin + 9 * cin * cout + cout + (emb + 1) * e * cout + 2 * cout
        n += 9 * cout * cout + cout
        return n + (cin * cout + cout if cin != cout else 0)

    def attn(c):
        return 2 * c + 3 * c * c + 3 * c + c * c + c

    n = base * emb + emb + emb * emb + emb  # timestep MLP
    n += 0 if num_classes is None else (num_classes + 1) * emb
    n += 9 * image_channels * base + base  # conv in
    skips, ch = [base], base
    for level, m in enumerate(mults):
        for _ in range(blocks):
            n += res(ch, base * m) + (attn(base * m) if level in attn_levels else 0)
            ch = base * m
            skips.append(ch)
        if level < len(mults) - 1:
            n += 9 * ch * ch + ch
            skips.append(ch)
    n += 2 * res(ch, ch) + attn(ch)
    for level in reversed(range(len(mults))):
        for i in range(blocks + 1):
            n += res(ch + skips.pop(), base * mults[level])
            ch = base * mults[level]
            n += attn(ch) if level in attn_levels else 0
            if level > 0 and i == blocks:
                n += 9 * ch * ch + ch
    return n + 2 * ch + 9 * ch * image_channels + image_channels  # norm + conv out


def test_parameter_count_formula_matches_tiny_models():
    for scale_shift, classes in [(True, None), (False, 7)]:
        model = UNet(**TINY, use_scale_shift_norm=scale_shift, num_classes=classes)
        contract.run_parameter_count_test(
            model, _ddpm_param_count(3, 16, (1, 2), 1, {1}, scale_shift, classes)
        )


def test_cifar10_preset_is_ddpm_size_by_formula():
    # Ho et al. 2020, Sec. 4 / App. B: the CIFAR-10 model has 35.7M parameters.
    cfg = unet_lib.PRESETS["unet_cifar10"]["config"]
    n = _ddpm_param_count(3, 128, (1, 2, 2, 2), 2, {1}, cfg["use_scale_shift_norm"])
    assert abs(n - 35.7e6) / 35.7e6 < 0.01
    assert abs(unet_lib.PRESETS["unet_cifar10"]["paper_params"] - 35.7e6) < 1


@pytest.mark.large
def test_cifar10_preset_built_parameter_count():
    from keras_minsnr import backbones

    model = backbones.get("unet_cifar10")
    assert model.image_shape == (32, 32, 3) and model.conditioning is None
    assert abs(model.count_params() - 35.7e6) / 35.7e6 < 0.01
