"""The installed layout: everything under keras_minsnr (no top-level `recipes`), and the
dependency pins."""

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from setuptools.config.setupcfg import read_configuration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _options():
    return read_configuration(os.path.join(ROOT, "setup.cfg"))["options"]


def test_setup_cfg_installs_recipes_under_the_project_namespace():
    options = _options()
    packages = set(options["packages"])
    assert {p.split(".")[0] for p in packages} == {"keras_minsnr"}
    assert options["package_dir"] == {"keras_minsnr.recipes": "recipes"}
    # Every package folder of the source tree is listed (the list is explicit).
    found = {"keras_minsnr.recipes"}
    for folder, dirs, files in os.walk(os.path.join(ROOT, "keras_minsnr")):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        if "__init__.py" in files:
            found.add(os.path.relpath(folder, ROOT).replace(os.sep, "."))
    assert packages == found, "list new package folders under [options] packages in setup.cfg"


def test_tfds_download_path_dependency_is_required():
    # tensorflow_datasets imports importlib_resources lazily when it prepares a dataset
    # (data_args.download=true); it is no dependency of TFDS itself.
    names = [r.split(">")[0].split("=")[0].strip().lower() for r in _options()["install_requires"]]
    assert "importlib_resources" in names


def test_constraints_pin_every_requirement():
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        pinned = {line.split("==")[0].strip().lower().replace("_", "-")
                  for line in f if "==" in line and not line.startswith("#")}
    for requirement in _options()["install_requires"]:
        name = requirement.split(">")[0].split("<")[0].split("=")[0].strip().lower()
        assert name.replace("_", "-") in pinned, name
    assert "keras-minsnr" not in pinned


@pytest.mark.skipif(importlib.util.find_spec("wheel") is None, reason="needs `wheel`")
def test_wheel_has_no_top_level_recipes_and_its_cli_finds_the_recipes(tmp_path):
    source = tmp_path / "src"
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        os.makedirs(source, exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("keras_minsnr", "recipes"):
        shutil.copytree(os.path.join(ROOT, name), source / name, ignore=ignore)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True,
        timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = os.listdir(tmp_path / "dist")
    with zipfile.ZipFile(tmp_path / "dist" / wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"keras_minsnr"}
    assert "keras_minsnr/recipes/digits.py" in names
    assert "keras_minsnr/metrics/weights/digits_classifier.weights.h5" in names
    # Installed (no source tree on the path): the CLI lists the recipes from the package.
    code = ("from keras_minsnr import cli; print(cli._recipes_package().__name__, "
            "cli.available_recipes(), cli.load_recipe('digits')['backbone'])")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("keras_minsnr.recipes [") and "'digits'" in result.stdout
    assert "mlp_digits" in result.stdout
