"""Rectified flow vs DDPM ε on the digits: weightings and timestep densities.

Every run trains the digits recipe's backbone (class-conditional `mlp_digits`, AdamW 1e-3
with 100 warm-up steps, batch 128, EMA 0.999, label dropout 0.15) for the same step budget,
built directly as a `DiffusionModel`; the runs differ only in schedule, target, weighting
and timestep density:

* ``flow/constant``            rectified flow, velocity target, the plain flow-matching loss
* ``flow/min_snr5``            … with Min-SNR-5 in velocity space, ``min((1 − t)², 5t²)``
* ``flow/logit_normal``        … constant weight, SD3's logit-normal(0, 1) density
* ``flow/logit_normal+min_snr5``
* ``eps/uniform``              cosine schedule, ε target, constant weight, uniform steps
* ``eps/laplace``              … Laplace(0, 0.5) density in log SNR (Hang et al. 2024)

For a given seed every run starts from the same backbone weights and sees the same
batches. FID (offline digits extractor) of class-balanced samples at guidance 1, EMA
weights: flow runs with the Euler sampler, ε runs with DDIM, both ``--sample-steps``
steps, fixed sampling seed. FID is computed by `keras_minsnr.evaluation.FIDCallback`
exactly as in `benchmarks/convergence.py`, whose data and initial-weight helpers are
imported from there.

Outputs (``--output-dir``, default ``docs/results``)::

    flow_comparison.json   settings, per-run FIDs, per-config mean ± spread, timings, load
    flow_comparison.png    FID vs steps, mean over seeds
    flow_samples.png       one row of samples per config (seed 0; two per digit)

Usage::

    python benchmarks/flow_comparison.py                  # ~15 min on a quiet 2-core CPU
    python benchmarks/flow_comparison.py --steps 40 --eval-every 20 --num-samples 100 \\
        --seeds 0 --output-dir /tmp/flow                  # a smoke run, ~2 min
"""

import argparse
import csv
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from _common import device_description  # noqa: E402

# name -> (schedule, prediction_type, weighting, timestep_sampling)
CONFIGS = {
    "flow/constant": ("flow", "flow", "constant", "uniform"),
    "flow/min_snr5": ("flow", "flow", "min_snr", "uniform"),
    "flow/logit_normal": ("flow", "flow", "constant", "logit_normal"),
    "flow/logit_normal+min_snr5": ("flow", "flow", "min_snr", "logit_normal"),
    "eps/uniform": ("cosine", "epsilon", "constant", "uniform"),
    "eps/laplace": ("cosine", "epsilon", "constant", "laplace"),
}
GAMMA = 5.0


def build_model(schedule, prediction_type, weighting, density, seed, initial_weights, info):
    """The recipe's backbone and optimizer around the given objective."""
    import keras

    import keras_minsnr as kms
    from recipes.digits import RECIPE

    backbone = kms.backbones.get(
        RECIPE["backbone"], image_shape=tuple(info.image_shape), num_classes=info.num_classes
    )
    model = kms.DiffusionModel(
        backbone,
        kms.FlowMatchingSchedule(1000) if schedule == "flow" else kms.NoiseSchedule(schedule),
        prediction_type=prediction_type,
        weighting=weighting,
        gamma=GAMMA,
        timestep_sampling=density,
        label_dropout=RECIPE["label_dropout"],
        ema_decay=RECIPE["ema_decay"],
        seed=seed,
    )
    model.backbone.set_weights(initial_weights)
    model.reset_ema()
    learning_rate = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=1, alpha=1.0, warmup_target=RECIPE["learning_rate"],
        warmup_steps=RECIPE["warmup_steps"],
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(
            learning_rate, beta_1=RECIPE["beta_1"], beta_2=RECIPE["beta_2"],
            weight_decay=RECIPE["weight_decay"],
        )
    )
    return model


def train_and_evaluate(args, name, seed, initial_weights, real, extractor, workdir):
    import keras

    from convergence import _config
    from keras_minsnr.evaluation import FIDCallback
    from keras_minsnr.training import build_dataset

    schedule, prediction_type, weighting, density = CONFIGS[name]
    keras.utils.set_random_seed(seed)
    dataset, info = build_dataset(_config(args, "epsilon", "constant", None, seed))
    model = build_model(schedule, prediction_type, weighting, density, seed, initial_weights,
                        info)
    path = os.path.join(workdir, f"{seed}_{name.replace('/', '_')}.csv")
    if os.path.exists(path):
        os.remove(path)
    sampler = "euler" if model.is_flow else "ddim"
    callback = FIDCallback(real, path, num_samples=args.num_samples, extractor=extractor,
                           every_epochs=1, sampler=sampler, num_steps=args.sample_steps,
                           guidance_scale=1.0, clip_denoised=True, seed=args.sample_seed)
    start = time.perf_counter()
    model.fit(dataset, epochs=args.steps // args.eval_every, steps_per_epoch=args.eval_every,
              callbacks=[callback], verbose=0)
    elapsed = time.perf_counter() - start
    with open(path) as f:
        rows = [{"seed": seed, "run": name, "step": int(r["step"]), "fid": float(r["fid"]),
                 "seconds": round(elapsed, 1)} for r in csv.DictReader(f)]
    return rows, model


