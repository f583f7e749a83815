"""Convergence benchmark: FID vs training steps, constant vs Min-SNR-γ weighting, on digits.

The small-scale stand-in for the paper's "3.4x faster convergence" claim. Every run uses the
digits recipe (`recipes/digits.py`: class-conditional `mlp_digits`, cosine schedule, AdamW
1e-3, batch 128) and differs only in the prediction target and the loss weighting:

* for each target (``sample``, ``epsilon``, ``v_prediction``): ``constant`` vs ``min_snr`` (γ=5);
* for ``epsilon``: the γ ablation (``min_snr`` with γ = 1 and 20) and ``soft_min_snr`` (γ=5).

For a given seed every run starts from the same backbone weights (built once, copied in with
``set_weights``), sees the same batches (the data pipeline is seeded) and the same noise and
timesteps (`DiffusionModel(seed=...)`). Training goes through `DiffusionModel.fit`; FID is
measured by `keras_minsnr.evaluation.FIDCallback` at fixed step checkpoints (every
``--eval-every`` steps) from ``--num-samples`` class-balanced DDIM-50 samples (EMA weights,
guidance 1, fixed sampling seed) against the real digits, with the offline digits feature
extractor.

Outputs (in ``--output-dir``, default ``docs/results``)::

    convergence.csv    one row per run x checkpoint
    convergence.png    FID vs steps, one panel per target, mean over seeds
    convergence.json   the plan, per-target speed-ups and the mean curves

Speed-up (the paper's measure): the steps the baseline (``constant``) needs to reach its own
final FID, divided by the steps Min-SNR needs to reach that same FID. Both are read off the
seed-mean FID curves on the checkpoint grid with linear interpolation between neighbouring
checkpoints (first crossing). A curve already below the target at its first checkpoint is
credited with that first checkpoint (no extrapolation towards step 0), so the speed-up is then
a lower bound. If Min-SNR never reaches the baseline's final FID the speed-up is ``null``.

Each finished run is recorded in ``OUTPUT_DIR/convergence_runs/`` (removed at the end), so a
killed benchmark started again with the same settings skips the runs it already finished.

Usage::

    python benchmarks/convergence.py                 # ~1 hour on a 2-core CPU
    python benchmarks/convergence.py --quick --output-dir /tmp/conv   # ~1-2 minutes
    #   (quick: 1 seed, 40 steps, FID of 100 DDIM-10 samples at steps 20 and 40, no ablation)
    KERAS_BACKEND=jax python benchmarks/convergence.py --seeds 0 1 2
"""

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from _common import device_description  # noqa: E402

TARGETS = ("sample", "epsilon", "v_prediction")
CSV_COLUMNS = (
    "seed",
    "run",
    "target",
    "weighting",
    "gamma",
    "step",
    "fid",
    "kid_mean",
    "kid_std",
    "train_seconds",
)
FULL = {"steps": 2000, "eval_every": 250, "num_samples": 1000, "seeds": [0, 1],
        "sample_steps": 50, "ablation": True}
# CI-sized: one seed, no ablation, a short sampler; the numbers mean nothing, the files do.
QUICK = {"steps": 40, "eval_every": 20, "num_samples": 100, "seeds": [0],
         "sample_steps": 10, "ablation": False}


def run_plan(targets=TARGETS, ablation=True):
    """The runs: ``(name, target, weighting, gamma)`` tuples."""
    runs = []
    for target in targets:
        runs.append((f"{target}/constant", target, "constant", None))
        runs.append((f"{target}/min_snr_5", target, "min_snr", 5.0))
    if ablation and "epsilon" in targets:
        runs.append(("epsilon/min_snr_1", "epsilon", "min_snr", 1.0))
        runs.append(("epsilon/min_snr_20", "epsilon", "min_snr", 20.0))
        runs.append(("epsilon/soft_min_snr_5", "epsilon", "soft_min_snr", 5.0))
    return runs


# -- speed-up ------------------------------------------------------------------------------


def steps_to_reach(steps, fids, target):
    """First step at which the curve ``(steps, fids)`` reaches ``fids <= target``.

    Linear interpolation between the two checkpoints around the first crossing; a curve
    already at or below `target` at its first checkpoint returns that checkpoint. ``None``
    when the curve never reaches `target`.
    """
    if len(steps) != len(fids) or not steps:
        raise ValueError(
            f"steps and fids must be non-empty and of equal length, got {len(steps)} and "
            f"{len(fids)}."
        )
    if fids[0] <= target:
        return float(steps[0])
    for i in range(1, len(steps)):
        if fids[i] <= target:
            s0, s1, f0, f1 = steps[i - 1], steps[i], fids[i - 1], fids[i]
            return float(s0 + (f0 - target) / (f0 - f1) * (s1 - s0))
    return None


