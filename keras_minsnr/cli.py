"""The ``keras-minsnr`` command line: ``train``, ``sample``, ``evaluate``, ``export``,
``recipes``, ``show``, ``convert-official``, ``convert-diffusers``.

Every expected failure (a bad flag or config value, an unusable output folder, missing
data) ends in one line ``keras-minsnr: error: ...`` and exit code 2, before anything is
written. Keras, TensorFlow and JAX are imported only by the commands that need them, so
``--help``, ``recipes`` and ``show`` answer at once.
"""

import os

# Before anything can import TensorFlow: no C++ INFO/WARNING lines (CUDA probing, oneDNN).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import pkgutil  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402

import keras_minsnr  # noqa: E402
from keras_minsnr import diffusers_flags  # noqa: E402
from keras_minsnr import run_config  # noqa: E402
from keras_minsnr import tf_onednn  # noqa: E402
from keras_minsnr import xla_flags  # noqa: E402

PROG = "keras-minsnr"
SAMPLERS = run_config.SAMPLERS
# Extensions `sample --output` can write (the format follows the extension).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class UsageError(ValueError):
    """A bad command line; printed as one line like every other expected failure."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``keras-minsnr: error: ...``, exit code 2)."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _at_least(low, kind=int):
    """An argparse type: a ``kind`` (int or float) number >= ``low``."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: must be >= {low}")
        return value

    return parse


@contextlib.contextmanager
def _quiet_native_logs():
    """Sends what native code writes to stderr while Keras/TensorFlow load to /dev/null.

    TensorFlow's absl logging prints INFO lines (oneDNN, CUDA probing) before it reads
    TF_CPP_MIN_LOG_LEVEL; with TF_CPP_MIN_LOG_LEVEL=0 nothing is hidden. Errors raised
    inside are printed after stderr is restored.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") == "0":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _load_training():
    """`keras_minsnr.training`, with TensorFlow (the tf.data pipelines of every backend)
    and the backend's devices initialised while their start-up logs are hidden."""
    with _quiet_native_logs():
        import keras
        import tensorflow as tf

        tf.config.list_physical_devices()
        keras.distribution.list_devices()
        from keras_minsnr import training
    return training


# === Recipes ===

def _recipes_package():
    """Installed: ``keras_minsnr.recipes``; in a source checkout: the top-level ``recipes``."""
    try:
        return importlib.import_module("keras_minsnr.recipes")
    except ModuleNotFoundError:
        return importlib.import_module("recipes")


def available_recipes():
    package = _recipes_package()
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__)
                  if not m.name.startswith("_"))


def load_recipe(name):
    names = available_recipes()
    if name not in names:
        raise ValueError(f"Unknown recipe {name!r}. Available recipes: {', '.join(names)}.")
    return importlib.import_module(f"{_recipes_package().__name__}.{name}").RECIPE


# === Checks before anything is written ===

def check_output_dir(path):
    """Raises `ValueError` unless ``path`` is a folder, or can be made one, that is writable.

    Nothing is created: the nearest existing ancestor must be a writable folder.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"--output-dir {path!r} is a file, not a folder.")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"--output-dir {path!r} is not writable.")
        return path
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(
            f"--output-dir {path!r} cannot be created: {ancestor!r} is a file, not a folder."
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(
            f"--output-dir {path!r} cannot be created: {ancestor!r} is not writable "
            "(read-only disk or no permission)."
        )
    return path


def _config_from_args(args):
    overrides = run_config.parse_overrides(args.set)
    if args.steps is not None:
        overrides["steps"] = args.steps
    for key in ("checkpoint_every", "grad_accum", "distribution", "mesh", "multihost",
                "gradient_checkpointing"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    recipe = load_recipe(args.recipe)
    with _quiet_native_logs():  # checking `backbone` loads the presets (and Keras)
        config = run_config.resolve_config(recipe, overrides)
        if getattr(args, "allow_download", False):
            _allow_downloads(config)
    return config


def _allow_downloads(config):
    """``--allow-download``: ``allow_download=True`` wherever the run loads pretrained
    files, as in Python: the ``encode`` autoencoder's (VAE, text encoder, decoder) and
    the backbone's, when its class takes one (the Stable Diffusion presets)."""
    import inspect

    if config.get("encode"):
        config["encode"]["allow_download"] = True
    from keras_minsnr import backbones

    preset = backbones.PRESETS.get(config.get("backbone"))
    if preset and "allow_download" in inspect.signature(preset["class"].__init__).parameters:
        config["backbone_args"]["allow_download"] = True


