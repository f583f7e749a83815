"""Forward+backward step time and peak memory of the backbones, one backend per run.

Usage::

    python benchmarks/backbones.py --backend jax          # writes results/backbones_jax.json
    python benchmarks/backbones.py --backend tensorflow --quick   # smoke run

Each backbone runs in its own child process so that its peak memory is its own: the child
builds the model, compiles one step (``jax.jit`` of ``value_and_grad`` over
``stateless_call``, or a ``tf.function`` with a ``GradientTape``), runs warm-up steps and
then times ``--steps`` steps; the median is reported. A step is the forward pass, a mean
squared error against a random target and the gradients of every trainable weight (no
optimizer update). Memory is the growth of the process's peak resident set over its size
before the model was built (CPU), plus the device allocator's peak where the backend
reports one (GPU).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _common import device_description  # noqa: E402
from _common import device_peak_mb  # noqa: E402
from _common import rss_mb  # noqa: E402

# (label, preset, overrides, batch size)
DIT_CASES = [
    ("dit_s_2", "dit_s_2", {}, 8),
    (
        "vit_tiny_in_context",
        "vit_l_4_in64",
        {"depth": 4, "hidden_size": 256, "num_heads": 4},
        8,
    ),
]
QUICK_OVERRIDES = {"depth": 2}


def _make_batch(model, batch_size, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    h, w, c = model.image_shape
    batch = {
        "x": rng.standard_normal((batch_size, h, w, c)).astype("float32"),
        "t": rng.integers(0, 1000, (batch_size,)).astype("int32"),
    }
    if getattr(model, "conditioning", None) == "class":
        batch["y"] = rng.integers(0, model.num_classes, (batch_size,)).astype("int32")
    elif getattr(model, "conditioning", None) == "context":
        length, dim = model.context_shape
        batch["y"] = rng.standard_normal((batch_size, length, dim)).astype("float32")
    target = rng.standard_normal((batch_size, h, w, c)).astype("float32")
    return batch, target


def _jax_step(model):
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss_fn(trainable, batch, target):
        out, _ = model.stateless_call(trainable, non_trainable, batch, training=True)
        return jnp.mean(jnp.square(out - target))

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))

    def step(batch, target):
        loss, grads = grad_fn(trainable, batch, target)
        jax.block_until_ready((loss, grads))
        return float(loss)

    return step


def _tf_step(model):
    import tensorflow as tf

    @tf.function
    def grad_fn(batch, target):
        with tf.GradientTape() as tape:
            out = model(batch, training=True)
            loss = tf.reduce_mean(tf.square(out - target))
        grads = tape.gradient(loss, model.trainable_variables)
        # Touch every gradient so none is pruned from the graph.
        return loss, tf.add_n([tf.reduce_sum(g) for g in grads])

    def step(batch, target):
        loss, _ = grad_fn(batch, target)
        return float(loss)

    return step


def run_case(args):
    """Child process: one backbone, prints one JSON line."""
    import keras

    from keras_minsnr import backbones

    backend = keras.backend.backend()
    overrides = json.loads(args.overrides)
    rss_before = rss_mb("VmRSS")
    t0 = time.perf_counter()
    model = backbones.get(args.preset, **overrides)
    build_s = time.perf_counter() - t0
    batch, target = _make_batch(model, args.batch_size)
    step = _jax_step(model) if backend == "jax" else _tf_step(model)

    t0 = time.perf_counter()
    step(batch, target)
    first_step_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        step(batch, target)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(batch, target)
        times.append(time.perf_counter() - t0)
    result = {
        "params": int(model.count_params()),
        "build_s": round(build_s, 3),
        "first_step_s": round(first_step_s, 3),
        "step_time_s_median": round(statistics.median(times), 4),
        "step_times_s": [round(t, 4) for t in times],
        "peak_rss_delta_mb": round(rss_mb("VmHWM") - rss_before, 1),
        "device_peak_mb": device_peak_mb(backend),
    }
    print("RESULT " + json.dumps(result), flush=True)


def _cases(quick):
    sys.path.insert(0, ROOT)
    from keras_minsnr.backbones import unet

    cases = list(DIT_CASES)
    if quick:  # fewer blocks, batch 2
        cases = [(lab, pre, {**over, **QUICK_OVERRIDES}, 2) for lab, pre, over, _ in cases]
    # Every UNet preset as published (no common `depth` knob), at batch 2: a full-size
    # UNet step at batch 8 takes minutes on a 2-core CPU.
    for name in sorted(getattr(unet, "PRESETS", {})):
        cases.append((name, name, {}, 2))
    return cases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["jax", "tensorflow"], required=True)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per backbone")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps after compile")
    parser.add_argument("--batch-size", type=int, default=None, help="override every batch")
    parser.add_argument("--only", nargs="*", default=None, help="labels to run")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per backbone")
    parser.add_argument("--output", default=None, help="JSON path (default results/...)")
    # Internal: the child process that measures one backbone.
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.steps is None:
        args.steps = 2 if args.quick else 3
    if args.warmup is None:
        args.warmup = 1

    if args.case:
        sys.path.insert(0, ROOT)
        run_case(args)
        return

    results = []
    for label, preset, overrides, batch_size in _cases(args.quick):
        if args.only and label not in args.only:
            continue
        batch_size = args.batch_size or batch_size
        command = [
            sys.executable, os.path.abspath(__file__), "--case",
            "--backend", args.backend, "--preset", preset,
            "--overrides", json.dumps(overrides), "--batch-size", str(batch_size),
            "--steps", str(args.steps), "--warmup", str(args.warmup),
        ]
        entry = {"name": label, "preset": preset, "overrides": overrides,
                 "batch_size": batch_size}
        print(f"[{args.backend}] {label} batch {batch_size} ...", flush=True)
        try:
            proc = subprocess.run(command, capture_output=True, text=True,
                                  timeout=args.timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            entry["error"] = f"timed out after {args.timeout:.0f} s"
        else:
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode == 0 and lines:
                entry.update(json.loads(lines[-1][len("RESULT "):]))
            else:
                entry["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        print("   ", json.dumps(entry), flush=True)
        results.append(entry)

    sys.path.insert(0, ROOT)
    import keras

    report = {
        "backend": args.backend,
        "device": device_description(args.backend),
        "keras": keras.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()),
        "quick": args.quick,
        "steps": args.steps,
        "warmup": args.warmup,
        "step": "forward + MSE + gradients of all trainable weights, no optimizer update",
        "results": results,
    }
    suffix = "_quick" if args.quick else ""
    output = args.output or os.path.join(
        HERE, "results", f"backbones_{args.backend}{suffix}.json"
    )
    os.makedirs(os.path.dirname(output), exist_ok=True)
    if args.only and os.path.exists(output):
        # A partial rerun replaces its own entries and keeps the others.
        with open(output) as f:
            previous = json.load(f)["results"]
        rerun = {entry["name"] for entry in results}
        merged = [entry for entry in previous if entry["name"] not in rerun]
        report["results"] = merged + results
    with open(output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
