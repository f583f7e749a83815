"""Convergence benchmark: FID vs training steps for loss weightings, on digits.

The small-scale stand-in for the paper's "3.4x faster convergence" claim, on two backbones
(``--backbone``):

* ``mlp_digits`` (default): the digits recipe (`recipes/digits.py`: class-conditional
  residual MLP, cosine schedule, AdamW 1e-3, batch 128), plan ``targets``: for each target
  (``sample``, ``epsilon``, ``v_prediction``) ``constant`` vs ``min_snr`` (γ=5), and for ε the
  γ ablation (γ = 1, 20) and ``soft_min_snr`` (γ=5). Outputs ``convergence.*``.
* ``vit_tiny``: the paper's in-context ViT (`VIT_TINY`: 4 blocks, width 128, patch 2, on the
  8x8 digits), by default plan ``targets`` at batch 128 for 4000 steps, 3 seeds (the
  headline of docs/results.md); ``--plan table1``: the paper's Table 1 at small scale (see
  `run_plan`). Outputs ``convergence_vit.*``.

For a given seed every run starts from the same backbone weights (built once, copied in with
``set_weights``), sees the same batches (the data pipeline is seeded) and the same noise and
timesteps (`DiffusionModel(seed=...)`). Training goes through `DiffusionModel.fit`; FID is
measured by `keras_minsnr.evaluation.FIDCallback` at fixed step checkpoints (every
``--eval-every`` steps) from ``--num-samples`` class-balanced DDIM samples (EMA weights,
guidance 1, fixed sampling seed) against the real digits, with the offline digits feature
extractor. `import keras_minsnr` sets the CPU defaults that make either backend's train
step fast on CPU (`keras_minsnr.xla_flags`, `keras_minsnr.tf_onednn`); for the 0.85 M
ViT, TensorFlow is the faster one on a 2-core CPU.

Outputs (in ``--output-dir``, default ``docs/results``, for ``vit_tiny``
``docs/results/vit_b128``; STEM is ``convergence`` or ``convergence_vit``)::

    STEM.csv    one row per run x seed x checkpoint
    STEM.png    FID vs steps, one panel per target (and one for a γ sweep): the mean over
                seeds with its 95% interval as a band
    STEM.json   the settings, per-target speed-ups and the other comparisons with their
                intervals, per-seed speed-ups, mean curves and FID bands, images seen
    STEM_diagnostics.{json,md,png}   with --diagnose: x₀ error per timestep and the
                split-sampler FID matrix of every checkpoint (`diagnostics`)

The CSV records ``images_seen`` (optimizer steps x batch x grad-accum) and the plot puts FID
against it. ``--batch-sizes 32 64 128`` runs the batch x weighting grid (x₀, ``constant``
vs ``min_snr_5``, one seed unless ``--seeds``) into ``STEM_batch_grid.*``, with one summary
per batch size. ``--reuse SUMMARY.json`` takes the grid cells that a finished run at one batch
size already trained (the batch-128 headline's x₀ runs, from its CSV) instead of training them
again; every setting but the batch grid must match, or it stops and names the difference.

Speed-up (the paper's measure): the steps the baseline (``constant``, same target) needs to
reach its own final FID, divided by the steps the candidate needs to reach that same FID.
Both are read off the seed-mean FID curves on the checkpoint grid with linear interpolation
between neighbouring checkpoints (first crossing). A curve already below the target at its
first checkpoint is credited with that first checkpoint (no extrapolation towards step 0),
so the speed-up is then a lower bound. If the candidate never reaches the baseline's final
FID the speed-up is ``null``.

Intervals (``--interval``, from `stats`): 95% Student-t over seeds by default (`t_interval`); a percentile
bootstrap over seeds is available (`bootstrap_interval`) but with 3 seeds it has only 10
distinct resamples and comes out too narrow. Speed-up intervals come from each seed's own
speed-up, on the log scale (`speedup_interval`).

Each finished run is recorded in ``OUTPUT_DIR/STEM_runs/`` (removed at the end), so a killed
benchmark started again with the same settings skips the runs it already finished, and
continues the one it was in from its last FID checkpoint (`SaveResumePoint`: the model,
optimizer, EMA and random generators; the data pipeline skips the batches already seen).
The directory's small ``*.json`` records (finished runs, measured diagnostics) are all a
new machine needs to go on; the checkpoints beside them only save the training under way.

Usage::

    python benchmarks/convergence.py                 # MLP, ~1 hour on a 2-core CPU
    python benchmarks/convergence.py --backbone vit_tiny --diagnose   # the headline, batch 128
    python benchmarks/convergence.py --backbone vit_tiny --plan table1 --batch-size 32 \
        --steps 800 --eval-every 200                                 # Table 1 on the ViT
    python benchmarks/convergence.py --backbone vit_tiny --batch-sizes 32 64 128   # grid
    python benchmarks/convergence.py --quick --output-dir /tmp/conv   # ~1-2 minutes
    python benchmarks/convergence.py --backbone vit_tiny --table   # the Table-1 markdown
    python benchmarks/convergence.py --backbone vit_tiny --progress   # a run under way
    KERAS_BACKEND=jax python benchmarks/convergence.py --seeds 0 1 2
"""

import argparse
import csv
import functools
import io
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

import diagnostics  # noqa: E402
import keras  # noqa: E402
from _common import device_description  # noqa: E402
from stats import INTERVAL_METHODS  # noqa: E402
from stats import interval  # noqa: E402
from stats import speedup  # noqa: E402
from stats import speedup_interval  # noqa: E402

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
    # Optimizer steps x examples per step (batch_size x grad_accum): runs at different
    # batch sizes are compared per image seen, not per step.
    "batch_size",
    "images_seen",
)

# The paper's in-context ViT (timestep and class as two extra tokens, learned positions,
# pre-LN blocks, no adaLN; `InContextViT` behind the
# `vit_b_2_in256` preset) cut down until the Table-1 plan (16 runs x 3 seeds) fits one
# long run on a 2-core CPU. The digits stay at their native 8x8: patch 2 gives 16 patch
# tokens (+2 condition tokens). Upsampling to 16x16 with patch 2 gives 64 tokens, which
# adds no information (the FID extractor resizes back to 8x8) but multiplies the step time
# by ~4 (see docs/results.md, "ViT step time").
VIT_TINY = {
    "description": "The Min-SNR paper's in-context ViT, 4 blocks of width 128, 4 heads, "
    "patch 2, on the native 8x8 digits (0.8 M parameters).",
    "paper_source": "Hang et al. 2023, guided_diffusion/vision_transformer.py (ViT-B/2 "
    "layout); Table 1's weighting ablation at small scale.",
    "image_size": 8,
    "backbone": "vit_b_2_in256",
    "backbone_args": {"patch_size": 2, "hidden_size": 128, "depth": 4, "num_heads": 4},
    "batch_size": 32,
    # The paper's AdamW (wd 0.03) with a short-run learning rate and warm-up, as the MLP
    # recipe does; beta_1 0.9 because 0.99 is too slow for an 800-step run.
    "learning_rate": 5e-4,
    "beta_1": 0.9,
    "beta_2": 0.99,
    "weight_decay": 0.03,
    "warmup_steps": 100,
    "ema_decay": 0.995,
}

