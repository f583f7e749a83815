"""DiT (adaLN-Zero) and the in-context ViT: shapes, init, references, presets, errors."""

import math

import keras
import numpy as np
import pytest

from keras_minsnr import backbones
from keras_minsnr.backbones import dit
from keras_minsnr.backbones import transformer_layers as layers_lib
from keras_minsnr.backbones import vit
from tests import backbone_contract as contract

TINY = dict(image_shape=(8, 8, 3), patch_size=2, hidden_size=32, depth=2, num_heads=4)
MODES = ("adaln_zero", "in_context")
PRESETS = {**dit.PRESETS, **vit.PRESETS}


def _model(conditioning_mode="adaln_zero", **kwargs):
    """`DiT` (adaLN-Zero) or `InContextViT`, by the conditioning they put in the blocks."""
    if conditioning_mode == "in_context":
        return vit.InContextViT(**kwargs)
    return dit.DiT(conditioning_mode=conditioning_mode, **kwargs)


def _inputs(batch=3, shape=(8, 8, 3), num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch,) + tuple(shape)).astype("float32")
    t = rng.integers(0, 1000, size=(batch,)).astype("int32")
    y = rng.integers(0, num_classes + 1, size=(batch,)).astype("int32")
    return {"x": x, "t": t, "y": y}


# --------------------------------------------------------------------------------------
# independent float64 references


def _layer_norm(x, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def _softmax(a):
    a = a - a.max(-1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(-1, keepdims=True)


def _attention_reference(x, qkv_w, qkv_b, proj_w, proj_b, heads):
    b, n, d = x.shape
    hd = d // heads
    qkv = x @ qkv_w + qkv_b
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    split = lambda a: a.reshape(b, n, heads, hd).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    att = _softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd))
    out = (att @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    return out @ proj_w + proj_b


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _f64(layer_weight):
    return np.asarray(keras.ops.convert_to_numpy(layer_weight), dtype=np.float64)


def _count_reference(image_shape, patch_size, hidden_size, depth, mlp_ratio=4.0,
                     num_classes=1000, conditioning_mode="adaln_zero",
                     frequency_dim=256, **_):
    """Parameter count written from the two architectures' descriptions."""
    h, w, c = image_shape
    d, p = hidden_size, patch_size
    m = int(d * mlp_ratio)
    n = (h // p) * (w // p)
    out = p * p * c
    total = p * p * c * d + d  # patch embedding
    total += frequency_dim * d + d + d * d + d  # timestep MLP
    if num_classes:
        total += (num_classes + 1) * d  # class table with the null row
    attention = 3 * d * d + 3 * d + d * d + d
    mlp = d * m + m + m * d + d
    if conditioning_mode == "adaln_zero":
        total += n * d  # fixed sin-cos positions (stored, not trained)
        total += depth * (attention + mlp + d * 6 * d + 6 * d)
        total += d * 2 * d + 2 * d + d * out + out  # adaLN final layer
    else:
        extra = 1 + bool(num_classes)
        total += (n + extra) * d  # learned positions
        total += depth * (attention + mlp + 4 * d)  # two affine LayerNorms
        total += 2 * d + d * out + out  # final LayerNorm + head
    return total


# --------------------------------------------------------------------------------------
# shapes, init


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_classes", [10, None])
def test_output_shape_and_finite(mode, num_classes):
    model = _model(**TINY, num_classes=num_classes, conditioning_mode=mode)
    contract.randomize(model)
    inputs = _inputs()
    if num_classes is None:
        inputs.pop("y")
    out = keras.ops.convert_to_numpy(model(inputs, training=True))
    assert out.shape == (3, 8, 8, 3)
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out))
    assert np.std(out) > 0
    assert model.image_shape == (8, 8, 3)
    assert model.conditioning == ("class" if num_classes else None)
    assert model.num_classes == num_classes
    if num_classes:
        # Compiled path (jit on JAX, tf.function on TF).
        compiled = model.predict(inputs, batch_size=3, verbose=0)
        np.testing.assert_allclose(compiled, out, rtol=1e-4, atol=1e-5)


def test_non_square_images_and_patch_4():
    model = _model(
        image_shape=(8, 16, 3), patch_size=4, hidden_size=32, depth=1, num_heads=4,
        num_classes=10, conditioning_mode="in_context",
    )
    contract.randomize(model)
    out = keras.ops.convert_to_numpy(model(_inputs(3, (8, 16, 3))))
    assert out.shape == (3, 8, 16, 3)
    assert np.all(np.isfinite(out))