def summarise(rows):
    import numpy as np

    summary = {}
    for name in [n for n in CONFIGS if any(r["run"] == n for r in rows)]:
        runs = [r for r in rows if r["run"] == name]
        steps = sorted({r["step"] for r in runs})
        curve = [float(np.mean([r["fid"] for r in runs if r["step"] == s])) for s in steps]
        final = [r["fid"] for r in runs if r["step"] == steps[-1]]
        summary[name] = {
            "steps": steps,
            "mean_fid": [round(v, 3) for v in curve],
            "final_fid_per_seed": [round(v, 3) for v in final],
            "final_fid_mean": round(float(np.mean(final)), 3),
            "final_fid_half_range": round(float(np.ptp(final)) / 2, 3),
        }
    return summary


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, s in summary.items():
        style = "-" if name.startswith("flow") else "--"
        ax.plot(s["steps"], s["mean_fid"], style, marker="o", label=name)
    ax.set_xlabel("training steps")
    ax.set_ylabel("FID (digits extractor, lower is better)")
    ax.set_yscale("log")
    ax.set_title("Digits: flow vs ε, weightings and timestep densities (mean of seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_samples(models, args, path):
    """One row per config: two samples of each digit, guidance 1, the FID's sampler."""
    import numpy as np

    from keras_minsnr.visualization import image_grid

    labels = np.repeat(np.arange(10), 2)
    rows = []
    for model in models.values():
        sampler = "euler" if model.is_flow else "ddim"
        rows.append(model.generate(labels=labels, num_steps=args.sample_steps, sampler=sampler,
                                   seed=args.sample_seed))
    grid = image_grid(np.concatenate(rows), columns=len(labels))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.55 * len(models) + 0.6))
    ax.imshow(grid, cmap="gray", interpolation="nearest")
    ax.set_yticks([(i + 0.5) * grid.shape[0] / len(models) for i in range(len(models))])
    ax.set_yticklabels(list(models), fontsize=8)
    ax.set_xticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--eval-every", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--sample-seed", type=int, default=1234)
    parser.add_argument("--num-real", type=int, default=1797)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "docs", "results"))
    args = parser.parse_args(argv)
    if args.steps % args.eval_every:
        parser.error("--steps must be a multiple of --eval-every.")
    args.backbone = "mlp_digits"  # convergence._config's backbone entry: the digits recipe
    return args


def main(argv=None):
    args = parse_args(argv)
    import keras

    from convergence import initial_backbone_weights
    from keras_minsnr.evaluation import real_images_for
    from keras_minsnr.metrics import get_feature_extractor

    os.makedirs(args.output_dir, exist_ok=True)
    workdir = os.path.join(args.output_dir, "flow_comparison_runs")
    os.makedirs(workdir, exist_ok=True)
    extractor = get_feature_extractor("digits")
    real = real_images_for({"data": "digits"}, args.num_real)
    rows, loads, models = [], [os.getloadavg()[0]], {}
    start = time.perf_counter()
    for seed in args.seeds:
        initial = initial_backbone_weights(args, seed)
        for name in args.configs:
            run_rows, model = train_and_evaluate(args, name, seed, initial, real, extractor,
                                                 workdir)
            rows.extend(run_rows)
            loads.append(os.getloadavg()[0])
            if seed == args.seeds[0]:
                models[name] = model
            print(f"seed {seed} {name}: FID {run_rows[-1]['fid']:.3f} "
                  f"({time.perf_counter() - start:.0f} s so far, load {loads[-1]:.2f})",
                  flush=True)
    seconds = time.perf_counter() - start
    summary = summarise(rows)
    plot(summary, os.path.join(args.output_dir, "flow_comparison.png"))
    save_samples(models, args, os.path.join(args.output_dir, "flow_samples.png"))
    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "configs": {n: dict(zip(("schedule", "prediction_type", "weighting", "density"), c))
                    for n, c in CONFIGS.items() if n in args.configs},
        "gamma": GAMMA,
        "backend": keras.backend.backend(),
        "device": device_description(keras.backend.backend()),
        "seconds": round(seconds, 1),
        "load_average_1min": {"start": round(loads[0], 2), "max": round(max(loads), 2),
                              "mean": round(sum(loads) / len(loads), 2)},
        "summary": summary,
        "rows": rows,
    }
    with open(os.path.join(args.output_dir, "flow_comparison.json"), "w") as f:
        json.dump(result, f, indent=2)
    for name, s in summary.items():
        print(f"{name:28s} final FID {s['final_fid_mean']:.3f} ± {s['final_fid_half_range']:.3f}")
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
