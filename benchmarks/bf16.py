"""bf16 on the current device: float32 vs ``mixed_bfloat16`` train steps, and a loss curve.

Two modes, one backend per process (Keras fixes it at import):

* timing (default): for ``vit_b_2_in256``, ``dit_s_2`` and ``unet_cifar10`` at batch 8
  (``--cases paper``), the child builds the same backbone twice from one seed, once under
  ``float32`` and once under ``mixed_bfloat16`` (Min-SNR-5, ε target, AdamW), and times
  ``train_on_batch`` on one fixed batch for both, interleaved step by step with the order
  alternating, as ``throughput.py`` does, so a shared machine's noise hits both alike. It
  reports the median step of each, their ratio, the dtypes the step really used (the
  backbone computes in bfloat16, its output and the loss are float32) and the load
  average before and after. Writes ``docs/results/bf16_<backend>.json``.
* ``--digits``: trains ``recipes/digits`` twice per backend from the same seed (same data
  order, timesteps and noise), float32 and ``mixed_bfloat16``, and writes both loss curves
  (the logged mean training loss every ``--log-every`` steps) to
  ``docs/results/bf16_digits.json`` and ``.png``. This compares how the two policies
  train; it is not a timing.

bf16 needs no loss scaling (its exponent range is float32's); `DiffusionModel` casts the
backbone's output to float32 before the loss, so only the backbone runs in bfloat16.

Usage::

    python benchmarks/bf16.py                                  # timing, both backends
    python benchmarks/bf16.py --backend jax --quick            # a smoke run
    python benchmarks/bf16.py --digits --steps 600             # loss curves, both backends
"""

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _common  # noqa: E402

POLICIES = ("float32", "mixed_bfloat16")
CASE_SETS = {
    "paper": ("vit_b_2_in256", "dit_s_2", "unet_cifar10"),
    "small": ("dit_small", "unet_small"),
}


# -- timing ----------------------------------------------------------------------------


def _make_model(preset, overrides, policy):
    import keras

    from keras_minsnr import backbones
    from keras_minsnr.diffusion_model import DiffusionModel

    # A layer takes the global policy when it is built; the next model may use another.
    keras.mixed_precision.set_dtype_policy(policy)
    keras.utils.set_random_seed(0)
    backbone = backbones.get(preset, **overrides)
    conditional = backbone.conditioning is not None
    model = DiffusionModel(backbone, "cosine", prediction_type="epsilon", weighting="min_snr",
                           gamma=5.0, label_dropout=0.1 if conditional else 0.0,
                           ema_decay=0.999, seed=0)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4))
    return model


def dtypes_used(model, batch):
    """The dtypes one loss evaluation really uses: the backbone's variables and compute,
    its raw output, and the loss."""
    import numpy as np
    from keras import ops

    images = batch["images"]
    t = ops.convert_to_tensor(np.full((images.shape[0],), 500, "int32"))
    inputs = {"x": ops.convert_to_tensor(images), "t": t}
    if "labels" in batch:
        inputs["y"] = ops.convert_to_tensor(batch["labels"])
    raw = model.backbone(inputs)
    loss, _ = model.diffusion_loss_terms(images, inputs.get("y"), t, np.zeros_like(images))
    return {
        "variable_dtype": model.backbone.dtype_policy.variable_dtype,
        "compute_dtype": model.backbone.dtype_policy.compute_dtype,
        "backbone_output_dtype": str(ops.convert_to_numpy(raw).dtype),
        "loss_dtype": str(ops.convert_to_numpy(loss).dtype),
    }


