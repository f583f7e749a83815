"""Per-noise-level diagnostics of the convergence benchmark (``convergence.py --diagnose``).

Why does one weighting converge faster than another? For each checkpoint's EMA model:

* **x₀ error per timestep** on the held-out digits (the 180 images of the ``test`` split,
  never trained on) with fixed noise, at `DIAGNOSTIC_TIMESTEPS` (t = 10 … 990) and their
  SNR (`keras_minsnr.noise_level_error.x0_error_by_timestep`);
* **the split-sampler FID matrix** of each target's ``constant`` and ``min_snr_5`` models:
  DDIM with model A for ``t >= t_split`` (the noisy steps) and model B below
  (`keras_minsnr.split_sampling.generate_split`), all four combinations, so the FID says
  which model's noisy half and which model's clean half make the better sampler.

Each value is recorded in the benchmark's work directory as it is measured, and a target's
diagnostics are measured as soon as its runs of one seed have trained. So a killed run
resumes, and once a run's diagnostics are recorded its EMA checkpoints are no longer
needed: the work directory's JSON records alone carry the benchmark to a new machine.
Outputs next to the benchmark's: ``STEM_diagnostics.json`` (per seed, seed means, and
Min-SNR-5's effects taken seed by seed with 95% intervals: its x₀-error ratio per timestep
and the FID change from its model on each half of the sampler), ``STEM_diagnostics.md``
(the tables docs/results.md includes) and ``STEM_diagnostics.png``.
"""

import json
import os

import keras
import numpy as np

from keras_minsnr.noise_level_error import DIAGNOSTIC_TIMESTEPS
from stats import interval
from stats import speedup_interval

# The pair whose split sampler is measured, per target: (label of A/B, run suffix).
PAIR = ("constant", "min_snr_5")


def ema_backbone_weights(model):
    """The backbone's weights in ``backbone.weights`` order, each replaced by its EMA."""
    values = []
    for weight in model.backbone.weights:
        average = model.ema.average_of(weight) if model.ema is not None else None
        values.append(keras.ops.convert_to_numpy(weight if average is None else average))
    return values


def checkpoint_path(prefix, step):
    return f"{prefix}_step{step}.npz"


def save_weights(path, values):
    """Atomic: a killed run leaves no half-written file under `path`."""
    partial = path + ".partial"
    with open(partial, "wb") as f:
        np.savez(f, *values)
    os.replace(partial, path)


def load_weights(path):
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


