"""Per-device memory of a training run, for data-parallel, model-parallel and FSDP layouts.

Usage::

    python benchmarks/memory_plan.py dit_xl_2 --devices 8 --batch 256 --precision bf16
    python benchmarks/memory_plan.py dit_xl_2 --devices 16 --batch 256 --grad-accum 2 \
        --json benchmarks/results/memory_plan_dit_xl_2_v5e16.json   # TPU v5e-16
    python benchmarks/memory_plan.py --check      # estimate vs XLA's buffers, small DiT

The plan builds the backbone *abstractly* (variables created inside a
`keras.StatelessScope` get shapes but no memory, so DiT-XL/2 takes a fraction of a
second) and counts, per device, for each ``(data, model)`` mesh that divides
``--devices``:

- weights: every variable, divided by the model-axis size where
  `keras_minsnr.distribution` splits it (the layouts the training really uses), and
  for ``fsdp`` rows also by the data-axis size where `kms.distribution.fsdp_axes`
  splits it (float variables of rank >= 2 with a divisible dimension);
- EMA: one copy of each trainable weight, laid out like it;
- optimizer slots: ``k`` copies of each trainable weight (AdamW: 2), laid out like it;
- gradients: one copy of each trainable weight (alive during the update), plus one
  float32 accumulator per trainable weight with ``--grad-accum`` > 1, laid out like it;
- ``fsdp`` only, gathered weights: XLA gathers a weight's shards where a layer uses
  it and may hold many layers' gathers (and unreduced gradients) at once; counted as
  the full float32 trainable weights divided by the model-axis size (``--check``:
  XLA:CPU's extra temporary buffers over data parallelism are 0.9-1.5x that);
- activations: what the backward pass keeps, estimated per transformer block for a local
  batch ``b = batch / data`` with ``s`` tokens, width ``h``, ``a`` heads, MLP width ``f``
  (elements)::

      b * s * (8 h  +  (4 h + 2 f + 2 a s) / m)

  ``8 h``: residual stream, the two norms, the two adaLN-modulated inputs, the two gated
  outputs and the MLP output (replicated over the model axis); split over the ``m``
  model shards: ``qkv`` (3h), the attention output (h), ``fc1`` and GELU outputs (2f)
  and the attention logits and probabilities (2as; XLA materialises them on CPU and
  TPU, a fused flash-attention kernel on GPU does not). Plus ``4 b s h`` for the patch
  embedding and the final layer. Bytes: 4 per element in float32, 2 under
  ``mixed_bfloat16`` (weights, EMA, slots and gradients stay float32 there).
  ``b`` is the local micro-batch ``batch / grad_accum / data``. With
  ``--gradient-checkpointing`` each block keeps only its input, ``b * s * h``, and one
  block holds the full set above while it is recomputed.

``--check`` compiles the forward + backward pass of a small DiT on 4 virtual CPU
devices (1 device, data-parallel 4x1, model-parallel 2x2, fsdp 4x1; float32 and
mixed_bfloat16) and
compares the estimate with XLA's memory analysis of the compiled step (its temporary
buffers per device: the activations and workspace it really allocates), writing
``benchmarks/results/memory_plan_check.json``.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CHECK_DEVICES = 4

if "--check" in sys.argv:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (
            flags + f" --xla_force_host_platform_device_count={CHECK_DEVICES}"
        ).strip()
os.environ["KERAS_BACKEND"] = "jax"
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_minsnr as kms  # noqa: E402
from keras_minsnr import distribution as kd  # noqa: E402

PRECISIONS = {"fp32": ("float32", 4), "bf16": ("mixed_bfloat16", 2)}
OPTIMIZER_SLOTS = {"adamw": 2, "adam": 2, "lion": 1, "sgd_momentum": 1, "sgd": 0}
GIB = 2**30


def abstract_backbone(name, **overrides):
    """The backbone with shaped, unallocated variables."""
    with keras.StatelessScope():
        backbone = kms.backbones.get(name, **overrides)
        h, w, c = backbone.image_shape
        shapes = {"x": (None, h, w, c), "t": (None,)}
        if getattr(backbone, "conditioning", None) == "class":
            shapes["y"] = (None,)
        backbone.build(shapes)
    return backbone


def _bytes(shape, itemsize=4):
    return int(np.prod(shape)) * itemsize


def state_bytes(backbone, model_shards, data_shards=1):
    """Per-device bytes of (all weights, trainable weights) with the model axis split,
    and with ``data_shards`` > 1 the FSDP split over the data axis too."""
    total = trainable = 0
    trainable_ids = {id(v) for v in backbone.trainable_variables}
    sizes = {kd.MODEL_AXIS: model_shards, kd.DATA_AXIS: data_shards}
    for v in backbone.variables:
        axes = kd.match_rules(backbone, v.path) if model_shards > 1 else None
        axes = kd.fsdp_axes(v.shape, data_shards, axes, v.dtype)
        size = _bytes(v.shape)
        for axis in axes:
            size //= sizes.get(axis, 1)
        total += size
        if id(v) in trainable_ids:
            trainable += size
    return total, trainable


def activation_elements(backbone, local_batch, model_shards, gradient_checkpointing=False):
    """The backward pass's saved activations (elements, per device); None if unknown.

    With ``gradient_checkpointing`` each block keeps only its input (the residual
    stream, ``s·h``) and one block at a time holds its full set while it is recomputed.
    """
    if not kd.backbone_rules(backbone):  # a transformer's activations, split by its rules
        return None
    s = backbone.num_patches + backbone.num_extra_tokens
    h, a, depth = backbone.hidden_size, backbone.num_heads, backbone.depth
    f = int(h * backbone.mlp_ratio)
    per_block = s * (8 * h + (4 * h + 2 * f + 2 * a * s) / model_shards)
    if gradient_checkpointing:
        return local_batch * (depth * s * h + per_block + 4 * s * h)
    return local_batch * (depth * per_block + 4 * s * h)


def meshes(devices):
    return [(devices // m, m) for m in range(1, devices + 1) if devices % m == 0]


def gathered_bytes(backbone, model_shards):
    """FSDP's transient full weights and unreduced gradients: budgeted as the whole
    float32 trainable weights split over the model axis only (XLA may gather every
    layer before its first use; `check` compares this with XLA:CPU)."""
    return state_bytes(backbone, model_shards)[1]


MEMORY_PARTS = ("weights", "ema", "optimizer_slots", "gradients", "gathered_weights",
                "activations")


def plan(backbone, devices, batch, precision="bf16", optimizer="adamw", grad_accum=1,
         gradient_checkpointing=False):
    """Rows of per-device bytes: per ``(data, model)`` mesh that fits the model, the
    data-/model-parallel layout and the FSDP one.

    ``batch`` is the global batch of one optimizer step: ``grad_accum`` micro-batches of
    ``batch / grad_accum`` each, split over the data axis.
    """
    _, act_bytes = PRECISIONS[precision]
    slots = OPTIMIZER_SLOTS[optimizer]
    rows = []
    micro_batch = batch // grad_accum if batch % grad_accum == 0 else None
    for data, model in meshes(devices):
        if model > 1:
            try:
                if not kd.backbone_rules(backbone, model):
                    continue
            except ValueError:  # a split dimension does not divide by `model`
                continue
        if micro_batch is None or micro_batch % data:
            continue
        elements = activation_elements(backbone, micro_batch // data, model,
                                       gradient_checkpointing)
        for layout in ("data_parallel" if model == 1 else "model_parallel", "fsdp"):
            if layout == "fsdp" and data == 1:
                continue  # no data axis to split the state over
            fsdp = layout == "fsdp"
            weights, trainable = state_bytes(backbone, model, data if fsdp else 1)
            row = {
                "layout": layout,
                "mesh": [data, model],
                "local_batch": micro_batch // data,
                "grad_accum": grad_accum,
                "weights": weights,
                "ema": trainable,
                "optimizer_slots": slots * trainable,
                "gradients": trainable * (2 if grad_accum > 1 else 1),
                "gathered_weights": gathered_bytes(backbone, model) if fsdp else 0,
                "activations": None if elements is None else int(elements * act_bytes),
            }
            row["total"] = sum(row[k] for k in MEMORY_PARTS if row[k])
            rows.append(row)
    return rows


def print_plan(name, backbone, rows, args):
    params = sum(int(np.prod(v.shape)) for v in backbone.trainable_variables)
    print(f"{name}: {params / 1e6:.1f}M trainable parameters; {args.devices} devices, "
          f"global batch {args.batch} ({args.grad_accum} micro-batches), precision "
          f"{args.precision} ({PRECISIONS[args.precision][0]}), optimizer {args.optimizer}"
          + (", gradient checkpointing" if args.gradient_checkpointing else ""))
    cols = MEMORY_PARTS + ("total",)
    print(f"{'layout':<16}{'mesh':>6}{'batch/dev':>10}" + "".join(f"{c:>17}" for c in cols))
    for r in rows:
        cells = "".join(
            f"{'n/a' if r[c] is None else f'{r[c] / GIB:.2f} GiB':>17}" for c in cols
        )
        print(f"{r['layout']:<16}{'%dx%d' % tuple(r['mesh']):>6}{r['local_batch']:>10}{cells}")
    print("Activations: b*s*(8h + (4h + 2f + 2as)/m) elements per block (see the "
          "docstring); checked against XLA:CPU (--check): float32 within +2..30%, "
          "mixed_bfloat16 about 2x this, since XLA:CPU keeps bf16 elementwise math in "
          "float32. GiB = 2^30 bytes.")


# -- the check against XLA ----------------------------------------------------------------

CHECK_MODEL = dict(depth=4, hidden_size=128, num_heads=4, image_shape=(16, 16, 4),
                   num_classes=10)
CHECK_BATCH = 32


def measure(precision, mesh, kind=None):
    """XLA's per-device buffer sizes for one forward + backward of the check model.

    ``kind`` defaults to data- or model-parallel by the mesh (one device: none)."""
    import jax

    data, model = mesh
    if kind is None and data * model > 1:
        kind = "data_parallel" if model == 1 else "model_parallel"
    devices = jax.devices()[: data * model]
    keras.mixed_precision.set_dtype_policy(PRECISIONS[precision][0])
    kd.configure(kind, mesh, backbone_name="dit_s_2", devices=devices)
    try:
        backbone = kms.backbones.get("dit_s_2", **CHECK_MODEL)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(CHECK_BATCH,) + CHECK_MODEL["image_shape"]).astype("float32")
        inputs = {"x": x, "t": rng.integers(0, 1000, CHECK_BATCH).astype("int32"),
                  "y": rng.integers(0, 10, CHECK_BATCH).astype("int32")}
        backbone(jax.tree_util.tree_map(lambda v: v[:1], inputs))
        dist = keras.distribution.distribution()
        if dist is not None:
            inputs = {k: jax.device_put(v, dist.get_data_layout(v.shape).backend_layout)
                      for k, v in inputs.items()}
        target = x

        def loss(trainable, non_trainable, inputs):
            pred, _ = backbone.stateless_call(trainable, non_trainable, inputs)
            return keras.ops.mean(keras.ops.square(keras.ops.cast(pred, "float32") - target))

        trainable = [v.value for v in backbone.trainable_variables]
        non_trainable = [v.value for v in backbone.non_trainable_variables]
        # FSDP: each gradient leaves the step split like its weight, as the split
        # optimizer update takes it (unconstrained, XLA may return some whole).
        jit_args = ({"out_shardings": (None, [w.sharding for w in trainable])}
                    if kind == "fsdp" else {})
        compiled = jax.jit(jax.value_and_grad(loss), **jit_args).lower(
            trainable, non_trainable, inputs).compile()
        analysis = compiled.memory_analysis()
        abstract = abstract_backbone("dit_s_2", **CHECK_MODEL)
        weights, grads = state_bytes(abstract, model, data if kind == "fsdp" else 1)
        predicted = activation_elements(abstract, CHECK_BATCH // data, model)
        predicted *= PRECISIONS[precision][1]
        return {
            "precision": precision,
            "layout": kind or "none",
            "mesh": [data, model],
            "local_batch": CHECK_BATCH // data,
            "predicted_weights": weights,
            "xla_argument_bytes": int(analysis.argument_size_in_bytes),
            "predicted_gradients": grads,
            "xla_output_bytes": int(analysis.output_size_in_bytes),
            "predicted_activations": int(predicted),
            "xla_temp_bytes": int(analysis.temp_size_in_bytes),
            "activations_ratio_xla_over_predicted": round(
                analysis.temp_size_in_bytes / predicted, 3),
        }
    finally:
        kd.configure(None)
        keras.mixed_precision.set_dtype_policy("float32")


def check(out_path):
    import jax

    rows = [measure(p, m, kind) for p in ("fp32", "bf16")
            for m, kind in (((1, 1), None), ((4, 1), None), ((2, 2), None), ((4, 1), "fsdp"))]
    result = {
        "what": "Planner estimate vs XLA memory_analysis() of the compiled forward+backward "
                "(jax.jit(value_and_grad)) of a small DiT, per device, on virtual CPU devices. "
                "XLA argument bytes = weights + the local batch; output = loss + gradients; "
                "temp = activations and workspace.",
        "model": {"preset": "dit_s_2", **CHECK_MODEL, "image_shape": list(
            CHECK_MODEL["image_shape"]), "global_batch": CHECK_BATCH},
        "jax": jax.__version__,
        "keras": keras.__version__,
        "device": f"{jax.device_count()} virtual {jax.devices()[0].platform} devices",
        "rows": rows,
    }
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    for r in rows:
        print(f"{r['precision']} {r['layout']} mesh {r['mesh']}: activations predicted "
              f"{r['predicted_activations'] / 2**20:.2f} MiB, XLA temp "
              f"{r['xla_temp_bytes'] / 2**20:.2f} MiB "
              f"(x{r['activations_ratio_xla_over_predicted']}); "
              f"gradients {r['predicted_gradients'] / 2**20:.2f} vs output "
              f"{r['xla_output_bytes'] / 2**20:.2f} MiB")
    print(f"wrote {out_path}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("backbone", nargs="?", default="dit_xl_2",
                        help="a preset of keras_minsnr.backbones.PRESETS")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256, help="global batch size")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZER_SLOTS), default="adamw")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="micro-batches per optimizer step (the run's grad_accum)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="activations with each block recomputed in the backward pass")
    parser.add_argument("--json", help="also write the plan to this file")
    parser.add_argument("--check", action="store_true",
                        help="compare the estimate with XLA on a small DiT and exit")
    args = parser.parse_args(argv)
    if args.check:
        return check(os.path.join(HERE, "results", "memory_plan_check.json"))
    if min(args.devices, args.batch, args.grad_accum) < 1:
        parser.error(f"--devices, --batch and --grad-accum must be positive, got "
                     f"{args.devices}, {args.batch}, {args.grad_accum}")
    backbone = abstract_backbone(args.backbone)
    rows = plan(backbone, args.devices, args.batch, args.precision, args.optimizer,
                args.grad_accum, args.gradient_checkpointing)
    if not rows:
        parser.error(f"no mesh of {args.devices} devices divides the micro-batch "
                     f"{args.batch} / {args.grad_accum}")
    print_plan(args.backbone, backbone, rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backbone": args.backbone, **vars(args), "rows": rows}, f, indent=1)
            f.write("\n")
    return rows


if __name__ == "__main__":
    main()
