"""The convergence benchmark: its quick mode writes well-formed results; the speed-up rule."""

import csv
import json
import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import convergence  # noqa: E402
import diagnostics  # noqa: E402
import stats  # noqa: E402


def test_steps_to_reach_interpolates_first_crossing():
    steps = [100, 200, 300, 400]
    # 25 at 200, 15 at 300: 20 is reached halfway, at 250.
    assert stats.steps_to_reach(steps, [45, 25, 15, 10], 20.0) == pytest.approx(250.0)
    # Already below at the first checkpoint: credited with that checkpoint.
    assert stats.steps_to_reach(steps, [5, 4, 3, 2], 20.0) == 100.0
    assert stats.steps_to_reach(steps, [50, 40, 30, 21], 20.0) is None
    # Non-monotone: the first crossing counts (100 + 30/32 * 100).
    assert stats.steps_to_reach(steps, [50, 18, 30, 20], 20.0) == pytest.approx(193.75)


def test_speedup_on_synthetic_curves():
    steps = [100, 200, 300, 400]
    value, base, cand, target = stats.speedup(steps, [50, 40, 30, 20], [45, 25, 15, 10])
    assert target == 20.0 and base == 400.0 and cand == pytest.approx(250.0)
    assert value == pytest.approx(1.6)
    value, _, cand, _ = stats.speedup(steps, [50, 40, 30, 20], [60, 55, 50, 45])
    assert value is None and cand is None
    with pytest.raises(ValueError, match="equal length"):
        stats.steps_to_reach([1, 2], [1.0], 0.5)


def test_bad_step_grid_is_rejected():
    with pytest.raises(SystemExit):
        convergence.parse_args(["--steps", "30", "--eval-every", "20"])


def _planted_rows(run, weighting, gamma, fids):
    return [
        {"seed": 0, "run": run, "target": "epsilon", "weighting": weighting, "gamma": gamma,
         "step": step, "fid": fid, "kid_mean": 0.0, "kid_std": 0.0, "train_seconds": 1.0}
        for step, fid in zip((20, 40), fids)
    ]


def test_quick_run_writes_the_three_files_and_resumes(tmp_path):
    out = tmp_path / "results"
    argv = ["--quick", "--targets", "epsilon", "--num-samples", "64", "--sample-steps", "5",
            "--output-dir", str(out)]
    # As if an earlier benchmark was killed after finishing the constant run: it is reused,
    # while a record written under other settings is not.
    workdir = out / "convergence_runs"
    workdir.mkdir(parents=True)
    settings = convergence.run_settings(convergence.parse_args(argv))
    convergence.save_finished_run(
        str(workdir / "0_epsilon_constant.json"), settings,
        _planted_rows("epsilon/constant", "constant", "", (777.0, 555.0)),
    )
    convergence.save_finished_run(
        str(workdir / "0_epsilon_min_snr_5.json"), {**settings, "steps": 4000},
        _planted_rows("epsilon/min_snr_5", "min_snr", 5.0, (999.0, 888.0)),
    )
    assert convergence.main(argv) == 0
    assert not workdir.exists()
    assert {p.name for p in out.iterdir()} >= {
        "convergence.csv", "convergence.png", "convergence.json"
    }
    with open(out / "convergence.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == convergence.CSV_COLUMNS
        rows = list(reader)
    # 2 runs (constant, min_snr γ=5) x 1 seed x checkpoints at 20 and 40.
    assert len(rows) == 4
    assert {r["run"] for r in rows} == {"epsilon/constant", "epsilon/min_snr_5"}
    assert sorted({int(r["step"]) for r in rows}) == [20, 40]
    fids = {(r["run"], int(r["step"])): float(r["fid"]) for r in rows}
    assert fids[("epsilon/constant", 20)] == 777.0 and fids[("epsilon/constant", 40)] == 555.0
    assert fids[("epsilon/min_snr_5", 20)] not in (999.0, 888.0)
    # Images seen: optimizer steps x the recipe's batch of 128.
    trained = [r for r in rows if r["run"] == "epsilon/min_snr_5"]
    assert [int(r["images_seen"]) for r in trained] == [20 * 128, 40 * 128]
    for r in rows:
        assert math.isfinite(float(r["fid"])) and float(r["fid"]) >= 0
        assert math.isfinite(float(r["kid_mean"]))
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "convergence.json").read_text())
    assert summary["quick"] is True and summary["checkpoints"] == [20, 40]
    entry = summary["speedups"]["epsilon"]
    assert set(entry) >= {"target_fid", "baseline_steps", "min_snr_steps", "speedup"}
    assert isinstance(entry["target_fid"], float) and math.isfinite(entry["target_fid"])
    assert entry["speedup"] is None or (
        isinstance(entry["speedup"], float) and entry["speedup"] > 0
    )
    curve = summary["mean_curves"]["epsilon/constant"]
    assert curve["steps"] == [20, 40] and len(curve["fid"]) == 2
    # One seed: its own speed-up is the mean curves' one.
    assert entry["per_seed"] == {"0": entry["speedup"]}
    # --from-csv recomputes the summary from the CSV alone, without training.
    (out / "convergence.png").unlink()
    before = dict(summary)
    summary["speedups"] = {}
    (out / "convergence.json").write_text(json.dumps(summary))
    assert convergence.main(["--from-csv", "--output-dir", str(out)]) == 0
    again = json.loads((out / "convergence.json").read_text())
    assert again["speedups"] == before["speedups"] and again["quick"] is True
    assert again["mean_curves"] == before["mean_curves"]
    assert (out / "convergence.png").exists()


# -- intervals over seeds ------------------------------------------------------------------


def test_t_interval_matches_closed_forms_and_scipy():
    from scipy import stats as scipy_stats

    # df = 1: the 97.5% t quantile is tan(0.475 π); [0, 2] has mean 1 and s/sqrt(n) = 1.
    mean, low, high = stats.t_interval([0.0, 2.0])
    half = math.tan(0.475 * math.pi)
    assert mean == 1.0 and low == pytest.approx(1 - half) and high == pytest.approx(1 + half)
    # df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t²)), so t = u sqrt(2 / (1 - u²)) with u = 0.95.
    mean, low, high = stats.t_interval([0.0, 1.0, 2.0])
    half = 0.95 * math.sqrt(2.0 / (1.0 - 0.95**2)) / math.sqrt(3.0)
    assert (low, high) == (pytest.approx(1 - half), pytest.approx(1 + half))
    # df = 4 against scipy's own interval routine.
    sample = [3.1, 2.4, 5.0, 4.2, 3.3]
    ref = scipy_stats.t.interval(0.95, df=4, loc=sum(sample) / 5,
                                 scale=scipy_stats.sem(sample))
    assert stats.t_interval(sample)[1:] == pytest.approx(ref, rel=1e-12)
    assert stats.t_interval([4.0]) == (4.0, None, None)
    with pytest.raises(ValueError, match="non-empty"):
        stats.t_interval([])


def test_bootstrap_interval_closed_form_and_coverage():
    import numpy as np

    # Two values: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% quantiles are 0 and 1.
    assert stats.bootstrap_interval([0.0, 1.0]) == (0.5, 0.0, 1.0)
    # Coverage of the true mean on normal samples of 30 (fixed seed): close to 95%.
    rng = np.random.default_rng(7)
    trials, hits = 300, 0
    for i in range(trials):
        sample = rng.normal(10.0, 3.0, size=30)
        _, low, high = stats.bootstrap_interval(sample, num_resamples=2000, seed=i)
        hits += low <= 10.0 <= high
    assert 0.90 <= hits / trials <= 0.98


