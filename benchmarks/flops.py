"""Model FLOPs of a backbone, and the peak FLOP rates that MFU is measured against.

Model FLOPs count the multiply-adds of the network itself (2 FLOPs each): every
``dot_general`` and convolution in the backbone's forward pass, read off its jaxpr,
so the count follows the architecture whatever the backend that later trains it. A
train step is counted as 3 forward passes (forward + input and weight gradients), the
usual MFU convention (PaLM, appendix B); element-wise work is not counted. XLA's own
cost analysis of the compiled forward pass is reported beside it as a check.

`peak_tflops(device_kind, dtype)` gives the dense peak of known accelerators; on a CPU
the peak is measured: the float32 rate of a large matmul (`measure_matmul_tflops`).
"""

import math
import time

# Dense (no sparsity) peak TFLOP/s per chip from the vendors' data sheets.
PEAK_TFLOPS = {
    # name fragment (lower case): {dtype: peak}
    "h200": {"bfloat16": 989.0, "float32": 67.0},
    "h100": {"bfloat16": 989.0, "float32": 67.0},  # SXM; PCIe is 756 / 51
    "a100": {"bfloat16": 312.0, "float32": 19.5},
    "l4": {"bfloat16": 121.0, "float32": 30.3},
    "tpu v6": {"bfloat16": 918.0},
    "tpu v5p": {"bfloat16": 459.0},
    "tpu v5 lite": {"bfloat16": 197.0},
    "tpu v5e": {"bfloat16": 197.0},
    "tpu v4": {"bfloat16": 275.0},
}
TRAIN_STEP_FORWARDS = 3


def peak_tflops(device_kind, dtype="bfloat16"):
    """The data-sheet peak for a device name such as ``"NVIDIA H100 80GB HBM3"``, or None."""
    name = (device_kind or "").lower()
    for fragment in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if fragment in name:
            return PEAK_TFLOPS[fragment].get(dtype)
    return None


def measure_matmul_tflops(size=4096, repeats=5, dtype="float32"):
    """The best rate of a ``size``² matmul in JAX on the default device, in TFLOP/s."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype) / size
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def _eqn_flops(eqn):
    name = eqn.primitive.name
    if name == "dot_general":
        (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        out = eqn.outvars[0].aval.shape
        contracted = math.prod(lhs[d] for d in lhs_contract)
        return 2 * math.prod(out) * contracted
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        out = eqn.outvars[0].aval.shape
        dims = eqn.params["dimension_numbers"]
        out_features = rhs[dims.rhs_spec[0]]
        # MACs per output element: kernel volume x input features per group.
        per_output = math.prod(rhs) // out_features
        return 2 * math.prod(out) * per_output
    return 0


def jaxpr_flops(jaxpr):
    """Sum of matmul and convolution FLOPs in a (closed) jaxpr, sub-jaxprs included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    total += jaxpr_flops(sub)
    return total


def backbone_forward_flops(backbone, inputs):
    """``(model_flops, xla_flops)`` of one forward pass of a Keras backbone on JAX.

    ``inputs`` is the backbone's input dict (numpy or tensors). ``xla_flops`` is XLA's
    cost analysis of the compiled forward pass (None where it reports nothing).
    """
    import jax

    trainable = [v.value for v in backbone.trainable_variables]
    non_trainable = [v.value for v in backbone.non_trainable_variables]

    def forward(trainable, non_trainable, inputs):
        return backbone.stateless_call(trainable, non_trainable, inputs)[0]

    model_flops = jaxpr_flops(jax.make_jaxpr(forward)(trainable, non_trainable, inputs))
    analysis = jax.jit(forward).lower(trainable, non_trainable, inputs).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    xla_flops = analysis.get("flops") if analysis else None
    return model_flops, xla_flops
