"""The guides run end to end (with few steps) and their notebooks match the sources."""

import glob
import json
import os
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDES = sorted(
    p for p in glob.glob(os.path.join(ROOT, "guides", "*.py")) if not p.endswith("make_notebooks.py")
)
sys.path.insert(0, os.path.join(ROOT, "guides"))
import make_notebooks  # noqa: E402

# What each guide must print and write; the backends it runs on.
EXPECTED = {
    "min_snr_weighting.py": ("'fid'", "digits_min_snr.keras", ("tensorflow", "jax")),
    "distributed_dit.py": ("resumed at step", "dit_distributed.keras", ("jax",)),
    "official_vit_sampling.py": ("restored InContextViT table", "official_vit.keras",
                                 ("tensorflow", "jax")),
    "sd3_min_snr.py": ("final loss:", "sd3_min_snr.keras", ("tensorflow", "jax")),
}


@pytest.mark.parametrize("path", GUIDES, ids=os.path.basename)
def test_notebook_is_generated_from_the_guide(path):
    with open(path) as f:
        expected = make_notebooks.to_notebook(make_notebooks.split_cells(f.read()))
    with open(path[:-3] + ".ipynb") as f:
        assert json.load(f) == expected, "run `python guides/make_notebooks.py`"


@pytest.mark.parametrize("path", GUIDES, ids=os.path.basename)
def test_guide_runs(path, tmp_path):
    printed, written, backends = EXPECTED[os.path.basename(path)]
    if keras.backend.backend() not in backends:
        pytest.skip(f"this guide runs on {', '.join(backends)} only")
    env = {
        **os.environ,
        "KERAS_BACKEND": keras.backend.backend(),
        "KMS_GUIDE_STEPS": "8",
        "MPLBACKEND": "Agg",
        "PYTHONPATH": ROOT,
    }
    result = subprocess.run(
        [sys.executable, path], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert printed in result.stdout
    assert os.path.exists(tmp_path / written)