def test_speedup_interval_is_taken_on_the_log_scale():
    centre, low, high = stats.speedup_interval({"0": 1.0, "1": 4.0})
    # log values 0 and log 4: mean log 2, s = log 4 / sqrt 2, n = 2, t = tan(0.475 π).
    half = math.tan(0.475 * math.pi) * math.log(4.0) / math.sqrt(2.0) / math.sqrt(2.0)
    assert centre == pytest.approx(2.0)
    assert low == pytest.approx(2.0 * math.exp(-half))
    assert high == pytest.approx(2.0 * math.exp(half))
    assert stats.speedup_interval({"0": 2.0, "1": 2.0, "2": 2.0}) == (
        pytest.approx(2.0), pytest.approx(2.0), pytest.approx(2.0)
    )
    # A seed that never reached the baseline's FID: no interval.
    assert stats.speedup_interval({"0": 2.0, "1": None}) == (None, None, None)


def planted_rows(fids, steps=(100, 200)):
    """Benchmark CSV rows from ``{run: {seed: (FID at each of steps)}}``."""
    return [
        {"seed": seed, "run": run, "target": run.split("/")[0],
         "weighting": run.split("/")[1], "gamma": "", "step": step, "fid": fid,
         "kid_mean": 0.0, "kid_std": 0.0, "train_seconds": 1.0}
        for run, per_seed in fids.items()
        for seed, values in per_seed.items()
        for step, fid in zip(steps, values)
    ]


def test_fid_bands_and_summary_intervals_on_planted_curves():
    steps = (100, 200)
    fids = {  # run -> seed -> FIDs at the two checkpoints
        "sample/constant": {0: (40.0, 20.0), 1: (44.0, 22.0), 2: (42.0, 24.0)},
        "sample/min_snr_5": {0: (18.0, 10.0), 1: (19.0, 12.0), 2: (20.0, 14.0)},
    }
    rows = planted_rows(fids, steps)
    band = convergence.fid_intervals(rows)["sample/min_snr_5"]
    # Final FIDs 10, 12, 14: mean 12, s = 2, t(0.975, 2) from the closed form above.
    half = 0.95 * math.sqrt(2.0 / (1.0 - 0.95**2)) * 2.0 / math.sqrt(3.0)
    assert band["steps"] == [100, 200] and band["mean"] == [19.0, 12.0]
    assert band["low"][1] == pytest.approx(12 - half)
    assert band["high"][1] == pytest.approx(12 + half)
    runs = convergence.run_plan(["sample"], ablation=False, plan="targets")
    summary = convergence.summarise(rows, runs)
    entry = summary["speedups"]["sample"]
    # Each seed: the baseline reaches its final FID at step 200, min_snr_5 already at 100
    # (credited with the first checkpoint), so every per-seed speed-up is 2.
    assert entry["per_seed"] == {"0": 2.0, "1": 2.0, "2": 2.0}
    assert entry["speedup_interval"] == [pytest.approx(2.0), pytest.approx(2.0)]
    assert entry["min_snr_final_fid_interval"] == [pytest.approx(12 - half),
                                                   pytest.approx(12 + half)]
    table = convergence.table1_markdown({**summary, "runs": [r[0] for r in runs],
                                         "seeds": [0, 1, 2], "checkpoints": [100, 200]})
    assert "| x₀ | `min_snr_5` | 12.00 [" in table and "| 2.00x [2.00, 2.00] |" in table
    assert "| x₀ | `constant` | 22.00 [" in table and "1 (baseline)" in table
    assert "3.4x" in table and "2303.09556" in table


def test_a_slower_min_snr_reports_how_much_faster_constant_was():
    """When Min-SNR never reaches the baseline's final FID, the summary and the table give
    the reverse speed-up: how much sooner `constant` reached Min-SNR's final FID."""
    fids = {  # run -> seed -> FIDs at steps 100, 200
        "sample/constant": {0: (30.0, 10.0), 1: (32.0, 12.0), 2: (34.0, 14.0)},
        "sample/min_snr_5": {0: (40.0, 20.0), 1: (42.0, 22.0), 2: (44.0, 24.0)},
    }
    rows = planted_rows(fids)
    runs = convergence.run_plan(["sample"], ablation=False, plan="targets")
    entry = convergence.summarise(rows, runs)["speedups"]["sample"]
    assert entry["speedup"] is None
    # Each seed: constant falls 20 per 100 steps and meets Min-SNR's final FID (its own
    # final + 10) halfway, at step 150; Min-SNR needs all 200 steps: 200/150.
    assert entry["constant_speedup"] == pytest.approx(4.0 / 3.0)
    assert entry["constant_speedup_interval"] == [pytest.approx(4.0 / 3.0)] * 2
    summary = {**convergence.summarise(rows, runs), "runs": [r[0] for r in runs],
               "seeds": [0, 1, 2], "checkpoints": [100, 200]}
    assert ("| never reached; reverse 1.33x [1.33, 1.33] |"
            in convergence.table1_markdown(summary))


def test_paired_differences_are_taken_within_each_seed():
    """Each seed's runs share initial weights, batches and noise: the difference of two
    runs is taken seed by seed, and the interval is over those differences."""
    fids = {  # run -> seed -> FIDs at steps 100, 200
        "sample/constant": {0: (40.0, 20.0), 1: (50.0, 30.0), 2: (60.0, 40.0)},
        "sample/snr": {0: (45.0, 35.0), 1: (55.0, 45.0), 2: (65.0, 55.0)},
        "sample/min_snr_5": {0: (30.0, 21.0), 1: (40.0, 33.0), 2: (50.0, 42.0)},
        "epsilon/constant": {0: (9.0, 8.0), 1: (9.0, 8.0), 2: (9.0, 8.0)},
    }
    rows = planted_rows(fids)
    names = list(fids)
    assert convergence.paired_plan(names) == [
        ("sample/min_snr_5", "sample/constant"), ("sample/min_snr_5", "sample/snr")]
    result = convergence.paired_differences(rows, convergence.paired_plan(names))
    vs_constant = result["sample/min_snr_5 - sample/constant"]
    # Step 100: −10 on every seed, an interval of width 0 (the seeds' spread cancels).
    assert vs_constant["steps"] == [100, 200]
    assert vs_constant["mean"][0] == pytest.approx(-10.0)
    assert vs_constant["low"][0] == pytest.approx(-10.0)
    assert vs_constant["high"][0] == pytest.approx(-10.0)
    # Step 200: differences 1, 3, 2: mean 2, s = 1, t(0.975, 2) in closed form.
    half = 0.95 * math.sqrt(2.0 / (1.0 - 0.95**2)) / math.sqrt(3.0)
    assert vs_constant["per_seed"][1] == {"0": 1.0, "1": 3.0, "2": 2.0}
    assert vs_constant["mean"][1] == pytest.approx(2.0)
    assert vs_constant["low"][1] == pytest.approx(2.0 - half)
    assert vs_constant["high"][1] == pytest.approx(2.0 + half)
    vs_snr = result["sample/min_snr_5 - sample/snr"]
    assert vs_snr["mean"] == [pytest.approx(-15.0), pytest.approx(-13.0)]
    table = convergence.paired_markdown({"paired_differences": result})
    assert "| x₀ `min_snr_5` − `constant` | -10.00 [-10.00, -10.00] | 2.00 [" in table
    assert "| x₀ `min_snr_5` − `snr` | -15.00" in table


