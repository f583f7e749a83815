"""Where one training step's time goes, read from the backend's own profiler trace.

Traces ``--steps`` training steps (after ``--warmup``) of ``--backbone`` at
``--batch-size`` with the backend's profiler (`jax.profiler` on JAX,
`tf.profiler.experimental` on TensorFlow), reads the trace's XSpace protobuf (its schema
ships with TensorFlow) and sums the duration of every op event the host's threads ran,
grouped by what the op does:

* ``matmul``: dots, matmuls, batched matmuls, convolutions (on JAX with the library's
  XLA:CPU flag these are YNN fusions, which also hold the element-wise work fused with
  the dot);
* ``optimizer+ema``: the weight, slot and EMA updates (TensorFlow's ``ResourceApplyAdam``
  and variable assignments; on JAX these are ordinary fusions and land in ``other``);
* ``layout``: transposes, copies, pads, concatenations, slices, broadcasts;
* ``other``: everything else (element-wise fusions, reductions, softmax, layer norms).

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
CATEGORIES = (
    ("matmul", re.compile(r"matmul|einsum|conv2d|convolution|\bdot\b|dot[._]|gemm|ynn",
                          re.IGNORECASE)),
    ("optimizer+ema", re.compile(r"ResourceApply|Assign(Add|Sub)?VariableOp")),
    ("layout", re.compile(r"transpose|copy|\bpad|pad[._]|concat|slice|broadcast|Tile|"
                          r"Reshape|gather", re.IGNORECASE)),
)
# Events that wrap others (a whole step, an executor run): not ops themselves.
WRAPPERS = re.compile(r"^(\$|Xla|PjRt|TfrtCpu|ThunkExecutor|__inference_|train_function|"
                      r"EagerExecute|EagerLocalExecute|Run|FunctionRun|ExecutorState|"
                      r"Iterator::|ParallelFor|pjit|jit_)|TraceContext|Session|"
                      r"tf_data|ThreadpoolListener")


def category(name):
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def op_times(xplane_path):
    """{op name: (total seconds, count)} over the host planes' events, wrappers left out."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(xplane_path, "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.defaultdict(lambda: [0.0, 0])
    for plane in space.planes:
        if not plane.name.startswith("/host:"):
            continue
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if not name or WRAPPERS.search(name):
                    continue
                totals[name][0] += event.duration_ps * 1e-12
                totals[name][1] += 1
    return totals


def child(args):
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
    per_step = {name: (seconds / args.steps, count // args.steps)
                for name, (seconds, count) in totals.items()}
    by_category = collections.Counter()
    for name, (seconds, _) in per_step.items():
        by_category[category(name)] += seconds
    top = sorted(per_step.items(), key=lambda item: -item[1][0])[:25]
    return {
        "backend": backend,
        "step_seconds_untraced_median": statistics.median(untraced),
        "step_seconds_traced": traced,
        "op_seconds_per_step": {k: round(v, 4) for k, v in by_category.items()},
        "op_seconds_per_step_total": round(sum(by_category.values()), 4),
        "top_ops": [{"name": name, "category": category(name), "seconds": round(s, 4),
                     "count": c} for name, (s, c) in top],
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
              "device": _common.device_description(), "load_average_before": os.getloadavg(),
              "backends": {}}
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
