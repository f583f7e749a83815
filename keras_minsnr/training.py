"""Training runs: a recipe config in, a run directory out.

A run directory holds::

    config.json      the resolved configuration (recipe + overrides)
    metrics.csv      one row per logged step (epoch ends and checkpoints): loss and the
                     per-SNR-quarter MSE
    history.jsonl    every configuration change between sessions
    logs/            TensorBoard logs: per-step scalars every log_every steps at the global
                     step, validation grids (keras_minsnr.monitoring); W&B's offline files
    samples/         step-NNNNNNNN.png validation grids (validation_every)
    checkpoints/     step-NNNNNNNN.keras (model, optimizer, EMA) + state.json
    samples.png      a grid of samples, refreshed during training; the final model's at
                     the end
    model.keras      the final model
    lora.weights.h5  the LoRA adapters alone (runs with lora_rank; docs/lora.md)

Starting the same run again resumes from the last checkpoint and continues exactly where
it stopped; see `keras_minsnr.checkpointing` and docs/reliability.md.

A *step* is one optimizer update. With ``grad_accum = N`` (Keras'
``gradient_accumulation_steps``) an update averages the gradients of N micro-batches of
``batch_size``, and every count of the run is in updates: ``steps``, ``steps_per_epoch``,
``checkpoint_every``, the ``step`` of metrics rows, checkpoints, ``state.json`` and
``history.jsonl``, the EMA warm-up and the learning-rate warm-up. Keras' ``fit()`` counts
micro-batches (its progress bar and TensorBoard batch numbers), ``optimizer.iterations``
counts updates. ``state.json`` also records ``batches``, the micro-batches consumed, where
a resumed run continues reading the data.
"""

import contextlib
import json
import math
import os
import re
import sys
import time

import keras
import numpy as np
from keras import ops

from keras_minsnr import backbones
from keras_minsnr import checkpointing
from keras_minsnr import weighting as weighting_lib
from keras_minsnr.diffusion_model import DiffusionModel
from keras_minsnr.flow import FlowMatchingSchedule
from keras_minsnr.monitoring import RunLogger
from keras_minsnr.monitoring import StepLogger
from keras_minsnr.monitoring import write_samples
from keras_minsnr.optimizers import grad_accum
from keras_minsnr.optimizers import make_optimizer
from keras_minsnr.schedules import NoiseSchedule

# The config schema lives in run_config; these names stay importable from here.
from keras_minsnr.run_config import DEFAULTS  # noqa: F401
from keras_minsnr.run_config import ENCODE_KEYS  # noqa: F401
from keras_minsnr.run_config import RESUMABLE_KEYS  # noqa: F401
from keras_minsnr.run_config import _set_nested  # noqa: F401
from keras_minsnr.run_config import parse_overrides  # noqa: F401
from keras_minsnr.run_config import resolve_config  # noqa: F401


def make_encoders(encode, needs_text):
    """The frozen Stable Diffusion VAE encoder (and text encoder) named by ``encode``.

    Missing weight files raise `FileNotFoundError` naming the file and KerasCV's URL
    before anything is built; ``None`` paths give random weights (tests only).
    """
    from keras_minsnr.backbones import stable_diffusion as sd

    version = encode.get("version", "v1")
    if version == "sd3":
        # One preset holds the VAE and the text encoders; text needs no extra files.
        return backbones.sd3.StableDiffusion3Encoders(
            encode.get("preset"),
            allow_download=bool(encode.get("allow_download", False)),
            sample_posterior=bool(encode.get("sample_posterior", False)),
            seed=0,
        )
    sd.resolve_weights(encode.get("image_encoder_weights"), version, "image_encoder")
    kwargs = dict(
        version=version,
        image_encoder_weights=encode.get("image_encoder_weights"),
        sample_posterior=bool(encode.get("sample_posterior", False)),
        seed=0,
    )
    if needs_text:
        sd.resolve_weights(encode.get("text_encoder_weights"), version, "text_encoder")
        return sd.StableDiffusionEncoders(
            vocabulary=encode.get("vocabulary"),
            text_encoder_weights=encode.get("text_encoder_weights"),
            **kwargs,
        )

    class ImageOnlyEncoders(sd.StableDiffusionEncoders):
        def _make_tokenizer(self, vocabulary):
            return None  # no captions: no BPE vocabulary needed

    return ImageOnlyEncoders(**kwargs)


