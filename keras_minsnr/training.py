"""Training runs: a recipe config in, a run directory out.

A run directory holds::

    config.json      the resolved configuration (recipe + overrides)
    metrics.csv      one row per logged step (epoch ends and checkpoints): loss and the
                     per-SNR-quarter MSE
    history.jsonl    every configuration change between sessions
    logs/            TensorBoard logs
    checkpoints/     step-NNNNNNNN.keras (model, optimizer, EMA) + state.json
    samples.png      a grid of samples, refreshed during training
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
import math
import os
import sys
import time

import keras
import numpy as np
from keras import ops

from keras_minsnr import backbones
from keras_minsnr import backend as backend_lib
from keras_minsnr import checkpointing
from keras_minsnr import interrupts
from keras_minsnr import resume
from keras_minsnr import run_lock
from keras_minsnr import weighting as weighting_lib
from keras_minsnr.diffusion_model import DiffusionModel
from keras_minsnr.flow import FlowMatchingSchedule
from keras_minsnr.lr_schedules import PerUpdateSchedule
from keras_minsnr.schedules import NoiseSchedule
from keras_minsnr.visualization import save_image_grid

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


def make_optimizer(config):
    """AdamW with the config's rate (after a linear warm-up), betas, decay and clipping.

    With ``grad_accum`` N > 1 the optimizer accumulates N micro-batches per update, and
    the warm-up counts updates.
    """
    learning_rate = config["learning_rate"]
    accumulation = grad_accum(config)
    if config["warmup_steps"]:
        learning_rate = keras.optimizers.schedules.CosineDecay(
            0.0,
            decay_steps=1,
            alpha=1.0,
            warmup_target=learning_rate,
            warmup_steps=config["warmup_steps"],
        )
        if accumulation > 1:
            learning_rate = PerUpdateSchedule(learning_rate, accumulation)
    return keras.optimizers.AdamW(
        learning_rate,
        beta_1=config["beta_1"],
        beta_2=config["beta_2"],
        weight_decay=config["weight_decay"],
        clipnorm=config["clipnorm"],
        gradient_accumulation_steps=accumulation if accumulation > 1 else None,
    )


def grad_accum(config):
    """Micro-batches per optimizer update (``grad_accum``; 1 in configs from before it)."""
    return int(config.get("grad_accum", 1))


class RunLogger(keras.callbacks.Callback):
    """Ends each logged interval of a run: a metrics row, a checkpoint, a sample grid.

    `train` runs `fit` with Keras epochs of ``segment`` optimizer steps, a divisor of both
    ``steps_per_epoch`` and ``checkpoint_every``, so every row, checkpoint and grid falls on
    an epoch end. An interval that stopped early (a non-finite loss, whose update was
    skipped) writes nothing: the last checkpoint stays the latest. Steps are optimizer
    updates; `fit` sees ``grad_accum`` micro-batches per step.

    Args:
        run: the `checkpointing.RunDirectory`.
        config: the run's config.
        start_step: the optimizer step `fit` starts from.
        end_step: the step to stop after (the run's ``steps``).
        initial_epoch: the ``initial_epoch`` passed to `fit`.
        epoch_steps: optimizer steps per `fit` epoch (``grad_accum`` times fewer than the
            ``steps_per_epoch`` passed to `fit`).
        start_batches: micro-batches consumed before ``start_step`` (default:
            ``start_step * grad_accum``).
    """

    def __init__(self, run, config, start_step, end_step, initial_epoch, epoch_steps,
                 start_batches=None):
        super().__init__()
        self.run = run
        self.config = config
        self.start_step = start_step
        self.end_step = end_step
        self.initial_epoch = initial_epoch
        self.epoch_steps = epoch_steps
        self.accumulation = grad_accum(config)
        self.start_batches = (start_step * self.accumulation if start_batches is None
                              else start_batches)
        self.steps_per_epoch = config["steps_per_epoch"]
        self.checkpoint_every = resume.checkpoint_interval(config)
        self.sample_every = self.steps_per_epoch * max(int(config["sample_every_epochs"]), 1)
        self.samples_path = os.path.join(run.run_dir, "samples.png")
        self.last_step = start_step

    def _micro_batches_at(self, epoch, batch):
        """Micro-batches this session has trained on after `fit`'s ``batch`` of ``epoch``."""
        return (epoch - self.initial_epoch) * self.epoch_steps * self.accumulation + batch + 1

    def on_train_batch_end(self, batch, logs=None):
        # Counted here rather than read from the optimizer: on JAX reading a variable
        # syncs the whole training state back from the device after every step.
        micro = self._micro_batches_at(self._epoch, batch)
        if micro % self.accumulation:
            return  # gradients accumulated, no update yet
        self.last_step = self.start_step + micro // self.accumulation
        checkpointing.inject_fault("step", self.last_step)
        if self.last_step >= self.end_step:
            self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        logs = {k: float(ops.convert_to_numpy(v)) for k, v in (logs or {}).items()}
        if step != self.last_step or not all(np.isfinite(v) for v in logs.values()):
            return  # stopped on a non-finite loss: this interval is not kept
        if (step - self.start_step) % self.epoch_steps and step != self.end_step:
            return  # stopped between two logged steps by a signal: `train` checkpoints it
        row = {"epoch": (step - 1) // self.steps_per_epoch, "step": step}
        row.update({k: repr(v) for k, v in logs.items()})
        self.run.append_metrics(row)
        if step % self.checkpoint_every == 0 or step == self.end_step:
            batches = self.start_batches + (step - self.start_step) * self.accumulation
            self.run.save_checkpoint(self.model, step, epoch=step // self.steps_per_epoch,
                                     extra={"batches": int(batches)})
        if step % self.sample_every == 0:
            write_samples(self.model, self.samples_path, self.config)


def sample_labels(model, num_samples):
    if model.conditioning != "class":
        return None
    # Rows of one class each when the grid is square-ish.
    per_class = max(num_samples // model.num_classes, 1)
    return np.repeat(np.arange(model.num_classes), per_class)[:num_samples]


def sample_context(config, num_samples):
    """Text contexts for samples of a text-conditional model: the first captions of the
    run's latent cache (``config["data"]``), repeated as needed."""
    from keras_minsnr.data import latents

    cache_dir = os.path.expanduser(str(config["data"]))
    manifest = latents.read_manifest(cache_dir) if os.path.isdir(cache_dir) else None
    if manifest is None or not manifest.get("context_shape"):
        raise ValueError(
            f"This model is text-conditional but data={cache_dir!r} holds no latent "
            "cache with text embeddings to sample from."
        )
    shard = manifest["shards"][0]
    context = np.load(os.path.join(cache_dir, shard["context"]), mmap_mode="r")
    context = np.asarray(context[:num_samples], dtype="float32")
    return np.resize(context, (num_samples,) + context.shape[1:])


def write_samples(model, path, config, num_samples=None, seed=0, **overrides):
    """Generates ``num_samples`` images with the config's sampler and saves a grid."""
    num_samples = num_samples or config["num_samples"]
    labels = sample_labels(model, num_samples)
    if model.conditioning == "context":
        overrides.setdefault("context", sample_context(config, num_samples))
    kwargs = dict(
        num_steps=config["sample_steps"],
        sampler=config["sampler"],
        # The recipe's guidance is for conditional models; generate refuses it otherwise.
        guidance_scale=config["guidance_scale"] if model.conditioning else 1.0,
        clip_denoised=config["clip_denoised"],
        seed=seed,
    )
    kwargs.update(overrides)
    if labels is None:
        images = model.generate(num_samples, **kwargs)
    else:
        images = model.generate(labels=labels, **kwargs)
    per_class = 0 if labels is None else len(labels) // model.num_classes
    # One row per class when every class gets a full row; otherwise a square-ish grid.
    columns = per_class if per_class > 1 else int(np.ceil(np.sqrt(len(images))))
    save_image_grid(decode_for_display(images, config), path, columns=columns)
    return images


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


LORA_FILE = "lora.weights.h5"  # the adapters alone, next to model.keras


def train(config, run_dir, verbose=None, allow_config_change=(), restart=False):
    """Trains (or resumes) a run for exactly ``config["steps"]`` optimizer steps.

    With ``grad_accum`` N each step averages N micro-batches of ``batch_size`` (printed
    at the start as the effective batch); every step count is in optimizer steps.

    Returns the trained `DiffusionModel`. Checkpoints are written every
    ``checkpoint_every`` steps (default: one epoch); the newest ``keep_checkpoints`` are
    kept. A resumed run continues the data order where the checkpoint stopped and equals
    the run that was never interrupted. Everything that can refuse a run (devices, data,
    model, config changes, ``steps``) is checked before ``run_dir`` is created or
    changed; then the run holds ``run_dir/run.lock`` until it returns (`run_lock`).
    SIGINT / SIGTERM stop it after the current step with a checkpoint (`interrupts`).

    Args:
        config: the resolved config.
        run_dir: the run directory, created or resumed.
        verbose: `fit`'s verbosity; default a live progress bar on a terminal and one line
            per epoch otherwise (logs, CI).
        allow_config_change: top-level config keys that may differ from the run's stored
            config; each change is printed and appended to ``history.jsonl``.
        restart: start from step 0 although checkpoints exist; the old checkpoints,
            metrics and model are moved to ``run_dir/replaced-TIME/``.

    Raises:
        FloatingPointError: the loss became NaN or Inf. Nothing of the interval it
            happened in is saved; the message says how to resume with a lower rate.
        ValueError: a changed config key that was not allowed, or that is part of the
            checkpointed model; ``steps`` below the step the run reached; a run directory
            in use by another process (`run_lock.RunLockedError`).
        interrupts.TrainingInterrupted: SIGINT or SIGTERM; the last step is checkpointed.
    """
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    # Everything below up to os.makedirs only reads: a refused run writes nothing.
    scope = distribution_scope(config)
    run = checkpointing.RunDirectory(run_dir, config.get("keep_checkpoints", 2))
    reached = None if restart else resume.newest_step(run)
    resume.config_changes(run_dir, config, allow_config_change, reached is not None)
    resume.check_steps(run_dir, config, reached)
    keras.utils.set_random_seed(config["seed"])
    dataset, info = build_dataset(config)
    model = None
    if reached is None:
        with scope():  # variables get their device layout when they are made
            model = build_model(config, info)
    os.makedirs(run_dir, exist_ok=True)
    lock = run_lock.RunLock(run_dir) if _holds_lock(config) else contextlib.nullcontext()
    with lock, interrupts.StopRequests() as stop:
        return _train_locked(config, run, model, (dataset, info), scope, verbose,
                             allow_config_change, restart, stop)


def _holds_lock(config):
    """Multi-host runs share one directory: only process 0 locks (and writes) it."""
    return not config.get("multihost") or backend_lib.process_index() == 0


def _train_locked(config, run, model, data, scope, verbose, allow_config_change,
                  restart, stop):
    """`train` once the run directory is locked: resume, fit, save."""
    run_dir = run.run_dir
    dataset, info = data
    if restart:
        moved = resume.move_aside_for_restart(run)
        if moved:
            print(f"Restarting {run_dir} from step 0; the previous checkpoints, metrics and "
                  f"model are in {moved}.")
    run.remove_partial_files()
    with scope():
        loaded, state = resume.load_newest(run, make_optimizer(config), move_broken=True)
    if loaded is not None:
        model = loaded
    elif model is None:  # its checkpoints vanished since train() looked (another run)
        with scope():
            model = build_model(config, info)
    changes = resume.config_changes(run_dir, config, allow_config_change, state is not None)
    step = int(state["step"]) if state else 0
    resume.check_steps(run_dir, config, step)
    # Micro-batches read so far: the data continues there (runs before `batches` was
    # recorded had no accumulation).
    batches = state.get("batches", step * grad_accum(config)) if state else 0
    backend = keras.backend.backend()
    if state and state.get("backend", backend) != backend:
        changes.append(("backend", state["backend"], backend))
    for key, old, new in changes:
        print(f"Config change at step {step}: {key} {old!r} -> {new!r}")
        run.record_change(step, key, old, new)
    # Rows logged after the checkpoint are replayed below, identically.
    run.truncate_metrics(step)
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
            _fit(model, dataset, run, config, step, total, verbose, batches, stop)
    except FloatingPointError as error:
        state = run.read_state()
        kept = state["step"] if state else 0
        raise FloatingPointError(
            f"{error}{_non_finite_data(config)} Nothing after step {kept} was saved: "
            f"{run_dir} resumes from "
            f"{'its checkpoint of step ' + str(kept) if state else 'the start'}. To resume "
            "with a lower learning rate, repeat the command with --set learning_rate=... "
            "--allow-config-change learning_rate."
        ) from None
    final = int(ops.convert_to_numpy(model.optimizer.iterations))
    if stop.signum is not None and final < total:
        _checkpoint_interrupted(model, run, config, final, batches + (final - step) *
                                grad_accum(config))
        raise interrupts.TrainingInterrupted(
            stop.signum, final,
            f"Stopped at step {final} of {total} on {interrupts.signal_name(stop.signum)}; "
            f"checkpoint {run.checkpoint_path(run.read_state())}. Run the same command "
            "again to resume.",
        )
    if final < total:
        raise RuntimeError(f"Training stopped at step {final} of {total}.")
    checkpointing.atomic_save_model(model, os.path.join(run_dir, "model.keras"))
    if model.lora is not None:
        size = model.save_lora(os.path.join(run_dir, LORA_FILE))
        print(f"LoRA adapters: {os.path.join(run_dir, LORA_FILE)} ({size / 1024:.1f} KiB)")
    if not os.path.exists(os.path.join(run_dir, "samples.png")):
        write_samples(model, os.path.join(run_dir, "samples.png"), config)
    print(f"Trained in {time.time() - start:.0f} s; run directory: {run_dir}")
    return model


def _checkpoint_interrupted(model, run, config, step, batches):
    """The checkpoint of the step a signal stopped at (unless it is already written)."""
    state = run.read_state()
    if state is not None and int(state["step"]) == step:
        return
    run.save_checkpoint(model, step, epoch=step // config["steps_per_epoch"],
                        extra={"batches": int(batches)})


def _non_finite_data(config):
    """Names the examples of a latent cache that hold NaN or Inf (empty if none)."""
    from keras_minsnr.data import latents

    cache_dir = os.path.expanduser(str(config["data"]))
    if not os.path.isdir(cache_dir) or latents.read_manifest(cache_dir) is None:
        return ""
    bad = latents.non_finite_examples(cache_dir)
    if not bad:
        return ""
    where = ", ".join(f"example {index} ({file} row {row})" for index, file, row in bad)
    return f" The latent cache {cache_dir} holds NaN or Inf values: {where}."


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


def _fit(model, dataset, run, config, step, total, verbose, batches=None, stop=None):
    """`fit` from optimizer step ``step`` to ``total`` on the data from micro-batch
    ``batches`` on (default ``step * grad_accum``), until ``stop`` (an
    `interrupts.StopRequests`) records a signal.

    Keras epochs are ``segment`` steps long, so every metrics row, checkpoint and sample
    grid falls on an epoch end; a start between two of them first runs a short epoch up to
    the next. Each step is ``grad_accum`` of `fit`'s batches.
    """
    segment = math.gcd(config["steps_per_epoch"], resume.checkpoint_interval(config))
    accumulation = grad_accum(config)
    if batches is None:
        batches = step * accumulation
    while step < total:
        epoch_steps = min(segment - step % segment, total - step)
        initial_epoch = step // segment
        num_epochs = 1 if step % segment else -(-(total - step) // segment)
        logger = RunLogger(run, config, step, total, initial_epoch, epoch_steps, batches)
        model.fit(
            # The data order continues where the checkpoint stopped (micro-batch
            # `batches` of the seeded, repeated pipeline).
            dataset.skip(batches) if batches else dataset,
            initial_epoch=initial_epoch,
            epochs=initial_epoch + num_epochs,
            steps_per_epoch=epoch_steps * accumulation,
            callbacks=[
                keras.callbacks.TensorBoard(os.path.join(run.run_dir, "logs"), write_graph=False),
                logger,
                *([interrupts.StopAtStepBoundary(stop, accumulation)] if stop else []),
            ],
            verbose=verbose,
            shuffle=False,  # the tf.data pipeline shuffles with its own seed
        )
        new_step = int(ops.convert_to_numpy(model.optimizer.iterations))
        if logger.last_step != new_step or (stop and stop.signum is not None):
            break  # an interval stopped early; `train` reports it
        batches += (new_step - step) * accumulation
        step = new_step
