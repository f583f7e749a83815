"""LoRA: the scaled update against float64 numpy, which layers each backbone adapts,
frozen base weights and the EMA through fit(), adapter files, merging and `.keras` files."""

import os

import h5py
import keras
import numpy as np
import pytest

import keras_minsnr as kms
from keras_minsnr import builders
from keras_minsnr import lora
from keras_minsnr import training
from tests.tiny_backbones import TinyConvBackbone

X = np.random.RandomState(0).uniform(-1, 1, (8, 8, 8, 1)).astype("float32")
Y = (np.arange(8) % 10).astype("int32")
INPUTS = {"x": X[:3], "t": np.array([5, 40, 90], "int32"), "y": Y[:3]}


def numpy(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable))


def pretend_pretrained(backbone, seed=0):
    """Random non-zero values for every weight: adaLN-Zero gates and zero-initialised
    output layers would otherwise give the adapters zero gradients."""
    rng = np.random.RandomState(seed)
    for weight in backbone.weights:
        if weight.trainable:
            weight.assign(0.2 * rng.standard_normal(weight.shape).astype(weight.dtype))


def tiny_dit(in_context=False):
    name = "vit_b_2_in256" if in_context else "dit_s_2"
    return kms.backbones.get(name, image_shape=(8, 8, 1), num_classes=10, depth=1,
                             hidden_size=16, num_heads=2, patch_size=4)


def tiny_unet():
    return kms.backbones.get("unet_cifar10", image_shape=(4, 4, 1), base_channels=4,
                             channel_multipliers=(1,), num_res_blocks=1,
                             attention_resolutions=(4,), num_groups=2)


def run_config_groups():
    from keras_minsnr import run_config

    return run_config.LORA_TARGET_GROUPS


def random_adapters(backbone, seed=1):
    rng = np.random.RandomState(seed)
    for variable in lora.lora_variables(backbone):
        variable.assign(rng.standard_normal(variable.shape).astype("float32"))


# -- the update W + (alpha / r) A B ---------------------------------------------------


def test_dense_and_conv_update_equal_float64_reference():
    inputs = keras.Input((5, 5, 3))
    h = keras.layers.Conv2D(4, 3, padding="valid", name="conv")(inputs)
    outputs = keras.layers.Dense(2, name="dense")(keras.layers.Flatten()(h))
    model = keras.Model(inputs, outputs)
    paths = lora.enable_lora(model, rank=2, alpha=6.0, targets=["all"])
    assert sorted(paths) == ["conv", "dense"]
    random_adapters(model)
    x = np.random.RandomState(2).standard_normal((2, 5, 5, 3))
    f64 = {v.path: numpy(v).astype(np.float64) for v in model.weights}
    scale = 6.0 / 2
    # 3x3 valid convolution written out: out[b,i,j,o] = sum_{u,v,c} x[b,i+u,j+v,c] K[u,v,c,o].
    kernel = f64["conv/kernel"] + scale * f64["conv/lora_kernel_a"] @ f64["conv/lora_kernel_b"]
    conv = np.zeros((2, 3, 3, 4))
    for u in range(3):
        for v in range(3):
            conv += np.einsum("bijc,co->bijo", x[:, u:u + 3, v:v + 3, :], kernel[u, v])
    conv += f64["conv/bias"]
    dense = f64["dense/kernel"] + scale * f64["dense/lora_kernel_a"] @ f64["dense/lora_kernel_b"]
    expected = conv.reshape(2, -1) @ dense + f64["dense/bias"]
    actual = numpy(model(x.astype("float32")))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


# -- which layers -----------------------------------------------------------------------


def test_default_targets_of_each_backbone_are_attention_and_mlp():
    block = ["blocks/0/attn/proj", "blocks/0/attn/qkv", "blocks/0/fc1", "blocks/0/fc2"]
    assert sorted(lora.target_layers(tiny_dit())) == block
    assert sorted(lora.target_layers(tiny_dit(in_context=True))) == block
    mlp = kms.backbones.get("mlp_digits", image_shape=(8, 8, 1), num_classes=10,
                            hidden_size=16, depth=2)
    assert sorted(lora.target_layers(mlp)) == [
        "blocks/0/dense_1", "blocks/0/dense_2", "blocks/1/dense_1", "blocks/1/dense_2"
    ]
    # Groups and regexes combine; "modulation" is DiT's adaLN.
    assert sorted(lora.target_layers(tiny_dit(), ["modulation", "^final_layer/linear$"])) == [
        "blocks/0/modulation", "final_layer/linear", "final_layer/modulation"
    ]


