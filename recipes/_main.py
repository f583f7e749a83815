"""Shared entry point so every recipe runs with ``python -m recipes.NAME``."""

import sys


def run_recipe(name, argv=None):
    """Trains recipe ``name`` with the options of ``keras-minsnr train`` (``--help`` lists
    them); ``--output-dir`` defaults to ``runs/NAME``."""
    from keras_minsnr.cli import main_for_recipe

    sys.exit(main_for_recipe(name, argv))