def prepare_data(config):
    """Encodes ``encode.source`` into the latent cache ``config["data"]`` once.

    A no-op unless ``config["encode"]`` is set. When ``data`` already holds a complete
    cache it is reused; otherwise the raw data ``encode.source`` (a TFDS name or a
    folder, loaded with ``encode.source_args``) is encoded with the Stable Diffusion VAE
    (latents x 0.18215) and, for caption folders, the text encoder (``"context"``).
    """
    encode = config.get("encode") or {}
    if not encode:
        return None
    unknown = sorted(set(encode) - set(ENCODE_KEYS))
    if unknown:
        raise ValueError(
            f"Unknown encode key(s) {unknown}. Valid keys: {', '.join(ENCODE_KEYS)}."
        )
    if encode.get("version") == "sd3":
        encode = _sd3_encode(config)
    if encode.get("decoder_weights"):  # a typo should fail now, not at the first samples
        backbones.stable_diffusion.resolve_weights(
            encode["decoder_weights"], encode.get("version", "v1"), "decoder"
        )
    from keras_minsnr.data import latents
    from keras_minsnr.data import make_dataset

    cache_dir = os.path.expanduser(str(config["data"]))
    manifest = latents.read_manifest(cache_dir) if os.path.isdir(cache_dir) else None
    if manifest is not None:
        return manifest
    if not encode.get("source"):
        raise FileNotFoundError(
            f"No latent cache in data={cache_dir!r}. Encode one first: name the raw "
            "data with --set encode.source=DATA (a TFDS name such as imagenet2012, an "
            "image folder, or a caption folder with metadata.jsonl) and the VAE weights "
            "with --set encode.image_encoder_weights=vae_encoder.h5; or write the cache "
            "with keras_minsnr.data.cache_latents and pass --set data=CACHE_DIR."
        )
    if config["backbone"] in backbones.stable_diffusion.PRESETS:
        # Fail on a missing UNet file before spending time on encoding.
        version = backbones.PRESETS[config["backbone"]]["config"]["version"]
        version = config["backbone_args"].get("version", version)
        backbones.stable_diffusion.resolve_weights(
            config["backbone_args"].get("weights"), version, "diffusion_model"
        )
    source_args = dict(encode.get("source_args") or {})
    dataset, info = make_dataset(
        encode["source"],
        batch_size=int(encode.get("batch_size", 16)),
        shuffle=False,
        repeat=False,
        drop_remainder=False,
        **source_args,
    )
    encoders = make_encoders(encode, needs_text=info.has_text)
    print(f"Encoding {encode['source']} into the latent cache {cache_dir} (once).")
    return latents.cache_latents(
        dataset,
        encoders.encode_images,
        cache_dir,
        # SD3's encoder already applies the VAE's shift and scale.
        scale=1.0 if encode.get("version") == "sd3" else latents.SD_LATENT_SCALE,
        text_encode_fn=encoders.encode_text if info.has_text else None,
        info=info,
        verbose=1 if sys.stdout.isatty() else 0,
    )


def _sd3_encode(config):
    """``config["encode"]`` for SD3, its preset defaulting to the backbone's, checked.

    The preset is resolved now (no network unless ``allow_download``), so a preset that
    is not available fails before anything is encoded.
    """
    encode = dict(config["encode"])
    args = config.get("backbone_args") or {}
    preset_config = backbones.PRESETS.get(config["backbone"], {}).get("config", {})
    encode.setdefault("preset", args.get("preset", preset_config.get("preset")))
    encode.setdefault("allow_download", args.get("allow_download", False))
    if not encode["preset"]:
        raise ValueError(
            "encode.version 'sd3' needs a KerasHub preset: --set backbone_args.preset=DIR "
            "(or encode.preset=DIR)."
        )
    backbones.sd3.resolve_preset(encode["preset"], bool(encode["allow_download"]))
    return encode


def build_dataset(config):
    from keras_minsnr.data import make_dataset

    prepare_data(config)
    kwargs = dict(config["data_args"])
    if config["image_size"] is not None:
        kwargs.setdefault("image_size", config["image_size"])
    return make_dataset(
        config["data"],
        batch_size=config["batch_size"],
        repeat=True,
        shuffle=True,
        seed=config["seed"],
        **kwargs,
    )