# Per benchmark backbone: recipe overrides (on top of recipes/digits.py), output file stem,
# default plan, full and CI-sized settings.
BACKBONES = {
    "mlp_digits": {
        "recipe": {},
        "stem": "convergence",
        "plan": "targets",
        "full": {"steps": 2000, "eval_every": 250, "num_samples": 1000, "seeds": [0, 1],
                 "sample_steps": 50},
        # CI-sized: one seed, a short sampler; the numbers mean nothing, the files do.
        "quick": {"steps": 40, "eval_every": 20, "num_samples": 100, "seeds": [0],
                  "sample_steps": 10},
    },
    "vit_tiny": {
        "recipe": VIT_TINY,
        "stem": "convergence_vit",
        "output_dir": os.path.join(ROOT, "docs", "results", "vit_b128"),
        # The headline ViT comparison (docs/results.md, docs/results/vit_b128/): constant
        # vs Min-SNR-5 per target at batch 128, 4000 steps, FID every 500 steps from 300
        # DDIM-20 samples, 3 seeds, without the MLP's ε γ ablation. The batch-32 row is
        # `--batch-size 32 --steps 2000 --eval-every 400`; the 800-step Table-1 run is
        # `--plan table1 --batch-size 32 --steps 800 --eval-every 200`.
        "plan": "targets",
        "epsilon_ablation": False,
        "full": {"steps": 4000, "eval_every": 500, "num_samples": 300, "seeds": [0, 1, 2],
                 "sample_steps": 20, "batch_size": 128},
        "quick": {"steps": 4, "eval_every": 2, "num_samples": 20, "seeds": [0],
                  "sample_steps": 2},
    },
}
# Kept for callers of the MLP benchmark's settings.
FULL = {**BACKBONES["mlp_digits"]["full"], "ablation": True}
QUICK = {**BACKBONES["mlp_digits"]["quick"], "ablation": False}

PLANS = ("targets", "table1")
# The γ sweep of the Table-1 plan runs on the x₀ target: there Min-SNR-γ's weight is
# min(SNR, γ) itself, so γ is the cap on the per-step weight with nothing folded in (with ε
# it becomes min(1, γ/SNR)), and x₀ is the target of the official ViT configs
# (`pred_x0__min_snr_5`).
GAMMA_SWEEP = (1.0, 2.0, 5.0, 10.0, 20.0)
SWEEP_TARGET = "sample"


def _run(target, weighting, gamma=None):
    suffix = weighting if gamma is None else f"{weighting}_{gamma:g}"
    return (f"{target}/{suffix}", target, weighting, gamma)


def run_plan(targets=TARGETS, ablation=True, plan="targets"):
    """The runs: ``(name, target, weighting, gamma)`` tuples.

    ``"targets"`` (the MLP benchmark): for each target ``constant`` vs ``min_snr`` (γ=5);
    with `ablation`, ε with γ = 1 and 20 and ``soft_min_snr`` (γ=5).

    ``"table1"`` (the paper's Table 1 at small scale): on x₀, ``constant``, ``snr``,
    ``trunc_snr``, ``max_snr`` (γ=5), ``min_snr`` (γ=5); on ε and v, ``constant`` vs
    ``min_snr`` (γ=5); the γ sweep `GAMMA_SWEEP` on x₀; and on x₀ the later weightings
    ``soft_min_snr`` (γ=5), ``p2`` (k=1, exponent 1) and ``debiased``.
    """
    if plan not in PLANS:
        raise ValueError(f"Unknown plan {plan!r}; expected one of {PLANS}.")
    runs = []
    if plan == "targets":
        for target in targets:
            runs.append(_run(target, "constant"))
            runs.append(_run(target, "min_snr", 5.0))
        if ablation and "epsilon" in targets:
            runs.append(_run("epsilon", "min_snr", 1.0))
            runs.append(_run("epsilon", "min_snr", 20.0))
            runs.append(_run("epsilon", "soft_min_snr", 5.0))
        return runs
    for target in targets:
        runs.append(_run(target, "constant"))
        if target == SWEEP_TARGET:
            runs.append(_run(target, "snr"))
            runs.append(_run(target, "trunc_snr"))
            runs.append(_run(target, "max_snr", 5.0))
        runs.append(_run(target, "min_snr", 5.0))
        if target == SWEEP_TARGET and ablation:
            runs.extend(_run(target, "min_snr", g) for g in GAMMA_SWEEP if g != 5.0)
            runs.append(_run(target, "soft_min_snr", 5.0))
            runs.append(_run(target, "p2"))
            runs.append(_run(target, "debiased"))
    return runs


# -- runs ----------------------------------------------------------------------------------


def _config(args, target, weighting, gamma, seed, batch_size=None):
    from recipes.digits import RECIPE
    from keras_minsnr.run_config import resolve_config

    overrides = {
        "prediction_type": target,
        "weighting": weighting,
        "seed": seed,
        "steps": args.steps,
        "steps_per_epoch": args.eval_every,
    }
    if gamma is not None:
        overrides["gamma"] = gamma
    batch_size = batch_size or getattr(args, "batch_size", None)
    if batch_size:
        overrides["batch_size"] = batch_size
    if getattr(args, "grad_accum", 1) > 1:
        overrides["grad_accum"] = args.grad_accum
    recipe = {**RECIPE, **BACKBONES[args.backbone]["recipe"]}
    return resolve_config(recipe, overrides)


def run_key(seed, name, batch_size=None):
    """The file name stem of one training in the work directory."""
    batch = "" if batch_size is None else f"b{batch_size}_"
    return f"{seed}_{batch}{name.replace('/', '_')}"


