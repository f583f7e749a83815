"""Run directories: config resolution and the CLI (kills and resumption: test_reliability)."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from keras_minsnr import cli
from keras_minsnr import training
from keras_minsnr.visualization import image_grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--set", "backbone_args.hidden_size=32",
    "--set", "backbone_args.depth=1",
    "--set", "num_samples=10",
    "--set", "sample_steps=2",
    "--set", "batch_size=16",
]


def test_resolve_config_layers_defaults_recipe_and_overrides():
    recipe = {"gamma": 3.0, "backbone_args": {"depth": 2}}
    overrides = training.parse_overrides(
        ["gamma=1", "backbone_args.hidden_size=64", "weighting=soft_min_snr", "clipnorm=1.5"]
    )
    config = training.resolve_config(recipe, overrides)
    assert config["gamma"] == 1
    assert config["backbone_args"] == {"depth": 2, "hidden_size": 64}
    assert config["weighting"] == "soft_min_snr" and config["clipnorm"] == 1.5
    # the paper's defaults where nothing overrides them
    assert (config["learning_rate"], config["beta_1"], config["beta_2"]) == (1e-4, 0.99, 0.99)
    assert (config["weight_decay"], config["ema_decay"], config["label_dropout"]) == (
        0.03,
        0.9999,
        0.15,
    )


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"gama": 5}, "Unknown config key 'gama'.*gamma"),
        ({"gamma.x": 5}, "not a dict"),
        ({"steps": 0}, "steps"),
    ],
)
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        training.resolve_config({}, overrides)


def test_parse_overrides_rejects_missing_equals():
    with pytest.raises(ValueError, match="key=value"):
        training.parse_overrides(["gamma"])


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


def test_cli_errors_name_the_valid_choices(tmp_path, capsys):
    assert cli.main(["train", "mnist", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Unknown recipe 'mnist'" in err and "digits" in err
    assert cli.main(["train", "digits", "--output-dir", str(tmp_path), "--set", "lr=1"]) == 2
    assert "Unknown config key 'lr'" in capsys.readouterr().err
    assert cli.main(["sample", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    assert "--output-dir" in capsys.readouterr().out
