"""Where one training step's time goes, read from the backend's own profiler trace.

Traces ``--steps`` training steps (after ``--warmup``) of ``--backbone`` at
``--batch-size`` with the backend's profiler (`jax.profiler` on JAX,
`tf.profiler.experimental` on TensorFlow), reads the trace's XSpace protobuf (its schema
ships with TensorFlow) and sums the duration of every op event the host's threads ran,
grouped by what the op does:

* ``matmul``: dots, matmuls, batched matmuls, convolutions (on JAX with the library's
  XLA:CPU flag these are YNN fusions, which also hold the element-wise work fused with
  the dot);
* ``optimizer+ema``: the weight, slot and EMA updates (on TensorFlow every op of the
  non-finite-loss guard's update branch; on JAX the update fusions, which end in the
  guard's ``select``);
* ``layout``: transposes, copies, pads, concatenations, slices, broadcasts;
* ``other``: every other op (element-wise fusions, reductions, softmax, layer norms).

Events that only wrap ops (function calls, the executor, thread-pool waits) are left out.

Each category's seconds are per step, summed over threads, so with two busy threads they
can add up to twice the step. The report also lists the 25 ops that took longest.
`benchmarks/vs_official.py` gives the step's model FLOPs and the backends' matmul rates
on the same machine, against which the ``matmul`` seconds can be set.

Usage::

    python benchmarks/step_profile.py                       # both backends, ViT-B/2
    python benchmarks/step_profile.py --backend tensorflow --depth 4

Writes ``benchmarks/results/step_profile_<backbone>.json`` (``--output-dir``).
"""

import argparse
import collections
import glob
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

import _common  # noqa: E402

BACKENDS = ("tensorflow", "jax")
# An op event is "scope/name:OpType" (TensorFlow) or carries an ``hlo_op`` stat (JAX: an
# HLO instruction "kind.N"); other events wrap ops (function calls, the executor, waits).
# With oneDNN on, TensorFlow's kernels are "_MklMatMul", "_MklNativeFusedConv2D" and such.
TF_OP = re.compile(r"^[^:]+:(_?[A-Z][A-Za-z0-9_]*)$")
ONEDNN_PREFIX = r"(_Mkl(Native)?)?(_?Fused)?"
HLO_SUFFIX = re.compile(r"\.\d+$")
CATEGORIES = (
    ("matmul", re.compile(ONEDNN_PREFIX + r"(Einsum|MatMul|BatchMatMul\w*|Conv\w*|ynn_fusion|"
                          r"dot|convolution[\w\-]*)$")),
    # TensorFlow: the guarded update branch and the optimizer's scope; JAX: the update
    # fusions, which all end in the non-finite-loss guard's select.
    ("optimizer+ema", re.compile(r"^(ResourceApply\w+|Assign(Add|Sub)?VariableOp|"
                                 r"\w*select\w*)$")),
    ("layout", re.compile(r"^(_Mkl)?(Transpose|StridedSlice\w*|Slice|Pack|Unpack|Pad\w*|ConcatV2|Tile|"
                          r"BroadcastTo|GatherV2|\w*(transpose|copy|pad|concatenate|slice|"
                          r"broadcast|dynamic)\w*)$")),
)
UPDATE_SCOPE = re.compile(r"^cond/then/|/adam")


def op_kind(name, hlo=False):
    """The op type of a trace event (``MatMul``, ``ynn_fusion``), or None if it is not one."""
    if hlo:
        return HLO_SUFFIX.sub("", name)
    match = TF_OP.match(name)
    return match.group(1) if match else None


def category(kind, name=""):
    if UPDATE_SCOPE.search(name):
        return "optimizer+ema"
    for label, pattern in CATEGORIES:
        if pattern.match(kind):
            return label
    return "other"