def train_and_evaluate(args, name, target, weighting, gamma, seed, initial_weights, real,
                       extractor, workdir, batch_size=None):
    """One run; returns its CSV rows. With ``args.diagnose`` it also leaves each
    checkpoint's EMA weights in `workdir` (`diagnostics.SaveEMAWeights`)."""
    import keras

    from keras_minsnr.evaluation import FIDCallback
    from keras_minsnr.training import build_dataset
    from keras_minsnr.builders import build_model

    config = _config(args, target, weighting, gamma, seed, batch_size)
    keras.utils.set_random_seed(seed)
    dataset, info = build_dataset(config)
    key = run_key(seed, name, batch_size)
    path = os.path.join(workdir, key + ".csv")
    resume_prefix = os.path.join(workdir, key + "_resume")
    settings = run_settings(args)
    resumed = load_resume_point(resume_prefix, settings)
    if resumed is None:
        model = build_model(config, info)
        model.backbone.set_weights(initial_weights)
        model.reset_ema()
        initial_epoch, seconds_before = 0, 0.0
        if os.path.exists(path):  # left by a killed run; the callback appends
            os.remove(path)
    else:
        model, initial_epoch, seconds_before = resumed
        _keep_csv_rows_before(path, initial_epoch)
        print(f"{key}: resuming at step {initial_epoch * args.eval_every}", flush=True)
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
    callbacks = [callback]
    if args.diagnose:
        from diagnostics import SaveEMAWeights

        callbacks.append(SaveEMAWeights(os.path.join(workdir, key)))
    accum = max(int(config.get("grad_accum", 1)), 1)
    # fit() counts micro-batches; a checkpoint is every eval_every optimizer updates.
    steps_per_epoch = args.eval_every * accum
    start = time.perf_counter()
    callbacks.append(SaveResumePoint(resume_prefix, settings, start - seconds_before))
    model.fit(
        # A resumed run sees the batches the uninterrupted one would have seen next.
        dataset.skip(initial_epoch * steps_per_epoch),
        initial_epoch=initial_epoch,
        epochs=args.steps // args.eval_every,
        steps_per_epoch=steps_per_epoch,
        callbacks=callbacks,
        verbose=args.verbose,
    )
    elapsed = time.perf_counter() - start + seconds_before
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
                    "batch_size": config["batch_size"],
                    "images_seen": int(record["step"]) * config["batch_size"] * accum,
                }
            )
    return rows


class SaveResumePoint(keras.callbacks.Callback):
    """After each FID checkpoint, the whole training state: weights, optimizer, EMA and
    random generators in ``PREFIX_epochN.keras``, then ``PREFIX.json`` naming it. A killed
    benchmark continues a training from its last checkpoint instead of from step 0 (one
    training of the issue-26 evidence run is about half an hour of CPU)."""

    def __init__(self, prefix, settings, start):
        super().__init__()
        self.prefix, self.settings, self.start = prefix, settings, start

    def on_epoch_end(self, epoch, logs=None):
        from keras_minsnr import checkpointing

        previous = _resume_record(self.prefix)
        model_file = f"{os.path.basename(self.prefix)}_epoch{epoch + 1}.keras"
        checkpointing.atomic_save_model(
            self.model, os.path.join(os.path.dirname(self.prefix), model_file))
        checkpointing.atomic_write_json(self.prefix + ".json", {
            "settings": self.settings,
            "epoch": epoch + 1,
            "model": model_file,
            "seed_states": checkpointing.seed_states(self.model),
            "train_seconds": time.perf_counter() - self.start,
        })
        if previous and previous["model"] != model_file:
            stale = os.path.join(os.path.dirname(self.prefix), previous["model"])
            if os.path.exists(stale):
                os.remove(stale)


def _resume_record(prefix):
    if not os.path.exists(prefix + ".json"):
        return None
    with open(prefix + ".json") as f:
        return json.load(f)


def load_resume_point(prefix, settings):
    """``(model, epochs done, training seconds so far)`` of a training a killed benchmark
    left half-way under the same settings, or None."""
    record = _resume_record(prefix)
    if record is None or record.get("settings") != settings:
        return None
    from keras_minsnr.resume import load_checkpoint_file

    model_path = os.path.join(os.path.dirname(prefix), record["model"])
    if not os.path.exists(model_path):
        return None
    model = load_checkpoint_file(model_path, {"seed_states": record["seed_states"]})
    return model, int(record["epoch"]), float(record["train_seconds"])


def remove_resume_point(prefix):
    record = _resume_record(prefix)
    if record is not None:
        for path in (os.path.join(os.path.dirname(prefix), record["model"]),
                     prefix + ".json"):
            if os.path.exists(path):
                os.remove(path)


def _keep_csv_rows_before(path, epoch):
    """Drops the FID rows a killed run wrote after its last resume point."""
    if not os.path.exists(path):
        return
    from keras_minsnr import checkpointing

    with open(path) as f:
        rows = list(csv.reader(f))
    kept = io.StringIO()
    csv.writer(kept).writerows(rows[:1] + [row for row in rows[1:] if int(row[0]) < epoch])
    checkpointing.atomic_write_text(path, kept.getvalue())


def initial_backbone_weights(args, seed):
    import keras

    from keras_minsnr.training import build_dataset
    from keras_minsnr.builders import build_model

    config = _config(args, "epsilon", "constant", None, seed)
    keras.utils.set_random_seed(seed)
    _, info = build_dataset(config)
    return build_model(config, info).backbone.get_weights()


# -- summary -------------------------------------------------------------------------------


def _by_run_step(rows):
    by_run = {}
    for row in rows:
        by_run.setdefault(row["run"], {}).setdefault(row["step"], {})[row["seed"]] = row["fid"]
    return by_run


def mean_curves(rows):
    """``{run: (steps, mean_fids)}`` over seeds (only steps every seed reached)."""
    seeds = len({row["seed"] for row in rows})
    curves = {}
    for run, per_step in _by_run_step(rows).items():
        steps = sorted(s for s, v in per_step.items() if len(v) == seeds)
        curves[run] = (steps, [sum(per_step[s].values()) / seeds for s in steps])
    return curves


def fid_intervals(rows, method="t"):
    """``{run: {"steps", "mean", "low", "high", "num_seeds"}}``: the FID band over seeds."""
    seeds = len({row["seed"] for row in rows})
    result = {}
    for run, per_step in sorted(_by_run_step(rows).items()):
        steps = sorted(s for s, v in per_step.items() if len(v) == seeds)
        stats = [interval(list(per_step[s].values()), method) for s in steps]
        result[run] = {
            "steps": steps,
            "mean": [m for m, _, _ in stats],
            "low": [lo for _, lo, _ in stats],
            "high": [hi for _, _, hi in stats],
            "num_seeds": seeds,
        }
    return result


def _comparison(rows, curves, bands, base, name, method):
    value, b_steps, c_steps, fid = speedup(curves[base][0], curves[base][1], curves[name][1])
    per_seed = per_seed_speedups(rows, base, name)
    _, low, high = speedup_interval(per_seed, method)
    return {
        "baseline": base,
        "target_fid": fid,
        "baseline_steps": b_steps,
        "steps": c_steps,
        "speedup": value,
        "speedup_interval": [low, high],
        # The same measure on each seed's own curves: the spread behind the mean.
        "per_seed": per_seed,
        "final_fid": curves[name][1][-1],
        "final_fid_interval": [bands[name]["low"][-1], bands[name]["high"][-1]],
    }