@pytest.mark.large
def test_unet_default_targets_are_its_attention_blocks():
    # The ADM UNet has no MLP: attention only (its residual blocks' convolutions: "conv").
    backbone = tiny_unet()
    assert sorted(lora.target_layers(backbone)) == [
        "down_blocks/0/1/proj", "down_blocks/0/1/qkv", "mid_attn/proj", "mid_attn/qkv",
        "up_blocks/0/1/proj", "up_blocks/0/1/qkv", "up_blocks/1/1/proj", "up_blocks/1/1/qkv",
    ]
    assert sorted(lora.target_layers(backbone, ["conv"]))[:4] == [
        "down_blocks/0/0/conv_1", "down_blocks/0/0/conv_2", "mid_res_1/conv_1",
        "mid_res_1/conv_2",
    ]


def test_bad_targets_rank_and_alpha_are_named():
    backbone = TinyConvBackbone(image_shape=(8, 8, 1))
    backbone({"x": X[:1], "t": INPUTS["t"][:1]})
    with pytest.raises(ValueError, match=r"match no layer of backbone .*TinyConvBackbone.*"
                                         r"conv_in \(Conv2D\).*conv_out \(Conv2D\)"):
        lora.enable_lora(backbone, rank=4)
    with pytest.raises(ValueError, match=r"LoRA rank must be an integer >= 1, got 0"):
        lora.enable_lora(backbone, rank=0, targets=["conv_in"])
    with pytest.raises(ValueError, match=r"LoRA alpha must be a number > 0.*-1"):
        lora.enable_lora(backbone, rank=2, alpha=-1, targets=["conv_in"])
    with pytest.raises(ValueError, match=r"'\(unclosed' is neither a group name"):
        lora.enable_lora(backbone, rank=2, targets=["(unclosed"])


# -- training -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    """A tiny DiT model that got LoRA after its EMA and optimizer existed, fit 1 step."""
    backbone = tiny_dit()
    pretend_pretrained(backbone)
    model = kms.DiffusionModel(backbone, kms.NoiseSchedule("cosine", 100), ema_decay=0.9,
                               seed=0)
    model.compile(optimizer=keras.optimizers.AdamW(1e-2))
    assert len(model.ema.averages) == len(backbone.trainable_weights)  # all, before LoRA
    model.enable_lora(2, alpha=4)
    base = [(v, numpy(v)) for v in backbone.weights if "lora_kernel" not in v.path]
    b_before = {v.path: numpy(v) for v in lora.lora_variables(backbone)}
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    return model, base, b_before


def test_fit_changes_only_adapters_and_ema_tracks_only_them(trained):
    model, base, before = trained
    backbone = model.backbone
    for weight, value in base:
        assert not weight.trainable, weight.path
        np.testing.assert_array_equal(numpy(weight), value, err_msg=weight.path)
    adapters = lora.lora_variables(backbone)
    assert len(adapters) == 8  # A and B of qkv, proj, fc1, fc2
    assert sorted(v.path for v in model.trainable_variables) == sorted(v.path for v in adapters)
    assert all(np.any(numpy(v) != before[v.path]) for v in adapters)
    # One EMA copy per adapter weight and nothing else; after update 1 the warm-up decay
    # is min(0.9, 2/11) = 2/11: ema = 2/11 · initial + 9/11 · new.
    assert len(model.ema.averages) == len(adapters)
    for variable in adapters:
        average = model.ema.average_of(variable)
        assert average.path == f"ema/{variable.path}"
        expected = 2 / 11 * before[variable.path] + 9 / 11 * numpy(variable)
        np.testing.assert_allclose(numpy(average), expected, rtol=1e-5, atol=1e-6)


def test_keras_file_keeps_base_adapters_and_ema_exactly(trained, tmp_path):
    model, _, _ = trained
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.lora == model.lora
    for a, b in zip(model.weights, loaded.weights):
        assert a.path == b.path and a.trainable == b.trainable
        np.testing.assert_array_equal(numpy(a), numpy(b), err_msg=a.path)
    np.testing.assert_array_equal(numpy(loaded.backbone(INPUTS)), numpy(model.backbone(INPUTS)))
    # Keras alone would have zeroed A and B on load: the adapter could never train again.
    adapters = lora.lora_variables(loaded.backbone)
    before = [numpy(v) for v in adapters]
    loaded.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    assert all(np.any(numpy(v) != b) for v, b in zip(adapters, before))


