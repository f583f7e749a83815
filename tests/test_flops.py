"""The benchmarks' FLOP counter against closed forms and the DiT paper's figure."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import flops  # noqa: E402


def test_matmul_and_batched_einsum_count_two_flops_per_multiply_add():
    a, b = jnp.ones((3, 5, 7)), jnp.ones((7, 11))
    assert flops.jaxpr_flops(jax.make_jaxpr(lambda x, y: x @ y)(a, b)) == 2 * 3 * 5 * 7 * 11
    q, k = jnp.ones((2, 4, 9, 16)), jnp.ones((2, 4, 13, 16))
    attention = jax.make_jaxpr(lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k))(q, k)
    assert flops.jaxpr_flops(attention) == 2 * 2 * 4 * 9 * 13 * 16


def test_convolution_and_nested_jaxprs():
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 6))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    expected = 2 * (2 * 8 * 8 * 6) * (3 * 3 * 3)
    assert flops.jaxpr_flops(jax.make_jaxpr(conv)(x, w)) == expected
    # Inside jit and a loop body: still counted (once per appearance in the trace).
    nested = jax.make_jaxpr(lambda x, w: jax.jit(conv)(x, w) + conv(x, w))(x, w)
    assert flops.jaxpr_flops(nested) == 2 * expected
    # Element-wise work is not model FLOPs.
    assert flops.jaxpr_flops(jax.make_jaxpr(lambda x: jnp.tanh(x) * 2 + 1)(x)) == 0


# Peaks rebuilt from each chip's published architecture: units x work per clock x clock.
ARCHITECTURE_PEAKS = [
    # A100 whitepaper: 108 SMs at 1410 MHz; 1024 dense bf16 FMAs per SM per clock.
    ("NVIDIA A100-SXM4-40GB", "bfloat16", 108 * 1024 * 2 * 1.41e9),
    # ... and 64 fp32 lanes per SM.
    ("NVIDIA A100-SXM4-40GB", "float32", 108 * 64 * 2 * 1.41e9),
    # TPU v4: 2 TensorCores x 4 MXUs of 128x128 multiply-adds at 1050 MHz.
    ("TPU v4", "bfloat16", 2 * 4 * 128 * 128 * 2 * 1.05e9),
    # TPU v5e ("v5 lite" to JAX): 1 TensorCore x 4 MXUs of 128x128 at 1.5 GHz.
    ("TPU v5 lite", "bfloat16", 1 * 4 * 128 * 128 * 2 * 1.5e9),
]


@pytest.mark.parametrize("device, dtype, flops_per_second", ARCHITECTURE_PEAKS)
def test_peak_rates_follow_from_the_chips_architecture(device, dtype, flops_per_second):
    assert flops.peak_tflops(device, dtype) == pytest.approx(flops_per_second / 1e12, rel=5e-3)


def test_device_names_match_case_blind_and_unknown_ones_give_none():
    assert flops.peak_tflops("nvidia a100-sxm4-80gb") == flops.peak_tflops("NVIDIA A100")
    assert flops.peak_tflops("TPU v4", "float32") is None  # no data-sheet fp32 rate
    assert flops.peak_tflops("cpu") is None and flops.peak_tflops(None) is None


_DIT_S2 = """
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np, flops, keras_minsnr as kms
backbone = kms.backbones.get("dit_s_2")
inputs = {"x": np.zeros((2, 32, 32, 4), "float32"), "t": np.zeros((2,), "int32"),
          "y": np.zeros((2,), "int32")}
print(json.dumps(flops.backbone_forward_flops(backbone, inputs)))
"""


def test_dit_s2_forward_flops_match_the_dit_paper():
    # DiT (Peebles & Xie 2023) Table 4: DiT-S/2 at 256x256 (32x32x4 latents) is 6.06 GFLOPs
    # per image, counted as multiply-adds; 2 FLOPs each here. The count is read from a
    # JAX trace, so the TensorFlow suite asks a JAX child process.
    environ = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", _DIT_S2, os.path.join(ROOT, "benchmarks")],
        env=environ, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    model_flops, xla_flops = json.loads(result.stdout.strip().splitlines()[-1])
    assert model_flops / 2 / 2 == pytest.approx(6.06e9, rel=0.01)
    # XLA's cost analysis adds element-wise work: a little more, never less.
    assert model_flops <= xla_flops <= 1.05 * model_flops
