"""Any backbone that follows the contract trains, samples and round-trips."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_minsnr as kms


def functional_backbone(conditioning=None, image_shape=(8, 8, 1), num_classes=10):
    """A plain functional model with {"x", "t"(, "y")} inputs and no extra attributes."""
    x = keras.Input(image_shape, name="x")
    t = keras.Input((), dtype="int32", name="t")
    inputs = {"x": x, "t": t}
    emb = keras.layers.Embedding(1000, 4)(t)
    if conditioning == "class":
        inputs["y"] = keras.Input((), dtype="int32", name="y")
        emb = emb + keras.layers.Embedding(num_classes + 1, 4)(inputs["y"])
    elif conditioning == "context":
        inputs["y"] = keras.Input((3, 2), name="y")
        emb = emb + keras.layers.Dense(4)(keras.layers.GlobalAveragePooling1D()(inputs["y"]))
    h = keras.layers.Conv2D(4, 3, padding="same")(x) + keras.layers.Reshape((1, 1, 4))(emb)
    h = keras.layers.Activation("silu")(h)
    out = keras.layers.Conv2D(image_shape[-1], 3, padding="same")(h)
    return keras.Model(inputs, out)


@keras.saving.register_keras_serializable(package="keras_minsnr_tests")
class PlainSubclassedBackbone(keras.Model):
    """A subclassed backbone with no contract attributes: its first call tells the shapes."""

    def __init__(self, num_labels=0, **kwargs):
        super().__init__(**kwargs)
        self.num_labels = num_labels
        self.time = keras.layers.Embedding(1000, 4)
        self.label = keras.layers.Embedding(num_labels + 1, 4) if num_labels else None
        self.conv_in = keras.layers.Conv2D(4, 3, padding="same")
        self.conv_out = keras.layers.Conv2D(1, 3, padding="same")

    def call(self, inputs):
        emb = self.time(inputs["t"])
        if self.label is not None:
            emb = emb + self.label(inputs["y"])
        h = keras.activations.silu(self.conv_in(inputs["x"]) + emb[:, None, None, :])
        return self.conv_out(h)

    def get_config(self):
        return {**super().get_config(), "num_labels": self.num_labels}


def make_batch(conditioning, n=8, seed=0):
    rng = np.random.default_rng(seed)
    batch = {"images": rng.uniform(-1, 1, size=(n, 8, 8, 1)).astype("float32")}
    if conditioning == "class":
        batch["labels"] = rng.integers(0, 10, size=n).astype("int32")
    elif conditioning == "context":
        batch["context"] = rng.normal(size=(n, 3, 2)).astype("float32")
    return batch


def generate_kwargs(conditioning):
    if conditioning == "class":
        return dict(labels=[0, 9], guidance_scale=2.0)
    if conditioning == "context":
        return dict(context=np.ones((2, 3, 2), "float32"), guidance_scale=2.0)
    return dict(num_samples=2)


@pytest.mark.parametrize("conditioning", [None, "class", "context"])
def test_a_plain_functional_backbone_trains_samples_and_round_trips(conditioning, tmp_path):
    backbone = functional_backbone(conditioning)
    num_classes = 10 if conditioning == "class" else None
    model = kms.DiffusionModel(backbone, "cosine", ema_decay=0.5, num_classes=num_classes,
                               label_dropout=0.2 if conditioning else 0.0)
    assert model.image_shape == (8, 8, 1)
    assert model.conditioning == conditioning
    assert model.num_classes == num_classes
    assert model.context_shape == ((3, 2) if conditioning == "context" else None)
    model.compile(optimizer=keras.optimizers.SGD(1e-2))
    history = model.fit(make_batch(conditioning), batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    kwargs = generate_kwargs(conditioning)
    samples = model.generate(num_steps=3, seed=1, clip_denoised=True, **kwargs)
    assert samples.shape == (2, 8, 8, 1) and np.isfinite(samples).all()

    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.num_classes == num_classes and restored.conditioning == conditioning
    np.testing.assert_array_equal(
        restored.generate(num_steps=3, seed=1, clip_denoised=True, **kwargs), samples
    )


def test_a_subclassed_backbone_called_once_needs_no_attributes(tmp_path):
    num_labels = 10
    backbone = PlainSubclassedBackbone(num_labels)
    conditioning = "class" if num_labels else None
    example = {"x": ops.zeros((2, 8, 8, 1)), "t": ops.zeros((2,), "int32")}
    if num_labels:
        example["y"] = ops.zeros((2,), "int32")
    backbone(example)
    model = kms.DiffusionModel(backbone, "cosine", ema_decay=0,
                               num_classes=num_labels or None)
    assert model.image_shape == (8, 8, 1) and model.conditioning == conditioning
    model.compile(optimizer=keras.optimizers.SGD(1e-2))
    model.fit(make_batch(conditioning), batch_size=4, epochs=1, verbose=0)
    kwargs = generate_kwargs(conditioning)
    samples = model.generate(num_steps=3, seed=1, clip_denoised=True, **kwargs)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        restored.generate(num_steps=3, seed=1, clip_denoised=True, **kwargs), samples
    )


def test_attributes_override_what_the_inputs_say():
    backbone = functional_backbone("class")
    backbone.num_classes = 7
    model = kms.DiffusionModel(backbone, ema_decay=0)
    assert model.num_classes == 7 and model.conditioning == "class"
    with pytest.raises(ValueError, match="num_classes=10 disagrees.*num_classes=7"):
        kms.DiffusionModel(backbone, ema_decay=0, num_classes=10)
    backbone = functional_backbone("context")
    backbone.context_shape = (3, 2)
    backbone.conditioning = "context"
    assert kms.DiffusionModel(backbone, ema_decay=0).context_shape == (3, 2)


def test_backbones_that_cannot_tell_get_a_clear_error():
    with pytest.raises(ValueError, match="class-conditional.*pass num_classes="):
        kms.DiffusionModel(functional_backbone("class"))
    with pytest.raises(ValueError, match="num_classes=10 is only for a class-conditional"):
        kms.DiffusionModel(functional_backbone(None), num_classes=10)
    with pytest.raises(ValueError, match="image shape.*PlainSubclassedBackbone.*image_shape"):
        kms.DiffusionModel(PlainSubclassedBackbone())
    x = keras.Input((None, None, 1), name="x")
    t = keras.Input((), dtype="int32", name="t")
    with pytest.raises(ValueError, match=r"\(None, None, None, 1\).*backbone.image_shape"):
        kms.DiffusionModel(keras.Model({"x": x, "t": t}, x))
    x = keras.Input((8, 8, 1), name="x")
    y = keras.Input((4,), name="y")
    with pytest.raises(ValueError, match=r"'y' input \(shape \(None, 4\).*conditioning"):
        kms.DiffusionModel(keras.Model({"x": x, "t": t, "y": y}, x))
