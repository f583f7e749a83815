"""What the JAX train step compiles to, and in-process A/B tests of the levers on its speed.

Two modes (one backend per process):

* ``--hlo`` (JAX): compiles the library's train step (`DiffusionModel.train_step` under
  `jax.jit`, state donated as Keras does) for ``--backbone`` at ``--batch-size`` and
  counts what XLA made of it: fusions by kind, instructions by opcode (dots,
  convolutions, ``erf`` of the exact GELU, transposes, copies, ...), the largest fusion's
  operand count, and XLA's cost analysis (FLOPs, bytes accessed). With ``--dump PATH`` the
  optimized HLO text is written there too.
* ``--ab LEVER``: two variants of the same train step on the same weights and batch,
  timed alternately (ABAB..., the order flipping every pair) in one process, so that the
  load of a shared machine hits both alike; reports each variant's median step and the
  median of the per-pair ratios B/A. Levers:

  - ``gelu`` (JAX or TF): exact (the paper's ViT) vs tanh-approximate GELU;
  - ``gelu_erf``: the exact GELU as the library writes it, ``x/2·(1 + erf(x/√2))``
    (`keras_minsnr.backbones.layers.gelu`) vs `keras.ops.gelu`, which on JAX is
    ``jax.nn.gelu``, written with ``erfc``;
  - ``attention``: ``keras.ops.dot_product_attention`` vs an explicit
    ``softmax(q·kᵀ/√d)·v`` with einsums;
  - ``layernorm``: Keras' ``LayerNormalization`` vs the formula written out with
    ``keras.ops`` (mean and variance in float32);
  - ``donation`` (JAX): the state donated to the step (as Keras does) vs not;
  - ``tf_xla`` (TF): the TensorFlow step without XLA (Keras' default on CPU here) vs with
    ``jit_compile=True``: is the gap JAX's front end or XLA:CPU's code?
  - ``keras_adamw`` (TF): the library's AdamW (TensorFlow's fused Adam kernel per weight,
    `keras_minsnr.optimizers.AdamW`) vs `keras.optimizers.AdamW`.

  Ratios measured on a loaded machine are indicative only: the report carries the load
  averages.

Usage::

    KERAS_BACKEND=jax python benchmarks/jax_gap.py --hlo
    KERAS_BACKEND=jax python benchmarks/jax_gap.py --ab gelu --depth 4 --steps 6
    KERAS_BACKEND=tensorflow python benchmarks/jax_gap.py --ab tf_xla --depth 4

Writes ``benchmarks/results/jax_gap_<mode>.json`` (``--output-dir``).
"""

import argparse
import collections
import contextlib
import json
import os
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

import _common  # noqa: E402

LEVERS = ("gelu", "gelu_erf", "attention", "layernorm", "donation", "tf_xla", "keras_adamw")
JAX_ONLY = ("donation",)
TF_ONLY = ("tf_xla", "keras_adamw")


def build_model(backbone_name, depth, seed=0, backbone_args=None):
    import keras

    from keras_minsnr import backbones
    from keras_minsnr.diffusion_model import DiffusionModel

    keras.utils.set_random_seed(seed)
    overrides = dict(backbone_args or {})
    if depth is not None:
        overrides["depth"] = depth
    backbone = backbones.get(backbone_name, **overrides)
    model = DiffusionModel(backbone, "cosine", prediction_type="epsilon",
                           weighting="min_snr", gamma=5.0, label_dropout=0.1,
                           ema_decay=0.999, seed=0)
    return model


def example_batch(model, batch_size):
    from throughput import example_batch as make

    return make(model.backbone, batch_size)


# -- the optimized HLO ------------------------------------------------------------------

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = (?:\((?:[^()]|\([^()]*\))*\)|\S+) ([a-z][\w\-]*)\((.*)$"
)


_ENTRY_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([a-z][\w\-]*)\((.*)$"
)