def test_adaln_zero_block_starts_as_identity():
    block = layers_lib.DiTBlock(32, num_heads=4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16, 32)).astype("float32")
    c = rng.standard_normal((3, 32)).astype("float32")
    out = keras.ops.convert_to_numpy(block(x, c))
    np.testing.assert_array_equal(out, x)
    # Its attention and MLP branches are not trivial; only the zero gates hide them.
    assert np.abs(keras.ops.convert_to_numpy(block.attn(x))).max() > 1e-3


def test_adaln_model_outputs_zeros_at_init():
    model = _model(**TINY, num_classes=10)
    out = keras.ops.convert_to_numpy(model(_inputs()))
    np.testing.assert_array_equal(out, np.zeros_like(out))


def test_in_context_head_starts_small_but_not_zero():
    model = _model(**TINY, num_classes=10, conditioning_mode="in_context")
    out = np.abs(keras.ops.convert_to_numpy(model(_inputs())))
    assert 0 < out.max() < 1e-2


def test_null_class_row():
    model = _model(**TINY, num_classes=10, conditioning_mode="in_context")
    assert tuple(model.y_embedder.embeddings.shape) == (11, 32)
    contract.randomize(model)
    inputs = _inputs()
    null = dict(inputs, y=np.full((3,), 10, "int32"))
    missing = {"x": inputs["x"], "t": inputs["t"]}
    label0 = dict(inputs, y=np.zeros((3,), "int32"))
    out_null = keras.ops.convert_to_numpy(model(null))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(missing)), out_null)
    assert np.abs(keras.ops.convert_to_numpy(model(label0)) - out_null).max() > 1e-4


def test_unconditional_has_no_class_table():
    for mode in MODES:
        for num_classes in (None, 0):
            model = _model(**TINY, num_classes=num_classes, conditioning_mode=mode)
            assert model.y_embedder is None
            assert model.conditioning is None


# --------------------------------------------------------------------------------------
# numbers against float64 references


def test_sincos_position_embedding_matches_dit_formula():
    dim, gh, gw = 16, 3, 5
    # DiT / MAE construction: meshgrid(w, h); first half from grid[0], second from grid[1].
    grid = np.stack(np.meshgrid(np.arange(gw, dtype=float), np.arange(gh, dtype=float)))
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4.0))

    def one_d(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    reference = np.concatenate([one_d(grid[0]), one_d(grid[1])], axis=1)
    np.testing.assert_allclose(
        layers_lib.sincos_position_embedding_2d(dim, gh, gw), reference, rtol=1e-12, atol=1e-12
    )
    model = _model(**TINY, num_classes=None)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model.pos_embed)[0],
        layers_lib.sincos_position_embedding_2d(32, 4, 4),
        rtol=0,
        atol=1e-7,
    )


def test_unpatchify_matches_loop_reference():
    gh, gw, p, c = 2, 3, 2, 3
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((2, gh * gw, p * p * c)).astype("float32")
    reference = np.zeros((2, gh * p, gw * p, c), "float32")
    for i in range(gh):
        for j in range(gw):
            patch = tokens[:, i * gw + j].reshape(2, p, p, c)
            reference[:, i * p : (i + 1) * p, j * p : (j + 1) * p] = patch
    out = keras.ops.convert_to_numpy(layers_lib.unpatchify(tokens, gh, gw, p, c))
    np.testing.assert_array_equal(out, reference)


def test_self_attention_matches_numpy():
    layer = layers_lib.SelfAttention(32, num_heads=4)
    x = np.random.default_rng(0).standard_normal((3, 16, 32)).astype("float32")
    out = keras.ops.convert_to_numpy(layer(x))
    reference = _attention_reference(
        x.astype(np.float64), _f64(layer.qkv.kernel), _f64(layer.qkv.bias),
        _f64(layer.proj.kernel), _f64(layer.proj.bias), heads=4,
    )
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-5)


def test_self_attention_backward_writes_the_qkv_gradient_once():
    # One stack of the q, k and v gradients; each slice's gradient (StridedSliceGrad) would
    # write a zero-padded copy of the whole qkv tensor (0.8 s of a ViT-B/2 step on TF).
    x = np.random.default_rng(0).standard_normal((2, 16, 32)).astype("float32")
    kinds = contract.tensorflow_gradient_op_kinds(layers_lib.SelfAttention(32, num_heads=4), x)
    assert {"MatMul", "BatchMatMulV2", "Einsum"} & set(kinds)  # the graph is the attention's
    assert "StridedSliceGrad" not in kinds


