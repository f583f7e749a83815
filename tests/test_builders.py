"""`builders.build_model`: what a run builds from its config, and what it leaves alone."""

import keras
import numpy as np
from keras import ops

from keras_minsnr import builders
from keras_minsnr import run_config
from keras_minsnr.data.info import DatasetInfo

INFO = DatasetInfo(name="digits", image_shape=(8, 8, 1), num_classes=10)


def _config(**overrides):
    return run_config.resolve_config({
        "backbone": "mlp_digits", "backbone_args": {"depth": 1, "hidden_size": 8},
        **overrides})


def test_mixed_precision_is_scoped_to_the_model_not_set_globally():
    """The layers compute in bfloat16 with float32 weights; the process-wide policy
    stays what the caller had (before, build_model set it for everything after)."""
    assert keras.config.dtype_policy().name == "float32"
    model = builders.build_model(_config(mixed_precision="mixed_bfloat16"), INFO)
    assert keras.config.dtype_policy().name == "float32"
    dense = model.backbone.blocks[0]["dense_1"]
    assert dense.dtype_policy.name == "mixed_bfloat16"
    assert keras.backend.standardize_dtype(dense.kernel.dtype) == "float32"
    out = dense(ops.ones((1, 8)))
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    # A layer made afterwards takes the caller's policy again.
    assert keras.layers.Dense(2).dtype_policy.name == "float32"


def test_the_backbone_takes_its_shape_and_classes_from_the_data():
    info = DatasetInfo(name="planted", image_shape=(4, 4, 3), num_classes=7)
    model = builders.build_model(_config(), info)
    assert model.backbone.image_shape == (4, 4, 3) and model.backbone.num_classes == 7
    # backbone_args win over the data.
    model = builders.build_model(_config(backbone_args={"depth": 1, "hidden_size": 8,
                                                       "num_classes": 2}), info)
    assert model.backbone.num_classes == 2
    x = np.zeros((1, 4, 4, 3), "float32")
    out = model.backbone({"x": x, "t": np.array([1], "int32"), "y": np.array([0], "int32")})
    assert tuple(out.shape) == (1, 4, 4, 3)
