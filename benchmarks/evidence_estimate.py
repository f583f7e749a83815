"""CPU-hour estimate of the issue-26 evidence run, from a few measured steps.

Times a few `vit_tiny` training steps at each batch size the run uses and one FID
evaluation (the benchmark's sampler and sample count), then multiplies by the plan that
`benchmarks/run_evidence.sh` runs. Prints one line per part and the total; the run itself
is not started. Machine load changes the numbers, so read them as the order of magnitude.

Usage::

    KERAS_BACKEND=tensorflow python benchmarks/evidence_estimate.py \\
        --part headline:128:4000:1000:6:3 --part grid:32,64,128:4000:1000:2:1
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)


def parse_part(text):
    """``NAME:BATCHES:STEPS:EVAL_EVERY:RUNS:SEEDS`` (BATCHES comma-separated) as a dict."""
    fields = text.split(":")
    if len(fields) != 6:
        raise argparse.ArgumentTypeError(
            f"--part {text!r}: expected NAME:BATCHES:STEPS:EVAL_EVERY:RUNS:SEEDS, e.g. "
            "headline:128:4000:1000:6:3")
    name, batches, *numbers = fields
    try:
        batches = [int(b) for b in batches.split(",")]
        steps, eval_every, runs, seeds = (int(n) for n in numbers)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part {text!r}: the fields after NAME must be "
                                         "integers") from None
    return {"name": name, "batch_sizes": batches, "steps": steps, "eval_every": eval_every,
            "runs": runs, "seeds": seeds}


def part_seconds(part, step_seconds, fid_seconds, diagnose_factor=0.0):
    """Seconds of one part: every training's steps plus its FID checkpoints; with
    diagnostics, ``diagnose_factor`` more FIDs per checkpoint and run (the split matrix)."""
    checkpoints = part["steps"] // part["eval_every"]
    per_batch = [part["steps"] * step_seconds[b] + checkpoints * fid_seconds
                 * (1.0 + diagnose_factor) for b in part["batch_sizes"]]
    return part["runs"] * part["seeds"] * sum(per_batch)


def measure_step_seconds(batch_size, steps=5):
    """Seconds per optimizer step of `vit_tiny` at `batch_size` (after one compiling fit)."""
    import keras

    import convergence
    from keras_minsnr.builders import build_model
    from keras_minsnr.training import build_dataset

    args = convergence.parse_args(["--backbone", "vit_tiny", "--steps", str(steps),
                                   "--eval-every", str(steps), "--batch-size",
                                   str(batch_size)])
    config = convergence._config(args, "sample", "min_snr", 5.0, 0)
    keras.utils.set_random_seed(0)
    dataset, info = build_dataset(config)
    model = build_model(config, info)
    model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0)  # compiles
    start = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    return (time.perf_counter() - start) / steps, model


def measure_fid_seconds(model, num_samples, sample_steps):
    from keras_minsnr.evaluation import evaluate_model
    from keras_minsnr.evaluation import real_images_for

    real = real_images_for({"data": "digits", "image_size": 8}, 1797)
    evaluate_model(model, real, 10, "digits", num_steps=sample_steps)  # compiles
    start = time.perf_counter()
    evaluate_model(model, real, num_samples, "digits", num_steps=sample_steps)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", type=parse_part, action="append", required=True,
                        help="NAME:BATCHES:STEPS:EVAL_EVERY:RUNS:SEEDS, once per part")
    parser.add_argument("--diagnose-parts", nargs="*", default=[],
                        help="parts run with --diagnose (4 split FIDs per target pair and "
                        "checkpoint, about 2 per run)")
    parser.add_argument("--measure-steps", type=int, default=5)
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--sample-steps", type=int, default=20)
    args = parser.parse_args(argv)
    import keras

    sizes = sorted({b for part in args.part for b in part["batch_sizes"]})
    step_seconds, model = {}, None
    for size in sizes:
        step_seconds[size], model = measure_step_seconds(size, args.measure_steps)
        print(f"measured: batch {size}: {1e3 * step_seconds[size]:.0f} ms per step")
    fid_seconds = measure_fid_seconds(model, args.num_samples, args.sample_steps)
    print(f"measured: one FID ({args.num_samples} DDIM-{args.sample_steps} samples): "
          f"{fid_seconds:.1f} s")
    total = 0.0
    for part in args.part:
        factor = 2.0 if part["name"] in args.diagnose_parts else 0.0
        seconds = part_seconds(part, step_seconds, fid_seconds, factor)
        total += seconds
        print(f"estimate: {part['name']}: {seconds / 3600:.2f} h")
    print(f"estimate: total {total / 3600:.2f} h of this machine's CPU "
          f"({os.cpu_count()} cores, {keras.backend.backend()}, load as now)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