def test_dit_block_matches_numpy_with_nonzero_modulation():
    block = layers_lib.DiTBlock(32, num_heads=4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16, 32)).astype("float32")
    c = rng.standard_normal((3, 32)).astype("float32")
    block(x, c)
    block.modulation.kernel.assign(0.3 * rng.standard_normal((32, 192)).astype("float32"))
    block.modulation.bias.assign(0.3 * rng.standard_normal((192,)).astype("float32"))
    out = keras.ops.convert_to_numpy(block(x, c))

    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    silu = c64 / (1 + np.exp(-c64))
    mod = silu @ _f64(block.modulation.kernel) + _f64(block.modulation.bias)
    sh1, sc1, g1, sh2, sc2, g2 = np.split(mod, 6, axis=-1)
    h = _layer_norm(x64) * (1 + sc1[:, None]) + sh1[:, None]
    attn = block.attn
    h = _attention_reference(
        h, _f64(attn.qkv.kernel), _f64(attn.qkv.bias), _f64(attn.proj.kernel),
        _f64(attn.proj.bias), heads=4,
    )
    y = x64 + g1[:, None] * h
    h = _layer_norm(y) * (1 + sc2[:, None]) + sh2[:, None]
    h = _gelu_tanh(h @ _f64(block.fc1.kernel) + _f64(block.fc1.bias))
    h = h @ _f64(block.fc2.kernel) + _f64(block.fc2.bias)
    reference = y + g2[:, None] * h
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4)


def test_in_context_tokens_reach_the_patches():
    """The timestep only enters through its extra token, so changing t changes x."""
    model = _model(**TINY, num_classes=None, conditioning_mode="in_context")
    contract.randomize(model)
    inputs = _inputs()
    inputs.pop("y")
    a = keras.ops.convert_to_numpy(model(inputs))
    b = keras.ops.convert_to_numpy(model(dict(inputs, t=inputs["t"] + 1)))
    assert np.abs(a - b).max() > 1e-5


# --------------------------------------------------------------------------------------
# serialization, mixed precision


@pytest.mark.parametrize("mode", MODES)
def test_keras_file_round_trip(tmp_path, mode):
    model = _model(**TINY, num_classes=10, conditioning_mode=mode)
    contract.randomize(model)
    contract.run_round_trip_test(model, _inputs(), tmp_path)


@pytest.mark.parametrize("mode", MODES)
def test_mixed_bfloat16(mode):
    contract.run_mixed_bfloat16_test(
        lambda: _model(**TINY, num_classes=10, conditioning_mode=mode), _inputs()
    )


# --------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(image_shape=(10, 8, 3), patch_size=4), "not divisible by patch_size=4"),
        (dict(conditioning_mode="cross_attention"), "cross_attention"),
        (dict(hidden_size=30, num_heads=4), "hidden_size=30"),
        (dict(hidden_size=18, num_heads=2), "divisible by 4"),
        (dict(depth=0), "depth=0"),
        (dict(patch_size=0), "patch_size=0"),
        (dict(image_shape=(8, 8)), r"\(8, 8\)"),
        (dict(num_classes=-1), "num_classes=-1"),
        (dict(mlp_ratio=0), "mlp_ratio"),
    ],
)
def test_bad_construction(overrides, match):
    contract.run_bad_construction_test(dit.DiT, {**TINY, **overrides}, match=match)


def test_bad_inputs():
    model = _model(**TINY, num_classes=10)
    good = _inputs()
    for bad, match in [
        (dict(good, x=good["x"][0]), "rank 4"),
        (dict(good, x=good["x"][..., :1]), r"axis 3 is 1, expected 3"),
        (dict(good, x=good["x"][:, :6]), r"axis 1 is 6, expected 8"),
        (dict(good, t=good["t"][:, None]), "'t'"),
        ({"x": good["x"]}, "'x', 't'"),
        (good["x"], "'x', 't'"),
    ]:
        contract.run_bad_call_test(model, bad, match=match)


# --------------------------------------------------------------------------------------
# presets and the registry


