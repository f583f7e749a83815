"""The ``keras-minsnr`` command line: ``train``, ``sample`` and ``evaluate``."""

import argparse
import importlib
import json
import os
import pkgutil
import sys


def available_recipes():
    import recipes

    return sorted(m.name for m in pkgutil.iter_modules(recipes.__path__) if not m.name.startswith("_"))


def load_recipe(name):
    names = available_recipes()
    if name not in names:
        raise ValueError(f"Unknown recipe {name!r}. Available recipes: {', '.join(names)}.")
    return importlib.import_module(f"recipes.{name}").RECIPE


def _train(args):
    from keras_minsnr import training

    overrides = training.parse_overrides(args.set)
    if args.steps is not None:
        overrides["steps"] = args.steps
    config = training.resolve_config(load_recipe(args.recipe), overrides)
    training.train(config, args.output_dir)
    print(f"Run directory: {os.path.abspath(args.output_dir)}")
    for name in ("samples.png", "metrics.csv", "model.keras"):
        print(f"  {os.path.join(args.output_dir, name)}")


def _sample(args):
    from keras_minsnr import training

    config, model = training.load_run(args.run_dir)
    overrides = {
        key: value
        for key, value in dict(
            num_steps=args.steps,
            sampler=args.sampler,
            guidance_scale=args.guidance_scale,
        ).items()
        if value is not None
    }
    path = args.output or os.path.join(args.run_dir, "samples_cli.png")
    training.write_samples(
        model, path, config, num_samples=args.num_samples, seed=args.seed, **overrides
    )
    print(f"Wrote {args.num_samples} samples to {path}")


def _evaluate(args):
    from keras_minsnr import evaluation

    result = evaluation.evaluate_run(
        args.run_dir,
        num_samples=args.num_samples,
        extractor=args.extractor,
        sampler=args.sampler,
        num_steps=args.steps,
        seed=args.seed,
    )
    print(json.dumps(result, indent=2))


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-minsnr",
        description="Train diffusion models with Min-SNR-γ loss weighting (Keras 3, "
        "TensorFlow or JAX: set KERAS_BACKEND).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train a recipe into a run directory (resumes it if it exists)",
        description="Train a recipe from recipes/ into a run directory. Re-running the "
        "same command resumes from the last checkpoint.",
    )
    train.add_argument("recipe", help="recipe name, e.g. digits, cifar10_unet, sd15_captions")
    train.add_argument("--output-dir", required=True, help="run directory to write")
    train.add_argument("--steps", type=int, help="total optimizer steps (overrides the recipe)")
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set gamma=1 --set backbone_args.depth=4 "
        "(repeatable)",
    )
    train.set_defaults(func=_train)

    sample = commands.add_parser(
        "sample", help="draw samples from a trained run", description="Draw a grid of samples."
    )
    sample.add_argument("run_dir")
    sample.add_argument("--num-samples", type=int, default=64)
    sample.add_argument("--sampler", choices=("ddim", "ddpm", "edm_heun"))
    sample.add_argument("--steps", type=int, help="sampling steps")
    sample.add_argument("--guidance-scale", type=float)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--output", help="PNG path (default: RUN_DIR/samples_cli.png)")
    sample.set_defaults(func=_sample)

    evaluate = commands.add_parser(
        "evaluate",
        help="FID/KID of a run's samples against its data; writes RUN_DIR/eval.json",
        description="Generate samples and compare them with the run's training data.",
    )
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--num-samples", type=int, default=1000)
    evaluate.add_argument("--extractor", default=None, help="digits or inception (default: by data)")
    evaluate.add_argument("--sampler", default=None, choices=("ddim", "ddpm", "edm_heun"))
    evaluate.add_argument("--steps", type=int, default=None)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.set_defaults(func=_evaluate)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"keras-minsnr: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