def test_table1_plan_is_the_papers_ablation():
    names = [name for name, *_ in convergence.run_plan(plan="table1")]
    assert names == [
        "sample/constant", "sample/snr", "sample/trunc_snr", "sample/max_snr_5",
        "sample/min_snr_5", "sample/min_snr_1", "sample/min_snr_2", "sample/min_snr_10",
        "sample/min_snr_20", "sample/soft_min_snr_5", "sample/p2", "sample/debiased",
        "epsilon/constant", "epsilon/min_snr_5",
        "v_prediction/constant", "v_prediction/min_snr_5",
    ]
    plan = {name: (weighting, gamma) for name, _, weighting, gamma in
            convergence.run_plan(plan="table1")}
    assert plan["sample/max_snr_5"] == ("max_snr", 5.0)
    assert plan["sample/min_snr_20"] == ("min_snr", 20.0)
    with pytest.raises(ValueError, match="Unknown plan 'table2'"):
        convergence.run_plan(plan="table2")
    args = convergence.parse_args(["--backbone", "vit_tiny"])
    assert args.plan == "targets" and args.seeds == [0, 1, 2] and args.stem == "convergence_vit"
    assert args.ablation is False and args.batch_size == 128
    assert args.output_dir == os.path.join(ROOT, "docs", "results", "vit_b128")
    assert convergence.parse_args([]).output_dir == os.path.join(ROOT, "docs", "results")
    # Table 1 keeps its γ sweep and later weightings; the MLP keeps its ε ablation.
    assert convergence.parse_args(["--backbone", "vit_tiny", "--plan", "table1"]).ablation
    assert convergence.parse_args([]).ablation


def _vit_rows(seed, run, weighting, gamma, fids):
    return [
        {"seed": seed, "run": run, "target": "epsilon", "weighting": weighting,
         "gamma": gamma, "step": step, "fid": fid, "kid_mean": 0.0, "kid_std": 0.0,
         "train_seconds": 1.0}
        for step, fid in zip((2, 4), fids)
    ]