@pytest.mark.parametrize(
    "config",
    [
        dict(TINY, num_classes=10),
        dict(TINY, num_classes=None),
        dict(TINY, num_classes=7, conditioning_mode="in_context"),
        dict(TINY, num_classes=None, conditioning_mode="in_context"),
        dict(image_shape=(8, 16, 3), patch_size=4, hidden_size=32, depth=3, num_heads=4,
             mlp_ratio=2.0, num_classes=10, frequency_dim=32,
             conditioning_mode="in_context"),
    ],
)
def test_count_reference_matches_built_models(config):
    contract.run_parameter_count_test(_model(**config), _count_reference(**config))


PAPER = {
    "dit_s_2": 33e6, "dit_b_2": 130e6, "dit_l_2": 458e6, "dit_xl_2": 675e6,
    "vit_l_4_in64": 269e6, "vit_xl_2_in256": 451e6,
}


def test_preset_parameter_counts_match_the_papers():
    assert set(PRESETS) == set(PAPER) | {"vit_b_2_in256"}
    for name, preset in PRESETS.items():
        assert preset["class"] is (vit.InContextViT if name.startswith("vit") else dit.DiT)
        assert preset["paper_params"] == (int(PAPER[name]) if name in PAPER else None)
        mode = "in_context" if preset["class"] is vit.InContextViT else "adaln_zero"
        count = _count_reference(**preset["config"], conditioning_mode=mode)
        if name in PAPER:
            assert abs(count / PAPER[name] - 1) < 0.01, (name, count)
    config = PRESETS["vit_l_4_in64"]["config"]
    assert (config["depth"], config["hidden_size"], config["num_heads"]) == (21, 1024, 16)
    assert tuple(config["image_shape"]) == (64, 64, 3) and config["patch_size"] == 4
    config = PRESETS["vit_xl_2_in256"]["config"]
    assert (config["depth"], config["hidden_size"], config["num_heads"]) == (28, 1152, 16)
    config = PRESETS["vit_b_2_in256"]["config"]
    assert (config["depth"], config["hidden_size"]) == (12, 768)


def test_largest_preset_at_full_width_builds_with_paper_count():
    """DiT-XL/2's layers at their full width, one and two blocks deep: the built counts are
    the reference's, and 28 blocks of the measured block size give the paper's 675M.
    (Building all 28 blocks takes ~3 GB and most of a minute of random initialisation on
    JAX; that the count grows by one block per block is checked on the small models.)"""
    name = "dit_xl_2"
    config = PRESETS[name]["config"]
    counts = {}
    for depth in (1, 2):
        counts[depth] = backbones.get(name, depth=depth).count_params()
        assert counts[depth] == _count_reference(**{**config, "depth": depth})
    full = counts[1] + (config["depth"] - 1) * (counts[2] - counts[1])
    assert full == _count_reference(**config)
    assert abs(full / PAPER[name] - 1) < 0.01


def test_registry_get_with_overrides_and_unknown_name():
    model = backbones.get("dit_s_2", depth=1, hidden_size=32, num_heads=2, num_classes=4)
    assert isinstance(model, dit.DiT)
    assert (model.depth, model.hidden_size, model.num_heads) == (1, 32, 2)
    assert model.num_classes == 4 and model.patch_size == 2
    assert model.image_shape == (32, 32, 4)
    assert backbones.PRESETS["vit_l_4_in64"] is vit.PRESETS["vit_l_4_in64"]
    with pytest.raises(ValueError, match="dit_s_2") as info:
        backbones.get("dit_s_3")
    assert "dit_s_3" in str(info.value)


# --------------------------------------------------------------------------------------
# initialisation against the references' distributions


def _normal_cdf(z):
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _truncated_normal_std(stddev, lower, upper):
    """Closed-form std of N(0, stddev²) truncated to [lower, upper]."""
    a, b = lower / stddev, upper / stddev
    pdf = lambda z: math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)  # noqa: E731
    mass = _normal_cdf(b) - _normal_cdf(a)
    mean = (pdf(a) - pdf(b)) / mass
    var = 1.0 + (a * pdf(a) - b * pdf(b)) / mass - mean**2
    return stddev * math.sqrt(var)


def _measured_std(weight):
    return float(np.std(np.asarray(keras.ops.convert_to_numpy(weight), np.float64)))


# A model whose every initialised kernel holds at least 4096 values: the sample std
# then sits within ~1.1% (one standard error) of the distribution's, and the checks
# below allow 4%, while the distributions they tell apart differ by 12% or more.
INIT = dict(image_shape=(32, 32, 8), patch_size=4, hidden_size=256, depth=2,
            num_heads=4, num_classes=1000)


