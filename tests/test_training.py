"""Run directories: the CLI end to end (kills and resumption: test_reliability.py).

Config checks are in test_run_config.py, command-line errors in test_cli.py.
"""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from keras_minsnr import cli
from keras_minsnr.visualization import image_grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--set", "backbone_args.hidden_size=32",
    "--set", "backbone_args.depth=1",
    "--set", "num_samples=10",
    "--set", "sample_steps=2",
    "--set", "batch_size=16",
]


def test_image_grid_layout_and_values():
    images = np.stack([np.full((2, 2, 1), v, np.float32) for v in (-1.0, 0.0, 1.0)])
    grid = image_grid(images, columns=3, padding=1, min_size=6)
    # 3 tiles of 2x2 pixels, one pixel of white padding around each
    assert grid.shape == (4, 10, 3)
    assert grid[1, 1].tolist() == [0, 0, 0]  # -1 -> black
    assert grid[1, 4].tolist() == [128, 128, 128]  # 0 -> mid grey (127.5 rounds to 128)
    assert grid[1, 7].tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        image_grid(np.zeros((2, 2, 2)))


def test_cli_trains_samples_and_refuses_to_overwrite(tmp_path, capsys):
    run = str(tmp_path / "run")
    args = ["train", "digits", "--output-dir", run, "--steps", "6", *TINY,
            "--set", "steps_per_epoch=3"]
    assert cli.main(args) == 0
    for name in ("config.json", "metrics.csv", "model.keras", "samples.png",
                 os.path.join("checkpoints", "state.json")):
        assert os.path.exists(os.path.join(run, name)), name
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    assert config["steps"] == 6 and config["backbone_args"]["depth"] == 1
    with open(os.path.join(run, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    grid = Image.open(os.path.join(run, "samples.png"))
    assert grid.size[0] >= 256  # enlarged for viewing

    assert cli.main(["sample", run, "--num-samples", "4", "--steps", "2",
                     "--sampler", "edm_heun", "--output", str(tmp_path / "s.png")]) == 0
    assert os.path.exists(tmp_path / "s.png")

    assert cli.main(["evaluate", run, "--num-samples", "20", "--steps", "2"]) == 0
    with open(os.path.join(run, "eval.json")) as f:
        result = json.load(f)
    assert result["extractor"] == "digits" and result["num_fake"] == 20
    assert result["fid"] > 0 and result["step"] == 6

    # Same directory, different settings: refused, nothing overwritten.
    before = os.path.getmtime(os.path.join(run, "model.keras"))
    assert cli.main([*args[:-2], "--set", "steps_per_epoch=3", "--set", "gamma=1"]) == 2
    assert "different configuration (changed: gamma)" in capsys.readouterr().err
    assert os.path.getmtime(os.path.join(run, "model.keras")) == before
