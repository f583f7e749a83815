"""The converter of the Min-SNR paper's ViT checkpoints (keras_minsnr/official.py).

No torch here: the state dicts are built in numpy with the official names and shapes
(``guided_diffusion/vision_transformer.py``), and the converted Keras model is compared
with a float64 numpy forward pass written in the official layer order, on NCHW inputs.
"""

import math
import sys

import keras
import numpy as np
import pytest
from scipy.special import erf

from keras_minsnr import cli
from keras_minsnr import official
from keras_minsnr.backbones import dit
from keras_minsnr.backbones import vit

# A tiny official-layout ViT: 8x8x4 latents, patch 2 (16 patches), width 32, 2 heads.
TINY = dict(image_shape=(8, 8, 4), patch_size=2, hidden_size=32, num_heads=2)
DEPTH, CLASSES, TABLE = 2, 5, 50


def _random_state_dict(seed=0, depth=DEPTH, num_classes=CLASSES, table=TABLE):
    """Official names and shapes, written out here (not taken from the converter)."""
    rng = np.random.default_rng(seed)
    d, c, p, n = 32, 4, 2, 16

    def w(*shape, scale=0.3):
        return (scale * rng.standard_normal(shape)).astype("float32")

    sd = {
        "pos_embed": w(1, (2 if num_classes else 1) + n, d, scale=0.5),
        "patch_embed.proj.weight": w(d, c, p, p),
        "patch_embed.proj.bias": w(d, scale=0.1),
        "time_embedding.weight": w(table, d, scale=1.0),
        "linear_projection.weight": w(p * p * c, d),
        "linear_projection.bias": w(p * p * c, scale=0.1),
    }
    if num_classes:
        sd["class_embedding.weight"] = w(num_classes + 1, d, scale=1.0)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": 1 + w(d, scale=0.1), b + "norm1.bias": w(d, scale=0.1),
            b + "attn.qkv.weight": w(3 * d, d), b + "attn.q_bias": w(d, scale=0.2),
            b + "attn.v_bias": w(d, scale=0.2),
            b + "attn.proj.weight": w(d, d), b + "attn.proj.bias": w(d, scale=0.1),
            b + "norm2.weight": 1 + w(d, scale=0.1), b + "norm2.bias": w(d, scale=0.1),
            b + "mlp.fc1.weight": w(4 * d, d), b + "mlp.fc1.bias": w(4 * d, scale=0.1),
            b + "mlp.fc2.weight": w(d, 4 * d), b + "mlp.fc2.bias": w(d, scale=0.1),
        })
    return sd