def _assert_std(weight, expected, name):
    got = _measured_std(weight)
    assert abs(got / expected - 1) < 0.04, (name, got, expected)


def test_truncated_normal_is_timm_trunc_normal():
    # timm's trunc_normal_(std=.02) cuts at +-2 absolute (100 sigma): std 0.0200; Keras'
    # TruncatedNormal(0.02) cuts at 2 sigma: std 0.0176. The reference is the former.
    from keras_minsnr.backbones.initializers import TruncatedNormal

    assert abs(_truncated_normal_std(0.02, -2, 2) - 0.02) < 1e-12
    assert abs(_truncated_normal_std(0.02, -0.04, 0.04) - 0.01759) < 1e-4
    values = keras.ops.convert_to_numpy(TruncatedNormal(stddev=0.02)((512, 512)))
    _assert_std(values, 0.02, "stddev 0.02")
    assert abs(values.mean()) < 4 * 0.02 / 512
    # Bounds are absolute, as in timm: with std 1 and [-2, 2] the std is 0.8796.
    values = keras.ops.convert_to_numpy(TruncatedNormal(stddev=1.0)((512, 512)))
    _assert_std(values, _truncated_normal_std(1.0, -2, 2), "stddev 1, cut at 2")
    assert values.min() >= -2 and values.max() <= 2
    restored = TruncatedNormal.from_config(TruncatedNormal(0.5, lower=-1).get_config())
    assert (restored.stddev, restored.lower, restored.upper) == (0.5, -1, 2)


def test_adaln_zero_initialisation_matches_dit_initialize_weights():
    """facebookresearch/DiT models.py initialize_weights, one line per layer."""
    model = _model(**INIT)
    d, p, c = 256, 4, 8
    xavier = lambda fan_in, fan_out: math.sqrt(2.0 / (fan_in + fan_out))  # noqa: E731
    # Patch embedding: xavier_uniform on the conv kernel seen as a (D, p*p*C) matrix.
    _assert_std(model.patch_embed.kernel, xavier(p * p * c, d), "patch_embed")
    # Timestep MLP: normal(std=0.02) on both linear layers.
    _assert_std(model.t_embedder.dense_1.kernel, 0.02, "t_embedder.dense_1")
    _assert_std(model.t_embedder.dense_2.kernel, 0.02, "t_embedder.dense_2")
    # Label table: normal(std=0.02).
    _assert_std(model.y_embedder.embeddings, 0.02, "y_embedder")
    for block in model.blocks:  # every other linear layer: xavier_uniform
        _assert_std(block.attn.qkv.kernel, xavier(d, 3 * d), "qkv")
        _assert_std(block.attn.proj.kernel, xavier(d, d), "proj")
        _assert_std(block.fc1.kernel, xavier(d, 4 * d), "fc1")
        _assert_std(block.fc2.kernel, xavier(4 * d, d), "fc2")
    zeros = [model.final_layer.modulation, model.final_layer.linear]
    zeros += [block.modulation for block in model.blocks]  # adaLN-Zero
    for layer in zeros:
        for w in layer.weights:
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(w), 0.0)
    _assert_independent_draws(model)
    # Linear biases start at zero.
    for w in model.weights:
        if w.path.endswith("bias"):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(w), 0.0)


def test_in_context_initialisation_matches_the_min_snr_vit():
    """Min-SNR guided_diffusion/vision_transformer.py: timm trunc_normal_(std=.02) on every
    linear layer and the positions, fix_init_weight, init_scale on the head, PyTorch's
    default Conv2d init on the patch embedding and N(0, 1) for the class table."""
    model = _model(**INIT, conditioning_mode="in_context")
    d, p, c = 256, 4, 8
    fan_in = p * p * c
    # nn.Conv2d default: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), bias too.
    _assert_std(model.patch_embed.kernel, 1.0 / math.sqrt(3 * fan_in), "patch_embed")
    bias = keras.ops.convert_to_numpy(model.patch_embed.bias)
    assert np.abs(bias).max() <= 1.0 / math.sqrt(fan_in) and np.std(bias) > 0
    _assert_std(model.pos_embed, 0.02, "pos_embed")
    _assert_std(model.y_embedder.embeddings, 1.0, "class table")
    for i, block in enumerate(model.blocks):
        _assert_std(block.attn.qkv.kernel, 0.02, "qkv")
        _assert_std(block.fc1.kernel, 0.02, "fc1")
        shrunk = 0.02 / math.sqrt(2.0 * (i + 1))
        _assert_std(block.attn.proj.kernel, shrunk, "proj")
        _assert_std(block.fc2.kernel, shrunk, "fc2")
    _assert_std(model.head.kernel, 0.02 * 1e-3, "head")
    _assert_independent_draws(model)