def build_model(config, info):
    """The backbone (shaped by the data) wrapped in a `DiffusionModel`, compiled."""
    if config["mixed_precision"]:
        keras.mixed_precision.set_dtype_policy(config["mixed_precision"])
    preset = backbones.PRESETS.get(config["backbone"])
    if preset is None:
        backbones.get(config["backbone"])  # raises with the list of presets
    args = dict(config["backbone_args"])
    if "image_shape" in preset["config"]:
        args.setdefault("image_shape", tuple(info.image_shape))
    if "num_classes" in preset["config"]:
        args.setdefault("num_classes", info.num_classes)
    if "latent_shape" in preset["config"]:
        args.setdefault("latent_shape", tuple(info.image_shape))
    if "shift" in preset["config"]:  # a backbone that embeds the flow time itself
        args.setdefault("num_train_timesteps", config["num_timesteps"])
        args.setdefault("shift", config.get("flow_shift", 1.0))
    backbone = backbones.get(config["backbone"], **args)
    conditional = getattr(backbone, "conditioning", None) is not None
    weighting = weighting_lib.get(config["weighting"], gamma=config["gamma"],
                                  terminal_weight=config.get("terminal_weight", 1.0))
    if config["schedule"] == "flow":
        schedule = FlowMatchingSchedule(config["num_timesteps"], config.get("flow_shift", 1.0))
    else:
        schedule = NoiseSchedule(
            config["schedule"], config["num_timesteps"], config["zero_terminal_snr"]
        )
    if hasattr(backbone, "flow_schedule"):
        expected = backbone.flow_schedule()
        if config["schedule"] != "flow" or (
            expected.num_timesteps, expected.shift) != (schedule.num_timesteps, schedule.shift):
            raise ValueError(
                f"The backbone {config['backbone']} embeds the times of {expected!r}, but "
                f"the run's schedule is {schedule!r}: set schedule=flow, num_timesteps="
                f"{expected.num_timesteps} and flow_shift={expected.shift}."
            )
    density = {"kind": config.get("timestep_sampling", "uniform"),
               **(config.get("timestep_sampling_args") or {})}
    model = DiffusionModel(
        backbone,
        schedule,
        prediction_type=config["prediction_type"],
        weighting=weighting,
        timestep_sampling=density,
        noise_offset=config.get("noise_offset", 0.0),
        input_perturbation=config.get("input_perturbation", 0.0),
        label_dropout=config["label_dropout"] if conditional else 0.0,
        ema_decay=config["ema_decay"],
        seed=config["seed"],
        clip_denoised=config["clip_denoised"],
    )
    if model.conditioning == "context" and getattr(info, "null_context_file", None):
        model.set_null_context(np.load(info.null_context_file))
    if config.get("init_from"):
        init_backbone_from(model, config["init_from"])
    if config.get("lora_rank"):
        model.enable_lora(config["lora_rank"], config.get("lora_alpha"),
                          config.get("lora_targets"))
    optimizer = make_optimizer(config)
    model.compile(optimizer=optimizer)
    return model


def init_backbone_from(model, source):
    """Copies a run directory's (or `.keras` file's) backbone weights into ``model``.

    The source's EMA weights are used where it keeps them (they are what it samples
    with); the model's EMA then starts from the copied weights.
    """
    path = os.path.join(source, "model.keras") if os.path.isdir(source) else source
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"init_from={source!r}: no {path}; give a finished run directory or a .keras file."
        )
    trained = keras.models.load_model(path, compile=False)
    if trained.lora is not None:  # a LoRA run: its adapters folded into the base
        trained.merge_lora(use_ema=True)
    values = {}
    for weight in trained.backbone.weights:
        average = trained.ema.average_of(weight) if trained.ema is not None else None
        values[id(weight)] = weight if average is None else average
    source_weights = trained.backbone.weights
    target_weights = model.backbone.weights
    shapes = [(tuple(a.shape), tuple(b.shape)) for a, b in zip(source_weights, target_weights)]
    if len(source_weights) != len(target_weights) or any(a != b for a, b in shapes):
        raise ValueError(
            f"init_from={source!r}: its backbone ({len(source_weights)} weights) does not "
            f"match this run's ({len(target_weights)}); use the same backbone and "
            "backbone_args."
        )
    for source_weight, target_weight in zip(source_weights, target_weights):
        target_weight.assign(values[id(source_weight)])
    model.reset_ema()