def timing_child(case, batch_size, steps, warmup):
    import keras
    from throughput import CASES
    from throughput import example_batch

    preset, overrides = CASES[case]
    load_before = os.getloadavg()
    previous = keras.mixed_precision.dtype_policy()
    try:
        models = {policy: _make_model(preset, overrides, policy) for policy in POLICIES}
    finally:
        keras.mixed_precision.set_dtype_policy(previous)
    batch = example_batch(models["float32"].backbone, batch_size)
    times = {policy: [] for policy in POLICIES}
    losses = {policy: [] for policy in POLICIES}
    for i in range(warmup + steps):
        for policy in POLICIES if i % 2 == 0 else POLICIES[::-1]:
            start = time.perf_counter()
            loss = float(models[policy].train_on_batch(batch, return_dict=True)["loss"])
            if i >= warmup:
                times[policy].append(time.perf_counter() - start)
            losses[policy].append(loss)
    medians = {policy: statistics.median(t) for policy, t in times.items()}
    return {
        "case": case,
        "backbone": preset,
        "params": int(models["float32"].backbone.count_params()),
        "image_shape": list(models["float32"].image_shape),
        "batch_size": batch_size,
        "steps_timed": steps,
        "warmup_steps": warmup,
        "step_ms_float32": 1e3 * medians["float32"],
        "step_ms_mixed_bfloat16": 1e3 * medians["mixed_bfloat16"],
        "speedup_bf16": medians["float32"] / medians["mixed_bfloat16"],
        "losses": losses,
        "dtypes": {policy: dtypes_used(models[policy], batch) for policy in POLICIES},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def run_timing(args, backend):
    results = []
    for case in CASE_SETS[args.cases]:
        print(f"[{backend}] {case}: float32 vs mixed_bfloat16, {args.warmup} warm-up + "
              f"{args.steps} timed steps each, interleaved ...", flush=True)
        result = _common.run_child(__file__, backend, [
            "--child", case, "--batch-size", str(args.batch_size), "--steps",
            str(args.steps), "--warmup", str(args.warmup)], ROOT)
        print(f"  float32 {result['step_ms_float32']:.0f} ms, mixed_bfloat16 "
              f"{result['step_ms_mixed_bfloat16']:.0f} ms: x{result['speedup_bf16']:.2f} "
              f"(load {result['load_average_before'][0]:.2f} -> "
              f"{result['load_average_after'][0]:.2f})", flush=True)
        results.append(result)
    return {
        "backend": backend,
        "device": _common.device_description(backend),
        "quick": args.quick,
        "note": "median step after warm-up; float32 and mixed_bfloat16 interleaved in one "
        "process (order alternating). speedup_bf16 = float32 step / bf16 step. Only "
        "meaningful on a quiet machine: see the load averages.",
        "results": results,
    }


# -- digits loss curves ----------------------------------------------------------------


def digits_child(steps, log_every, seed):
    """Trains recipes/digits under each policy from one seed; the logged loss curves."""
    import keras

    from keras_minsnr import run_config
    from keras_minsnr import training
    from recipes import digits

    curves = {}
    for policy in POLICIES:
        overrides = {"steps": steps, "steps_per_epoch": log_every, "seed": seed,
                     "mixed_precision": policy, "sample_every_epochs": 10**6,
                     "num_samples": 10, "sample_steps": 10}
        config = run_config.resolve_config(digits.RECIPE, overrides)
        with tempfile.TemporaryDirectory() as run_dir:
            start = time.perf_counter()
            model = training.train(config, run_dir, verbose=0)
            seconds = time.perf_counter() - start
            with open(os.path.join(run_dir, "metrics.csv")) as f:
                rows = list(csv.DictReader(f))
        curves[policy] = {
            "step": [int(r["step"]) for r in rows],
            "loss": [float(r["loss"]) for r in rows],
            "compute_dtype": model.backbone.dtype_policy.compute_dtype,
            "train_seconds": seconds,
        }
    keras.mixed_precision.set_dtype_policy("float32")
    return {"curves": curves, "load_average": os.getloadavg()}


def curve_summary(curves, tail=5):
    """Mean of the last ``tail`` logged losses per policy and their relative difference."""
    ends = {p: statistics.fmean(c["loss"][-tail:]) for p, c in curves.items()}
    pointwise = [abs(b - f) / f for f, b in zip(curves["float32"]["loss"],
                                                  curves["mixed_bfloat16"]["loss"])]
    return {
        "final_loss_mean_last_points": ends,
        "points_averaged": min(tail, min(len(c["loss"]) for c in curves.values())),
        "relative_difference": abs(ends["mixed_bfloat16"] - ends["float32"]) / ends["float32"],
        "max_pointwise_relative_difference": max(pointwise),
    }


def plot_curves(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(report["backends"])
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 3.6), squeeze=False)
    for ax, backend in zip(axes[0], backends):
        for policy, style in zip(POLICIES, ("-", "--")):
            curve = report["backends"][backend]["curves"][policy]
            ax.plot(curve["step"], curve["loss"], style, label=policy)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss (mean of {report['log_every']} steps)")
        ax.set_title(f"recipes/digits, {backend}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_digits(args, backends):
    report = {"steps": args.steps, "log_every": args.log_every, "seed": args.seed,
              "quick": args.quick, "backends": {}}
    for backend in backends:
        print(f"[{backend}] digits: {args.steps} steps, float32 then mixed_bfloat16 ...",
              flush=True)
        result = _common.run_child(__file__, backend, [
            "--digits-child", "--steps", str(args.steps), "--log-every",
            str(args.log_every), "--seed", str(args.seed)], ROOT)
        result["summary"] = curve_summary(result["curves"])
        print(f"  final losses {result['summary']['final_loss_mean_last_points']}", flush=True)
        report["backends"][backend] = result
    _common.write_report(os.path.join(args.output_dir, "bf16_digits.json"), report)
    plot_curves(report, os.path.join(args.output_dir, "bf16_digits.png"))
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["jax", "tensorflow", "both"], default="both")
    parser.add_argument("--cases", choices=sorted(CASE_SETS), default="paper")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per policy (5; quick 1), or digits steps (600; "
                        "quick 20)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (1)")
    parser.add_argument("--digits", action="store_true", help="the digits loss curves")
    parser.add_argument("--log-every", type=int, default=None,
                        help="digits: steps per logged loss (25; quick 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="small cases (timing) or a short run (digits)")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "docs", "results"))
    parser.add_argument("--child", choices=sorted(set(sum(CASE_SETS.values(), ()))),
                        help=argparse.SUPPRESS)
    parser.add_argument("--digits-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and args.cases == "paper" and not args.child:
        args.cases = "small"
    if args.digits or args.digits_child:
        args.steps = args.steps or (20 if args.quick else 600)
        args.log_every = args.log_every or (10 if args.quick else 25)
        if args.steps % args.log_every:
            parser.error(f"--steps ({args.steps}) must be a multiple of --log-every "
                         f"({args.log_every}).")
    else:
        args.steps = args.steps or (1 if args.quick else 5)
    args.warmup = 1 if args.warmup is None else args.warmup
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child or args.digits_child:
        sys.path.insert(0, ROOT)
        import keras_minsnr  # noqa: F401 - first: its CPU defaults (oneDNN, XLA:CPU flags)
        if args.child:
            result = timing_child(args.child, args.batch_size, args.steps, args.warmup)
        else:
            result = digits_child(args.steps, args.log_every, args.seed)
        print("RESULT " + json.dumps(result))
        return 0
    backends = ["tensorflow", "jax"] if args.backend == "both" else [args.backend]
    if args.digits:
        run_digits(args, backends)
        return 0
    for backend in backends:
        report = run_timing(args, backend)
        _common.write_report(os.path.join(args.output_dir, f"bf16_{backend}.json"), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