def op_times(xplane_path):
    """{op event name: [total seconds, count, op kind]} over the host planes' op events."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(xplane_path, "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.defaultdict(lambda: [0.0, 0, None])
    for plane in space.planes:
        if not plane.name.startswith("/host:"):
            continue
        hlo_stat = {k for k, v in plane.stat_metadata.items() if v.name == "hlo_op"}
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                kind = op_kind(name, hlo=any(st.metadata_id in hlo_stat for st in event.stats))
                if kind is None:
                    continue
                totals[name][0] += event.duration_ps * 1e-12
                totals[name][1] += 1
                totals[name][2] = kind
    return totals


def child(args):
    import keras_minsnr  # noqa: F401 - first, for its CPU defaults (xla_flags, tf_onednn)

    import keras

    import jax_gap

    backend = keras.backend.backend()
    model = jax_gap.build_model(args.backbone, args.depth, backbone_args=args.backbone_args)
    from keras_minsnr.optimizers import AdamW

    model.compile(optimizer=AdamW(1e-4))
    batch = jax_gap.example_batch(model, args.batch_size)
    for _ in range(args.warmup):
        model.train_on_batch(batch)
    untraced = []
    for _ in range(args.steps):
        start = time.perf_counter()
        model.train_on_batch(batch)
        untraced.append(time.perf_counter() - start)
    folder = tempfile.mkdtemp(prefix="step_profile_")
    if backend == "jax":
        import jax

        jax.profiler.start_trace(folder)
    else:
        import tensorflow as tf

        tf.profiler.experimental.start(folder)
    start = time.perf_counter()
    for _ in range(args.steps):
        model.train_on_batch(batch)
    traced = (time.perf_counter() - start) / args.steps
    if backend == "jax":
        jax.profiler.stop_trace()
    else:
        tf.profiler.experimental.stop()
    path = sorted(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True))[-1]
    totals = op_times(path)
    shutil.rmtree(folder, ignore_errors=True)
    per_step = {name: (seconds / args.steps, count // args.steps, kind)
                for name, (seconds, count, kind) in totals.items()}
    by_category, by_kind = collections.Counter(), collections.Counter()
    for name, (seconds, _, kind) in per_step.items():
        by_category[category(kind, name)] += seconds
        by_kind[kind] += seconds
    top = sorted(per_step.items(), key=lambda item: -item[1][0])[:25]
    return {
        "backend": backend,
        "device": _common.device_description(backend),
        "step_seconds_untraced_median": statistics.median(untraced),
        "step_seconds_traced": traced,
        "op_seconds_per_step": {k: round(v, 4) for k, v in by_category.items()},
        "op_seconds_per_step_total": round(sum(by_category.values()), 4),
        "op_seconds_per_step_by_kind": {k: round(v, 4) for k, v in by_kind.most_common(20)},
        "top_ops": [{"name": name, "kind": kind, "category": category(kind, name),
                     "seconds": round(seconds, 4), "count": count}
                    for name, (seconds, count, kind) in top],
        "load_average_after": os.getloadavg(),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="one backend (default: both, one child process each)")
    parser.add_argument("--backbone", default="vit_b_2_in256")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--backbone-args", type=json.loads, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="traced steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])
                 if not a.startswith("--backend") and a not in BACKENDS]
    report = {"backbone": args.backbone, "depth": args.depth, "batch_size": args.batch_size,
              "load_average_before": os.getloadavg(), "backends": {}}
    for backend in [args.backend] if args.backend else BACKENDS:
        print(f"[{backend}] tracing {args.steps} steps ...", flush=True)
        row = _common.run_child(__file__, backend, ["--child", *forwarded], cwd=ROOT)
        report["backends"][backend] = row
        print("  " + json.dumps({k: row[k] for k in ("step_seconds_untraced_median",
                                                     "op_seconds_per_step")}), flush=True)
    name = f"step_profile_{args.backbone}" + (f"_depth{args.depth}" if args.depth else "")
    _common.write_report(os.path.join(args.output_dir, name + ".json"), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