def checkpoint_interval(config):
    """Optimizer steps between checkpoints (``checkpoint_every``, default one epoch)."""
    every = config.get("checkpoint_every") or config["steps_per_epoch"]
    if int(every) != every or every < 1:
        raise ValueError(f"checkpoint_every must be an integer >= 1, got {every!r}.")
    return int(every)


def load_checkpoint(run_dir, config=None, state=None):
    """The model of a run directory's newest checkpoint, ready to train on this backend.

    Returns None before the first checkpoint. The `.keras` file's compile settings are not
    trusted: `jit_compile` is backend-specific (a TensorFlow checkpoint says ``False``,
    which would run JAX op by op), so the model is recompiled with the current backend's
    default. With ``config``, the optimizer is rebuilt from it (so an allowed change of the
    learning rate or betas takes effect) and the saved optimizer state is carried over.
    The random-generator states, which `.keras` files do not restore, come from
    ``state.json``. ``state`` picks another checkpoint (`rewind_state`).
    """
    run = checkpointing.RunDirectory(run_dir)
    state = state or run.read_state()
    if state is None:
        return None
    model = keras.models.load_model(run.checkpoint_path(state))
    if "seed_states" in state:
        checkpointing.restore_seed_states(model, state["seed_states"])
    optimizer = model.optimizer
    if config is not None:
        optimizer = make_optimizer(config)
        optimizer.build(model.trainable_variables)
        _copy_optimizer_state(model.optimizer, optimizer)
    model.compile(optimizer=optimizer)  # jit_compile="auto": this backend's default
    return model


def rewind_state(run, state, resume_from, config):
    """The state to resume ``run`` from its checkpoint ``resume_from`` (a path or file
    name in ``checkpoints/``) instead of the newest, ``state``.

    An older checkpoint's data position is its step times ``grad_accum``; its random
    generators are not stored (only the newest's are), so they continue from the
    checkpointed model's own. Nothing is written here: `train` commits the rewind
    (``state.json`` then names the checkpoint, so the newer ones are replaced as the run
    passes their steps; ``history.jsonl`` records it) once the config is checked.
    """
    name = os.path.basename(str(resume_from))
    match = re.fullmatch(r"step-(\d+)\.keras", name)
    available = sorted(n for n in os.listdir(run.checkpoint_dir)
                       if re.fullmatch(r"step-\d+\.keras", n)) \
        if os.path.isdir(run.checkpoint_dir) else []
    if state is None or match is None or name not in available:
        raise ValueError(
            f"--resume-from {resume_from!r} is not a checkpoint of {run.run_dir}. "
            f"Available: {', '.join(available) if state else 'none'}."
        )
    if state is not None and state["checkpoint"] == name:
        return state
    step = int(match.group(1))
    rewound = {"step": step, "epoch": step // config["steps_per_epoch"], "checkpoint": name,
               "backend": keras.backend.backend(), "batches": step * grad_accum(config)}
    return rewound


def _copy_optimizer_state(source, target):
    """Iterations and slot variables from ``source``; hyperparameters stay ``target``'s.

    The gradient accumulation may differ (an allowed ``grad_accum`` change): a checkpoint
    lies between two updates, so the accumulators are zero and the micro-batch counter is
    the update count times the new accumulation.
    """

    def by_name(optimizer):
        # Paths start with the optimizer's own (possibly uniquified) name.
        return {v.path.split("/", 1)[-1]: v for v in optimizer.variables}

    def accumulation(optimizer):
        return int(optimizer.gradient_accumulation_steps or 1)

    old = by_name(source)
    updates = int(ops.convert_to_numpy(source.iterations))
    for name, variable in by_name(target).items():
        if name == "learning_rate":
            continue
        if name == "iteration" and accumulation(source) != accumulation(target):
            variable.assign(updates * accumulation(target))  # Keras counts micro-batches
            continue
        if name.endswith("gradient_accumulator") and name not in old:
            variable.assign(ops.zeros_like(variable))
            continue
        if name not in old or tuple(old[name].shape) != tuple(variable.shape):
            raise ValueError(
                f"The checkpoint's optimizer state has no variable {name!r} of shape "
                f"{tuple(variable.shape)}; the optimizer cannot be rebuilt from the config."
            )
        variable.assign(old[name])


_DECODERS = {}