def test_adapter_file_holds_only_adapters_and_loads_into_base(trained, tmp_path):
    model, base, _ = trained
    path = str(tmp_path / "adapters.h5")
    size = model.save_lora(path)
    assert size == os.path.getsize(path)
    adapters = lora.lora_variables(model.backbone)
    with h5py.File(path) as f:
        stored = []
        f.visititems(lambda name, node: stored.append(name)
                     if isinstance(node, h5py.Dataset) else None)
        assert sorted(stored) == sorted(
            "layers/" + v.path.split("/", 1)[1].replace("block_0", "blocks/0")
            for v in adapters
        )
        assert sum(f[n].size for n in stored) == sum(int(np.prod(v.shape)) for v in adapters)
    # A fresh model with the same base weights plus the file = the fine-tuned model.
    fresh = tiny_dit()
    for weight, (_, value) in zip(fresh.weights, base):
        weight.assign(value)
    fresh_model = kms.DiffusionModel(fresh, kms.NoiseSchedule("cosine", 100), ema_decay=0.9)
    fresh_model.load_lora(path)
    assert len(fresh_model.trainable_variables) == len(fresh_model.ema.averages) == 8
    np.testing.assert_array_equal(numpy(fresh(INPUTS)), numpy(model.backbone(INPUTS)))
    # A model with other adapters: every offending key is listed.
    other = tiny_dit()
    lora.enable_lora(other, rank=3, targets=["attention", "modulation"])
    with pytest.raises(ValueError) as error:
        lora.load_lora(other, path)
    message = str(error.value)
    assert "missing from the file: ['blocks/0/modulation', 'final_layer/modulation']" in message
    assert "not adapted in the model: ['blocks/0/fc1', 'blocks/0/fc2']" in message
    assert "blocks/0/attn/qkv/lora_kernel_a: file (16, 2), model (16, 3)" in message


