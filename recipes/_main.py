"""Shared entry point so every recipe runs with ``python -m recipes.NAME``."""

import argparse
import sys


def run_recipe(name, argv=None):
    from keras_minsnr.cli import main

    parser = argparse.ArgumentParser(prog=f"python -m recipes.{name}")
    parser.add_argument("--output-dir", default=f"runs/{name}")
    args, rest = parser.parse_known_args(argv)
    sys.exit(main(["train", name, "--output-dir", args.output_dir, *rest]))
