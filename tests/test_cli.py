"""The command line: bad input fails at once with one line, help and listings, sample files."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from keras_minsnr import builders
from keras_minsnr import cli
from keras_minsnr import run_config
from keras_minsnr import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A short run, so that the old behaviour (fail after an epoch) showed in seconds.
SHORT = ["--set", "steps=2", "--set", "steps_per_epoch=2", "--set", "sample_steps=2",
         "--set", "num_samples=4"]


def _one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("keras-minsnr: error: "), err
    return lines[0]


def _run(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


# Each bad flag: exit code 2, one line naming the key, the value and what is allowed, and
# nothing written (the run directory is not even created).
@pytest.mark.parametrize("flag, words", [
    ("sampler=dim", ["sampler", "'dim'", "ddim", "edm_heun"]),
    ("guidance_scale=high", ["guidance_scale", "'high'", "a number >= 0"]),
    ("steps=abc", ["steps", "'abc'", "an integer >= 1"]),
    ("gamma=abc", ["gamma", "'abc'", "a number > 0"]),
    ("learning_rate=fast", ["learning_rate", "'fast'", "a number > 0"]),
    ("label_dropout=1.5", ["label_dropout", "1.5", "[0, 1]"]),
    ("mixed_precision=fp16", ["mixed_precision", "'fp16'", "mixed_bfloat16"]),
    ("terminal_weight=-1", ["terminal_weight", "-1", "limit"]),
])
def test_bad_set_value_fails_before_anything_is_written(tmp_path, capsys, flag, words):
    run = tmp_path / "run"
    code = cli.main(["train", "digits", "--output-dir", str(run), *SHORT, "--set", flag])
    line = _one_error_line(capsys)
    assert code == 2
    for word in words:
        assert word in line, (word, line)
    assert not run.exists()


def test_bad_steps_flag_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "digits", "--output-dir", str(tmp_path / "r"), "--steps", "abc"])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys)
    assert "--steps" in line and "'abc'" in line and "integer" in line


def test_output_dir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "taken"
    path.write_text("not a folder")
    assert cli.main(["train", "digits", "--output-dir", str(path), "--steps", "1"]) == 2
    line = _one_error_line(capsys)
    assert str(path) in line and "is a file" in line
    assert path.read_text() == "not a folder"


def test_output_dir_under_a_file(tmp_path, capsys):
    parent = tmp_path / "file"
    parent.write_text("x")
    run = parent / "run"
    assert cli.main(["train", "digits", "--output-dir", str(run), "--steps", "1"]) == 2
    line = _one_error_line(capsys)
    assert str(run) in line and str(parent) in line and "is a file" in line


def test_output_dir_on_a_read_only_disk(tmp_path, capsys, monkeypatch):
    # root may write into any folder, so the read-only disk is simulated: access(2)
    # answers EROFS there, which os.access reports as False.
    readonly = str(tmp_path / "mnt")
    os.mkdir(readonly)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p)
                        == readonly else real_access(p, mode, **kw))
    run = os.path.join(readonly, "run")
    assert cli.main(["train", "digits", "--output-dir", run, "--steps", "1"]) == 2
    line = _one_error_line(capsys)
    assert run in line and "not writable" in line and readonly in line
    assert not os.path.exists(run)


def test_unknown_recipe_and_key_name_the_valid_choices(tmp_path, capsys):
    assert cli.main(["train", "mnist", "--output-dir", str(tmp_path / "r")]) == 2
    line = _one_error_line(capsys)
    assert "Unknown recipe 'mnist'" in line and "digits" in line
    assert cli.main(["train", "digits", "--output-dir", str(tmp_path / "r"), "--set",
                     "lr=1"]) == 2
    line = _one_error_line(capsys)
    assert "Unknown config key 'lr'" in line and "learning_rate" in line
    assert cli.main(["sample", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in _one_error_line(capsys)
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory holding an untrained tiny digits model (sampling needs no training)."""
    from keras_minsnr.data import DatasetInfo

    run = str(tmp_path_factory.mktemp("run"))
    config = run_config.resolve_config(cli.load_recipe("digits"), {
        "backbone_args": {"hidden_size": 16, "depth": 1}})
    model = builders.build_model(config, DatasetInfo(name="digits", image_shape=(8, 8, 1),
                                                     num_classes=10))
    model.save(os.path.join(run, "model.keras"))
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(config, f)
    return run


@pytest.mark.parametrize("count", ["0", "-3"])
def test_sample_count_must_be_positive(run_dir, capsys, count):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sample", run_dir, "--num-samples", count])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys)
    assert "--num-samples" in line and repr(count) in line and ">= 1" in line
    assert not os.path.exists(os.path.join(run_dir, "samples_cli.png"))


def test_sample_output_extension_names_the_format(run_dir, tmp_path, capsys):
    args = ["sample", run_dir, "--num-samples", "2", "--steps", "2"]
    assert cli.main([*args, "--output", str(tmp_path / "s.jpg")]) == 0
    with Image.open(tmp_path / "s.jpg") as image:
        assert image.format == "JPEG"
    assert "Wrote 2 samples" in capsys.readouterr().out
    assert cli.main([*args, "--output", str(tmp_path / "s.txt")]) == 2
    line = _one_error_line(capsys)
    assert "s.txt" in line and ".png" in line and ".jpg" in line
    assert not (tmp_path / "s.txt").exists()