# === Commands ===

def _train(args):
    allowed = args.allow_config_change or []
    unknown = [key for key in allowed if key not in run_config.DEFAULTS]
    if unknown:
        raise ValueError(
            f"--allow-config-change: unknown config key {unknown[0]!r}. Valid keys: "
            f"{', '.join(sorted(run_config.DEFAULTS))}."
        )
    check_output_dir(args.output_dir)
    config = _config_from_args(args)
    from keras_minsnr import distribution

    # Before JAX makes its devices (_load_training lists them): XLA reads its flags then.
    flag_added = keras_minsnr.XLA_FLAGS_ADDED and not xla_flags.withdraw_for_mesh(
        config["distribution"], distribution.parse_mesh(config.get("mesh")))
    if config["multihost"] and xla_flags.keras_backend_name() == "jax":
        distribution.initialize_multihost()
    if config["multihost"] and xla_flags.keras_backend_name() == "tensorflow":
        # Before TensorFlow's runtime starts (_load_training lists its devices): the
        # strategy configures the collective ops, which TensorFlow takes only at startup.
        with _quiet_native_logs():
            from keras_minsnr import backend

            backend.multi_worker_strategy()
    training = _load_training()
    from keras_minsnr.data import preparation

    # An old-format cache, one of another VAE, or an image size the VAE cannot encode
    # fails here: before the run directory exists.
    preparation.check_data(config)
    if flag_added:
        print(xla_flags.announcement(), file=sys.stderr)
    if keras_minsnr.ONEDNN_SET:
        print(tf_onednn.announcement(), file=sys.stderr)

    kwargs = {"allow_config_change": list(allowed)} if allowed else {}
    if args.resume_from:
        kwargs["resume_from"] = args.resume_from
    if args.restart:
        kwargs["restart"] = True
    training.train(config, args.output_dir, **kwargs)
    print(f"Run directory: {os.path.abspath(args.output_dir)}")
    for name in ("samples.png", "metrics.csv", "model.keras"):
        print(f"  {os.path.join(args.output_dir, name)}")


def _sample(args):
    path = args.output or os.path.join(args.run_dir, "samples_cli.png")
    if not path.lower().endswith(IMAGE_EXTENSIONS):
        raise ValueError(
            f"--output {path!r}: the extension names the image format; use one of "
            f"{', '.join(IMAGE_EXTENSIONS)}."
        )
    _load_training()
    from keras_minsnr import resume

    config, model = resume.load_run(args.run_dir)
    if args.allow_download:
        _allow_downloads(config)
    overrides = {
        key: value
        for key, value in dict(
            num_steps=args.steps,
            sampler=args.sampler,
            guidance_scale=args.guidance_scale,
        ).items()
        if value is not None
    }
    from keras_minsnr import monitoring

    monitoring.write_samples(
        model, path, config, num_samples=args.num_samples, seed=args.seed, **overrides
    )
    print(f"Wrote {args.num_samples} samples to {path}")


def _evaluate(args):
    _load_training()
    from keras_minsnr import evaluation

    result = evaluation.evaluate_run(
        args.run_dir,
        num_samples=args.num_samples,
        extractor=args.extractor,
        sampler=args.sampler,
        num_steps=args.steps,
        seed=args.seed,
    )
    if "features" in result:
        print(f"FID/KID with {result['extractor']} features: {result['features']}.",
              file=sys.stderr)
    print(json.dumps(result, indent=2))


def _check_keras_output(path):
    """Refuses an OUT.keras path that is not a ``.keras`` file in an existing folder."""
    if not path.endswith(".keras"):
        raise ValueError(f"OUT {path!r} must end with .keras (a Keras model file).")
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise ValueError(f"OUT {path!r}: folder {out_dir!r} does not exist.")


def _export(args):
    _check_keras_output(args.output)
    _load_training()
    from keras_minsnr import resume

    state = resume.export(args.run_dir, args.output)
    print(f"Exported {state['checkpoint']} (step {state['step']}) of {args.run_dir} to "
          f"{args.output}")


