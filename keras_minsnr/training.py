"""Training runs: a recipe config in, a run directory out.

A run directory holds::

    config.json      the resolved configuration (recipe + overrides)
    metrics.csv      one row per logged step (epoch ends and checkpoints): loss and the
                     per-SNR-quarter MSE
    history.jsonl    every configuration change between sessions
    logs/            TensorBoard logs: per-step scalars every log_every steps at the global
                     step, validation grids (keras_minsnr.monitoring); W&B's offline files
    samples/         step-NNNNNNNN.png validation grids (validation_every)
    checkpoints/     step-NNNNNNNN.keras (model, optimizer, EMA) or the sharded folder
                     step-NNNNNNNN.orbax/ (checkpoint_format), its sidecar
                     step-NNNNNNNN.json, and state.json (keras_minsnr.resume)
    run.lock         while a process trains the run (keras_minsnr.run_lock)
    samples.png      a grid of samples, refreshed during training; the final model's at
                     the end
    model.keras      the final model
    lora.weights.h5  the LoRA adapters alone (runs with lora_rank; docs/lora.md)

Starting the same run again resumes from the last checkpoint and continues exactly where
it stopped; see `keras_minsnr.checkpointing` and docs/reliability.md. The hosts of a
multi-host run may share one run directory: process 0 then writes it
(`keras_minsnr.run_sharing`, docs/scaling.md).

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

from keras_minsnr import backend as backend_lib
from keras_minsnr import checkpointing
from keras_minsnr import interrupts
from keras_minsnr import resume
from keras_minsnr import run_lock
from keras_minsnr.backbones.contract import set_gradient_checkpointing
from keras_minsnr import run_sharing
from keras_minsnr.builders import build_dataset
from keras_minsnr.builders import build_model
from keras_minsnr.builders import check_backbone_options
from keras_minsnr.builders import distribution_scope
from keras_minsnr.monitoring import RunLogger
from keras_minsnr.monitoring import StepLogger
from keras_minsnr.monitoring import validation_condition
from keras_minsnr.monitoring import write_samples
from keras_minsnr.optimizers import grad_accum
from keras_minsnr.optimizers import make_optimizer


LORA_FILE = "lora.weights.h5"  # the adapters alone, next to model.keras


def train(config, run_dir, verbose=None, allow_config_change=(), restart=False,
          resume_from=None):
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
        resume_from: a checkpoint of this run to continue from instead of the newest
            (its path or file name, e.g. ``step-00002000.keras``); the newer ones are
            moved to ``run_dir/replaced-TIME/`` (`resume.rewind`).

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
    if config.get("checkpoint_format") == "orbax":
        from keras_minsnr import sharded_checkpoint

        sharded_checkpoint.check_available()
    run = checkpointing.RunDirectory(run_dir, config.get("keep_checkpoints", 2))
    if restart and resume_from is not None:
        raise ValueError("--restart and --resume-from exclude each other: restart begins "
                         "at step 0, resume-from at a checkpoint.")
    if resume_from is not None:
        reached = int(resume.chosen_point(run, resume_from)["step"])
    else:
        reached = None if restart else resume.newest_step(run)
    resume.config_changes(run_dir, config, allow_config_change, reached is not None)
    resume.check_steps(run_dir, config, reached)
    check_backbone_options(config)
    keras.utils.set_random_seed(config["seed"])
    dataset, info = build_dataset(config)
    model = validation = None
    if reached is None:
        with scope():  # variables get their device layout when they are made
            model = build_model(config, info)
        # A validation key that does not fit the model fails here (prompts are encoded once).
        validation = validation_condition(model, config)
    # Several hosts: process 0 writes a directory they share; one of its own each
    # process writes itself.
    sharing = run_sharing.decide(run_dir)
    if config.get("checkpoint_format") == "orbax" and (
            sharing.process_count > 1 and not sharing.all_shared):
        raise ValueError(
            "checkpoint_format=orbax needs one --output-dir shared by all "
            f"{sharing.process_count} processes (every host writes its shards into the "
            "same folder), but they do not all see process 0's; use a shared folder or "
            "checkpoint_format=keras."
        )
    run.writes = sharing.writes
    if sharing.writes:
        os.makedirs(run_dir, exist_ok=True)
    lock = run_lock.RunLock(run_dir) if sharing.locks else contextlib.nullcontext()
    with lock, interrupts.StopRequests() as stop:
        return _train_locked(config, run, (model, validation), (dataset, info), scope,
                             verbose, allow_config_change, restart, stop, resume_from,
                             sharing)


def checkpoint_format(config, model, sharing):
    """The format of this session's checkpoints: the config's ``checkpoint_format``, or
    (null) ``orbax`` when some array of ``model`` is split over several hosts and they
    share the run directory, else ``keras``. An explicit ``orbax`` with hosts that do
    not share the directory was refused by `train` before anything was written.
    """
    chosen = config.get("checkpoint_format")
    if chosen is None:
        split = any(backend_lib.spans_other_hosts(v.value) for v in model.variables)
        chosen = "orbax" if split and sharing.all_shared else "keras"
    return chosen


def _train_locked(config, run, built, data, scope, verbose, allow_config_change,
                  restart, stop, resume_from=None, sharing=run_sharing.RunSharing()):
    """`train` once the run directory is locked: resume, fit, save. ``built`` is the
    fresh model `train` made (or None) and its validation condition."""
    run_dir = run.run_dir
    model, validation = built
    dataset, info = data
    if restart and run.writes:
        moved = resume.move_aside_for_restart(run)
        if moved:
            print(f"Restarting {run_dir} from step 0; the previous checkpoints, metrics and "
                  f"model are in {moved}.")
    run.remove_partial_files()
    backend_lib.barrier("keras_minsnr.training.prepared")  # every host reads the same files

    def build():  # the model an Orbax checkpoint is restored into
        return build_model(config, info)

    with scope():
        if resume_from is not None:
            loaded, state = resume.rewind(run, resume_from, make_optimizer(config), build)
        else:
            loaded, state = resume.load_newest(run, make_optimizer(config),
                                               move_broken=run.writes, build=build)
    if loaded is not None:
        model, validation = loaded, None
    elif model is None:  # its checkpoints vanished since train() looked (another run)
        with scope():
            model = build_model(config, info)
    # How this session computes gradients, not part of the weights (resumable): set on the
    # fresh or loaded backbone before fit() traces it.
    set_gradient_checkpointing(model.backbone, config.get("gradient_checkpointing", False))
    backend_lib.barrier("keras_minsnr.training.loaded")  # before process 0 writes again
    run.checkpoint_format = checkpoint_format(config, model, sharing)
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
    step_logger = StepLogger(run_dir, config, model, validation, writes=run.writes)
    if run.writes:
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
            _fit(model, dataset, run, config, step, total, verbose, batches, stop,
                 step_logger)
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
    finally:
        step_logger.close()
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
    # Arrays split over several hosts are gathered (by every process) first.
    with backend_lib.readable_variables(model), backend_lib.one_process_only():
        if run.writes:
            checkpointing.atomic_save_model(model, os.path.join(run_dir, "model.keras"))
            if model.lora is not None:
                size = model.save_lora(os.path.join(run_dir, LORA_FILE))
                print(f"LoRA adapters: {os.path.join(run_dir, LORA_FILE)} "
                      f"({size / 1024:.1f} KiB)")
    # samples.png shows the final model: RunLogger drew it at the last step only when that
    # step is a multiple of the sampling period. Every host samples (one program).
    samples_path = os.path.join(run_dir, "samples.png")
    sample_every = config["steps_per_epoch"] * max(int(config["sample_every_epochs"]), 1)
    drawn = total % sample_every == 0 and os.path.exists(samples_path)
    if not backend_lib.broadcast_from_first(np.asarray(int(drawn))):
        write_samples(model, samples_path if run.writes else None, config)
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


def _fit(model, dataset, run, config, step, total, verbose, batches=None, stop=None,
         step_logger=None):
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
        logger = RunLogger(run, config, step, total, initial_epoch, epoch_steps, batches,
                           step_logger)
        model.fit(
            # The data order continues where the checkpoint stopped (micro-batch
            # `batches` of the seeded, repeated pipeline).
            dataset.skip(batches) if batches else dataset,
            initial_epoch=initial_epoch,
            epochs=initial_epoch + num_epochs,
            steps_per_epoch=epoch_steps * accumulation,
            callbacks=[
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
