"""MLPDenoiser (the residual adaLN MLP for 8x8 digits): the shared backbone contracts."""

import numpy as np
import pytest

from keras_minsnr.backbones.mlp import MLPDenoiser
from tests import backbone_contract as contract

TINY = dict(image_shape=(4, 4, 2), hidden_size=16, depth=2, mlp_ratio=2.0)


def _inputs(batch=3, num_classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((batch, 4, 4, 2)).astype("float32"),
        "t": rng.integers(0, 1000, size=(batch,)).astype("int32"),
        "y": rng.integers(0, num_classes + 1, size=(batch,)).astype("int32"),
    }


def _count_reference(image_shape, hidden_size, depth, mlp_ratio, num_classes=None,
                     frequency_dim=256):
    """Parameter count written from the class docstring's description."""
    pixels, d = int(np.prod(image_shape)), hidden_size
    inner = int(d * mlp_ratio)
    total = pixels * d + d  # input projection
    total += frequency_dim * d + d + d * d + d  # timestep MLP
    total += (num_classes + 1) * d if num_classes else 0  # class table + null row
    # per block: (scale, shift) regressor, two linear layers; its LayerNorm has no affine
    total += depth * (d * 2 * d + 2 * d + d * inner + inner + inner * d + d)
    return total + 2 * d + d * pixels + pixels  # affine output norm + output projection


@pytest.mark.parametrize("num_classes", [None, 5])
def test_parameter_count(num_classes):
    model = MLPDenoiser(**TINY, num_classes=num_classes)
    model.build()
    contract.run_parameter_count_test(model, _count_reference(**TINY, num_classes=num_classes))


def test_keras_round_trip(tmp_path):
    model = MLPDenoiser(**TINY, num_classes=5)
    model.build()
    contract.randomize(model)
    contract.run_round_trip_test(model, _inputs(), tmp_path)


def test_mixed_bfloat16():
    def build():
        model = MLPDenoiser(**TINY, num_classes=5)
        model.build()
        return model

    contract.run_mixed_bfloat16_test(build, _inputs())


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"image_shape": (4, 4)}, ["(4, 4)", "(H, W, C)"]),
        ({"hidden_size": 0}, ["hidden_size", "0"]),
        ({"depth": 0}, ["depth", "0"]),
        ({"num_classes": 0}, ["num_classes", "0"]),
    ],
)
def test_bad_construction(overrides, words):
    contract.run_bad_construction_test(MLPDenoiser, {**TINY, **overrides}, words)


def test_bad_call_inputs():
    model = MLPDenoiser(**TINY, num_classes=5)
    good = _inputs()
    contract.run_bad_call_test(
        model, dict(good, x=good["x"][:, :3]), ["(3, 3, 4, 2)", "(batch, 4, 4, 2)"]
    )
    contract.run_bad_call_test(model, good["x"], ["dict", "'x'", "'t'"])
    contract.run_bad_call_test(model, {"x": good["x"]}, ["dict", "'x'", "'t'"])