class SaveEMAWeights(keras.callbacks.Callback):
    """Saves the EMA backbone weights at the end of each epoch (a FID checkpoint) to
    ``PREFIX_stepN.npz``, N the optimizer step (`checkpoint_path`)."""

    def __init__(self, prefix):
        super().__init__()
        self.prefix = prefix

    def on_epoch_end(self, epoch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        save_weights(checkpoint_path(self.prefix, step), ema_backbone_weights(self.model))


def heldout_digits(image_size):
    """The digits ``test`` split (180 images, not trained on) in [-1, 1], with labels."""
    from keras_minsnr.data import make_dataset

    dataset, _ = make_dataset("digits", split="test", image_size=image_size, batch_size=256,
                              shuffle=False, repeat=False, drop_remainder=False, seed=0)
    batch = next(iter(dataset))
    return np.asarray(batch["images"]), np.asarray(batch["labels"])


def _record(path, settings, compute):
    """``compute()``'s JSON value, or the one recorded under the same settings earlier
    (None where nothing is recorded and `compute` is None)."""
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
        if record.get("settings") == settings:
            return record["value"]
    if compute is None:
        return None
    value = compute()
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump({"settings": settings, "value": value}, f)
    os.replace(partial, path)
    return value


def split_fid(model_noisy, model_clean, t_split, real, extractor, num_samples, num_steps,
              seed):
    """FID of DDIM samples with `model_noisy` for ``t >= t_split``, `model_clean` below;
    class-balanced labels and the sampling seed as the benchmark's FID."""
    from keras_minsnr.evaluation import balanced_labels
    from keras_minsnr.metrics import evaluate_samples
    from keras_minsnr.split_sampling import generate_split

    labels = balanced_labels(model_noisy, num_samples)
    fake = generate_split(model_noisy, model_clean, t_split, num_samples=num_samples,
                          labels=labels, num_steps=num_steps, seed=seed, use_ema=False,
                          clip_denoised=True, batch_size=500)
    return float(evaluate_samples(real, fake, extractor=extractor)["fid"])


def diagnostic_settings(args):
    """What every recorded diagnostic depends on besides its run, seed and step."""
    return {"timesteps": list(DIAGNOSTIC_TIMESTEPS), "t_split": args.t_split,
            "num_samples": args.num_samples, "sample_steps": args.sample_steps,
            "sample_seed": args.sample_seed, "noise_seed": 0}


def x0_record_path(workdir, key, step):
    return os.path.join(workdir, f"diag_x0_{key}_step{step}.json")


def split_record_path(workdir, target_key, noisy, clean, step):
    return os.path.join(workdir, f"diag_split_{target_key}_{noisy}_then_{clean}_step{step}.json")


def _pair_names(runs, target):
    """The target's ``constant``/``min_snr_5`` run names, or None when the plan lacks one."""
    names = [f"{target}/{label}" for label in PAIR]
    return names if all(any(n == name for name, *_ in runs) for n in names) else None


def _records(runs, name, seed, batch_size, checkpoints, workdir):
    """The record files the diagnostics of run `name` fill in."""
    from convergence import run_key

    paths = [x0_record_path(workdir, run_key(seed, name, batch_size), step)
             for step in checkpoints]
    target = name.split("/")[0]
    pair = _pair_names(runs, target)
    if pair is not None and name in pair:
        paths += [split_record_path(workdir, run_key(seed, target, batch_size),
                                    noisy.split("/")[1], clean.split("/")[1], step)
                  for step in checkpoints for noisy in pair for clean in pair]
    return paths


def diagnosed(args, runs, name, seed, batch_size, checkpoints, workdir):
    """Whether every diagnostic that needs run `name`'s EMA checkpoints is recorded under
    the current settings: then the checkpoints themselves are no longer needed (a run
    resumed on a new machine, where the work directory kept only its JSON records)."""
    settings = diagnostic_settings(args)
    return all(_record(path, settings, None) is not None
               for path in _records(runs, name, seed, batch_size, checkpoints, workdir))


def run_diagnostics(args, runs, batch_sizes, checkpoints, workdir, real, extractor,
                    build_model_for, seeds=None, measure=True):
    """Measures every checkpoint of every run of `seeds` (default ``args.seeds``); returns
    the diagnostics summary. Values recorded earlier are read back, not measured again;
    with ``measure=False`` only those are summarised (a run under way).

    ``build_model_for(name, seed, batch_size)`` builds the run's `DiffusionModel` (weights
    are then loaded from the work directory's EMA checkpoints, sampled without EMA).
    """
    from convergence import run_key

    images, labels = None, None
    settings = diagnostic_settings(args)
    per_seed = {"x0_error": {}, "split_fid": {}}
    for batch_size in batch_sizes:
        group = "" if batch_size is None else f"b{batch_size}"
        for seed in args.seeds if seeds is None else seeds:
            models = {}

            def model_at(name, step):
                if name not in models:
                    models[name] = build_model_for(name, seed, batch_size)
                prefix = os.path.join(workdir, run_key(seed, name, batch_size))
                models[name].backbone.set_weights(load_weights(checkpoint_path(prefix, step)))
                return models[name]

            for name, *_ in runs:
                for step in checkpoints:
                    def x0_error():
                        nonlocal images, labels
                        from keras_minsnr.noise_level_error import x0_error_by_timestep

                        if images is None:
                            images, labels = heldout_digits(real.shape[1])
                        model = model_at(name, step)
                        return x0_error_by_timestep(
                            model, images, DIAGNOSTIC_TIMESTEPS,
                            labels=labels if model.conditioning == "class" else None,
                            seed=settings["noise_seed"], use_ema=False)

                    path = x0_record_path(workdir, run_key(seed, name, batch_size), step)
                    value = _record(path, settings, x0_error if measure else None)
                    if value is None:
                        continue
                    per_seed["x0_error"].setdefault(group, {}).setdefault(name, {}).setdefault(
                        str(step), {})[str(seed)] = value
            targets = dict.fromkeys(name.split("/")[0] for name, *_ in runs)
            for target in targets:
                names = _pair_names(runs, target)
                if names is None:
                    continue
                for step in checkpoints:
                    for noisy in names:
                        for clean in names:
                            def fid():
                                # One model instance per run name: A and B keep their own
                                # weights (the same instance when A == B).
                                return split_fid(model_at(noisy, step),
                                                 model_at(clean, step), args.t_split, real,
                                                 extractor, args.num_samples,
                                                 args.sample_steps, args.sample_seed)

                            a, b = noisy.split("/")[1], clean.split("/")[1]
                            path = split_record_path(workdir, run_key(seed, target, batch_size),
                                                     a, b, step)
                            value = _record(path, settings, fid if measure else None)
                            if value is None:
                                continue
                            per_seed["split_fid"].setdefault(group, {}).setdefault(
                                target, {}).setdefault(str(step), {}).setdefault(
                                f"{a}|{b}", {})[str(seed)] = value
    return summarise_diagnostics(per_seed, settings)


def summarise_diagnostics(per_seed, settings):
    """Seed means of the per-seed values (the per-seed values are kept)."""
    x0 = {}
    for group, by_run in per_seed["x0_error"].items():
        for name, by_step in by_run.items():
            for step, seeds in by_step.items():
                first = next(iter(seeds.values()))
                mse = np.mean([seeds[s]["x0_mse"] for s in sorted(seeds)], axis=0)
                x0.setdefault(group, {}).setdefault(name, {})[step] = {
                    "timesteps": first["timesteps"], "snr": first["snr"],
                    "x0_mse": [float(v) for v in mse],
                    "per_seed": {s: seeds[s]["x0_mse"] for s in sorted(seeds)},
                }
    split = {}
    for group, by_target in per_seed["split_fid"].items():
        for target, by_step in by_target.items():
            for step, cells in by_step.items():
                split.setdefault(group, {}).setdefault(target, {})[step] = {
                    key: {"fid": float(np.mean(list(seeds.values()))), "per_seed": seeds}
                    for key, seeds in cells.items()
                }
    summary = {
        "settings": settings,
        "x0_error": x0,
        "split_fid": split,
        "split_key": "'A|B': model A for t >= t_split (noisy steps), model B below",
    }
    summary["effects"] = weighting_effects(summary)
    return summary


def per_seed_values(summary):
    """The per-seed values a summary was made from (`summarise_diagnostics`' input), so a
    written ``STEM_diagnostics.json`` can be summarised again after a change here."""
    x0, split = {}, {}
    for group, by_run in summary["x0_error"].items():
        for name, by_step in by_run.items():
            for step, entry in by_step.items():
                x0.setdefault(group, {}).setdefault(name, {})[step] = {
                    seed: {"timesteps": entry["timesteps"], "snr": entry["snr"],
                           "x0_mse": values}
                    for seed, values in entry["per_seed"].items()}
    for group, by_target in summary["split_fid"].items():
        for target, by_step in by_target.items():
            for step, cells in by_step.items():
                split.setdefault(group, {}).setdefault(target, {})[step] = {
                    key: cell["per_seed"] for key, cell in cells.items()}
    return {"x0_error": x0, "split_fid": split}


def _paired(per_seed_a, per_seed_b, combine):
    """``combine(a, b)`` seed by seed over the seeds both have, with its 95% t interval."""
    seeds = sorted(set(per_seed_a) & set(per_seed_b), key=str)
    values = [combine(per_seed_a[s], per_seed_b[s]) for s in seeds]
    centre, low, high = interval(values)
    return {"mean": centre, "low": low, "high": high,
            "per_seed": dict(zip(seeds, values))}


def weighting_effects(summary):
    """What Min-SNR-5 changes, seed by seed at each target's last checkpoint, with 95%
    t intervals over the seeds (a seed's two runs share initial weights and data):

    * ``x0_error_ratio``: Min-SNR-5's x₀ error over constant's at each timestep; the
      interval is taken on the log ratio and mapped back (the centre is the geometric mean);
    * ``split``: the FID change when Min-SNR-5's model instead of constant's takes one half
      of the split sampler, the other half's model held fixed (both choices of it).
    """
    base, cand = PAIR
    effects = {}
    for group, by_run in summary["x0_error"].items():
        for name in by_run:
            target, label = name.split("/", 1)
            other = by_run.get(f"{target}/{cand}")
            if label != base or other is None:
                continue
            step = max(set(by_run[name]) & set(other), key=int)
            a, b = by_run[name][step]["per_seed"], other[step]["per_seed"]
            seeds = sorted(set(a) & set(b), key=str)
            ratios = []
            for i, t in enumerate(by_run[name][step]["timesteps"]):
                per_seed = {s: float(b[s][i] / a[s][i]) for s in seeds}
                mean, low, high = speedup_interval(per_seed)  # on the log, as speed-ups
                ratios.append({"t": t, "mean": mean, "low": low, "high": high,
                               "per_seed": per_seed})
            effects.setdefault(group, {}).setdefault(target, {})["x0_error_ratio"] = {
                "step": step, "by_timestep": ratios}
    for group, by_target in summary["split_fid"].items():
        for target, by_step in by_target.items():
            step = max(by_step, key=int)
            cells = by_step[step]
            halves = {}
            for half, other_half in (("clean", "noisy"), ("noisy", "clean")):
                for fixed in PAIR:
                    before, after = ((f"{fixed}|{base}", f"{fixed}|{cand}") if half == "clean"
                                     else (f"{base}|{fixed}", f"{cand}|{fixed}"))
                    if before in cells and after in cells:
                        halves[f"{half} steps ({other_half}: {fixed})"] = _paired(
                            cells[before]["per_seed"], cells[after]["per_seed"],
                            lambda x, y: float(y - x))
            effects.setdefault(group, {}).setdefault(target, {})["split"] = {
                "step": step, "fid_change": halves}
    return effects


_TARGET_LABELS = {"sample": "x₀", "epsilon": "ε", "v_prediction": "v"}


def _table_head(caption, first, columns):
    return [caption, "", f"| {first} | " + " | ".join(columns) + " |",
            "|---|" + "---:|" * len(columns)]


def diagnostics_markdown(summary):
    """The x₀-error table and the split-sampler FID matrices at the last checkpoint."""
    lines = []
    t_split = summary["settings"]["t_split"]
    for group, by_run in summary["x0_error"].items():
        first = next(iter(by_run.values()))
        step = max(first, key=int)
        entry = first[step]
        where = f" (batch {group[1:]})" if group else ""
        lines += _table_head(
            f"x₀ error (mean squared, held-out digits, fixed noise) of the EMA models at "
            f"step {step}{where}, seed mean:", "run", [f"t={t}" for t in entry["timesteps"]])
        lines.append("| SNR | " + " | ".join(f"{s:.3g}" for s in entry["snr"]) + " |")
        for name, by_step in by_run.items():
            target, label = name.split("/", 1)
            cells = " | ".join(f"{v:.4g}" for v in by_step[step]["x0_mse"])
            lines.append(f"| {_TARGET_LABELS.get(target, target)} `{label}` | {cells} |")
        lines.append("")
    for group, by_target in summary["split_fid"].items():
        for target, by_step in by_target.items():
            step = max(by_step, key=int)
            cells = by_step[step]
            where = f", batch {group[1:]}" if group else ""
            lines += _table_head(
                f"Split-sampler FID, {_TARGET_LABELS.get(target, target)} at step {step}"
                f"{where} (rows: the model for t ≥ {t_split}; columns: the model for "
                f"t < {t_split}; seed mean):", "noisy steps \\ clean steps",
                [f"`{b}`" for b in PAIR])
            for a in PAIR:
                row = " | ".join(_cell(cells.get(f"{a}|{b}")) for b in PAIR)
                lines.append(f"| `{a}` | {row} |")
            lines.append("")
    lines += effects_markdown(summary.get("effects", {}))
    return "\n".join(lines)


def _with_interval(entry, fmt):
    if entry["low"] is None:
        return fmt.format(entry["mean"])
    return f"{fmt.format(entry['mean'])} [{fmt.format(entry['low'])}, {fmt.format(entry['high'])}]"


def effects_markdown(effects):
    """`weighting_effects` as two tables per batch group: the x₀-error ratio per timestep
    and the FID change per half of the sampler, each with its 95% interval over seeds."""
    base, cand = PAIR
    lines = []
    for group, by_target in effects.items():
        where = f", batch {group[1:]}" if group else ""
        ratios = [(t, e["x0_error_ratio"]) for t, e in by_target.items() if "x0_error_ratio" in e]
        if ratios:
            step = ratios[0][1]["step"]
            timesteps = [r["t"] for r in ratios[0][1]["by_timestep"]]
            lines += _table_head(
                f"`{cand}`'s x₀ error over `{base}`'s, seed by seed at step {step}{where} "
                "(below 1: Min-SNR-5 is more accurate there; 95% interval over seeds):",
                "target", [f"t={t}" for t in timesteps])
            for target, entry in ratios:
                cells = " | ".join(_with_interval(r, "{:.2f}") for r in entry["by_timestep"])
                lines.append(f"| {_TARGET_LABELS.get(target, target)} | {cells} |")
            lines.append("")
        splits = [(t, e["split"]) for t, e in by_target.items() if e.get("split", {}).get(
            "fid_change")]
        if splits:
            columns = list(splits[0][1]["fid_change"])
            lines += _table_head(
                f"FID change when `{cand}`'s model instead of `{base}`'s samples one half of "
                f"the split sampler, the other half's model fixed, seed by seed at step "
                f"{splits[0][1]['step']}{where} (negative: better; 95% interval over seeds):",
                "target", [f"on the {c}" for c in columns])
            for target, entry in splits:
                cells = " | ".join(
                    _with_interval(entry["fid_change"][c], "{:+.2f}")
                    if c in entry["fid_change"] else "—" for c in columns)
                lines.append(f"| {_TARGET_LABELS.get(target, target)} | {cells} |")
            lines.append("")
    return lines


def _cell(entry):
    return "—" if entry is None else f"{entry['fid']:.2f}"


def plot_diagnostics(summary, path):
    """Top: x₀ error against timestep, one panel per target (and batch size), every
    checkpoint (the last one solid). Bottom: the split-sampler FID matrices at the last
    checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {}
    for group, by_run in summary["x0_error"].items():
        for name, by_step in by_run.items():
            title = _TARGET_LABELS.get(name.split("/")[0], name) + (
                f", batch {group[1:]}" if group else "")
            panels.setdefault(title, []).append((name.split("/", 1)[1], by_step))
    matrices = [(target + (f", batch {group[1:]}" if group else ""), by_step)
                for group, by_target in summary["split_fid"].items()
                for target, by_step in by_target.items()]
    columns = max(len(panels), len(matrices))
    fig, axes = plt.subplots(1 + bool(matrices), columns, figsize=(5 * columns, 4 + 4 * bool(
        matrices)), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (title, by_step) in zip(axes[-1] if matrices else [], matrices):
        ax.set_visible(True)
        step = max(by_step, key=int)
        grid = np.array([[by_step[step].get(f"{a}|{b}", {"fid": np.nan})["fid"]
                          for b in PAIR] for a in PAIR])
        ax.imshow(grid, cmap="viridis_r")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center",
                    bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})
        ax.set_xticks(range(len(PAIR)), PAIR)
        ax.set_yticks(range(len(PAIR)), PAIR)
        ax.set_xlabel(f"model for t < {summary['settings']['t_split']}")
        ax.set_ylabel(f"model for t ≥ {summary['settings']['t_split']}")
        name = _TARGET_LABELS.get(title.split(",")[0], title.split(",")[0])
        ax.set_title(f"split-sampler FID: {name}{title[len(title.split(',')[0]):]}, "
                     f"step {step}")
    for ax, (title, lines) in zip(axes[0], panels.items()):
        ax.set_visible(True)
        for label, by_step in lines:
            steps = sorted(by_step, key=int)
            color = None
            for step in steps:
                entry = by_step[step]
                last = step == steps[-1]
                (line,) = ax.plot(entry["timesteps"], entry["x0_mse"], "-" if last else ":",
                                  marker="o", markersize=3, color=color,
                                  alpha=1.0 if last else 0.35,
                                  label=f"{label} (step {step})" if last else None)
                color = line.get_color()
        ax.set_title(f"x₀ error by timestep: {title}")
        ax.set_xlabel("timestep t (SNR falls from left to right)")
        ax.set_ylabel("mean squared x₀ error (held-out)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".partial", dpi=110, format="png")
    plt.close(fig)
    os.replace(path + ".partial", path)


def write_diagnostics(summary, stem):
    """``STEM_diagnostics.json``, ``.md`` and ``.png``, each written atomically."""
    base = stem + "_diagnostics"
    for suffix, write in ((".json", lambda f: json.dump(summary, f, indent=2)),
                          (".md", lambda f: f.write(diagnostics_markdown(summary)))):
        with open(base + suffix + ".partial", "w") as f:
            write(f)
        os.replace(base + suffix + ".partial", base + suffix)
    plot_diagnostics(summary, base + ".png")