def speedup(steps, baseline_fids, candidate_fids):
    """The paper's convergence speed-up of `candidate` over `baseline` on one step grid.

    Returns ``(speedup, baseline_steps, candidate_steps, target_fid)``; `speedup` and
    `candidate_steps` are ``None`` when the candidate never reaches the baseline's final FID.
    """
    target = float(baseline_fids[-1])
    base = steps_to_reach(steps, baseline_fids, target)
    cand = steps_to_reach(steps, candidate_fids, target)
    return (None if cand is None else base / cand), base, cand, target


# -- runs ----------------------------------------------------------------------------------


def _config(args, target, weighting, gamma, seed):
    from recipes.digits import RECIPE
    from keras_minsnr.training import resolve_config

    overrides = {
        "prediction_type": target,
        "weighting": weighting,
        "seed": seed,
        "steps": args.steps,
        "steps_per_epoch": args.eval_every,
    }
    if gamma is not None:
        overrides["gamma"] = gamma
    recipe = {k: v for k, v in RECIPE.items()}
    return resolve_config(recipe, overrides)


def train_and_evaluate(args, name, target, weighting, gamma, seed, initial_weights, real,
                       extractor, workdir):
    """One run; returns its CSV rows."""
    import keras

    from keras_minsnr.evaluation import FIDCallback
    from keras_minsnr.training import build_dataset
    from keras_minsnr.training import build_model

    config = _config(args, target, weighting, gamma, seed)
    keras.utils.set_random_seed(seed)
    dataset, info = build_dataset(config)
    model = build_model(config, info)
    model.backbone.set_weights(initial_weights)
    model.reset_ema()
    path = os.path.join(workdir, f"{seed}_{name.replace('/', '_')}.csv")
    if os.path.exists(path):  # left by a killed run; the callback appends
        os.remove(path)
    callback = FIDCallback(
        real,
        path,
        num_samples=args.num_samples,
        extractor=extractor,
        every_epochs=1,
        sampler="ddim",
        num_steps=args.sample_steps,
        guidance_scale=1.0,
        clip_denoised=True,
        seed=args.sample_seed,
    )
    start = time.perf_counter()
    model.fit(
        dataset,
        epochs=args.steps // args.eval_every,
        steps_per_epoch=args.eval_every,
        callbacks=[callback],
        verbose=args.verbose,
    )
    elapsed = time.perf_counter() - start
    rows = []
    with open(path) as f:
        for record in csv.DictReader(f):
            rows.append(
                {
                    "seed": seed,
                    "run": name,
                    "target": target,
                    "weighting": weighting,
                    "gamma": "" if gamma is None else gamma,
                    "step": int(record["step"]),
                    "fid": float(record["fid"]),
                    "kid_mean": float(record["kid_mean"]),
                    "kid_std": float(record["kid_std"]),
                    "train_seconds": round(elapsed, 2),
                }
            )
    return rows


def initial_backbone_weights(args, seed):
    import keras

    from keras_minsnr.training import build_dataset
    from keras_minsnr.training import build_model

    config = _config(args, "epsilon", "constant", None, seed)
    keras.utils.set_random_seed(seed)
    _, info = build_dataset(config)
    return build_model(config, info).backbone.get_weights()


# -- summary -------------------------------------------------------------------------------


def mean_curves(rows):
    """``{run: (steps, mean_fids)}`` over seeds (only steps every seed reached)."""
    by_run = {}
    for row in rows:
        by_run.setdefault(row["run"], {}).setdefault(row["step"], []).append(row["fid"])
    seeds = len({row["seed"] for row in rows})
    curves = {}
    for run, per_step in by_run.items():
        steps = sorted(s for s, v in per_step.items() if len(v) == seeds)
        curves[run] = (steps, [sum(per_step[s]) / len(per_step[s]) for s in steps])
    return curves


def summarise(rows, runs):
    curves = mean_curves(rows)
    result = {"speedups": {}, "ablation": {}}
    for target in TARGETS:
        base, cand = f"{target}/constant", f"{target}/min_snr_5"
        if base not in curves or cand not in curves:
            continue
        steps = curves[base][0]
        value, b_steps, c_steps, fid = speedup(steps, curves[base][1], curves[cand][1])
        result["speedups"][target] = {
            "baseline": base,
            "min_snr": cand,
            "target_fid": fid,
            "baseline_steps": b_steps,
            "min_snr_steps": c_steps,
            "speedup": value,
            "min_snr_final_fid": curves[cand][1][-1],
            # The same measure on each seed's own curves: the spread behind the mean.
            "per_seed": per_seed_speedups(rows, base, cand),
        }
    for name, target, _, _ in runs:
        base = f"{target}/constant"
        if name in (base, f"{target}/min_snr_5") or name not in curves or base not in curves:
            continue
        value, b_steps, c_steps, fid = speedup(curves[base][0], curves[base][1],
                                               curves[name][1])
        result["ablation"][name] = {
            "baseline": base,
            "target_fid": fid,
            "baseline_steps": b_steps,
            "steps": c_steps,
            "speedup": value,
            "final_fid": curves[name][1][-1],
        }
    result["mean_curves"] = {
        run: {"steps": s, "fid": f} for run, (s, f) in sorted(curves.items())
    }
    return result