def decode_for_display(images, config):
    """Latent samples decoded to pictures with the VAE named by ``encode.decoder_weights``
    (SD 1.x/2.x) or with the VAE of the SD3 preset (``encode.version`` ``"sd3"``).

    Anything else (pixel samples, or latents without a decoder file, which the grid shows
    as their first three channels) is returned as is.
    """
    encode = config.get("encode") or {}
    images = np.asarray(ops.convert_to_numpy(images))
    if encode.get("version") == "sd3" and images.ndim == 4 and images.shape[-1] == 16:
        # The preset holds the VAE (already loaded for the run, see sd3.load_preset).
        encode = _sd3_encode(config)
        decoder = backbones.sd3.StableDiffusion3Encoders(
            encode["preset"], allow_download=bool(encode["allow_download"])
        )
        return np.concatenate(
            [decoder.decode(images[i : i + 4]) for i in range(0, len(images), 4)]
        )
    if not encode.get("decoder_weights") or images.shape[-1] != 4:
        return images
    version = encode.get("version", "v1")
    height, width = images.shape[1] * 8, images.shape[2] * 8
    key = (version, encode["decoder_weights"], height, width)
    if key not in _DECODERS:
        _DECODERS[key] = backbones.stable_diffusion.latent_decoder(
            version, encode["decoder_weights"], height, width
        )
    decoder = _DECODERS[key]
    decoded = [decoder.predict_on_batch(images[i : i + 4]) for i in range(0, len(images), 4)]
    return np.concatenate([ops.convert_to_numpy(d) for d in decoded])


# Keys whose change would not reach a checkpointed model (they are part of the saved one).
LORA_FILE = "lora.weights.h5"  # the adapters alone, next to model.keras
MODEL_KEYS = (
    "backbone", "backbone_args", "schedule", "num_timesteps", "zero_terminal_snr",
    "prediction_type", "weighting", "gamma", "label_dropout", "ema_decay", "mixed_precision",
    "init_from", "lora_rank", "lora_alpha", "lora_targets",
)
# Keys of this module that may always change between sessions.
RUN_KEYS = ("checkpoint_every", "keep_checkpoints")


def config_changes(run_dir, config, allow_config_change=(), has_checkpoint=False):
    """``[(key, old, new)]`` between the run's stored config and ``config``.

    Refuses changes the user did not allow (``allow_config_change``, or the freely
    resumable keys such as ``steps``) and changes of the saved model's structure.
    """
    unknown = sorted(set(allow_config_change) - set(config))
    if unknown:
        raise ValueError(
            f"--allow-config-change names unknown config key(s) {', '.join(unknown)}. "
            f"Valid keys: {', '.join(sorted(config))}."
        )
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        previous = json.load(f)
    current = json.loads(json.dumps(config, default=str))
    # A key the stored config lacks came with a newer version: not a change.
    changes = [(k, previous[k], current[k]) for k in sorted(current)
               if k in previous and previous[k] != current[k]]
    refused = [k for k, _, _ in changes
               if k not in RESUMABLE_KEYS + RUN_KEYS and k not in allow_config_change]
    if refused:
        raise ValueError(
            f"{run_dir} already holds a run with a different configuration (changed: "
            f"{', '.join(refused)}). It is never overwritten: pick a new --output-dir, "
            "repeat the original settings to resume it, or accept the change with "
            f"--allow-config-change {' '.join(refused)} (recorded in history.jsonl)."
        )
    frozen = [k for k, _, _ in changes if k in MODEL_KEYS]
    if frozen and has_checkpoint:
        raise ValueError(
            f"{', '.join(frozen)} cannot change in an existing run: it is part of the "
            "checkpointed model. Start a new --output-dir."
        )
    return changes