def test_merge_gives_the_same_outputs_and_a_plain_model():
    # Conv2D, Embedding and Dense (the timestep MLP) adapters, all folded.
    backbone = TinyConvBackbone(image_shape=(8, 8, 1), num_classes=10, width=8)
    backbone(INPUTS)
    pretend_pretrained(backbone)
    trainable_before = [v.path for v in backbone.trainable_weights]
    assert sorted(lora.enable_lora(backbone, rank=2, alpha=3, targets=["all"])) == [
        "class_embedding", "conv_in", "conv_out", "time_embedding/dense_1",
        "time_embedding/dense_2",
    ]
    random_adapters(backbone)
    table = backbone.class_embedding
    expected_table = numpy(table._embeddings).astype(np.float64) + 1.5 * (
        numpy(table.lora_embeddings_a).astype(np.float64) @ numpy(table.lora_embeddings_b)
    )
    before = numpy(backbone(INPUTS))
    lora.merge_lora(backbone)
    np.testing.assert_allclose(numpy(table.embeddings), expected_table, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(numpy(backbone(INPUTS)), before, rtol=1e-4, atol=1e-4)
    assert lora.lora_variables(backbone) == []
    assert [v.path for v in backbone.trainable_weights] == trainable_before


def test_diffusion_model_merges_the_ema_adapters_and_tracks_the_plain_model():
    backbone = TinyConvBackbone(image_shape=(8, 8, 1), num_classes=10, width=8)
    model = kms.DiffusionModel(backbone, kms.NoiseSchedule("cosine", 100), ema_decay=0.9)
    model.enable_lora(2, alpha=1, targets=["conv_out"])
    layer = backbone.conv_out
    rng = np.random.RandomState(3)
    for variable in lora.lora_variables(backbone):
        variable.assign(rng.standard_normal(variable.shape).astype("float32"))
        model.ema.average_of(variable).assign(
            rng.standard_normal(variable.shape).astype("float32"))
    a, b = (numpy(model.ema.average_of(v)).astype(np.float64)
            for v in (layer.lora_kernel_a, layer.lora_kernel_b))
    expected = numpy(layer._kernel).astype(np.float64) + 0.5 * a @ b
    model.merge_lora(use_ema=True)
    np.testing.assert_allclose(numpy(layer.kernel), expected, rtol=1e-5, atol=1e-5)
    assert model.lora is None and model.get_config()["lora"] is None
    # The EMA now holds one copy per backbone weight, each at its recorded position.
    assert len(model.ema.averages) == len(backbone.trainable_weights)
    for index, average in zip(model.ema.weight_indices, model.ema.averages):
        source = backbone.weights[index]
        assert average.path == f"ema/{source.path}"
        np.testing.assert_array_equal(numpy(average), numpy(source))


def test_run_config_lora_keys_are_checked_and_applied(tmp_path):
    from keras_minsnr.run_config import resolve_config

    assert run_config_groups() == tuple(lora.GROUP_NAMES)  # --help needs no Keras import
    with pytest.raises(ValueError, match="lora_alpha=4.0 needs lora_rank"):
        resolve_config({}, {"lora_alpha": 4})
    with pytest.raises(ValueError, match="Invalid value for lora_rank: 0"):
        resolve_config({}, {"lora_rank": 0})
    with pytest.raises(ValueError, match="'attn\\[' is neither a group"):
        resolve_config({}, {"lora_rank": 4, "lora_targets": "mlp,attn["})
    config = resolve_config({"backbone": "dit_s_2", "ema_decay": 0.5},
                            {"lora_rank": 2, "lora_alpha": 4, "lora_targets": "mlp",
                             "backbone_args": {"depth": 1, "hidden_size": 16,
                                               "num_heads": 2, "patch_size": 4}})
    info = type("Info", (), {"image_shape": (8, 8, 1), "num_classes": 10})()
    model = builders.build_model(config, info)
    assert model.lora["layers"] == ["blocks/0/fc1", "blocks/0/fc2"]
    assert model.backbone.blocks[0].fc1.lora_alpha == 4.0
    assert len(model.trainable_variables) == len(model.ema.averages) == 4
    no_layer = resolve_config({"backbone": "mlp_digits"},
                              {"lora_rank": 2, "lora_targets": "attention",
                               "backbone_args": {"hidden_size": 16, "depth": 1}})
    with pytest.raises(ValueError, match=r"match no layer of backbone .*\(MLPDenoiser\).*"
                                         r"blocks/0/dense_1 \(Dense\)"):
        builders.build_model(no_layer, info)


@pytest.mark.large
def test_cli_lora_run_from_a_trained_model_writes_adapters(tmp_path):
    from keras_minsnr import cli
    from keras_minsnr import run_config

    tiny = {"backbone_args.hidden_size": 16, "backbone_args.depth": 1, "num_samples": 2,
            "sample_steps": 1, "batch_size": 8, "steps_per_epoch": 2}
    # The "trained" base: the digits recipe's model with non-zero weights, saved.
    config = run_config.resolve_config(cli.load_recipe("digits"), tiny)
    info = type("Info", (), {"image_shape": (8, 8, 1), "num_classes": 10})()
    base = builders.build_model(config, info)
    pretend_pretrained(base.backbone)
    base.reset_ema()
    base_path = str(tmp_path / "base.keras")
    base.save(base_path)
    run = str(tmp_path / "lora")
    sets = [f"{k}={v}" for k, v in {**tiny, "lora_rank": 2, "lora_alpha": 4,
                                    "init_from": base_path}.items()]
    argv = ["train", "digits", "--output-dir", run, "--steps", "2"]
    assert cli.main(argv + [a for s in sets for a in ("--set", s)]) == 0
    trained = keras.models.load_model(os.path.join(run, "model.keras"))
    assert trained.lora["layers"] == ["blocks/0/dense_1", "blocks/0/dense_2"]
    with h5py.File(os.path.join(run, training.LORA_FILE)) as f:
        assert sorted(f["layers/blocks/0"]) == ["dense_1", "dense_2"]
        assert sorted(f["layers/blocks/0/dense_1"]) == ["lora_kernel_a", "lora_kernel_b"]
    # The frozen base is the base model's, bit for bit; the adapters trained.
    frozen = [w for w in trained.backbone.weights if "lora_" not in w.path]
    for weight, source in zip(frozen, base.backbone.weights):
        np.testing.assert_array_equal(numpy(weight), numpy(source), err_msg=weight.path)
    assert all(np.any(numpy(v) != 0) for v in lora.lora_variables(trained) if "_b" in v.path)