def hlo_statistics(text):
    """Counts of a module's optimized HLO text: opcodes over every computation, fusions by
    kind, the operands of the largest fusion, and, for the entry computation (what runs
    one after the other), the bytes each kind of instruction writes and the scalar
    constants broadcast into full arrays."""
    opcodes = collections.Counter()
    fusion_kinds = collections.Counter()
    largest_fusion = 0
    for line in text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        opcode, rest = match.groups()
        opcodes[opcode] += 1
        if opcode == "fusion":
            kind = re.search(r"kind=(\w+)", rest)
            fusion_kinds[kind.group(1) if kind else "?"] += 1
            operands = rest.split("), ")[0] if "), " in rest else rest
            largest_fusion = max(largest_fusion, operands.count("%"))
    written = collections.Counter()
    count = collections.Counter()
    broadcasts = {"count": 0, "megabytes": 0.0, "shapes": collections.Counter()}
    entry = text[text.find("\nENTRY"):]
    for line in entry[: entry.find("\n}")].splitlines():
        match = _ENTRY_INSTRUCTION.match(line)
        if not match:
            continue
        name, dtype, dims, opcode, rest = match.groups()
        size = 2 if dtype in ("bf16", "f16") else 1 if dtype in ("pred", "s8", "u8") else 4
        for d in filter(None, dims.split(",")):
            size *= int(d)
        key = opcode
        if opcode == "fusion":
            key = name.rsplit(".", 1)[0] + " (" + re.search(r"kind=(\w+)", rest).group(1) + ")"
            operands = rest.split(")")[0]
            if name.startswith("wrapped_broadcast") and re.fullmatch(r"%constant[\w.]*", operands):
                broadcasts["count"] += 1
                broadcasts["megabytes"] += size / 1e6
                broadcasts["shapes"][dims] += 1
        written[key] += size
        count[key] += 1
    broadcasts["shapes"] = dict(broadcasts["shapes"].most_common())
    return {
        "instructions": sum(opcodes.values()),
        "opcodes": dict(opcodes.most_common()),
        "fusions_by_kind": dict(fusion_kinds),
        "largest_fusion_operands": largest_fusion,
        "entry_megabytes_written_by_kind": {
            k: {"megabytes": round(v / 1e6, 1), "count": count[k]}
            for k, v in written.most_common(15)
        },
        "entry_megabytes_written": round(sum(written.values()) / 1e6, 1),
        "scalar_constants_broadcast_to_arrays": broadcasts,
    }


def jax_state(model, batch):
    """The (trainable, non_trainable, optimizer, metrics) values Keras' JAX trainer passes."""
    model.compile(optimizer=__import__("keras").optimizers.AdamW(1e-4))
    model.optimizer.build(model.trainable_variables)
    return (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )


def hlo_mode(args):
    import jax

    model = build_model(args.backbone, args.depth, backbone_args=args.backbone_args)
    batch = example_batch(model, args.batch_size)
    state = jax_state(model, batch)
    step = jax.jit(lambda state, data: model.train_step(state, data), donate_argnums=0)
    start = time.perf_counter()
    with variant(args.lever or "gelu", model, "B" if args.lever else "A"):
        compiled = step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    text = compiled.as_text()
    if args.dump:
        with open(args.dump, "w") as f:
            f.write(text)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {
        "backbone": args.backbone,
        "depth": args.depth,
        "batch_size": args.batch_size,
        "variant": f"{args.lever}: B" if args.lever else "as the library does it",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_version": jax.__version__,
        "compile_seconds": compile_seconds,
        "cost_analysis": {k: float(v) for k, v in (cost or {}).items()
                          if k in ("flops", "bytes accessed", "transcendentals")},
        "hlo": hlo_statistics(text),
    }


# -- A/B ------------------------------------------------------------------------------


def explicit_attention(query, key, value, *args, **kwargs):
    """softmax(q·kᵀ/√d)·v with einsums, (B, N, H, D) in and out (no mask, no bias)."""
    from keras import ops

    scale = 1.0 / float(query.shape[-1]) ** 0.5
    scores = ops.einsum("bqhd,bkhd->bhqk", query * scale, key)
    return ops.einsum("bhqk,bkhd->bqhd", ops.softmax(scores, axis=-1), value)


def keras_gelu(x, approximate=False):
    from keras import ops

    return ops.gelu(x, approximate=approximate)


def formula_layer_norm(self, inputs):
    """LayerNormalization.call as the formula, statistics in float32."""
    from keras import ops

    x = ops.cast(inputs, "float32")
    mean = ops.mean(x, axis=self.axis, keepdims=True)
    var = ops.mean(ops.square(x - mean), axis=self.axis, keepdims=True)
    out = (x - mean) * ops.rsqrt(var + self.epsilon)
    if self.scale:
        out = out * ops.cast(self.gamma, "float32")
    if self.center:
        out = out + ops.cast(self.beta, "float32")
    return ops.cast(out, self.compute_dtype)


@contextlib.contextmanager
def variant(lever, model, which):
    """Variant ``which`` ("A" = as the library does it, "B" = the alternative) of a lever,
    active while the step is traced."""
    import keras

    from keras_minsnr.backbones import dit

    if which == "A" or lever in ("donation", "tf_xla", "keras_adamw"):
        yield
        return
    if lever == "gelu":
        blocks = [layer for layer in model.backbone._flatten_layers()
                  if isinstance(layer, dit._TransformerBlockBase)]
        old = [block._gelu_approximate for block in blocks]
        for block in blocks:
            block._gelu_approximate = not block._gelu_approximate
        try:
            yield
        finally:
            for block, value in zip(blocks, old):
                block._gelu_approximate = value
        return
    if lever == "gelu_erf":
        target, name, new = dit, "gelu", keras_gelu
    elif lever == "attention":
        target, name, new = keras.ops, "dot_product_attention", explicit_attention
    elif lever == "layernorm":
        target, name, new = keras.layers.LayerNormalization, "call", formula_layer_norm
    else:
        raise ValueError(f"Unknown lever {lever!r}. Allowed: {', '.join(LEVERS)}.")
    old = getattr(target, name)
    setattr(target, name, new)
    try:
        yield
    finally:
        setattr(target, name, old)


