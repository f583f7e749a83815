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

import json
import math
import os
import re
import sys
import time

import keras
from keras import ops

from keras_minsnr import checkpointing
from keras_minsnr.builders import build_model
from keras_minsnr.builders import distribution_scope
from keras_minsnr.monitoring import RunLogger
from keras_minsnr.monitoring import StepLogger
from keras_minsnr.monitoring import write_samples
from keras_minsnr.optimizers import grad_accum
from keras_minsnr.optimizers import make_optimizer
from keras_minsnr.run_config import RESUMABLE_KEYS


def build_dataset(config):
    from keras_minsnr.data import make_dataset
    from keras_minsnr.data.preparation import prepare_data

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