def train(config, run_dir, verbose=None, allow_config_change=(), resume_from=None):
    """Trains (or resumes) a run for exactly ``config["steps"]`` optimizer steps.

    With ``grad_accum`` N each step averages N micro-batches of ``batch_size`` (printed
    at the start as the effective batch); every step count is in optimizer steps.

    Returns the trained `DiffusionModel`. Checkpoints are written every
    ``checkpoint_every`` steps (default: one epoch); the newest ``keep_checkpoints`` are
    kept. A resumed run continues the data order where the checkpoint stopped and equals
    the run that was never interrupted.

    Args:
        config: the resolved config.
        run_dir: the run directory, created or resumed.
        verbose: `fit`'s verbosity; default a live progress bar on a terminal and one line
            per epoch otherwise (logs, CI).
        allow_config_change: top-level config keys that may differ from the run's stored
            config; each change is printed and appended to ``history.jsonl``.
        resume_from: a checkpoint of this run to continue from instead of the newest
            (its path or file name, e.g. ``step-00002000.keras``); see `rewind_state`.

    Raises:
        FloatingPointError: the loss became NaN or Inf. Nothing of the interval it
            happened in is saved; the message says how to resume with a lower rate.
        ValueError: a changed config key that was not allowed, or that is part of the
            checkpointed model.
    """
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    scope = distribution_scope(config)  # bad device settings fail before anything is written
    os.makedirs(run_dir, exist_ok=True)
    run = checkpointing.RunDirectory(run_dir, config.get("keep_checkpoints", 2))
    run.remove_partial_files()
    newest = run.read_state()
    state = newest if resume_from is None else rewind_state(run, newest, resume_from, config)
    changes = config_changes(run_dir, config, allow_config_change, state is not None)
    if state is not newest:
        print(f"Resuming from {state['checkpoint']} instead of the newest checkpoint "
              f"({newest['checkpoint']}); older checkpoints keep no random-generator "
              "states, so the noise after it differs from the first pass.")
        run.record_change(state["step"], "resume_from", newest["checkpoint"],
                          state["checkpoint"])
        checkpointing.atomic_write_json(run.state_path, state)
    step = state["step"] if state else 0
    # Micro-batches read so far: the data continues there (runs before `batches` was
    # recorded had no accumulation).
    batches = state.get("batches", step) if state else 0
    backend = keras.backend.backend()
    if state and state.get("backend", backend) != backend:
        changes.append(("backend", state["backend"], backend))
    for key, old, new in changes:
        print(f"Config change at step {step}: {key} {old!r} -> {new!r}")
        run.record_change(step, key, old, new)
    # Rows logged after the checkpoint are replayed below, identically.
    run.truncate_metrics(step)
    keras.utils.set_random_seed(config["seed"])

    dataset, info = build_dataset(config)
    with scope():  # variables get their device layout when they are made
        model = load_checkpoint(run_dir, config, state) if state else None
        if model is None:
            model = build_model(config, info)
    # A validation key that does not fit the model fails before config.json is written.
    step_logger = StepLogger(run_dir, config, model)
    # Written once the data and the model exist, so a start that fails on them leaves no
    # config behind that would hold the directory to the failed settings.
    checkpointing.atomic_write_json(os.path.join(run_dir, "config.json"), config)
    total = int(config["steps"])
    if grad_accum(config) > 1:
        print(f"Effective batch: {grad_accum(config)} micro-batches x "
              f"{config['batch_size']} = {grad_accum(config) * config['batch_size']} "
              "examples per optimizer step.")
    if state:
        print(f"Resuming {run_dir} from step {step} of {total} "
              f"({run.checkpoint_path(state)}).")
    start = time.time()
    try:
        with scope():
            _fit(model, dataset, run, config, step, total, verbose, batches, step_logger)
    except FloatingPointError as error:
        state = run.read_state()
        kept = state["step"] if state else 0
        raise FloatingPointError(
            f"{error} Nothing after step {kept} was saved: {run_dir} resumes from "
            f"{'its checkpoint of step ' + str(kept) if state else 'the start'}. To resume "
            "with a lower learning rate, repeat the command with --set learning_rate=... "
            "--allow-config-change learning_rate."
        ) from None
    finally:
        step_logger.close()
    final = int(ops.convert_to_numpy(model.optimizer.iterations))
    if final < total:
        raise RuntimeError(f"Training stopped at step {final} of {total}.")
    checkpointing.atomic_save_model(model, os.path.join(run_dir, "model.keras"))
    if model.lora is not None:
        size = model.save_lora(os.path.join(run_dir, LORA_FILE))
        print(f"LoRA adapters: {os.path.join(run_dir, LORA_FILE)} ({size / 1024:.1f} KiB)")
    # samples.png shows the final model: RunLogger drew it at the last step only when that
    # step is a multiple of the sampling period.
    samples_path = os.path.join(run_dir, "samples.png")
    sample_every = config["steps_per_epoch"] * max(int(config["sample_every_epochs"]), 1)
    if total % sample_every or not os.path.exists(samples_path):
        write_samples(model, samples_path, config)
    print(f"Trained in {time.time() - start:.0f} s; run directory: {run_dir}")
    return model


