"""Switching from diffusers / sd-scripts (issue 24, item 6): their flags answered with our
key, the mapping page, a recipe's own values in `train RECIPE --help`, `--version`, and
`show` without TensorFlow."""

import os
import re
import subprocess
import sys

import pytest

import keras_minsnr
from keras_minsnr import cli
from keras_minsnr import diffusers_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The flags the issue lists; each must be mapped.
COMMON_FLAGS = (
    "--snr_gamma", "--max_train_steps", "--train_batch_size", "--gradient_accumulation_steps",
    "--checkpointing_steps", "--checkpoints_total_limit", "--resume_from_checkpoint",
    "--mixed_precision", "--use_ema", "--lr_scheduler", "--noise_offset", "--rank",
    "--validation_prompts", "--report_to", "--resolution", "--random_flip", "--cache_latents",
    "--min_snr_gamma",
)


@pytest.mark.parametrize("flag", COMMON_FLAGS)
def test_a_diffusers_flag_names_the_key_to_use(tmp_path, capsys, flag):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "digits", "--output-dir", str(run), f"{flag}=5"])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("keras-minsnr: error: "), lines
    use, _ = diffusers_flags.FLAG_MAP[flag]
    assert flag in lines[0] and use in lines[0] and "coming_from_diffusers.md" in lines[0]
    assert not run.exists()


def test_every_suggested_key_exists():
    from keras_minsnr import run_config

    parser = cli.build_parser()
    train_flags = {o for a in parser._subparsers._group_actions[0].choices["train"]._actions
                   for o in a.option_strings}
    for flag, (use, _) in diffusers_flags.FLAG_MAP.items():
        if use.startswith("--set "):
            key = use.split()[1].split("=")[0].split(".")[0]
            assert key in run_config.DEFAULTS, (flag, key)
        else:
            assert use.split()[0] in train_flags, (flag, use)


def test_the_docs_page_holds_the_mapping():
    with open(os.path.join(ROOT, "docs", "coming_from_diffusers.md"), encoding="utf-8") as f:
        text = f.read()
    found = re.search(r"<!-- flag-map:start -->\n(.*?)\n<!-- flag-map:end -->", text, re.S)
    assert found and found.group(1) == diffusers_flags.markdown_table(), (
        "regenerate with: python -c 'from keras_minsnr import diffusers_flags; "
        "print(diffusers_flags.markdown_table())'")


def test_train_recipe_help_shows_the_recipes_values(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "digits", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    # The digits recipe: learning_rate 1e-3, 6000 steps (defaults 1e-4 and 400000).
    assert "learning_rate = 0.001  (" in out and "steps = 6000  (" in out
    assert "the digits recipe's value" in out
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "learning_rate = 0.0001  (" in capsys.readouterr().out  # no recipe: defaults


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"keras-minsnr {keras_minsnr.__version__}"


def test_show_imports_no_backend():
    code = ("import sys\n"
            "sys.argv[0] = '/venv/bin/keras-minsnr'\n"
            "from keras_minsnr import cli\n"
            "assert cli.main(['show', 'digits', '--set', 'lr_schedule=cosine']) == 0\n"
            "heavy = sorted(m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    result = subprocess.run([sys.executable, "-c", code],
                            env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'lr_schedule = "cosine"' in result.stdout
    assert "HEAVY []" in result.stdout, result.stdout[-500:]