def per_seed_speedups(rows, baseline, candidate):
    """``{seed: speed-up}`` of `candidate` over `baseline`, each seed's curves alone."""
    result = {}
    for seed in sorted({row["seed"] for row in rows}):
        curves = mean_curves([row for row in rows if row["seed"] == seed])
        if baseline in curves and candidate in curves:
            steps, base_fids = curves[baseline]
            result[str(seed)] = speedup(steps, base_fids, curves[candidate][1])[0]
    return result


def read_rows(path):
    """The rows of a ``convergence.csv``, typed as `train_and_evaluate` returns them."""
    rows = []
    with open(path, newline="") as f:
        for record in csv.DictReader(f):
            row = dict(record)
            row["seed"] = int(row["seed"])
            row["step"] = int(row["step"])
            for key in ("fid", "kid_mean", "kid_std", "train_seconds"):
                row[key] = float(row[key])
            row["gamma"] = float(row["gamma"]) if row["gamma"] else ""
            rows.append(row)
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = mean_curves(rows)
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(5 * len(TARGETS), 4), squeeze=False)
    for ax, target in zip(axes[0], TARGETS):
        for run, (steps, fids) in sorted(curves.items()):
            if not run.startswith(target + "/"):
                continue
            label = run.split("/", 1)[1]
            style = "--" if label == "constant" else "-"
            ax.plot(steps, fids, style, marker="o", markersize=3, label=label)
        ax.set_title(f"target: {target}")
        ax.set_xlabel("training steps")
        ax.set_ylabel("FID (digits features)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    seeds = len({row["seed"] for row in rows})
    fig.suptitle(f"Digits, mlp_digits: FID vs steps (mean over {seeds} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny CI-sized run (~1-2 min)")
    parser.add_argument("--steps", type=int, help=f"training steps per run ({FULL['steps']})")
    parser.add_argument("--eval-every", type=int,
                        help=f"FID checkpoint period in steps ({FULL['eval_every']})")
    parser.add_argument("--num-samples", type=int,
                        help=f"samples per FID ({FULL['num_samples']})")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (0 1)")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--no-ablation", action="store_true",
                        help="skip the γ ablation and soft_min_snr runs")
    parser.add_argument("--sample-steps", type=int, help="DDIM steps (50; quick 10)")
    parser.add_argument("--sample-seed", type=int, default=1234)
    parser.add_argument("--num-real", type=int, default=1797,
                        help="real digits to compare with (all 1797 by default)")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "docs", "results"))
    parser.add_argument("--verbose", type=int, default=None,
                        help="fit verbosity (default 2, quick 0)")
    parser.add_argument("--from-csv", action="store_true",
                        help="train nothing: recompute convergence.json and .png from the "
                        "convergence.csv (and the settings in convergence.json) in "
                        "--output-dir")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    args.ablation = defaults["ablation"] and not args.no_ablation
    for key in ("steps", "eval_every", "num_samples", "seeds", "sample_steps"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.verbose is None:
        args.verbose = 0 if args.quick else 2
    if args.eval_every < 1 or args.steps < args.eval_every or args.steps % args.eval_every:
        parser.error(
            f"--steps ({args.steps}) must be a positive multiple of --eval-every "
            f"({args.eval_every})."
        )
    if args.num_samples < 2:
        parser.error(f"--num-samples must be >= 2, got {args.num_samples}.")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.from_csv:
        return resummarise(args.output_dir)
    import keras

    from keras_minsnr.evaluation import real_images_for
    from keras_minsnr.metrics import get_feature_extractor

    runs = run_plan(args.targets, ablation=args.ablation)
    checkpoints = list(range(args.eval_every, args.steps + 1, args.eval_every))
    total = len(runs) * len(args.seeds)
    print(
        f"Plan ({keras.backend.backend()}): {len(runs)} runs x {len(args.seeds)} seeds = "
        f"{total} trainings of {args.steps} steps (batch 128, mlp_digits), FID from "
        f"{args.num_samples} DDIM-{args.sample_steps} samples at steps {checkpoints}.\n"
        f"Runs: {', '.join(name for name, *_ in runs)}",
        flush=True,
    )
    os.makedirs(args.output_dir, exist_ok=True)
    extractor = get_feature_extractor("digits")
    real = real_images_for({"data": "digits"}, args.num_real)
    rows = []
    bar = keras.utils.Progbar(total, unit_name="run")
    start = time.perf_counter()
    # Finished runs are kept in WORKDIR until the end, so a killed benchmark resumes
    # where it stopped instead of starting the hour again.
    workdir = os.path.join(args.output_dir, "convergence_runs")
    os.makedirs(workdir, exist_ok=True)
    settings = run_settings(args)
    done = 0
    for seed in args.seeds:
        initial = None
        for name, target, weighting, gamma in runs:
            record = os.path.join(workdir, f"{seed}_{name.replace('/', '_')}.json")
            run_rows = load_finished_run(record, settings)
            if run_rows is None:
                if initial is None:
                    initial = initial_backbone_weights(args, seed)
                run_rows = train_and_evaluate(args, name, target, weighting, gamma, seed,
                                              initial, real, extractor, workdir)
                save_finished_run(record, settings, run_rows)
                resumed = ""
            else:
                resumed = " (finished earlier, reused)"
            rows.extend(run_rows)
            done += 1
            last = rows[-1]
            print(f"\n[{done}/{total}] seed {seed} {name}: FID {last['fid']:.3f} at step "
                  f"{last['step']}{resumed} ({time.perf_counter() - start:.0f} s so far)",
                  flush=True)
            bar.update(done)
    write_outputs(args, runs, rows, checkpoints, time.perf_counter() - start)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def run_settings(args):
    """What a finished run's rows depend on besides its name and seed."""
    return {
        "steps": args.steps,
        "eval_every": args.eval_every,
        "num_samples": args.num_samples,
        "sample_steps": args.sample_steps,
        "sample_seed": args.sample_seed,
        "num_real": args.num_real,
        "backend": os.environ.get("KERAS_BACKEND", ""),
    }


def load_finished_run(path, settings):
    """A run's rows from an earlier, interrupted benchmark, or None."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    return record["rows"] if record.get("settings") == settings else None


def save_finished_run(path, settings, rows):
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump({"settings": settings, "rows": rows}, f)
    os.replace(partial, path)


def write_outputs(args, runs, rows, checkpoints, seconds):
    import keras

    with open(os.path.join(args.output_dir, "convergence.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, os.path.join(args.output_dir, "convergence.png"))
    summary = summarise(rows, runs)
    summary.update(
        {
            "quick": bool(args.quick),
            "backend": keras.backend.backend(),
            "device": device_description(keras.backend.backend()),
            "cpu_count": os.cpu_count(),
            "seeds": list(args.seeds),
            "steps": args.steps,
            "checkpoints": checkpoints,
            "num_samples": args.num_samples,
            "num_real": args.num_real,
            "sampler": f"ddim-{args.sample_steps}, guidance 1.0, EMA weights, "
            f"seed {args.sample_seed}",
            "extractor": "digits",
            "speedup_method": "seed-mean FID curves on the checkpoint grid, linear "
            "interpolation at the first crossing of the baseline's final FID; a curve "
            "already below it at the first checkpoint is credited with that checkpoint "
            "(lower bound); null when Min-SNR never reaches it",
            "wall_seconds": round(seconds, 1),
        }
    )
    with open(os.path.join(args.output_dir, "convergence.json"), "w") as f:
        json.dump(_finite_or_null(summary), f, indent=2)
    for target, entry in summary["speedups"].items():
        value = entry["speedup"]
        print(f"{target}: speed-up {'never reached (null)' if value is None else f'{value:.2f}x'}"
              f" (baseline final FID {entry['target_fid']:.3f})")


def resummarise(output_dir):
    """Rewrites the summary and plot from a finished run's CSV (after a change to them)."""
    summary_path = os.path.join(output_dir, "convergence.json")
    csv_path = os.path.join(output_dir, "convergence.csv")
    for path in (csv_path, summary_path):
        if not os.path.exists(path):
            raise SystemExit(f"--from-csv needs {path} from an earlier run.")
    with open(summary_path) as f:
        previous = json.load(f)
    rows = read_rows(csv_path)
    runs = [(name, name.split("/", 1)[0], None, None)
            for name in dict.fromkeys(row["run"] for row in rows)]
    summary = {**previous, **summarise(rows, runs)}
    plot(rows, os.path.join(output_dir, "convergence.png"))
    with open(summary_path, "w") as f:
        json.dump(_finite_or_null(summary), f, indent=2)
    print(f"rewrote {summary_path} and convergence.png from {csv_path}")
    return 0


def _finite_or_null(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


if __name__ == "__main__":
    sys.exit(main())