def summarise(rows, runs, method="t"):
    curves = mean_curves(rows)
    bands = fid_intervals(rows, method)
    result = {"speedups": {}, "ablation": {}}
    for target in TARGETS:
        base, cand = f"{target}/constant", f"{target}/min_snr_5"
        if base not in curves or cand not in curves:
            continue
        entry = _comparison(rows, curves, bands, base, cand, method)
        result["speedups"][target] = {
            "baseline": base,
            "min_snr": cand,
            "target_fid": entry["target_fid"],
            "baseline_steps": entry["baseline_steps"],
            "min_snr_steps": entry["steps"],
            "speedup": entry["speedup"],
            "speedup_interval": entry["speedup_interval"],
            "min_snr_final_fid": entry["final_fid"],
            "min_snr_final_fid_interval": entry["final_fid_interval"],
            "baseline_final_fid_interval": [bands[base]["low"][-1], bands[base]["high"][-1]],
            "per_seed": entry["per_seed"],
        }
        # The other way round: how much sooner `constant` reached Min-SNR's final FID (the
        # informative number when Min-SNR never reaches the baseline's).
        reverse = _comparison(rows, curves, bands, cand, base, method)
        result["speedups"][target].update(
            constant_speedup=reverse["speedup"],
            constant_speedup_interval=reverse["speedup_interval"],
        )
    for name, target, _, _ in runs:
        base = f"{target}/constant"
        if name in (base, f"{target}/min_snr_5") or name not in curves or base not in curves:
            continue
        result["ablation"][name] = _comparison(rows, curves, bands, base, name, method)
    result["mean_curves"] = {
        run: {"steps": s, "fid": f} for run, (s, f) in sorted(curves.items())
    }
    result["fid_intervals"] = bands
    result["paired_differences"] = paired_differences(
        rows, paired_plan([name for name, *_ in runs if name in curves]), method)
    result["interval_method"] = INTERVAL_DESCRIPTIONS[method]
    return result


def paired_plan(names):
    """The paired comparisons of a plan's run names: each target's ``min_snr_5`` against
    its ``constant``, and on x₀ against every other x₀ weighting of the Table-1 ablation."""
    pairs = []
    for target in TARGETS:
        mine, base = f"{target}/min_snr_5", f"{target}/constant"
        if mine not in names:
            continue
        if base in names:
            pairs.append((mine, base))
        if target == SWEEP_TARGET:
            pairs.extend((mine, other) for other in names
                         if other.startswith(target + "/") and other not in (mine, base))
    return pairs


def paired_differences(rows, pairs, method="t"):
    """``{"a - b": {"steps", "mean", "low", "high", "per_seed"}}``: FID(a) − FID(b).

    A seed's runs share initial weights, batches, noise and sampling seed, so the
    difference is taken within each seed (what the seeds share cancels) and the interval
    is over the seeds' differences; negative means ``a`` has the lower (better) FID.
    """
    by_run = _by_run_step(rows)
    result = {}
    for a, b in pairs:
        if a not in by_run or b not in by_run:
            continue
        entry = {"steps": [], "mean": [], "low": [], "high": [], "per_seed": []}
        for step in sorted(set(by_run[a]) & set(by_run[b])):
            seeds = sorted(set(by_run[a][step]) & set(by_run[b][step]))
            per_seed = {str(k): by_run[a][step][k] - by_run[b][step][k] for k in seeds}
            mean, low, high = interval(list(per_seed.values()), method)
            for key, value in (("steps", step), ("mean", mean), ("low", low),
                               ("high", high), ("per_seed", per_seed)):
                entry[key].append(value)
        result[f"{a} - {b}"] = entry
    return result