def test_train_passes_checkpoint_and_config_change_flags(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(training, "train", lambda config, run_dir, **kw: calls.append(
        (config, run_dir, kw)))
    run = str(tmp_path / "run")
    assert cli.main(["train", "digits", "--output-dir", run, "--checkpoint-every", "7"]) == 0
    config, run_dir, kwargs = calls[-1]
    assert config["checkpoint_every"] == 7 and run_dir == run
    assert kwargs == {}  # the keyword is passed only when the flag is given
    assert cli.main(["train", "digits", "--output-dir", run, "--allow-config-change",
                     "learning_rate", "warmup_steps", "--set", "learning_rate=1e-4"]) == 0
    config, _, kwargs = calls[-1]
    assert kwargs == {"allow_config_change": ["learning_rate", "warmup_steps"]}
    assert config["learning_rate"] == 1e-4


def test_allow_config_change_names_known_keys(tmp_path, capsys):
    assert cli.main(["train", "digits", "--output-dir", str(tmp_path / "r"),
                     "--allow-config-change", "lr"]) == 2
    line = _one_error_line(capsys)
    assert "'lr'" in line and "learning_rate" in line


def test_help_imports_no_backend_and_silences_tensorflow():
    # As the `keras-minsnr` console script runs it (argv[0] names the command).
    code = ("import sys\n"
            "sys.argv[0] = '/venv/bin/keras-minsnr'\n"
            "from keras_minsnr import cli\n"
            "try:\n"
            "    cli.main(['train', '--help'])\n"
            "except SystemExit:\n"
            "    pass\n"
            "import os\n"
            "heavy = sorted(m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules)\n"
            "print('HEAVY', heavy, os.environ.get('TF_CPP_MIN_LOG_LEVEL'))\n")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": ROOT},
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY [] 2" in result.stdout, result.stdout[-500:]


def test_train_help_groups_options_and_lists_config_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in ("--output-dir", "--steps", "--set", "--checkpoint-every",
                 "--allow-config-change", "run length and checkpoints:",
                 "gamma = 5.0", "sampler = \"ddim\"  (one of ddpm, ddim, edm_heun, euler, heun)",
                 "keras-minsnr recipes", "keras-minsnr show"):
        assert text in out, text
    with pytest.raises(SystemExit):
        cli.main(["sample", "--help"])
    assert "(default: 64)" in capsys.readouterr().out


def test_recipe_module_help_shows_the_train_options():
    result = _run("-m", "recipes.digits", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--output-dir", "--steps", "--set", "--checkpoint-every"):
        assert flag in result.stdout, flag


def test_recipes_lists_one_line_per_recipe(capsys):
    assert cli.main(["recipes"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = cli.available_recipes()
    assert len(lines) == len(names)
    for name, line in zip(names, lines):
        recipe = cli.load_recipe(name)
        assert line.split()[0] == name and recipe["description"][:40] in line


def test_show_prints_the_resolved_config_with_key_docs(capsys):
    assert cli.main(["show", "digits", "--set", "gamma=2", "--steps", "9"]) == 0
    out = capsys.readouterr().out
    assert "gamma = 2.0  # γ of min_snr" in out
    assert "learning_rate = 0.001" in out  # the digits recipe's value
    assert "steps = 9" in out and "# Optimizer" in out
    assert cli.main(["show", "digits", "--set", "sampler=dim"]) == 2
    assert "'dim'" in _one_error_line(capsys)


def test_a_fresh_process_prints_only_the_error_line(tmp_path):
    # Checking `backbone` loads Keras and TensorFlow, whose start-up logs (oneDNN, CUDA
    # probing) used to surround the error.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, "-m", "keras_minsnr.cli", "train", "digits", "--output-dir",
         str(tmp_path / "run"), "--set", "backbone=dit_s2"],
        env={**env, "PYTHONPATH": ROOT}, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        result.stderr.splitlines()[0]] and "backbone: 'dit_s2'" in result.stderr, result.stderr
    assert result.stdout == "" and not (tmp_path / "run").exists()


def test_a_plain_import_registers_every_class_for_load_model():
    # Outside the console script, `import keras_minsnr` loads the API, so a saved model
    # loads with nothing else imported.
    code = ("import keras_minsnr, keras\n"
            "names = ['DiffusionModel', 'NoiseSchedule', 'LossWeighting', 'DiT', 'UNet',\n"
            "         'PerUpdateSchedule']\n"
            "print([keras.saving.get_registered_object('keras_minsnr>' + n) is not None\n"
            "       for n in names])\n")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": ROOT},
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[True, True, True, True, True, True]"


def test_a_diverging_run_ends_with_one_line_naming_the_way_out(tmp_path, capsys):
    run = tmp_path / "nan"
    code = cli.main(["train", "digits", "--output-dir", str(run), "--steps", "4",
                     "--set", "learning_rate=1e30", "--set", "warmup_steps=0",
                     "--set", "steps_per_epoch=2", "--set", "backbone_args.depth=1",
                     "--set", "backbone_args.hidden_size=32", "--set", "batch_size=16"])
    assert code == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("keras-minsnr")]
    assert len(errors) == 1 and "Traceback" not in captured.err
    assert "--allow-config-change learning_rate" in errors[0]