def distribution_scope(config):
    """The context a run builds and trains its model in, for ``config["distribution"]``.

    Returns a function that makes the context (enter one to build, another to train).
    JAX: the scope of the `keras.distribution` that `kms.distribution.configure` makes.
    TensorFlow: ``data_parallel`` is a `tf.distribute.MirroredStrategy`
    (``MultiWorkerMirroredStrategy`` with ``multihost``); ``model_parallel`` is refused.
    The global batch ``batch_size`` must divide evenly over the data-parallel devices.
    """
    kind = config.get("distribution", "none")
    if kind == "none":
        return contextlib.nullcontext
    from keras_minsnr import distribution

    mesh_shape = distribution.parse_mesh(config.get("mesh"))
    if keras.backend.backend() == "jax":
        dist = distribution.configure(kind, mesh_shape, backbone_name=config["backbone"],
                                      set_global=False)
        data_devices = dist.device_mesh.shape[0]
        scope = dist.scope
    else:
        import tensorflow as tf

        if kind != "data_parallel":
            raise ValueError(
                f"distribution={kind!r} needs the JAX backend (keras.distribution); on "
                "TensorFlow use distribution=data_parallel (tf.distribute)."
            )
        if mesh_shape is not None:
            raise ValueError(
                f"mesh={config['mesh']!r} is for JAX; TensorFlow's data_parallel uses every "
                "device (set CUDA_VISIBLE_DEVICES to choose)."
            )
        if grad_accum(config) > 1:
            # Keras applies an accumulated update inside a tf.cond that each replica
            # enters alone, and tf.distribute cannot synchronise replicas there.
            raise ValueError(
                f"grad_accum={grad_accum(config)} with distribution={kind!r} is not "
                "supported on TensorFlow (Keras' gradient accumulation does not run under "
                "tf.distribute). Use KERAS_BACKEND=jax, or grad_accum=1 with data_parallel, "
                "or distribution=none with grad_accum."
            )
        strategy = (tf.distribute.MultiWorkerMirroredStrategy() if config.get("multihost")
                    else tf.distribute.MirroredStrategy())
        data_devices = strategy.num_replicas_in_sync
        scope = strategy.scope
    if config["batch_size"] % data_devices:
        raise ValueError(
            f"batch_size={config['batch_size']} must be a multiple of the {data_devices} "
            "data-parallel devices (it is the global batch, split over them)."
        )
    return scope


def _fit(model, dataset, run, config, step, total, verbose, batches=None, step_logger=None):
    """`fit` from optimizer step ``step`` to ``total`` on the data from micro-batch
    ``batches`` on (default ``step * grad_accum``).

    Keras epochs are ``segment`` steps long, so every metrics row, checkpoint and sample
    grid falls on an epoch end; a start between two of them first runs a short epoch up to
    the next. Each step is ``grad_accum`` of `fit`'s batches.
    """
    segment = math.gcd(config["steps_per_epoch"], checkpoint_interval(config))
    accumulation = grad_accum(config)
    if batches is None:
        batches = step * accumulation
    while step < total:
        epoch_steps = min(segment - step % segment, total - step)
        initial_epoch = step // segment
        num_epochs = 1 if step % segment else -(-(total - step) // segment)
        logger = RunLogger(run, config, step, total, initial_epoch, epoch_steps, batches,
                           step_logger)
        model.fit(
            # The data order continues where the checkpoint stopped (micro-batch
            # `batches` of the seeded, repeated pipeline).
            dataset.skip(batches) if batches else dataset,
            initial_epoch=initial_epoch,
            epochs=initial_epoch + num_epochs,
            steps_per_epoch=epoch_steps * accumulation,
            callbacks=[logger],
            verbose=verbose,
            shuffle=False,  # the tf.data pipeline shuffles with its own seed
        )
        new_step = int(ops.convert_to_numpy(model.optimizer.iterations))
        if logger.last_step != new_step:
            break  # an interval stopped early; `train` reports it
        batches += (new_step - step) * accumulation
        step = new_step


def load_run(run_dir):
    """The config and model of a run directory (final model, else last checkpoint)."""
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json).")
    with open(config_path) as f:
        config = json.load(f)
    final = os.path.join(run_dir, "model.keras")
    model = keras.models.load_model(final) if os.path.exists(final) else load_checkpoint(run_dir)
    if model is None:
        raise FileNotFoundError(
            f"{run_dir} has no model.keras nor a checkpoint yet; train it first."
        )
    return config, model