def paired_markdown(summary):
    """The paired differences as markdown: one row per pair, first and last checkpoint."""
    pairs = summary.get("paired_differences") or {}
    if not pairs:
        return ""
    first = next(iter(pairs.values()))["steps"]
    lines = [
        f"| FID difference, taken seed by seed | at step {first[0]} (95% "
        f"interval) | at step {first[-1]} (95% interval) |",
        "|---|---:|---:|",
    ]
    for name, entry in pairs.items():
        a, b = name.split(" - ")
        target = _TARGET_LABELS.get(a.split("/")[0], a.split("/")[0])
        cells = [_with_interval(entry["mean"][i], [entry["low"][i], entry["high"][i]])
                 for i in (0, -1)]
        lines.append(f"| {target} `{a.split('/', 1)[1]}` − `{b.split('/', 1)[1]}` | "
                     f"{cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


INTERVAL_DESCRIPTIONS = {
    "t": "95% Student-t interval over seeds (mean ± t_{0.975,n-1}·s/sqrt(n)); for "
    "speed-ups on log(speed-up) of each seed's own curves, mapped back (centre = geometric "
    "mean); null when a seed never reached the baseline's final FID or with one seed",
    "bootstrap": "95% percentile bootstrap over seeds (10000 resamples, seed 0); for "
    "speed-ups on log(speed-up) of each seed's own curves, mapped back; null when a seed "
    "never reached the baseline's final FID or with one seed",
}


def per_seed_speedups(rows, baseline, candidate):
    """``{seed: speed-up}`` of `candidate` over `baseline`, each seed's curves alone."""
    result = {}
    for seed in sorted({row["seed"] for row in rows}):
        curves = mean_curves([row for row in rows if row["seed"] == seed])
        if baseline in curves and candidate in curves:
            steps, base_fids = curves[baseline]
            result[str(seed)] = speedup(steps, base_fids, curves[candidate][1])[0]
    return result


def progress_markdown(args):
    """A run under way, from its work directory's records (a multi-session run can be
    read between sessions): each seed's finished ``min_snr_5``/``constant`` pairs with
    their FID at a quarter, half and all of the steps and that seed's speed-up, then the
    trainings still to run. Records of other settings do not count."""
    if args.batch_sizes:
        raise SystemExit("--progress reads the runs of one batch size; drop --batch-sizes "
                         "(the grid's cells are in its own work directory's records).")
    runs = run_plan(args.targets, ablation=args.ablation, plan=args.plan)
    workdir = os.path.join(args.output_dir, f"{args.stem}_runs")
    settings = run_settings(args)
    rows, todo = [], []
    for seed in args.seeds:
        for name, *_ in runs:
            found = load_finished_run(os.path.join(workdir, run_key(seed, name) + ".json"),
                                      settings)
            if found is None:
                todo.append(f"seed {seed} {name}")
            else:
                rows.extend(found)
    checkpoints = list(range(args.eval_every, args.steps + 1, args.eval_every))
    shown = [c for c in checkpoints if c in {args.steps // 4, args.steps // 2, args.steps}]
    lines = [f"{len(runs) * len(args.seeds) - len(todo)} of {len(runs) * len(args.seeds)} "
             f"trainings finished ({args.steps} steps, batch {settings['batch_size']}); "
             f"FID at steps {' / '.join(map(str, shown))}:", "",
             "| seed | pair | baseline | Min-SNR-5 | speed-up (this seed) |",
             "|---|---|---|---|---|"]
    names = [name for name, *_ in runs]
    for seed in args.seeds:
        mine = [row for row in rows if row["seed"] == seed]
        for candidate, baseline in paired_plan(names):
            fids = {run: {row["step"]: row["fid"] for row in mine if row["run"] == run}
                    for run in (baseline, candidate)}
            if not all(fids.values()):
                continue
            ratio = per_seed_speedups(mine, baseline, candidate)[str(seed)]
            lines.append(
                f"| {seed} | {candidate} vs {baseline.split('/', 1)[1]} | "
                + " | ".join(" / ".join(f"{fids[run][c]:.2f}" for c in shown)
                             for run in (baseline, candidate))
                + f" | {'never reaches it' if ratio is None else f'{ratio:.2f}x'} |")
    if todo:
        lines += ["", "To run: " + ", ".join(todo) + "."]
    if args.diagnose:
        summary = diagnostics.run_diagnostics(args, runs, [None], checkpoints, workdir, None,
                                              None, None, measure=False)
        if summary["x0_error"] or summary["split_fid"]:
            seeds = sorted({seed for entry in summary["split_fid"].get("", {}).values()
                            for cells in entry.values() for cell in cells.values()
                            for seed in cell["per_seed"]})
            lines += ["", f"Diagnostics recorded so far (split sampler: seeds "
                      f"{', '.join(seeds) or 'none'}):", "",
                      diagnostics.diagnostics_markdown(summary)]
    return "\n".join(lines) + "\n"


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
            # CSVs written before these columns existed have neither.
            for key in ("batch_size", "images_seen"):
                if row.get(key):
                    row[key] = int(row[key])
                else:
                    row.pop(key, None)
            row["gamma"] = float(row["gamma"]) if row["gamma"] else ""
            rows.append(row)
    return rows


def plot_panels(runs):
    """Panel title → run names: one panel per target, the γ sweep apart."""
    panels = {}
    for name in runs:
        target, label = name.split("/", 1)
        sweep = label.startswith("min_snr_") and label != "min_snr_5"
        key = f"{target}: γ sweep" if sweep else f"target: {target}"
        panels.setdefault(key, [])
        if sweep and not panels[key]:
            panels[key] += [n for n in (f"{target}/constant", f"{target}/min_snr_5")
                            if n in runs]
        panels[key].append(name)
    return panels


def images_per_step(rows):
    """``{run: examples per optimizer step}`` from the rows' ``images_seen`` (empty for
    rows written before that column existed)."""
    result = {}
    for row in rows:
        if row.get("images_seen") and row["step"]:
            result[row["run"]] = row["images_seen"] // row["step"]
    return result if len(result) == len({row["run"] for row in rows}) else {}


def plot_batch_grid(rows, path, title):
    """The batch grid: FID of each seed-mean curve against images seen, one line per
    weighting and batch size (same colour per batch size, dashed for ``constant``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = sorted({row["batch_size"] for row in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, size in enumerate(sizes):
        for run, (steps, fids) in mean_curves([r for r in rows
                                               if r["batch_size"] == size]).items():
            label = run.split("/", 1)[1]
            ax.plot([s * images_per_step([r for r in rows if r["batch_size"] == size])
                     .get(run, size) for s in steps], fids,
                    "--" if label == "constant" else "-", marker="o", markersize=3,
                    color=colors[i % len(colors)], label=f"{label}, batch {size}")
    ax.set_xlabel("images seen (steps x batch)")
    ax.set_ylabel("FID (digits features)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    seeds = len({row["seed"] for row in rows})
    ax.set_title(f"{title}: batch x weighting ({seeds} seed{'s' * (seeds > 1)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(rows, path, title="Digits, mlp_digits", method="t"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bands = fid_intervals(rows, method)
    panels = plot_panels(list(dict.fromkeys(row["run"] for row in rows)))
    per_step = images_per_step(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (panel, names) in zip(axes[0], panels.items()):
        for name in names:
            band = bands[name]
            label = name.split("/", 1)[1]
            style = "--" if label == "constant" else "-"
            x = [s * per_step.get(name, 1) for s in band["steps"]]
            (line,) = ax.plot(x, band["mean"], style, marker="o", markersize=3, label=label)
            if all(v is not None for v in band["low"] + band["high"]):
                ax.fill_between(x, [max(v, 1e-3) for v in band["low"]],
                                band["high"], color=line.get_color(), alpha=0.15,
                                linewidth=0)
        ax.set_title(panel)
        ax.set_xlabel("images seen (steps x batch)" if per_step else "training steps")
        ax.set_ylabel("FID (digits features)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    seeds = len({row["seed"] for row in rows})
    what = "mean and 95% interval" if seeds > 1 else "one seed"
    x_name = "images seen" if per_step else "steps"
    fig.suptitle(f"{title}: FID vs {x_name} ({what} over {seeds} seed{'s' * (seeds > 1)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the Table-1 analogue ------------------------------------------------------------------

# What the paper states that this table is compared with. The FIDs of the paper's Table 1
# (its loss-weighting ablation) are left as None: they could not be read from the paper in
# the offline session that wrote this file, and a number typed from memory is worse than
# none. Fill `table1_fid` from the PDF (arXiv 2303.09556v3, Table 1) with the run names
# below as keys; `table1_markdown` then prints them next to ours.
PAPER = {
    "source": "Hang et al., \"Efficient Diffusion Training via Min-SNR Weighting Strategy\", "
    "ICCV 2023, arXiv 2303.09556",
    "speedup": 3.4,
    "speedup_source": "abstract: \"3.4x faster than previous weighting strategies\"",
    "table1_source": "Table 1 (loss-weighting ablation)",
    "table1_fid": {
        "sample/constant": None,
        "sample/snr": None,
        "sample/trunc_snr": None,
        "sample/max_snr_5": None,
        "sample/min_snr_5": None,
    },
}

_TARGET_LABELS = {"sample": "x₀", "epsilon": "ε", "v_prediction": "v"}


def _fmt(value, digits=2, suffix=""):
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def _with_interval(value, bounds, digits=2, suffix=""):
    text = _fmt(value, digits, suffix)
    if value is None or bounds is None or None in bounds:
        return text
    return f"{text} [{_fmt(bounds[0], digits)}, {_fmt(bounds[1], digits)}]"


def table1_markdown(summary, paper=PAPER):
    """The Table-1 analogue as markdown, from a convergence summary (the JSON's dict).

    One row per run, in plan order: final FID (seed mean and 95% interval), the speed-up
    over the same target's ``constant`` run with its interval (for a Min-SNR-5 run that
    never reaches it, how much faster ``constant`` was), and the paper's Table-1 FID
    where `paper` has one. A closing line quotes the paper's speed-up claim.
    """
    bands = summary["fid_intervals"]
    comparisons = dict(summary.get("ablation", {}))
    for target, entry in summary.get("speedups", {}).items():
        comparisons[entry["min_snr"]] = {
            "speedup": entry["speedup"],
            "speedup_interval": entry["speedup_interval"],
            "per_seed": entry.get("per_seed", {}),
            "constant_speedup": entry.get("constant_speedup"),
            "constant_speedup_interval": entry.get("constant_speedup_interval"),
        }
    names = summary.get("runs") or sorted(bands)
    seeds = len(summary.get("seeds", [])) or bands[names[0]]["num_seeds"]
    last = summary["checkpoints"][-1] if summary.get("checkpoints") else None
    lines = [
        f"| target | weighting | final FID at step {last} (95% interval) | speed-up vs "
        f"`constant` (95% interval) | paper, {paper['table1_source']} |",
        "|---|---|---:|---:|---:|",
    ]
    for name in names:
        if name not in bands:
            continue
        target, label = name.split("/", 1)
        band = bands[name]
        fid = _with_interval(band["mean"][-1], [band["low"][-1], band["high"][-1]])
        if label == "constant":
            speed = "1 (baseline)"
        elif name in comparisons:
            entry = comparisons[name]
            speed = _with_interval(entry["speedup"], entry["speedup_interval"], suffix="x")
            per_seed = entry.get("per_seed") or {}
            missed = sum(v is None for v in per_seed.values())
            if entry["speedup"] is None:
                speed = "never reached"
                if entry.get("constant_speedup") is not None:
                    faster = _with_interval(entry["constant_speedup"],
                                            entry.get("constant_speedup_interval"), suffix="x")
                    speed += f"; reverse {faster}"
            elif missed:
                speed += f" (no interval: {missed} of {len(per_seed)} seeds never reached)"
        else:
            speed = "—"
        theirs = paper["table1_fid"].get(name)
        theirs = "not transcribed" if name in paper["table1_fid"] and theirs is None else (
            _fmt(theirs) if theirs is not None else "—")
        lines.append(f"| {_TARGET_LABELS.get(target, target)} | `{label}` | {fid} | {speed} "
                     f"| {theirs} |")
    lines.append("")
    lines.append(
        f"{seeds} seeds; intervals: {summary.get('interval_method', 'see the JSON')}. "
        "\"Reverse\": when Min-SNR-5 never reaches `constant`'s final FID, the speed-up of "
        "`constant` over Min-SNR-5 (the steps Min-SNR-5 took to its own final FID over "
        "those `constant` needed to reach it). "
        f"The paper's claim to compare with: {paper['speedup']}x faster convergence "
        f"({paper['speedup_source']}; {paper['source']})."
    )
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="mlp_digits", choices=sorted(BACKBONES),
                        help="mlp_digits (the default plan, ~1 h) or vit_tiny (the paper's "
                        "in-context ViT: constant vs Min-SNR-5 per target at batch 128, "
                        "4000 steps, 3 seeds, ~2.5 h on 2 CPU cores)")
    parser.add_argument("--plan", choices=PLANS,
                        help="'targets' (constant vs Min-SNR-5 per target, ε ablation) or "
                        "'table1' (the paper's Table 1 at small scale); default: targets")
    parser.add_argument("--quick", action="store_true", help="tiny CI-sized run (~1-2 min)")
    parser.add_argument("--steps", type=int, help="training steps per run")
    parser.add_argument("--eval-every", type=int, help="FID checkpoint period in steps")
    parser.add_argument("--num-samples", type=int, help="samples per FID")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds")
    parser.add_argument("--targets", nargs="+", choices=TARGETS,
                        help="default: all three (x₀ only with --batch-sizes)")
    parser.add_argument("--batch-size", type=int,
                        help="examples per micro-batch (default 128: mlp_digits' recipe; "
                        "vit_tiny's headline run, whose recipe has 32)")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="micro-batches per optimizer step (effective batch = "
                        "batch size x grad-accum; steps count optimizer steps)")
    parser.add_argument("--batch-sizes", type=int, nargs="+",
                        help="the batch x weighting grid: constant vs Min-SNR-5 on x₀ at "
                        "each batch size (one seed unless --seeds), into STEM_batch_grid.*")
    parser.add_argument("--reuse", metavar="SUMMARY_JSON",
                        help="--batch-sizes: take the cells at that run's batch size from "
                        "its summary JSON and the CSV beside it instead of training them")
    parser.add_argument("--diagnose", action="store_true",
                        help="per-noise-level diagnostics of every checkpoint's EMA model: "
                        "x₀ error at t = 10 … 990 and the split-sampler FID matrix "
                        "(STEM_diagnostics.json/.md/.png)")
    parser.add_argument("--t-split", type=int, default=500,
                        help="--diagnose: the noisy-steps model samples t >= T_SPLIT "
                        "(default 500)")
    parser.add_argument("--no-ablation", action="store_true",
                        help="skip the γ ablation and the other weightings")
    parser.add_argument("--sample-steps", type=int, help="DDIM steps")
    parser.add_argument("--sample-seed", type=int, default=1234)
    parser.add_argument("--num-real", type=int, default=1797,
                        help="real digits to compare with (all 1797 by default)")
    parser.add_argument("--interval", default="t", choices=INTERVAL_METHODS,
                        help="95%% intervals over seeds: Student-t (default) or percentile "
                        "bootstrap")
    parser.add_argument("--output-dir",
                        help="default: docs/results (mlp_digits), docs/results/vit_b128 "
                        "(vit_tiny)")
    parser.add_argument("--verbose", type=int, default=None,
                        help="fit verbosity (default 2, quick 0)")
    parser.add_argument("--table", action="store_true",
                        help="train nothing: print the Table-1 analogue (markdown) from "
                        "the summary JSON in --output-dir")
    parser.add_argument("--progress", action="store_true",
                        help="train nothing: the finished pairs and per-seed speed-ups of a "
                        "run under way, from the records in --output-dir's work directory "
                        "(the same settings as the run)")
    parser.add_argument("--from-csv", action="store_true",
                        help="train nothing: recompute the summary JSON and the plot from "
                        "the CSV (and the settings in the JSON) in --output-dir, and the "
                        "diagnostics from the per-seed values in STEM_diagnostics.json when "
                        "it is there")
    args = parser.parse_args(argv)
    spec = BACKBONES[args.backbone]
    args.stem = spec["stem"]
    if args.output_dir is None:
        args.output_dir = spec.get("output_dir", os.path.join(ROOT, "docs", "results"))
    if args.plan is None:
        args.plan = spec["plan"]
    defaults = spec["quick"] if args.quick else spec["full"]
    if args.batch_sizes:
        if args.batch_size is not None:
            parser.error("give --batch-size or --batch-sizes, not both.")
        args.stem += "_batch_grid"
        args.plan = "targets"
        args.no_ablation = True
        if args.targets is None:
            args.targets = [SWEEP_TARGET]
        if args.seeds is None:
            args.seeds = [0]  # one seed first; --seeds 0 1 2 where it decides something
    if args.reuse and not args.batch_sizes:
        parser.error("--reuse takes cells of a batch grid: give --batch-sizes too.")
    if args.targets is None:
        args.targets = list(TARGETS)
    for flag, values in (("--batch-size", [args.batch_size]),
                         ("--batch-sizes", args.batch_sizes or []),
                         ("--grad-accum", [args.grad_accum])):
        bad = [v for v in values if v is not None and v < 1]
        if bad:
            parser.error(f"{flag} must be >= 1, got {bad[0]}.")
    if not 0 <= args.t_split <= 1000:
        parser.error(f"--t-split must be an integer in [0, 1000] (the recipes' T), got "
                     f"{args.t_split}.")
    if args.batch_size is None and not args.batch_sizes:
        args.batch_size = defaults.get("batch_size")
    # The table1 plan's γ sweep and later weightings are part of it; the targets plan's ε
    # ablation belongs to the MLP benchmark.
    args.ablation = not args.quick and not args.no_ablation and (
        args.plan == "table1" or spec.get("epsilon_ablation", True))
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
        return resummarise(args.output_dir, args.stem, args.interval)
    if args.table:
        with open(os.path.join(args.output_dir, args.stem + ".json")) as f:
            summary = json.load(f)
        print(table1_markdown(summary), end="")
        if summary.get("paired_differences"):
            print("\n" + paired_markdown(summary), end="")
        return 0
    if args.progress:
        print(progress_markdown(args), end="")
        return 0
    import keras

    from keras_minsnr.evaluation import real_images_for
    from keras_minsnr.metrics import get_feature_extractor

    runs = run_plan(args.targets, ablation=args.ablation, plan=args.plan)
    batch_sizes = args.batch_sizes or [None]
    probe = _config(args, "epsilon", "constant", None, args.seeds[0])
    checkpoints = list(range(args.eval_every, args.steps + 1, args.eval_every))
    total = len(runs) * len(args.seeds) * len(batch_sizes)
    batch = (f"batch sizes {args.batch_sizes}" if args.batch_sizes else
             f"batch {probe['batch_size']}")
    if args.grad_accum > 1:
        batch += f" x grad-accum {args.grad_accum}"
    print(
        f"Plan ({keras.backend.backend()}): {len(runs)} runs x {len(args.seeds)} seeds"
        f"{f' x {len(batch_sizes)} batch sizes' if args.batch_sizes else ''} = "
        f"{total} trainings of {args.steps} steps ({batch}, "
        f"{args.backbone}: {probe['backbone']} {probe['backbone_args']}, "
        f"{probe['image_size']}x{probe['image_size']}), FID from "
        f"{args.num_samples} DDIM-{args.sample_steps} samples at steps {checkpoints}.\n"
        f"Runs: {', '.join(name for name, *_ in runs)}",
        flush=True,
    )
    os.makedirs(args.output_dir, exist_ok=True)
    extractor = get_feature_extractor("digits")
    real = real_images_for({"data": "digits", "image_size": probe["image_size"]},
                           args.num_real)
    rows = []
    bar = keras.utils.Progbar(total, unit_name="run")
    start = time.perf_counter()
    # Finished runs are kept in WORKDIR until the end, so a killed benchmark resumes
    # where it stopped instead of starting the hour again.
    workdir = os.path.join(args.output_dir, f"{args.stem}_runs")
    os.makedirs(workdir, exist_ok=True)
    settings = run_settings(args)
    reused = reused_cells(args, runs, probe, checkpoints) if args.reuse else {}
    last_of_target = {target: name for name, target, *_ in runs}
    build_model_for = functools.partial(_model_for, args)
    done = 0
    for batch_size in batch_sizes:
        for seed in args.seeds:
            initial = None
            for name, target, weighting, gamma in runs:
                key = run_key(seed, name, batch_size)
                record = os.path.join(workdir, key + ".json")
                run_rows = load_finished_run(record, settings)
                resumed = " (finished earlier, reused)"
                if run_rows is None and (batch_size, seed, name) in reused:
                    run_rows = reused[batch_size, seed, name]
                    save_finished_run(record, settings, run_rows)
                    resumed = f" (from {args.reuse})"
                if run_rows is not None and args.diagnose and not all(
                        os.path.exists(diagnostics.checkpoint_path(
                            os.path.join(workdir, key), step)) for step in checkpoints
                ) and not diagnostics.diagnosed(args, runs, name, seed, batch_size,
                                                checkpoints, workdir):
                    run_rows = None  # its diagnostics still need the EMA checkpoints
                if run_rows is None:
                    if initial is None:
                        initial = initial_backbone_weights(args, seed)
                    run_rows = train_and_evaluate(args, name, target, weighting, gamma, seed,
                                                  initial, real, extractor, workdir,
                                                  batch_size)
                    save_finished_run(record, settings, run_rows)
                    remove_resume_point(os.path.join(workdir, key + "_resume"))
                    resumed = ""
                rows.extend(run_rows)
                done += 1
                last = rows[-1]
                where = "" if batch_size is None else f"batch {batch_size} "
                print(f"\n[{done}/{total}] {where}seed {seed} {name}: FID {last['fid']:.3f} "
                      f"at step {last['step']}{resumed} ({time.perf_counter() - start:.0f} s "
                      "so far)", flush=True)
                bar.update(done)
                if args.diagnose and name == last_of_target[target]:
                    # Now, not after every run: a session that ends later keeps these.
                    diagnostics.run_diagnostics(
                        args, [r for r in runs if r[1] == target], [batch_size],
                        checkpoints, workdir, real, extractor, build_model_for,
                        seeds=[seed])
    write_outputs(args, runs, rows, checkpoints, time.perf_counter() - start)
    if args.diagnose:
        summary = diagnostics.run_diagnostics(
            args, runs, batch_sizes, checkpoints, workdir, real, extractor, build_model_for)
        diagnostics.write_diagnostics(summary, os.path.join(args.output_dir, args.stem))
        print(f"wrote {args.stem}_diagnostics.json/.md/.png")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _model_for(args, name, seed, batch_size):
    """A run's `DiffusionModel` (untrained) for the diagnostics to load weights into."""
    from keras_minsnr.builders import build_model
    from keras_minsnr.training import build_dataset

    _, target, weighting, gamma = next(r for r in run_plan(
        args.targets, ablation=args.ablation, plan=args.plan) if r[0] == name)
    config = _config(args, target, weighting, gamma, seed, batch_size)
    _, info = build_dataset(config)
    return build_model(config, info)


def sampler_description(args):
    """The summary's ``sampler`` entry: how every FID's samples were drawn."""
    return (f"ddim-{args.sample_steps}, guidance 1.0, EMA weights, "
            f"seed {args.sample_seed}")


def reused_cells(args, runs, probe, checkpoints):
    """``{(batch_size, seed, run): rows}`` of the grid cells a finished run trained already.

    The run is named by its summary JSON (``--reuse``); its rows come from the CSV beside
    it. It must match the grid in every setting but the batch size, hold every
    checkpoint of each cell it gives, and its batch size must be one the grid asks for.
    """
    import keras

    path = args.reuse
    csv_path = path[:-len(".json")] + ".csv" if path.endswith(".json") else None
    if csv_path is None or not (os.path.exists(path) and os.path.exists(csv_path)):
        raise SystemExit(f"--reuse {path}: expected a finished run's summary JSON with its "
                         "CSV beside it (STEM.json and STEM.csv).")
    with open(path) as f:
        summary = json.load(f)
    if summary.get("batch_sizes"):
        raise SystemExit(f"--reuse {path} is a batch grid itself; give a run at one batch "
                         "size.")
    # What the reused run must share with the grid; the batch size and the runs aside.
    ours = {"backbone": args.backbone, "steps": args.steps, "checkpoints": checkpoints,
            "num_samples": args.num_samples, "num_real": args.num_real,
            "sampler": sampler_description(args), "backend": keras.backend.backend(),
            "extractor": "digits"}
    for key in ours:
        if summary.get(key) != ours[key]:
            raise SystemExit(f"--reuse {path}: its {key} is {summary.get(key)!r}, this grid's "
                             f"is {ours[key]!r}; only the batch size may differ.")
    theirs = dict(summary["backbone_config"])
    batch = theirs.pop("batch_size")
    mine = {k: v for k, v in probe.items() if k in theirs}
    mine = json.loads(json.dumps(mine))  # tuples as lists, as the JSON has them
    if mine != theirs:
        differ = sorted(k for k in theirs if theirs[k] != mine.get(k))
        raise SystemExit(f"--reuse {path}: its backbone_config differs in {differ} "
                         f"({[theirs[k] for k in differ]} vs {[mine.get(k) for k in differ]}).")
    if batch not in args.batch_sizes:
        raise SystemExit(f"--reuse {path}: its batch size {batch} is not in --batch-sizes "
                         f"{args.batch_sizes}.")
    rows = read_rows(csv_path)
    cells = {}
    for seed in args.seeds:
        for name, *_ in runs:
            cell = [r for r in rows if r["seed"] == seed and r["run"] == name]
            if [r["step"] for r in cell] == checkpoints:
                cells[batch, seed, name] = [
                    {**r, "batch_size": batch, "images_seen": r["step"] * batch
                     * args.grad_accum} for r in cell]
    return cells


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
        "backbone": args.backbone,
        # A changed VIT_TINY must not reuse runs trained with the old one.
        "recipe": BACKBONES[args.backbone]["recipe"],
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
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


def _title(backbone):
    return f"Digits, {backbone}"


def write_outputs(args, runs, rows, checkpoints, seconds):
    import keras

    stem = os.path.join(args.output_dir, args.stem)
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if args.batch_sizes:
        summary = {"batch_grid": {
            str(size): summarise([r for r in rows if r["batch_size"] == size], runs,
                                 args.interval)
            for size in args.batch_sizes
        }}
        plot_batch_grid(rows, stem + ".png", _title(args.backbone))
    else:
        plot(rows, stem + ".png", _title(args.backbone), args.interval)
        summary = summarise(rows, runs, args.interval)
    config = _config(args, "epsilon", "constant", None, args.seeds[0])
    # Images seen = optimizer steps x examples per step; per run, or per batch size.
    per_step = ({str(size): size * args.grad_accum for size in args.batch_sizes}
                if args.batch_sizes else images_per_step(rows))
    summary["images_per_step"] = per_step
    summary["images_seen_at_checkpoints"] = {
        key: [step * value for step in checkpoints] for key, value in per_step.items()}
    summary.update(
        {
            "quick": bool(args.quick),
            "backbone": args.backbone,
            "backbone_config": {
                key: config[key]
                for key in ("backbone", "backbone_args", "image_size", "batch_size",
                            "learning_rate", "beta_1", "beta_2", "weight_decay",
                            "warmup_steps", "ema_decay", "schedule", "grad_accum")
                if key in config
            },
            "batch_sizes": args.batch_sizes,
            "plan": args.plan,
            "runs": [name for name, *_ in runs],
            "backend": keras.backend.backend(),
            "device": device_description(keras.backend.backend()),
            "cpu_count": os.cpu_count(),
            "seeds": list(args.seeds),
            "steps": args.steps,
            "checkpoints": checkpoints,
            "num_samples": args.num_samples,
            "num_real": args.num_real,
            "sampler": sampler_description(args),
            "extractor": "digits",
            "interval": args.interval,
            "speedup_method": "seed-mean FID curves on the checkpoint grid, linear "
            "interpolation at the first crossing of the baseline's final FID; a curve "
            "already below it at the first checkpoint is credited with that checkpoint "
            "(lower bound); null when Min-SNR never reaches it",
            "wall_seconds": round(seconds, 1),
        }
    )
    with open(stem + ".json", "w") as f:
        json.dump(_finite_or_null(summary), f, indent=2)
    groups = summary["batch_grid"] if args.batch_sizes else {"": summary}
    for group, part in groups.items():
        for target, entry in part["speedups"].items():
            value = entry["speedup"]
            speed = "never reached (null)" if value is None else f"{value:.2f}x"
            print(f"{f'batch {group} ' if group else ''}{target}: speed-up {speed}"
                  f" (baseline final FID {entry['target_fid']:.3f})")


def resummarise(output_dir, stem="convergence", method=None):
    """Rewrites the summary and plot from a finished run's CSV (after a change to them)."""
    summary_path = os.path.join(output_dir, stem + ".json")
    csv_path = os.path.join(output_dir, stem + ".csv")
    for path in (csv_path, summary_path):
        if not os.path.exists(path):
            raise SystemExit(f"--from-csv needs {path} from an earlier run.")
    with open(summary_path) as f:
        previous = json.load(f)
    method = method or previous.get("interval", "t")
    rows = read_rows(csv_path)
    runs = [(name, name.split("/", 1)[0], None, None)
            for name in dict.fromkeys(row["run"] for row in rows)]
    title = _title(previous.get("backbone", "mlp_digits"))
    if previous.get("batch_sizes"):  # a batch grid: one summary per batch size
        fresh = {"batch_grid": {
            str(size): summarise([r for r in rows if r.get("batch_size") == size], runs,
                                 method)
            for size in previous["batch_sizes"]
        }}
        plot_batch_grid(rows, os.path.join(output_dir, stem + ".png"), title)
    else:
        fresh = summarise(rows, runs, method)
        plot(rows, os.path.join(output_dir, stem + ".png"), title, method)
    summary = {**previous, **fresh, "interval": method}
    with open(summary_path, "w") as f:
        json.dump(_finite_or_null(summary), f, indent=2)
    print(f"rewrote {summary_path} and {stem}.png from {csv_path}")
    diagnostics_path = os.path.join(output_dir, stem + "_diagnostics.json")
    if os.path.exists(diagnostics_path):
        with open(diagnostics_path) as f:
            previous = json.load(f)
        diagnostics.write_diagnostics(diagnostics.summarise_diagnostics(
            diagnostics.per_seed_values(previous), previous["settings"]),
            os.path.join(output_dir, stem))
        print(f"rewrote {stem}_diagnostics.json/.md/.png from its per-seed values")
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
