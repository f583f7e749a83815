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

# What each guide must print and write (the model, then its figures, saved as files when
# it runs as a script); the backends it runs on.
EXPECTED = {
    "min_snr_weighting.py": ("'fid'", ("digits_min_snr.keras", "weightings.png",
                                       "digit_samples.png"), ("tensorflow", "jax")),
    "distributed_dit.py": ("resumed at step", ("dit_distributed.keras",), ("jax",)),
    "official_vit_sampling.py": ("restored InContextViT table",
                                 ("official_vit.keras", "official_vit_latents.png"),
                                 ("tensorflow", "jax")),
    "sd3_min_snr.py": ("final loss:", ("sd3_min_snr.keras", "sd3_samples.png"),
                       ("tensorflow", "jax")),
}


@pytest.mark.parametrize("path", GUIDES, ids=os.path.basename)
def test_notebook_is_generated_from_the_guide(path):
    # The cells' kinds and sources; outputs and execution counts come from running it.
    with open(path) as f:
        expected = make_notebooks.to_notebook(make_notebooks.split_cells(f.read()))
    with open(path[:-3] + ".ipynb") as f:
        notebook = json.load(f)
    assert make_notebooks.cell_sources(notebook) == make_notebooks.cell_sources(expected), (
        "run `python guides/make_notebooks.py`"
    )
    assert notebook["metadata"] == expected["metadata"]
    title = notebook["cells"][0]["source"]
    assert any(line.startswith("**Date created:** 20") for line in title)
    assert any(line.startswith("**Last modified:** 20") for line in title)
    # The install cell is the reader's step: executing the notebook leaves it alone.
    install = [c for c in notebook["cells"] if "".join(c["source"]).startswith("!pip install")]
    assert len(install) == 1
    assert install[0]["metadata"].get("tags") == [make_notebooks.SKIP_TAG]


@pytest.mark.parametrize("path", GUIDES, ids=os.path.basename)
def test_committed_notebook_carries_its_outputs(path):
    name = os.path.basename(path)[:-3]
    with open(path[:-3] + ".ipynb") as f:
        cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    if name in make_notebooks.NOT_EXECUTED:
        assert name not in make_notebooks.EXECUTE
        assert all(not c["outputs"] for c in cells)
        return
    assert name in make_notebooks.EXECUTE, "say in make_notebooks.py whether it runs"
    ran = [c for c in cells if make_notebooks.SKIP_TAG not in c["metadata"].get("tags", [])]
    assert all(c["execution_count"] for c in ran), (
        "run `python guides/make_notebooks.py --execute " + name + "`"
    )
    errors = [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors
    images = [o for c in cells for o in c["outputs"] if "image/png" in o.get("data", {})]
    _, written, _ = EXPECTED[name + ".py"]
    assert len(images) == sum(w.endswith(".png") for w in written)
    assert os.path.getsize(path[:-3] + ".ipynb") < 2_000_000


# Each guide runs as a script in a child process with the backend named here. The
# children all start from the TensorFlow pass of `make test`, the keras.distribution child
# (tests/test_distribution.py) from the JAX pass: so placed, the passes end together.
GUIDE_RUNS = [(path, backend) for path in GUIDES
              for backend in EXPECTED[os.path.basename(path)][2]]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="the guide scripts (both backends) run from the TensorFlow pass")
@pytest.mark.parametrize("path, guide_backend", GUIDE_RUNS,
                         ids=[f"{os.path.basename(p)}-{b}" for p, b in GUIDE_RUNS])
def test_guide_runs(path, guide_backend, tmp_path):
    printed, written, _ = EXPECTED[os.path.basename(path)]
    env = {
        **os.environ,
        "KERAS_BACKEND": guide_backend,
        "KMS_GUIDE_STEPS": "8",
        "MPLBACKEND": "Agg",
        "PYTHONPATH": ROOT,
    }
    result = subprocess.run(
        [sys.executable, path], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert printed in result.stdout
    for name in written:
        assert os.path.exists(tmp_path / name), name