def _convert_official(args):
    _check_keras_output(args.output)
    overrides = run_config.parse_overrides(args.set)
    with _quiet_native_logs():
        from keras_minsnr import official

        state_dict = official.load_official_checkpoint(args.checkpoint)
        backbone = official.convert_official_state_dict(
            state_dict, args.config, **overrides
        )
    backbone.save(args.output)
    print(
        f"Converted {args.checkpoint} ({args.config}, depth {backbone.depth}, "
        f"{backbone.count_params():,} parameters) to {args.output}"
    )


def _convert_diffusers(args):
    with _quiet_native_logs():
        from keras_minsnr.backbones import diffusers_conversion

        paths = diffusers_conversion.convert_diffusers(
            args.folder, args.out_dir, overwrite=args.overwrite
        )
    version = diffusers_conversion.folder_version(args.folder)
    print(f"Converted {args.folder} (Stable Diffusion {version}) to:")
    for component, path in paths.items():
        print(f"  {component:<16} {path}")


def _recipes(args):
    names = available_recipes()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {load_recipe(name).get('description', '')}")


def _show(args):
    config = _config_from_args(args)
    print(f"# Recipe {args.recipe}: resolved config (recipe, then --set)")
    print(run_config.describe(config), end="")


# === Parser ===

def _add_config_options(parser):
    group = parser.add_argument_group("config")
    group.add_argument(
        "--set", action="append", metavar="KEY=VALUE", default=[],
        help="override a config value (repeatable), e.g. --set gamma=1 "
        "--set backbone_args.depth=4; the keys are listed below",
    )
    return group


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the key list's line breaks; shows defaults that are not None."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, [], argparse.SUPPRESS) and "%(default)" not in text \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


def add_train_arguments(parser, recipe=None):
    """The options of `train`; ``recipe`` given (``python -m recipes.NAME``): no positional,
    and ``--output-dir`` defaults to ``runs/NAME``."""
    if recipe is None:
        parser.add_argument("recipe", action=_RecipeAction,
                            help=f"recipe name (see `{PROG} recipes`)")
    else:
        parser.set_defaults(recipe=recipe)
    where = parser.add_argument_group("run directory")
    where.add_argument("--output-dir", required=recipe is None,
                       default=None if recipe is None else f"runs/{recipe}",
                       help="run directory to write or resume")
    length = parser.add_argument_group("run length and checkpoints")
    length.add_argument("--steps", type=_at_least(1),
                        help="total optimizer steps (sets `steps`; default: the recipe's)")
    length.add_argument("--checkpoint-every", type=_at_least(1), metavar="STEPS",
                        help="steps between checkpoints (sets `checkpoint_every`; default: "
                        "one per epoch)")
    devices = parser.add_argument_group("devices")
    devices.add_argument("--grad-accum", type=_at_least(1), metavar="N",
                         help="accumulate the gradients of N micro-batches of batch_size "
                         "per optimizer step (sets `grad_accum`; --steps counts optimizer "
                         "steps)")
    devices.add_argument("--distribution", choices=run_config.DISTRIBUTIONS,
                         help="sets `distribution` (default: the recipe's, else none)")
    devices.add_argument("--mesh", metavar="DATAxMODEL",
                         help="device mesh for JAX, e.g. 2x4 (sets `mesh`)")
    devices.add_argument("--multihost", action="store_true", default=None,
                         help="join a multi-host cluster first (sets `multihost`)")
    devices.add_argument("--gradient-checkpointing", action="store_true", default=None,
                         help="recompute the backbone's blocks in the backward pass: less "
                         "memory, ~1/3 more compute (sets `gradient_checkpointing`)")
    config = _add_config_options(parser)
    where.add_argument("--restart", action="store_true",
                       help="start the run directory again from step 0 although it holds "
                       "checkpoints (they are moved to OUTPUT_DIR/replaced-TIME/)")
    config.add_argument(
        "--allow-config-change", nargs="+", metavar="KEY", default=[],
        help="resume a run although these keys changed (e.g. learning_rate after a NaN); "
        "recorded in the run's history",
    )
    config.add_argument(
        "--allow-download", action="store_true",
        help="let the run download pretrained weights it does not find locally (KerasCV's "
        "Stable Diffusion files, KerasHub presets): sets allow_download=True in `encode` "
        "and `backbone_args`; repeat it when resuming",
    )
    length.add_argument("--resume-from", metavar="CHECKPOINT",
                        help="resume from this checkpoint of the run (e.g. "
                        "step-00002000.keras) instead of the newest")
    parser.epilog = _keys_epilog(recipe)
    parser.set_defaults(func=_train)