def test_quick_vit_run_resumes_and_writes_bands_and_table(tmp_path, capsys):
    out = tmp_path / "results"
    # Batch 4 with 2 micro-batches per update: the 4 steps are optimizer updates.
    argv = ["--backbone", "vit_tiny", "--quick", "--targets", "epsilon", "--seeds", "0", "1",
            "--batch-size", "4", "--grad-accum", "2", "--output-dir", str(out)]
    # Three of the four trainings finished before a kill; only seed 1's min_snr_5 trains.
    workdir = out / "convergence_vit_runs"
    workdir.mkdir(parents=True)
    settings = convergence.run_settings(convergence.parse_args(argv))
    planted = {
        (0, "epsilon/constant"): ("constant", "", (300.0, 200.0)),
        (0, "epsilon/min_snr_5"): ("min_snr", 5.0, (150.0, 100.0)),
        (1, "epsilon/constant"): ("constant", "", (320.0, 220.0)),
    }
    for (seed, run), (weighting, gamma, fids) in planted.items():
        convergence.save_finished_run(
            str(workdir / f"{seed}_{run.replace('/', '_')}.json"), settings,
            _vit_rows(seed, run, weighting, gamma, fids),
        )
    assert convergence.main(argv) == 0
    assert not workdir.exists()
    with open(out / "convergence_vit.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    trained = [r for r in rows if r["seed"] == "1" and r["run"] == "epsilon/min_snr_5"]
    assert [int(r["step"]) for r in trained] == [2, 4]
    assert [int(r["images_seen"]) for r in trained] == [2 * 4 * 2, 4 * 4 * 2]
    assert all(math.isfinite(float(r["fid"])) and float(r["fid"]) >= 0 for r in trained)
    assert (out / "convergence_vit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "convergence_vit.json").read_text())
    assert summary["backbone"] == "vit_tiny" and summary["plan"] == "targets"
    assert summary["backbone_config"]["backbone"] == "vit_b_2_in256"
    assert summary["backbone_config"]["batch_size"] == 4
    assert summary["backbone_config"]["grad_accum"] == 2
    assert summary["runs"] == ["epsilon/constant", "epsilon/min_snr_5"]
    band = summary["fid_intervals"]["epsilon/constant"]
    # Two seeds, final FIDs 200 and 220: mean 210 ± tan(0.475 π) · 10.
    half = math.tan(0.475 * math.pi) * 10.0
    assert band["num_seeds"] == 2 and band["mean"][-1] == pytest.approx(210.0)
    assert band["low"][-1] == pytest.approx(210.0 - half)
    assert band["high"][-1] == pytest.approx(210.0 + half)
    assert "Student-t" in summary["interval_method"]
    capsys.readouterr()
    assert convergence.main(["--backbone", "vit_tiny", "--table", "--output-dir",
                             str(out)]) == 0
    table = capsys.readouterr().out
    assert "| ε | `constant` | 210.00 [" in table and "| ε | `min_snr_5` |" in table
    # The other comparison rule on planted curves: a seed whose candidate never reaches the
    # baseline's final FID leaves the speed-up without an interval, and the table says so.
    entry = summary["speedups"]["epsilon"]
    entry.update(speedup=1.5, speedup_interval=[None, None], per_seed={"0": 1.5, "1": None})
    assert "1.50x (no interval: 1 of 2 seeds never reached)" in convergence.table1_markdown(
        summary)


def test_a_training_killed_after_a_checkpoint_continues_there_as_if_never_killed(
        tmp_path, monkeypatch):
    """The issue-26 evidence run is hours of trainings of half an hour each: a kill must
    lose at most one FID checkpoint's steps, and the resumed training must be the one that
    was interrupted (same optimizer state, EMA, noise and batches), not a restart."""
    from keras_minsnr.evaluation import real_images_for
    from keras_minsnr.metrics import get_feature_extractor

    args = convergence.parse_args(
        ["--backbone", "vit_tiny", "--quick", "--targets", "sample", "--steps", "2",
         "--eval-every", "1", "--num-samples", "4", "--diagnose", "--batch-size", "4"])
    initial = convergence.initial_backbone_weights(args, 0)
    real = real_images_for({"data": "digits", "image_size": 8}, 50)
    extractor = get_feature_extractor("digits")

    def train(workdir):
        os.makedirs(workdir, exist_ok=True)
        return convergence.train_and_evaluate(
            args, "sample/min_snr_5", "sample", "min_snr", 5.0, 0, initial, real, extractor,
            str(workdir))

    save = convergence.SaveResumePoint.on_epoch_end
    trained = {}  # (work folder, epoch) -> the backbone's raw weights at that checkpoint

    def recorded(self, epoch, logs=None):
        save(self, epoch, logs)
        trained[os.path.basename(os.path.dirname(self.prefix)), epoch] = (
            self.model.backbone.get_weights())

    def killed_after_the_first_checkpoint(self, epoch, logs=None):
        recorded(self, epoch, logs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(convergence.SaveResumePoint, "on_epoch_end", recorded)
    whole = train(tmp_path / "whole")
    monkeypatch.setattr(convergence.SaveResumePoint, "on_epoch_end",
                        killed_after_the_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "killed")
    monkeypatch.setattr(convergence.SaveResumePoint, "on_epoch_end", recorded)
    resumed = train(tmp_path / "killed")

    assert [row["step"] for row in resumed] == [row["step"] for row in whole] == [1, 2]
    # The step-1 FID is the one measured before the kill, kept; step 2 trained after it.
    np.testing.assert_allclose([row["fid"] for row in resumed],
                               [row["fid"] for row in whole], rtol=1e-4)
    # Step 2 after the resume is step 2 of the uninterrupted training: same batch, noise,
    # timesteps and Adam moments. In the warm-up an update is ~1e-5, and resuming on the
    # first batch instead of the second moves the weights by up to 5.6e-6.
    assert sorted(trained) == [("killed", 0), ("killed", 1), ("whole", 0), ("whole", 1)]
    for a, b in zip(trained["whole", 1], trained["killed", 1], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-8)
    key = convergence.run_key(0, "sample/min_snr_5")
    name = os.path.basename(diagnostics.checkpoint_path(key, 2))
    for a, b in zip(diagnostics.load_weights(str(tmp_path / "whole" / name)),
                    diagnostics.load_weights(str(tmp_path / "killed" / name)), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-8)  # the EMA too
    # The resume point names its model file; after the second checkpoint only that one.
    kept = sorted(p.name for p in (tmp_path / "killed").iterdir() if "_resume" in p.name)
    assert kept == [f"{key}_resume.json", f"{key}_resume_epoch2.keras"]
    # A run under other settings does not pick it up.
    assert convergence.load_resume_point(
        str(tmp_path / "killed" / f"{key}_resume"), {"steps": 99}) is None


# -- bf16 ----------------------------------------------------------------------------------


def test_bf16_timing_child_trains_both_policies_in_one_process(monkeypatch):
    import keras

    import bf16
    import throughput

    monkeypatch.setitem(throughput.CASES, "dit_tiny", (
        "dit_s_2", {"image_shape": (8, 8, 2), "num_classes": 3, "depth": 1,
                    "hidden_size": 32, "num_heads": 2, "patch_size": 2}))
    result = bf16.timing_child("dit_tiny", batch_size=2, steps=1, warmup=0)
    assert keras.mixed_precision.dtype_policy().name == "float32"  # restored
    assert result["step_ms_float32"] > 0 and result["step_ms_mixed_bfloat16"] > 0
    assert result["speedup_bf16"] == pytest.approx(
        result["step_ms_float32"] / result["step_ms_mixed_bfloat16"])
    dtypes = result["dtypes"]
    assert dtypes["float32"]["compute_dtype"] == "float32"
    # bf16 runs the backbone only: variables and the loss stay float32 (no loss scaling).
    assert dtypes["mixed_bfloat16"] == {"variable_dtype": "float32",
                                        "compute_dtype": "bfloat16",
                                        "backbone_output_dtype": "float32",
                                        "loss_dtype": "float32"}
    for losses in result["losses"].values():
        assert len(losses) == 1 and all(math.isfinite(v) for v in losses)
    assert len(result["load_average_before"]) == 3


def test_bf16_digits_curves_agree_and_are_plotted(tmp_path):
    import keras

    import bf16

    result = bf16.digits_child(steps=10, log_every=5, seed=0)
    assert keras.mixed_precision.dtype_policy().name == "float32"
    curves = result["curves"]
    assert curves["float32"]["compute_dtype"] == "float32"
    assert curves["mixed_bfloat16"]["compute_dtype"] == "bfloat16"
    for curve in curves.values():
        assert curve["step"] == [5, 10] and all(math.isfinite(v) for v in curve["loss"])
    summary = bf16.curve_summary(curves)
    assert summary["max_pointwise_relative_difference"] < 0.01
    # The summary's arithmetic on planted curves: last-3 means 2 and 2.2.
    planted = {"float32": {"loss": [9.0, 1.0, 2.0, 3.0]},
               "mixed_bfloat16": {"loss": [9.0, 1.2, 2.2, 3.2]}}
    summary = bf16.curve_summary(planted, tail=3)
    assert summary["final_loss_mean_last_points"]["mixed_bfloat16"] == pytest.approx(2.2)
    assert summary["relative_difference"] == pytest.approx(0.1)
    assert summary["max_pointwise_relative_difference"] == pytest.approx(0.2)
    report = {"log_every": 5, "backends": {keras.backend.backend(): result}}
    bf16.plot_curves(report, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        bf16.parse_args(["--digits", "--steps", "30", "--log-every", "20"])


# -- the JAX gap ---------------------------------------------------------------------------

PLANTED_HLO = """HloModule jit_step, entry_computation_layout={()}

%fused_computation.1 (param_0: f32[4,8]) -> f32[4,8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  ROOT %exp.1 = f32[4,8]{1,0} exponential(%param_0)
}

ENTRY %main (p0: f32[4,8], p1: f32[8,16]) -> (f32[4,16], f32[4,8]) {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,16]{1,0} parameter(1)
  %constant.3 = f32[] constant(2)
  %wrapped_broadcast.1 = f32[4,8]{1,0} fusion(%constant.3), kind=kLoop, calls=%fused_computation.2
  %ynn_fusion.1 = f32[4,8]{1,0} fusion(%p0, %wrapped_broadcast.1, %p1), kind=kCustom, calls=%fused_computation.1
  %dot.1 = f32[4,16]{1,0} dot(%ynn_fusion.1, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %tuple.1 = (f32[4,16]{1,0}, f32[4,8]{1,0}) tuple(%dot.1, %ynn_fusion.1)
}
"""


def test_hlo_statistics_count_a_planted_module():
    import jax_gap

    stats = jax_gap.hlo_statistics(PLANTED_HLO)
    assert stats["opcodes"]["parameter"] == 3 and stats["opcodes"]["fusion"] == 2
    assert stats["opcodes"]["dot"] == 1 and stats["opcodes"]["exponential"] == 1
    assert stats["fusions_by_kind"] == {"kLoop": 1, "kCustom": 1}
    assert stats["largest_fusion_operands"] == 3
    written = stats["entry_megabytes_written_by_kind"]
    # 4·8 floats = 128 bytes, 4·16 = 256 bytes; the scalar constant 4 bytes.
    assert written["dot"]["megabytes"] == round(256 / 1e6, 1)
    assert written["ynn_fusion (kCustom)"]["count"] == 1
    broadcasts = stats["scalar_constants_broadcast_to_arrays"]
    assert broadcasts["count"] == 1 and broadcasts["shapes"] == {"4,8": 1}
    assert broadcasts["megabytes"] == pytest.approx(128 / 1e6)


@pytest.mark.parametrize("lever", ["attention"])
def test_jax_gap_levers_are_the_same_function(lever):
    """A lever's variant B computes the same loss as the library's A (tiny ViT): the A/B
    compares speed, not different models. (The GELU forms: tests/test_dit.py; one lever
    here keeps the test time down.)"""
    import jax_gap

    args = jax_gap.parse_args([
        "--ab", lever, "--steps", "1", "--batch-size", "2", "--backbone-args",
        '{"image_shape": [8, 8, 2], "num_classes": 3, "hidden_size": 32, "num_heads": 2,'
        ' "patch_size": 2}', "--depth", "1"])
    report = jax_gap.ab_mode(args)
    assert len(report["ratios_B_over_A"]) == 1 and report["step_ms_A"] > 0
    np.testing.assert_allclose(report["losses_B"], report["losses_A"], rtol=1e-4)


def test_step_profile_reads_the_ops_of_a_traced_step_from_the_backends_profiler():
    """The profiler's op events of a tiny ViT's step: matmuls found by their kinds, the
    update ops apart, and no wrapper event (a function call, the executor) counted as an op,
    which would make the ops' time several times the step's."""
    import step_profile

    args = step_profile.parse_args(["--depth", "1", "--batch-size", "2", "--steps", "2",
                                    "--warmup", "1", "--backbone-args",
                                    '{"hidden_size": 32, "num_heads": 2}'])
    report = step_profile.child(args)
    seconds = report["op_seconds_per_step"]
    assert seconds["matmul"] > 0 and seconds["optimizer+ema"] > 0
    kinds = set(report["op_seconds_per_step_by_kind"])
    # TensorFlow's Eigen or oneDNN (`tf_onednn`) kernels, JAX's fusions.
    assert kinds & {"MatMul", "Einsum", "_MklMatMul", "_MklEinsum", "ynn_fusion", "dot"}
    assert not kinds & {"Run", "Execute", "Process", "one_step_on_data", "Await"}
    # Ops run on at most two threads at once here, so their time stays within about twice
    # the traced step; each wrapper event counted would add about one step more.
    assert 0 < report["op_seconds_per_step_total"] <= 2.5 * report["step_seconds_traced"]


# -- the official code side by side, gradient checkpointing ---------------------------------

# A checkout of TiankaiHang/Min-SNR-Diffusion-Training; without it (or without torch) the
# official half is skipped and only our side runs.
OFFICIAL_DIR = os.environ.get("KERAS_MINSNR_OFFICIAL_DIR")


def test_vs_official_narrows_the_task_only_when_asked():
    import vs_official

    full = vs_official.parse_args([])
    assert vs_official.task_of(full) == vs_official.VIT_B and vs_official.report_suffix(full) == ""
    small = vs_official.parse_args(["--width", "256", "--depth", "2"])
    assert vs_official.task_of(small) == dict(vs_official.VIT_B, hidden_size=256, num_heads=4,
                                              depth=2)
    assert vs_official.report_suffix(small) == "_w256_d2"
    with pytest.raises(SystemExit):
        vs_official.parse_args(["--width", "0"])


def test_tf_onednn_children_run_with_and_without_onednn(tmp_path):
    """The A/B's children really differ: each asks TensorFlow whether oneDNN is on, and the
    benchmark refuses a child whose answer does not match its setting."""
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("its children are TensorFlow processes: run once, in the TensorFlow pass")
    import tf_onednn

    tf_onednn.main(["--quick", "--output-dir", str(tmp_path)])
    report = json.loads((tmp_path / "tf_onednn.json").read_text())
    assert sorted(c["onednn"] for c in report["children"]) == [False, True]
    assert report["summary"]["vit_tiny_b128"]["step_s_on"] > 0


def test_vs_official_alternates_both_sides_of_one_step(monkeypatch):
    import flops
    import vs_official

    args = vs_official.parse_args(["--child", "--quick", "--precision", "float32"]
                                  + (["--official", OFFICIAL_DIR] if OFFICIAL_DIR else []))
    args.warmup = 0
    # The rates are the machine's, not the step's: left out to keep the test short.
    monkeypatch.setattr(vs_official, "matmul_rates", lambda *a: {"torch_float32": 1.0})
    monkeypatch.setattr(flops, "backbone_forward_flops", lambda *a: (1e9, None))
    row = vs_official.child(args)
    vs_official.add_rates(row, 3e9)
    if "official" in row["step_s"]:
        assert row["rates"]["official"]["fraction_of_matmul_rate"] == pytest.approx(
            3e9 / row["step_s"]["official"] / 1e9)
    assert row["step_s"]["ours"] > 0 and all(math.isfinite(v) for v in row["losses"]["ours"])
    assert len(row["load_average_before"]) == 3
    why_not = vs_official.official_available(args.official)
    if why_not is not None:
        assert row["official_skipped"] == why_not and "official" not in row["step_s"]
        pytest.skip(f"official half skipped: {why_not}")
    # The real official ViT (built through the timm stand-in): its parameters are ours plus
    # its timestep table (4000 rows), minus our timestep MLP (256 -> d -> d), the k bias
    # it lacks (d per block) and our final LayerNorm (it has none).
    task = vs_official.QUICK
    d = task["hidden_size"]
    ours_only = (256 * d + d) + (d * d + d) + task["depth"] * d + 2 * d
    assert row["official_params"] == row["ours_params"] - ours_only + 4000 * d
    assert math.isfinite(row["losses"]["official"][0]) and row["speed_ours_over_official"] > 0


def test_remat_benchmark_child_trains_with_checkpointing_and_reports_memory():
    """The child of benchmarks/remat.py (the same numbers with and without: test_remat)."""
    import remat

    row = remat.child(remat.parse_args(["--child", "--quick", "--checkpointing", "1"]))
    assert row["gradient_checkpointing"] is True and math.isfinite(row["losses"][0])
    assert row["step_ms"] > 0 and row["peak_rss_mib"] >= row["rss_before_first_step_mib"]
    if row["backend"] == "jax":
        assert row["xla_temp_mib"] > 0


def test_memory_plan_with_checkpointing_keeps_one_block_and_the_block_inputs(monkeypatch):
    # Importing memory_plan sets KERAS_BACKEND=jax for its own runs; later subprocesses
    # of this session keep the backend they were given.
    monkeypatch.setenv("KERAS_BACKEND", os.environ.get("KERAS_BACKEND", "tensorflow"))
    import memory_plan

    b, h, f, a, depth, s = 8, 32, 128, 2, 3, 16  # 8x8 latents, patch 2: 16 tokens
    backbone = memory_plan.abstract_backbone(
        "dit_s_2", depth=depth, hidden_size=h, num_heads=a, image_shape=(8, 8, 4),
        num_classes=10)
    per_block = s * (8 * h + 4 * h + 2 * f + 2 * a * s)  # one model shard
    plain = memory_plan.activation_elements(backbone, b, 1)
    remat = memory_plan.activation_elements(backbone, b, 1, gradient_checkpointing=True)
    assert plain == b * (depth * per_block + 4 * s * h)
    assert remat == b * (depth * s * h + per_block + 4 * s * h)
    rows = memory_plan.plan(backbone, devices=1, batch=b, precision="fp32",
                            gradient_checkpointing=True)
    assert rows[0]["activations"] == 4 * remat


# -- issue 26: the published defaults, batch grid, diagnostics ------------------------------


def test_vit_tiny_defaults_are_the_published_run():
    """`--backbone vit_tiny` without options repeats the ViT headline docs/results.md
    quotes (its committed JSON): constant vs Min-SNR-5 per target, 4000 steps at batch
    128, FID every 500 steps, 3 seeds."""
    with open(os.path.join(ROOT, "docs", "results", "vit_b128",
                           "convergence_vit.json")) as f:
        published = json.load(f)
    args = convergence.parse_args(["--backbone", "vit_tiny"])
    assert args.steps == published["steps"] == 4000
    assert list(range(args.eval_every, args.steps + 1, args.eval_every)) == published[
        "checkpoints"]
    assert args.num_samples == published["num_samples"]
    assert args.seeds == published["seeds"]
    assert published["sampler"].startswith(f"ddim-{args.sample_steps},")
    assert args.batch_size == published["backbone_config"]["batch_size"] == 128
    assert [name for name, *_ in convergence.run_plan(
        args.targets, args.ablation, args.plan)] == published["runs"]


def _grid_rows(seed, run, batch_size, fids, steps=(20, 40)):
    weighting = run.split("/")[1].split("_5")[0]
    return [
        {"seed": seed, "run": run, "target": "sample", "weighting": weighting,
         "gamma": 5.0 if "min_snr" in run else "", "step": step, "fid": fid,
         "kid_mean": 0.0, "kid_std": 0.0, "train_seconds": 1.0, "batch_size": batch_size,
         "images_seen": step * batch_size}
        for step, fid in zip(steps, fids)
    ]


def test_batch_grid_resumes_into_one_csv_and_json(tmp_path):
    """Every training of the grid was finished before a kill: the rerun trains nothing and
    writes the grid's CSV, JSON (one summary per batch size) and plot."""
    out = tmp_path / "results"
    argv = ["--quick", "--batch-sizes", "8", "16", "--output-dir", str(out)]
    args = convergence.parse_args(argv)
    assert args.targets == ["sample"] and args.seeds == [0]
    assert [name for name, *_ in convergence.run_plan(args.targets, args.ablation,
                                                      args.plan)] == [
        "sample/constant", "sample/min_snr_5"]
    workdir = out / "convergence_batch_grid_runs"
    workdir.mkdir(parents=True)
    settings = convergence.run_settings(args)
    planted = {  # (batch, run): FIDs at steps 20, 40
        (8, "sample/constant"): (30.0, 10.0), (8, "sample/min_snr_5"): (40.0, 20.0),
        (16, "sample/constant"): (50.0, 40.0), (16, "sample/min_snr_5"): (30.0, 20.0),
    }
    for (size, run), fids in planted.items():
        convergence.save_finished_run(
            str(workdir / (convergence.run_key(0, run, size) + ".json")), settings,
            _grid_rows(0, run, size, fids))
    assert convergence.main(argv) == 0
    assert not workdir.exists()
    with open(out / "convergence_batch_grid.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert {(int(r["batch_size"]), int(r["step"]), int(r["images_seen"])) for r in rows} == {
        (8, 20, 160), (8, 40, 320), (16, 20, 320), (16, 40, 640)}
    summary = json.loads((out / "convergence_batch_grid.json").read_text())
    grid = summary["batch_grid"]
    # Batch 8: Min-SNR never reaches constant's final 10; constant reaches Min-SNR's final
    # 20 at step 30 (halfway from 30 to 10), Min-SNR at 40: reverse 40/30. Batch 16:
    # constant reaches its 40 at step 40, Min-SNR is below it at step 20: 40/20 = 2.
    assert grid["8"]["speedups"]["sample"]["speedup"] is None
    assert grid["8"]["speedups"]["sample"]["constant_speedup"] == pytest.approx(40 / 30)
    assert grid["16"]["speedups"]["sample"]["speedup"] == pytest.approx(2.0)
    assert summary["images_seen_at_checkpoints"] == {"8": [160, 320], "16": [320, 640]}
    assert summary["batch_sizes"] == [8, 16]
    assert (out / "convergence_batch_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --from-csv re-summarises the grid per batch size from the CSV alone.
    (out / "convergence_batch_grid.json").write_text(json.dumps({**summary, "batch_grid": {}}))
    assert convergence.main(["--batch-sizes", "8", "16", "--from-csv", "--output-dir",
                             str(out)]) == 0
    again = json.loads((out / "convergence_batch_grid.json").read_text())
    assert again["batch_grid"] == grid
    with pytest.raises(SystemExit):
        convergence.parse_args(["--batch-sizes", "32", "0"])


def test_batch_grid_reuses_the_cells_a_finished_run_trained(tmp_path):
    """`--reuse`: the grid takes its batch-16 cells from a finished batch-16 run's CSV
    (trains nothing for them), and refuses a run whose settings differ."""
    source = tmp_path / "b16"
    src_argv = ["--quick", "--batch-size", "16", "--targets", "sample", "--no-ablation",
                "--output-dir", str(source)]
    src_args = convergence.parse_args(src_argv)
    workdir = source / "convergence_runs"
    workdir.mkdir(parents=True)
    for run, fids in (("sample/constant", (50.0, 40.0)), ("sample/min_snr_5", (30.0, 20.0))):
        convergence.save_finished_run(
            str(workdir / (convergence.run_key(0, run) + ".json")),
            convergence.run_settings(src_args), _grid_rows(0, run, 16, fids))
    assert convergence.main(src_argv) == 0

    out = tmp_path / "grid"
    argv = ["--quick", "--batch-sizes", "8", "16", "--output-dir", str(out), "--reuse",
            str(source / "convergence.json")]
    grid_workdir = out / "convergence_batch_grid_runs"
    grid_workdir.mkdir(parents=True)
    for run, fids in (("sample/constant", (30.0, 10.0)), ("sample/min_snr_5", (40.0, 20.0))):
        convergence.save_finished_run(
            str(grid_workdir / (convergence.run_key(0, run, 8) + ".json")),
            convergence.run_settings(convergence.parse_args(argv)),
            _grid_rows(0, run, 8, fids))
    assert convergence.main(argv) == 0
    with open(out / "convergence_batch_grid.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["batch_size"] == "16"]
    assert [(r["run"], int(r["step"]), float(r["fid"]), int(r["images_seen"])) for r in rows] == [
        ("sample/constant", 20, 50.0, 320), ("sample/constant", 40, 40.0, 640),
        ("sample/min_snr_5", 20, 30.0, 320), ("sample/min_snr_5", 40, 20.0, 640)]
    grid = json.loads((out / "convergence_batch_grid.json").read_text())["batch_grid"]
    assert grid["16"]["speedups"]["sample"]["speedup"] == pytest.approx(2.0)

    # A run with other settings is refused, naming the setting; so is one at a batch
    # size the grid does not have.
    other = tmp_path / "other"
    summary = json.loads((source / "convergence.json").read_text())
    other.mkdir()
    (other / "convergence.csv").write_text((source / "convergence.csv").read_text())
    (other / "convergence.json").write_text(json.dumps({**summary, "num_samples": 7}))
    argv[-1] = str(other / "convergence.json")
    with pytest.raises(SystemExit, match="num_samples is 7, this grid's is 100"):
        convergence.main(argv)
    with pytest.raises(SystemExit, match="batch size 16 is not in --batch-sizes"):
        convergence.main(["--quick", "--batch-sizes", "8", "32", "--output-dir", str(out),
                          "--reuse", str(source / "convergence.json")])


def test_diagnostics_summary_means_over_seeds_and_tables():
    import diagnostics

    per_seed = {
        "x0_error": {"": {"sample/constant": {"40": {
            "0": {"timesteps": [10, 990], "snr": [400.0, 1e-4], "x0_mse": [0.1, 0.9]},
            "1": {"timesteps": [10, 990], "snr": [400.0, 1e-4], "x0_mse": [0.3, 0.7]},
        }}}},
        "split_fid": {"": {"sample": {"40": {
            "constant|constant": {"0": 10.0, "1": 12.0},
            "constant|min_snr_5": {"0": 8.0, "1": 9.0},
        }}}},
    }
    summary = diagnostics.summarise_diagnostics(per_seed, {"t_split": 500})
    entry = summary["x0_error"][""]["sample/constant"]["40"]
    assert entry["x0_mse"] == [pytest.approx(0.2), pytest.approx(0.8)]
    cells = summary["split_fid"][""]["sample"]["40"]
    assert cells["constant|min_snr_5"]["fid"] == pytest.approx(8.5)
    table = diagnostics.diagnostics_markdown(summary)
    assert "| x₀ `constant` | 0.2 | 0.8 |" in table
    assert "| SNR | 400 | 0.0001 |" in table
    assert "| `constant` | 11.00 | 8.50 |" in table and "| `min_snr_5` | — | — |" in table


def test_diagnostics_effects_are_paired_over_seeds_with_t_intervals(tmp_path):
    """The effects table: Min-SNR-5's x₀-error ratio per timestep (interval on the log)
    and the FID change per sampler half, each checked against numpy and the t quantile
    t(0.975, 2) = 4.302653 written out; --from-csv rebuilds them from the written JSON."""
    import convergence
    import diagnostics

    t975 = 4.302652729911275  # Student t, 2 degrees of freedom, 97.5% quantile
    const = {"0": [0.10, 0.50], "1": [0.12, 0.40], "2": [0.08, 0.60]}
    minsnr = {"0": [0.05, 0.55], "1": [0.07, 0.48], "2": [0.05, 0.62]}
    fids = {  # noisy|clean -> seed -> FID
        "constant|constant": {"0": 3.0, "1": 2.9, "2": 2.8},
        "constant|min_snr_5": {"0": 2.5, "1": 2.6, "2": 2.4},
        "min_snr_5|constant": {"0": 3.1, "1": 2.8, "2": 2.8},
        "min_snr_5|min_snr_5": {"0": 2.6, "1": 2.4, "2": 2.5},
    }

    def entry(values):
        return {s: {"timesteps": [10, 990], "snr": [400.0, 1e-4], "x0_mse": v}
                for s, v in values.items()}

    per_seed = {
        "x0_error": {"": {"sample/constant": {"40": entry(const)},
                          "sample/min_snr_5": {"40": entry(minsnr)}}},
        "split_fid": {"": {"sample": {"40": fids}}},
    }
    summary = diagnostics.summarise_diagnostics(per_seed, {"t_split": 500})
    effects = summary["effects"][""]["sample"]

    logs = np.log([minsnr[s][0] / const[s][0] for s in "012"])
    half = t975 * logs.std(ddof=1) / np.sqrt(3)
    ratio = effects["x0_error_ratio"]["by_timestep"][0]
    assert ratio["t"] == 10
    assert ratio["mean"] == pytest.approx(np.exp(logs.mean()), rel=1e-9)
    assert ratio["low"] == pytest.approx(np.exp(logs.mean() - half), rel=1e-9)
    assert ratio["high"] == pytest.approx(np.exp(logs.mean() + half), rel=1e-9)

    changes = effects["split"]["fid_change"]
    assert set(changes) == {"clean steps (noisy: constant)", "noisy steps (clean: constant)",
                            "clean steps (noisy: min_snr_5)", "noisy steps (clean: min_snr_5)"}
    d = np.array([fids["min_snr_5|min_snr_5"][s] - fids["constant|min_snr_5"][s]
                  for s in "012"])  # Min-SNR-5 takes the noisy half; clean half: Min-SNR-5
    got = changes["noisy steps (clean: min_snr_5)"]
    assert got["mean"] == pytest.approx(d.mean(), abs=1e-12)
    assert got["high"] - got["mean"] == pytest.approx(t975 * d.std(ddof=1) / np.sqrt(3))
    d = np.array([fids["constant|min_snr_5"][s] - fids["constant|constant"][s] for s in "012"])
    assert changes["clean steps (noisy: constant)"]["mean"] == pytest.approx(-0.4)
    assert changes["clean steps (noisy: constant)"]["low"] == pytest.approx(
        d.mean() - t975 * d.std(ddof=1) / np.sqrt(3))

    table = diagnostics.diagnostics_markdown(summary)
    low, high = np.exp(logs.mean() - half), np.exp(logs.mean() + half)
    assert f"| x₀ | {np.exp(logs.mean()):.2f} [{low:.2f}, {high:.2f}] |" in table
    assert "| x₀ | -0.40 [" in table and "on the clean steps (noisy: constant)" in table

    # Written, then rebuilt by --from-csv from the per-seed values alone.
    out = tmp_path / "out"
    out.mkdir()
    rows = [{**row, "run": f"sample/{row['run'].split('/')[1]}", "target": "sample",
             "seed": seed}
            for seed in (0, 1, 2)
            for row in _planted_rows("epsilon/constant", "constant", "", (9.0, 3.0))
            + _planted_rows("epsilon/min_snr_5", "min_snr", 5.0, (8.0, 2.5))]
    with open(out / "convergence.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=convergence.CSV_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    (out / "convergence.json").write_text(json.dumps({"interval": "t"}))
    stale = {k: v for k, v in summary.items() if k != "effects"}
    (out / "convergence_diagnostics.json").write_text(json.dumps(stale))
    assert convergence.main(["--from-csv", "--output-dir", str(out)]) == 0
    rebuilt = json.loads((out / "convergence_diagnostics.json").read_text())
    assert rebuilt["effects"] == json.loads(json.dumps(summary["effects"]))
    assert "on the clean steps (noisy: constant)" in (
        out / "convergence_diagnostics.md").read_text()


def test_diagnose_measures_planted_checkpoints_and_resumes(tmp_path):
    """--diagnose on finished runs whose EMA checkpoints are planted: the x₀ errors sit on
    the cosine schedule's SNR grid, a recorded value is reused, and the split sampler with
    A == B gives the FID of the benchmark's own (plain DDIM) evaluation."""
    import diagnostics
    from keras_minsnr.evaluation import evaluate_model
    from keras_minsnr.evaluation import real_images_for

    out = tmp_path / "results"
    argv = ["--quick", "--targets", "sample", "--steps", "20", "--eval-every", "20",
            "--num-samples", "8", "--sample-steps", "2", "--num-real", "200", "--diagnose",
            "--output-dir", str(out)]
    args = convergence.parse_args(argv)
    workdir = out / "convergence_runs"
    workdir.mkdir(parents=True)
    settings = convergence.run_settings(args)
    initial = convergence.initial_backbone_weights(args, 0)
    rng = np.random.default_rng(0)
    weights = {"sample/constant": initial,
               "sample/min_snr_5": [w + 0.01 * rng.standard_normal(w.shape).astype(w.dtype)
                                    for w in initial]}
    for run, values in weights.items():
        key = convergence.run_key(0, run)
        rows = [dict(r, target="sample") for r in
                _planted_rows(run, run.split("/")[1], "", (50.0, 40.0))][:1]
        convergence.save_finished_run(str(workdir / (key + ".json")), settings, rows)
        diagnostics.save_weights(diagnostics.checkpoint_path(str(workdir / key), 20), values)
    # A split FID measured before a kill is reused.
    diag_settings = {"timesteps": list(diagnostics.DIAGNOSTIC_TIMESTEPS), "t_split": 500,
                     "num_samples": 8, "sample_steps": 2, "sample_seed": 1234,
                     "noise_seed": 0}
    (workdir / "diag_split_0_sample_min_snr_5_then_constant_step20.json").write_text(
        json.dumps({"settings": diag_settings, "value": 123.0}))
    assert convergence.main(argv) == 0
    summary = json.loads((out / "convergence_diagnostics.json").read_text())
    from keras_minsnr.schedules import NoiseSchedule

    abar = NoiseSchedule("cosine", num_timesteps=1000).alphas_cumprod
    for run in weights:
        entry = summary["x0_error"][""][run]["20"]
        assert entry["timesteps"] == [10, 100, 300, 500, 700, 850, 950, 990]
        t = np.array(entry["timesteps"])
        np.testing.assert_allclose(entry["snr"], abar[t] / (1 - abar[t]), rtol=1e-12)
        assert all(math.isfinite(v) and v > 0 for v in entry["x0_mse"])
    cells = summary["split_fid"][""]["sample"]["20"]
    assert set(cells) == {"constant|constant", "constant|min_snr_5", "min_snr_5|constant",
                          "min_snr_5|min_snr_5"}
    assert cells["min_snr_5|constant"]["fid"] == 123.0
    # The diagonal is the plain sampler: the benchmark's FID evaluation of the same weights.
    model = convergence._model_for(args, "sample/min_snr_5", 0, None)
    model.backbone.set_weights(weights["sample/min_snr_5"])
    model.reset_ema()
    real = real_images_for({"data": "digits", "image_size": 8}, 200)
    plain = evaluate_model(model, real, 8, "digits", num_steps=2, seed=1234)
    assert cells["min_snr_5|min_snr_5"]["fid"] == pytest.approx(plain["fid"], rel=1e-6)
    table = (out / "convergence_diagnostics.md").read_text()
    assert "| `min_snr_5` | 123.00 |" in table and "t=990" in table
    assert (out / "convergence_diagnostics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diagnose_records_each_pair_as_it_finishes_and_a_new_machine_needs_no_checkpoints(
        tmp_path, monkeypatch):
    """The evidence run spans sessions on machines that keep only the work directory's JSON
    records: a target's diagnostics are measured as soon as its pair has trained (not after
    every run), and a pair whose diagnostics are recorded is not trained again when its EMA
    checkpoints are gone."""
    out = tmp_path / "results"
    argv = ["--quick", "--targets", "sample", "epsilon", "--no-ablation", "--steps", "20",
            "--eval-every", "20", "--num-samples", "8", "--sample-steps", "2",
            "--num-real", "200", "--diagnose", "--output-dir", str(out)]
    args = convergence.parse_args(argv)
    workdir = out / "convergence_runs"
    initial = convergence.initial_backbone_weights(args, 0)
    trained = []

    def fake_train(args, name, target, weighting, gamma, seed, initial_weights, real,
                   extractor, workdir, batch_size=None):
        if name == "epsilon/min_snr_5" and len(trained) == 3:
            raise KeyboardInterrupt("the session ended")
        trained.append(name)
        rng = np.random.default_rng(len(trained))
        values = [w + 0.01 * rng.standard_normal(w.shape).astype(w.dtype) for w in initial]
        key = convergence.run_key(seed, name, batch_size)
        diagnostics.save_weights(
            diagnostics.checkpoint_path(os.path.join(workdir, key), 20), values)
        return [dict(r, target=target) for r in
                _planted_rows(name, weighting, gamma or "", (50.0, 40.0))][:1]

    monkeypatch.setattr(convergence, "train_and_evaluate", fake_train)
    with pytest.raises(KeyboardInterrupt):
        convergence.main(argv)
    assert trained == ["sample/constant", "sample/min_snr_5", "epsilon/constant"]
    records = sorted(p.name for p in workdir.glob("diag_*.json"))
    assert records == sorted(
        [f"diag_x0_0_sample_{w}_step20.json" for w in ("constant", "min_snr_5")]
        + [f"diag_split_0_sample_{a}_then_{b}_step20.json"
           for a in ("constant", "min_snr_5") for b in ("constant", "min_snr_5")])
    recorded = json.loads((workdir / "diag_split_0_sample_constant_then_min_snr_5_step20"
                           ".json").read_text())["value"]
    assert math.isfinite(recorded) and recorded > 0
    # A new machine: only the JSON records came along.
    for path in workdir.iterdir():
        if not path.name.endswith(".json") or "_resume" in path.name:
            path.unlink()
    trained.clear()
    assert convergence.main(argv) == 0
    # epsilon/constant finished, but its pair's split sampler needs its weights: again.
    assert trained == ["epsilon/constant", "epsilon/min_snr_5"]
    summary = json.loads((out / "convergence_diagnostics.json").read_text())
    assert summary["split_fid"][""]["sample"]["20"]["constant|min_snr_5"]["fid"] == recorded
    assert set(summary["split_fid"][""]) == {"sample", "epsilon"}


def test_progress_reads_a_run_under_way_from_its_records(tmp_path, capsys):
    """--progress: the finished pairs of each seed with that seed's speed-up (the steps
    constant needs for its final FID over Min-SNR-5's, interpolated by hand below), the
    trainings left; a record written under other settings is not counted."""
    out = tmp_path / "results"
    argv = ["--targets", "sample", "--no-ablation", "--steps", "40", "--eval-every", "10",
            "--seeds", "0", "1", "2", "--output-dir", str(out)]
    settings = convergence.run_settings(convergence.parse_args(argv))
    workdir = out / "convergence_runs"
    workdir.mkdir(parents=True)

    def plant(seed, run, fids, record_settings=settings):
        rows = [{"seed": seed, "run": run, "step": step, "fid": fid}
                for step, fid in zip((10, 20, 30, 40), fids)]
        convergence.save_finished_run(
            str(workdir / (convergence.run_key(seed, run) + ".json")), record_settings, rows)

    plant(0, "sample/constant", (40.0, 30.0, 20.0, 10.0))
    plant(0, "sample/min_snr_5", (30.0, 24.0, 12.0, 8.0))
    plant(1, "sample/constant", (40.0, 30.0, 20.0, 10.0))
    plant(1, "sample/min_snr_5", (45.0, 35.0, 25.0, 15.0))
    plant(2, "sample/constant", (40.0, 30.0, 20.0, 10.0))
    plant(2, "sample/min_snr_5", (1.0, 1.0, 1.0, 1.0), {**settings, "steps": 99})
    assert convergence.main(argv + ["--progress"]) == 0
    table = capsys.readouterr().out
    # Seed 0: constant reaches 10 at step 40; Min-SNR-5 passes 10 between steps 30 (12)
    # and 40 (8), at 30 + 10 * (12 - 10) / (12 - 8) = 35: 40 / 35 = 1.14x.
    assert "| 0 | sample/min_snr_5 vs constant | 40.00 / 30.00 / 10.00 | " \
        "30.00 / 24.00 / 8.00 | 1.14x |" in table
    assert "| 1 | sample/min_snr_5 vs constant | 40.00 / 30.00 / 10.00 | " \
        "45.00 / 35.00 / 15.00 | never reaches it |" in table
    assert "| 2 |" not in table
    assert table.startswith("5 of 6 trainings finished")
    assert "To run: seed 2 sample/min_snr_5." in table
    with pytest.raises(SystemExit, match="--batch-sizes"):
        convergence.main(argv + ["--progress", "--batch-sizes", "32", "64"])
    # With --diagnose, the diagnostics recorded so far (seed 0's pair) follow.
    diag_settings = diagnostics.diagnostic_settings(convergence.parse_args(argv))
    for step in (10, 20, 30, 40):
        for weighting, mse in (("constant", [0.1, 0.9]), ("min_snr_5", [0.2, 0.6])):
            value = {"timesteps": [10, 990], "snr": [400.0, 1e-4], "x0_mse": mse}
            (workdir / f"diag_x0_0_sample_{weighting}_step{step}.json").write_text(
                json.dumps({"settings": diag_settings, "value": value}))
            for clean in ("constant", "min_snr_5"):
                path = diagnostics.split_record_path(str(workdir), "0_sample", weighting,
                                                     clean, step)
                fid = 7.0 if (weighting, clean) == ("constant", "min_snr_5") else 9.0
                with open(path, "w") as f:
                    json.dump({"settings": diag_settings, "value": fid}, f)
    assert convergence.main(argv + ["--progress", "--diagnose"]) == 0
    table = capsys.readouterr().out
    assert "Diagnostics recorded so far (split sampler: seeds 0)" in table
    assert "| x₀ `min_snr_5` | 0.2 | 0.6 |" in table
    assert "| `constant` | 9.00 | 7.00 |" in table


def test_evidence_estimate_adds_up_the_plan():
    import evidence_estimate

    part = evidence_estimate.parse_part("grid:32,128:1000:250:2:3")
    assert part == {"name": "grid", "batch_sizes": [32, 128], "steps": 1000,
                    "eval_every": 250, "runs": 2, "seeds": 3}
    # 2 runs x 3 seeds x (1000 steps at 0.1 s + 4 FIDs of 5 s, and at 0.4 s + 4 FIDs),
    # and with diagnostics 2 more FIDs per checkpoint (12 FIDs per training, not 4).
    seconds = evidence_estimate.part_seconds(part, {32: 0.1, 128: 0.4}, 5.0)
    assert seconds == pytest.approx(6 * (100 + 20 + 400 + 20))
    assert evidence_estimate.part_seconds(part, {32: 0.1, 128: 0.4}, 5.0, 2.0) == (
        pytest.approx(6 * (100 + 60 + 400 + 60)))
    with pytest.raises(Exception, match="NAME:BATCHES:STEPS"):
        evidence_estimate.parse_part("grid:32:1000")


@pytest.mark.parametrize("script, child_function, argv", [
    ("throughput", "child", ["--child", "dit_small"]),
    ("bf16", "timing_child", ["--child", "dit_small"]),
    ("bf16", "digits_child", ["--digits-child"]),
    ("remat", "child", ["--child"]),
])
def test_benchmark_children_import_keras_minsnr_before_their_backend(
        script, child_function, argv):
    """A timing child that imports keras first starts TensorFlow before keras_minsnr can set
    its CPU defaults (oneDNN, the XLA:CPU flags), so it would time something no user runs.
    The child function is replaced by one that reports what was set when it was called."""
    import subprocess

    code = (f"import json, os, sys; sys.path.insert(0, 'benchmarks'); import {script}\n"
            f"def spy(*a, **k):\n"
            f"    return {{'onednn': os.environ.get('TF_ENABLE_ONEDNN_OPTS'),\n"
            f"            'loaded': 'keras_minsnr' in sys.modules}}\n"
            f"{script}.{child_function} = spy\n"
            f"sys.exit({script}.main({argv!r}))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_ENABLE_ONEDNN_OPTS", "KERAS_MINSNR_XLA_CPU_FLAGS")}
    env["KERAS_BACKEND"] = "tensorflow"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(next(line for line in out.stdout.splitlines()
                             if line.startswith("RESULT "))[len("RESULT "):])
    assert result == {"onednn": "1", "loaded": True}