def ab_mode(args):
    import keras

    backend = keras.backend.backend()
    lever = args.ab
    if (lever in JAX_ONLY and backend != "jax") or (lever in TF_ONLY and backend == "jax"):
        raise SystemExit(f"--ab {lever} is for the {'JAX' if lever in JAX_ONLY else 'TF'} "
                         f"backend; this process runs {backend}.")
    load_before = os.getloadavg()
    model = build_model(args.backbone, args.depth, backbone_args=args.backbone_args)
    batch = example_batch(model, args.batch_size)
    if backend == "jax":
        import jax

        state = jax_state(model, batch)
        steps, states = {}, {}
        for which in "AB":
            donate = 0 if (lever != "donation" or which == "A") else ()
            jitted = jax.jit(lambda s, d: model.train_step(s, d), donate_argnums=donate)
            with variant(lever, model, which):
                steps[which] = jitted.lower(state, batch).compile()
            states[which] = jax.tree_util.tree_map(lambda v: v.copy(), state)

        def run(which):
            logs, states[which] = steps[which](states[which], batch)
            return float(logs["loss"])
    else:
        from keras_minsnr.optimizers import AdamW

        models = {}
        for which in "AB":
            m = build_model(args.backbone, args.depth, backbone_args=args.backbone_args)
            adamw = (keras.optimizers.AdamW if lever == "keras_adamw" and which == "B"
                     else AdamW)
            m.compile(optimizer=adamw(1e-4), jit_compile=(lever == "tf_xla" and which == "B"))
            models[which] = m
            with variant(lever, m, which):
                m.train_on_batch(batch)  # traces under the variant

        def run(which):
            return float(models[which].train_on_batch(batch, return_dict=True)["loss"])

    for which in "AB":
        run(which)  # warm-up
    times = {"A": [], "B": []}
    losses = {"A": [], "B": []}
    for i in range(args.steps):
        for which in ("AB" if i % 2 == 0 else "BA"):
            start = time.perf_counter()
            losses[which].append(run(which))
            times[which].append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(times["A"], times["B"])]
    return {
        "lever": lever,
        "backend": backend,
        "backbone": args.backbone,
        "depth": args.depth,
        "batch_size": args.batch_size,
        "variant_A": "as the library does it",
        "variant_B": {"gelu": "the other GELU (tanh for the ViT)",
                      "gelu_erf": "keras.ops.gelu (erfc on JAX)",
                      "attention": "explicit einsum softmax attention",
                      "layernorm": "LayerNorm formula in keras.ops",
                      "donation": "state not donated",
                      "tf_xla": "jit_compile=True",
                      "keras_adamw": "keras.optimizers.AdamW"}[lever],
        "step_ms_A": 1e3 * statistics.median(times["A"]),
        "step_ms_B": 1e3 * statistics.median(times["B"]),
        "ratio_B_over_A_median_of_pairs": statistics.median(ratios),
        "ratios_B_over_A": ratios,
        "losses_A": losses["A"],
        "losses_B": losses["B"],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--hlo", action="store_true", help="statistics of the optimized HLO")
    mode.add_argument("--ab", choices=LEVERS, help="A/B test of one lever")
    parser.add_argument("--backbone", default="vit_b_2_in256")
    parser.add_argument("--depth", type=int, default=None,
                        help="blocks (default: the preset's; fewer for a quicker A/B)")
    parser.add_argument("--backbone-args", type=json.loads, default=None,
                        help='JSON overrides of the preset, e.g. \'{"hidden_size": 64}\'')
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--dump", default=None, help="--hlo: write the HLO text here")
    parser.add_argument("--lever", choices=LEVERS, default=None,
                        help="--hlo: compile with this lever's variant B")
    parser.add_argument("--output-dir", default=os.path.join(HERE, "results"))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import keras

    import keras_minsnr  # noqa: F401 - on JAX it sets the XLA:CPU flag before JAX starts

    report = hlo_mode(args) if args.hlo else ab_mode(args)
    report["device"] = _common.device_description(keras.backend.backend())
    name = ("hlo" + (f"_{args.lever}" if args.lever else "")) if args.hlo else (
        f"ab_{args.ab}_{keras.backend.backend()}")
    depth = "" if args.depth is None else f"_depth{args.depth}"
    _common.write_report(
        os.path.join(args.output_dir, f"jax_gap_{name}_{args.backbone}{depth}.json"), report)
    print(json.dumps({k: v for k, v in report.items() if k != "hlo"}, indent=1)[:3000])
    if args.hlo:
        hlo = report["hlo"]
        print("fusions:", hlo["fusions_by_kind"], "largest fusion operands:",
              hlo["largest_fusion_operands"])
        print("top opcodes:", dict(list(hlo["opcodes"].items())[:20]))
        print("written by the entry computation:", hlo["entry_megabytes_written"], "MB;",
              json.dumps(hlo["entry_megabytes_written_by_kind"]))
        print("scalars broadcast to arrays:",
              json.dumps(hlo["scalar_constants_broadcast_to_arrays"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