def _keys_epilog(recipe=None):
    """The key list of `train --help`: a recipe's values when it names a valid one."""
    values = None
    if recipe is not None:
        try:
            values = run_config.resolve_config(load_recipe(recipe))
        except (ValueError, ImportError):
            recipe = None  # the error comes when the command runs
    source = f"the {recipe} recipe's value" if recipe else "default"
    return (
        f"Config keys for --set ({source}, allowed values, meaning; `{PROG} recipes` lists "
        f"the recipes, `{PROG} show RECIPE` a recipe's values):\n\n"
        + run_config.keys_help(values)
    )


class _RecipeAction(argparse.Action):
    """Stores the recipe name; `--help` after it then lists that recipe's values."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        parser.epilog = _keys_epilog(values)


def build_parser():
    formatter = _HelpFormatter
    parser = _Parser(
        prog=PROG,
        description="Train diffusion models with Min-SNR-γ loss weighting (Keras 3, "
        "TensorFlow or JAX: set KERAS_BACKEND).",
        epilog=f"`{PROG} recipes` lists the recipes; `{PROG} show RECIPE` prints one's "
        f"config with the meaning of each key; `{PROG} COMMAND --help` gives a command's "
        "options.",
    )
    parser.add_argument("--version", action="version",
                        version=f"{PROG} {keras_minsnr.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser(
        "train",
        help="train a recipe into a run directory (resumes it if it exists)",
        description="Train a recipe into a run directory. Re-running the same command "
        "resumes from the last checkpoint. The whole config is checked before anything "
        "is written.",
        formatter_class=formatter,
    )
    add_train_arguments(train)

    sample = commands.add_parser(
        "sample", help="draw samples from a trained run", description="Draw a grid of samples.",
        formatter_class=formatter,
    )
    sample.add_argument("run_dir", help="a run directory written by train")
    sample.add_argument("--num-samples", type=_at_least(1), default=64, help="images")
    sample.add_argument("--sampler", choices=SAMPLERS, help="default: the run's")
    sample.add_argument("--steps", type=_at_least(1), help="sampling steps (default: the "
                        "run's)")
    sample.add_argument("--guidance-scale", type=_at_least(0, float), help="default: the run's")
    sample.add_argument("--seed", type=int, default=0, help="sampling noise seed")
    sample.add_argument("--allow-download", action="store_true",
                        help="let the decoder download its weights (KerasCV's VAE decoder, "
                        "a KerasHub preset) when they are not found locally")
    sample.add_argument("--output", help="image path; its extension (" +
                        ", ".join(IMAGE_EXTENSIONS) + ") names the format (default: "
                        "RUN_DIR/samples_cli.png)")
    sample.set_defaults(func=_sample)

    evaluate = commands.add_parser(
        "evaluate",
        help="FID/KID of a run's samples against its data; writes RUN_DIR/eval.json",
        description="Generate samples and compare them with the run's training data.",
        formatter_class=formatter,
    )
    evaluate.add_argument("run_dir", help="a run directory written by train")
    evaluate.add_argument("--num-samples", type=_at_least(2), default=1000,
                          help="generated images to compare")
    evaluate.add_argument("--extractor", default=None, help="digits or inception (default: by data)")
    evaluate.add_argument("--sampler", default=None, choices=SAMPLERS, help="default: the run's")
    evaluate.add_argument("--steps", type=_at_least(1), default=None,
                          help="sampling steps (default: the run's)")
    evaluate.add_argument("--seed", type=int, default=0, help="sampling noise seed")
    evaluate.set_defaults(func=_evaluate)

    export = commands.add_parser(
        "export",
        help="write a run's newest checkpoint (.keras or sharded Orbax) as one .keras file",
        description="Write the newest checkpoint of a run directory (a step-N.keras file "
        "or a sharded step-N.orbax folder of any mesh) as one .keras model file that "
        "loads and samples on one device (keras.saving.load_model, `sample`).",
        formatter_class=formatter,
    )
    export.add_argument("run_dir", help="a run directory written by train")
    export.add_argument("output", metavar="OUT.keras", help="the Keras model file to write")
    export.set_defaults(func=_export)

    recipes = commands.add_parser(
        "recipes", help="list the recipes, one line each",
        description="List the recipes with one line about each.",
        formatter_class=formatter,
    )
    recipes.set_defaults(func=_recipes)

    show = commands.add_parser(
        "show", help="print a recipe's resolved config with the meaning of each key",
        description="Print a recipe's config (with --set applied) and what each key means.",
        formatter_class=formatter,
    )
    show.add_argument("recipe", help=f"recipe name (see `{PROG} recipes`)")
    show.add_argument("--steps", type=_at_least(1), help="as for train")
    _add_config_options(show)
    show.set_defaults(func=_show)

    convert = commands.add_parser(
        "convert-official",
        help="convert a released checkpoint of the Min-SNR paper's ViT to a .keras backbone",
        description="Convert an official Min-SNR ViT checkpoint (PyTorch .pt, which needs "
        "torch, or .npz) into a Keras DiT backbone in the official layout. A state dict "
        "that does not fit the config is reported key by key.",
        formatter_class=formatter,
    )
    convert.add_argument("checkpoint", help="the checkpoint, e.g. ema_0.9999_xl.pt")
    convert.add_argument("output", metavar="OUT.keras", help="the Keras model file to write")
    convert.add_argument("--config", default="vit_xl_patch2_32",
                         help="official model name: vit_base_patch2_32, "
                         "vit_large_patch2_32, vit_large_patch4_64 or vit_xl_patch2_32")
    convert.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                         help="override an architecture argument of the DiT (repeatable), "
                         "e.g. --set depth=12 --set image_shape=[32,32,4]")
    convert.set_defaults(func=_convert_official)

    diffusers = commands.add_parser(
        "convert-diffusers",
        help="convert a diffusers-format Stable Diffusion 1.x/2.x folder to KerasCV weight "
        "files",
        description="Convert a diffusers Stable Diffusion 1.x/2.x folder (unet/, vae/, "
        "text_encoder/: config.json + *.safetensors; read with numpy, no torch) into the "
        "KerasCV .h5 files the sd15/sd2 recipes load: kcv_diffusion_model.h5, kcv_encoder.h5, "
        "vae_encoder.h5, kcv_decoder.h5 (v2: diffusion_model_v2_1.h5, text_encoder_v2_1.h5). "
        "Every missing or mis-shaped tensor is listed before anything is written.",
        formatter_class=formatter,
    )
    diffusers.add_argument("folder", metavar="DIR", help="the diffusers folder")
    diffusers.add_argument("out_dir", metavar="OUT_DIR", help="where the .h5 files go")
    diffusers.add_argument("--overwrite", action="store_true",
                           help="replace .h5 files already in OUT_DIR")
    diffusers.set_defaults(func=_convert_diffusers)
    return parser


def _run(parser, argv):
    try:
        foreign = diffusers_flags.hint_for(sys.argv[1:] if argv is None else argv)
        if foreign is not None:
            flag, use = foreign
            raise UsageError(
                f"{flag} is a diffusers / sd-scripts flag; here use {use} (the full "
                "mapping: docs/coming_from_diffusers.md)"
            )
        args = parser.parse_args(argv)
        args.func(args)
    except BrokenPipeError:  # output piped into `head`: stop quietly
        sys.stdout = open(os.devnull, "w")
        return 0
    except (ValueError, OSError) as error:  # UsageError is a ValueError
        message = " ".join(str(error).split())  # one line
        print(f"{PROG}: error: {message}", file=sys.stderr)
        if isinstance(error, UsageError):
            raise SystemExit(2) from None
        return 2
    except FloatingPointError as error:  # training diverged: the message says what to do
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:
        if getattr(error, "exit_code", None):  # interrupts.TrainingInterrupted
            command = [arg for arg in (sys.argv[1:] if argv is None else argv)
                       if arg != "--restart"]
            print(f"{PROG}: {error} Resume with:\n  {parser.prog} {shlex.join(command)}",
                  file=sys.stderr)
            return error.exit_code
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv=None):
    """Runs a command; returns the exit code (usage errors raise `SystemExit(2)`)."""
    return _run(build_parser(), argv)


def main_for_recipe(name, argv=None):
    """``python -m recipes.NAME [train options]``: `train` with the recipe filled in."""
    parser = _Parser(
        prog=f"python -m recipes.{name}",
        description=f"Train the {name} recipe (as `{PROG} train {name}`).",
        formatter_class=_HelpFormatter,
    )
    add_train_arguments(parser, recipe=name)
    return _run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
