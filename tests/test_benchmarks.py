"""The convergence benchmark: its quick mode writes well-formed results; the speed-up rule."""

import csv
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import convergence  # noqa: E402


def test_steps_to_reach_interpolates_first_crossing():
    steps = [100, 200, 300, 400]
    # 25 at 200, 15 at 300: 20 is reached halfway, at 250.
    assert convergence.steps_to_reach(steps, [45, 25, 15, 10], 20.0) == pytest.approx(250.0)
    # Already below at the first checkpoint: credited with that checkpoint.
    assert convergence.steps_to_reach(steps, [5, 4, 3, 2], 20.0) == 100.0
    assert convergence.steps_to_reach(steps, [50, 40, 30, 21], 20.0) is None
    # Non-monotone: the first crossing counts (100 + 30/32 * 100).
    assert convergence.steps_to_reach(steps, [50, 18, 30, 20], 20.0) == pytest.approx(193.75)


def test_speedup_on_synthetic_curves():
    steps = [100, 200, 300, 400]
    value, base, cand, target = convergence.speedup(steps, [50, 40, 30, 20], [45, 25, 15, 10])
    assert target == 20.0 and base == 400.0 and cand == pytest.approx(250.0)
    assert value == pytest.approx(1.6)
    value, _, cand, _ = convergence.speedup(steps, [50, 40, 30, 20], [60, 55, 50, 45])
    assert value is None and cand is None
    with pytest.raises(ValueError, match="equal length"):
        convergence.steps_to_reach([1, 2], [1.0], 0.5)


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