def _assert_independent_draws(model):
    """No two same-shaped kernels share values (one unseeded initializer instance reused
    across layers returns the same draw every call)."""
    kernels = [w for w in model.weights if w.path.endswith(("kernel", "embeddings"))]
    seen = {}
    for w in kernels:
        values = keras.ops.convert_to_numpy(w)
        if not values.any():
            continue  # zero-initialised layers
        for other, other_values in seen.get(values.shape, []):
            assert not np.array_equal(values, other_values), (w.path, other)
        seen.setdefault(values.shape, []).append((w.path, values))


def test_gelu_matches_float64_and_the_exact_form_avoids_erfc():
    """Exact GELU x·Φ(x) = x/2·(1 + erf(x/√2)) and the tanh form, against float64; on JAX
    the exact form goes through erf: jax.nn.gelu's erfc expands on XLA:CPU into a
    polynomial whose constants become full-size arrays under the YNN fusion flag."""
    from keras_minsnr.backbones import layers

    x = np.concatenate([np.linspace(-9.0, 9.0, 721), [0.0, 1e-4, -1e-4]]).astype("float32")
    xd = x.astype(np.float64)
    exact = np.array([v / 2 * (1 + math.erf(v / math.sqrt(2))) for v in xd])
    tanh = 0.5 * xd * (1 + np.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd**3)))
    got = keras.ops.convert_to_numpy(layers.gelu(x, approximate=False))
    # 1 + erf (and 1 + tanh) cancel for x < −5, where |x·Φ(x)| < 2e-6: an absolute error
    # below 1e-6 there, in float32 (TensorFlow's own gelu is the same formula).
    np.testing.assert_allclose(got, exact, rtol=2e-6, atol=1e-6)
    got = keras.ops.convert_to_numpy(layers.gelu(x, approximate=True))
    np.testing.assert_allclose(got, tanh, rtol=2e-6, atol=1e-6)
    if keras.backend.backend() == "jax":
        import jax

        jaxpr = str(jax.make_jaxpr(lambda v: layers.gelu(v, approximate=False))(x))
        assert " erf " in jaxpr and "erfc" not in jaxpr


# --------------------------------------------------------------------------------------
# files saved when one `DiT` class held both transformers


def test_files_saved_before_the_split_load_with_their_outputs():
    """tests/data/transformers_before_split* were written at 47351dd, when `DiT` held the
    in-context ViT too (conditioning_mode="in_context"; see
    make_transformers_before_split.py). They load as the two classes and give the outputs
    that code computed, and the DiffusionModel keeps each EMA average on its weight."""
    import os

    folder = os.path.join(os.path.dirname(__file__), "data")
    saved = np.load(os.path.join(folder, "transformers_before_split.npz"))
    inputs = {"x": saved["x"], "t": saved["t"], "y": saved["y"]}
    model = keras.models.load_model(os.path.join(folder, "transformers_before_split.keras"))
    table = keras.models.load_model(
        os.path.join(folder, "transformers_before_split.vit_table.keras"))
    adaln = keras.models.load_model(os.path.join(folder, "transformers_before_split.dit.keras"))
    assert type(model.backbone) is vit.InContextViT and type(table) is vit.InContextViT
    assert type(adaln) is dit.DiT
    assert table.timestep_embedding == "table" and table.final_norm is None
    for backbone, key in ((model.backbone, "vit"), (table, "vit_table"), (adaln, "dit")):
        scale = np.abs(saved[key]).max()
        assert scale > 1e-5, key  # not all zero (the ViT head starts at std 2e-5)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(backbone(inputs)), saved[key],
                                   rtol=0, atol=1e-5 * scale)
    weights = model.backbone.trainable_weights
    flat = lambda arrays: np.concatenate(  # noqa: E731
        [np.ravel(keras.ops.convert_to_numpy(a)) for a in arrays])
    np.testing.assert_array_equal(flat(weights), saved["weights"])
    np.testing.assert_array_equal(flat([model.ema.average_of(w) for w in weights]),
                                  saved["ema"])
    assert not np.array_equal(saved["ema"], saved["weights"])  # the averages lag