def _official_forward(sd, x, t, y, patch, heads):
    """The official ViT's forward in float64 numpy: NCHW in, NCHW out."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    x = x.astype(np.float64)
    b, c, h, w = x.shape
    gh, gw = h // patch, w // patch

    def linear(z, name):
        return z @ sd[name + ".weight"].T + sd[name + ".bias"]

    def layer_norm(z, name):
        mu = z.mean(-1, keepdims=True)
        var = ((z - mu) ** 2).mean(-1, keepdims=True)
        return (z - mu) / np.sqrt(var + 1e-6) * sd[name + ".weight"] + sd[name + ".bias"]

    # PatchEmbed: stride-p conv, then flatten(2).transpose(1, 2).
    patches = x.reshape(b, c, gh, patch, gw, patch)
    conv = np.einsum("bcipjq,dcpq->bdij", patches, sd["patch_embed.proj.weight"])
    conv += sd["patch_embed.proj.bias"][None, :, None, None]
    tokens = conv.reshape(b, -1, gh * gw).transpose(0, 2, 1)
    extra = [sd["time_embedding.weight"][t][:, None]]
    if "class_embedding.weight" in sd:
        extra.append(sd["class_embedding.weight"][y][:, None])
    z = np.concatenate(extra + [tokens], axis=1) + sd["pos_embed"]
    n, d = z.shape[1], z.shape[2]
    for i in range(sum(k.endswith(".attn.q_bias") for k in sd)):
        p_ = f"blocks.{i}."
        a = layer_norm(z, p_ + "norm1")
        bias = np.concatenate(
            [sd[p_ + "attn.q_bias"], np.zeros(d), sd[p_ + "attn.v_bias"]]
        )
        qkv = (a @ sd[p_ + "attn.qkv.weight"].T + bias).reshape(b, n, 3, heads, -1)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B, heads, N, hd)
        logits = (q * (d // heads) ** -0.5) @ k.transpose(0, 1, 3, 2)
        logits -= logits.max(-1, keepdims=True)
        attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        out = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        z = z + linear(out, p_ + "attn.proj")
        hidden = linear(layer_norm(z, p_ + "norm2"), p_ + "mlp.fc1")
        hidden = 0.5 * hidden * (1 + erf(hidden / math.sqrt(2)))  # nn.GELU (exact)
        z = z + linear(hidden, p_ + "mlp.fc2")
    # No final norm (use_mean_pooling=True); head on the patch tokens; unpatchify.
    out = linear(z[:, len(extra):], "linear_projection")
    out = out.reshape(b, gh, gw, patch, patch, c)
    out = np.einsum("nhwpqc->nchpwq", out)
    return out.reshape(b, c, gh * patch, gw * patch)


def _inputs(seed=1, num_classes=CLASSES):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 4, 8, 8)).astype("float32")  # NCHW, as in PyTorch
    t = np.array([0, 17, TABLE - 1], "int32")
    y = np.array([0, num_classes - 1, num_classes], "int32")  # the last is the null class
    return x, t, y


@pytest.mark.parametrize("num_classes", [CLASSES, None], ids=["class", "uncond"])
def test_converted_forward_matches_float64_official_order(num_classes):
    sd = _random_state_dict(num_classes=num_classes)
    backbone = official.convert_official_state_dict(sd, TINY)
    assert backbone.depth == DEPTH and backbone.num_classes == num_classes
    assert backbone.timestep_table_size == TABLE
    x, t, y = _inputs(num_classes=num_classes or 1)
    inputs = {"x": x.transpose(0, 2, 3, 1), "t": t}
    if num_classes:
        inputs["y"] = y
    got = keras.ops.convert_to_numpy(backbone(inputs)).transpose(0, 3, 1, 2)
    want = _official_forward(sd, x, t, y, patch=2, heads=2)
    assert np.abs(want).max() > 1.0  # a non-trivial output
    # float32 against float64: 1e-5 of the output's scale.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_conversion_survives_a_keras_file(tmp_path):
    sd = _random_state_dict()
    backbone = official.convert_official_state_dict(sd, TINY)
    path = str(tmp_path / "vit.keras")
    backbone.save(path)
    loaded = keras.models.load_model(path)
    config = loaded.get_config()
    assert config["timestep_embedding"] == "table"
    assert config["final_norm"] is False and config["timestep_table_size"] == TABLE
    x, t, y = _inputs()
    inputs = {"x": x.transpose(0, 2, 3, 1), "t": t, "y": y}
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(inputs)).transpose(0, 3, 1, 2),
        _official_forward(sd, x, t, y, patch=2, heads=2),
        rtol=0, atol=1e-4,
    )


def test_parameter_count_is_the_official_one_plus_the_zero_k_bias():
    backbone = official.convert_official_state_dict(_random_state_dict(), TINY)
    d = 32
    # Official: per block 12 D^2 + 12 D (qkv without bias, q/v biases, proj, two norms,
    # MLP 4D); positions (2 + 16) D; patch conv 4*2*2*D + D; tables 50 D and 6 D; head.
    official_count = (DEPTH * (12 * d * d + 12 * d) + 18 * d + 16 * d + d
                      + TABLE * d + (CLASSES + 1) * d + 16 * d + 16)
    assert backbone.count_params() == official_count + DEPTH * d
    # The ViT-XL/2 of the paper ("451M"): the official layout's count.
    xl = official.expected_shapes(
        **official.OFFICIAL_CONFIGS["vit_xl_patch2_32"] | dict(
            num_classes=1000, timestep_table_size=4000)
    )
    assert sum(math.prod(s) for s in xl.values()) == 452_390_416


def test_bad_state_dict_lists_every_offending_key():
    sd = _random_state_dict()
    del sd["blocks.1.attn.v_bias"]
    sd["norm.weight"] = np.ones(32, "float32")
    sd["blocks.0.mlp.fc1.weight"] = np.zeros((64, 32), "float32")
    with pytest.raises(official.StateDictMismatchError) as info:
        official.convert_official_state_dict(sd, TINY)
    error = info.value
    assert error.missing == ["blocks.1.attn.v_bias"]
    assert error.unexpected == ["norm.weight"]
    assert error.mismatched == {"blocks.0.mlp.fc1.weight": ((64, 32), (128, 32))}
    message = str(error)
    for text in ("missing keys: blocks.1.attn.v_bias", "unexpected keys: norm.weight",
                 "blocks.0.mlp.fc1.weight (64, 32) (expected (128, 32))"):
        assert text in message


def test_a_tiny_dict_does_not_fit_the_released_xl_config():
    with pytest.raises(official.StateDictMismatchError, match="vit_xl_patch2_32") as info:
        official.convert_official_state_dict(_random_state_dict(), "vit_xl_patch2_32")
    # 28 blocks expected, 2 given; every tensor of the given ones is too narrow.
    assert "blocks.27.attn.qkv.weight" in info.value.missing
    assert info.value.mismatched["pos_embed"] == ((1, 18, 32), (1, 258, 1152))


@pytest.mark.parametrize(
    "config, overrides, match",
    [
        ("vit_huge_patch1", {}, "Unknown official config 'vit_huge_patch1'"),
        (["vit_xl_patch2_32"], {}, "config must be an official model name or a dict"),
        (dict(TINY, num_heads=None), {}, "lacks num_heads"),
        (TINY, {"qkv_bias": False}, "Unknown architecture argument.*qkv_bias"),
    ],
)
def test_bad_config(config, overrides, match):
    with pytest.raises(ValueError, match=match):
        official.convert_official_state_dict(_random_state_dict(), config, **overrides)


def test_load_npz_and_clear_errors(tmp_path, monkeypatch):
    sd = _random_state_dict()
    path = tmp_path / "ckpt.npz"
    np.savez(path, **sd)
    loaded = official.load_official_checkpoint(str(path))
    assert sorted(loaded) == sorted(sd)
    np.testing.assert_array_equal(loaded["pos_embed"], sd["pos_embed"])
    with pytest.raises(ValueError, match="does not exist"):
        official.load_official_checkpoint(str(tmp_path / "absent.npz"))
    (tmp_path / "ckpt.ckpt").write_text("")
    with pytest.raises(ValueError, match=r"Unsupported checkpoint format '.ckpt'"):
        official.load_official_checkpoint(str(tmp_path / "ckpt.ckpt"))
    (tmp_path / "ema.pt").write_text("")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(ValueError, match=r"needs PyTorch.*keras_minsnr\[official\]"):
        official.load_official_checkpoint(str(tmp_path / "ema.pt"))


def test_cli_converts_an_npz_checkpoint(tmp_path, capsys):
    sd = _random_state_dict()
    ckpt, out = str(tmp_path / "ema.npz"), str(tmp_path / "vit.keras")
    np.savez(ckpt, **sd)
    argv = ["convert-official", ckpt, out, "--config", "vit_xl_patch2_32",
            "--set", "image_shape=[8,8,4]", "--set", "hidden_size=32",
            "--set", "num_heads=2", "--set", "depth=2"]
    assert cli.main(argv) == 0
    assert "vit.keras" in capsys.readouterr().out
    loaded = keras.models.load_model(out)
    x, t, y = _inputs()
    got = loaded({"x": x.transpose(0, 2, 3, 1), "t": t, "y": y})
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(got).transpose(0, 3, 1, 2),
        _official_forward(sd, x, t, y, patch=2, heads=2),
        rtol=0, atol=1e-4,
    )
    # The released config as it is: one line naming the offending keys, exit code 2.
    assert cli.main(["convert-official", ckpt, out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keras-minsnr: error: The state dict does not fit")
    assert "missing keys: blocks.10." in err
    assert cli.main(["convert-official", ckpt, str(tmp_path / "vit.h5")]) == 2
    assert "must end with .keras" in capsys.readouterr().err


def test_paper_settings_for_the_released_checkpoints():
    backbone = official.convert_official_state_dict(_random_state_dict(), TINY)
    model = official.official_diffusion_model(backbone, "vit_xl_patch2_32")
    assert model.prediction_type == "sample" and model.label_dropout == 0.15
    assert model.weighting.strategy == "min_snr" and model.weighting.gamma == 5.0
    # Cosine schedule over 1000 steps: alpha_bar_0 = f(1/T) / f(0).
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert model.schedule.alphas_cumprod.shape == (1000,)
    np.testing.assert_allclose(model.schedule.alphas_cumprod[0], f(1e-3) / f(0), rtol=1e-12)
    assert official.sampling_settings("vit_large_patch4_64") == dict(
        sampler="edm_heun", num_steps=20, guidance_scale=1.5
    )
    with pytest.raises(ValueError, match="No paper settings for 'vit_base_patch2_32'"):
        official.sampling_settings("vit_base_patch2_32")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(timestep_embedding="sinusoidal"), "Unknown timestep_embedding 'sinusoidal'"),
        (dict(timestep_embedding="table", timestep_table_size=0), "timestep_table_size"),
        (dict(final_norm="no"), "final_norm must be True or False"),
        (dict(final_norm=False, conditioning_mode="adaln_zero"), "in_context' only"),
    ],
)
def test_layout_options_reject_bad_values(overrides, match):
    kwargs = dict(TINY, depth=1, num_classes=None, **overrides)
    backbone_class = dit.DiT if kwargs.pop("conditioning_mode", None) else vit.InContextViT
    with pytest.raises(ValueError, match=match):
        backbone_class(**kwargs)


def test_timestep_table_is_a_lookup():
    model = vit.InContextViT(**TINY, depth=1, num_classes=None,
                             timestep_embedding="table", timestep_table_size=7)
    table = np.arange(7 * 32, dtype="float32").reshape(7, 32)
    model.t_embedder.embeddings.assign(table)
    rows = keras.ops.convert_to_numpy(model.t_embedder(np.array([6, 0, 3])))
    np.testing.assert_array_equal(rows, table[[6, 0, 3]])


def test_a_key_bias_changes_no_output():
    # Why the zero k bias of the fused qkv layer is harmless: softmax cancels it.
    backbone = official.convert_official_state_dict(_random_state_dict(), TINY)
    x, t, y = _inputs()
    inputs = {"x": x.transpose(0, 2, 3, 1), "t": t, "y": y}
    before = keras.ops.convert_to_numpy(backbone(inputs))
    qkv = backbone.blocks[0].attn.qkv
    bias = keras.ops.convert_to_numpy(qkv.bias).copy()
    bias[32:64] = np.random.default_rng(3).standard_normal(32)
    qkv.bias.assign(bias)
    after = keras.ops.convert_to_numpy(backbone(inputs))
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5 * np.abs(before).max())
