"""Resuming a run directory: which checkpoint, which config, and loading it.

`train` resumes from the newest checkpoint that loads. ``checkpoints/state.json`` names
the current one, but it is not needed: every checkpoint ``step-N.keras`` has a sidecar
``step-N.json`` with the same state (step, micro-batches read, random-generator states),
and the step is in the file name. So a deleted or garbled ``state.json`` and a truncated
newest checkpoint cost at most the steps since the checkpoint before it, and the run
says what it did. A run never restarts from step 0 while a checkpoint is on disk unless
told to (``restart=True``, ``--restart``).
"""

import datetime
import json
import os

import keras
from keras import ops

from keras_minsnr import checkpointing
from keras_minsnr.run_config import RESUMABLE_KEYS

# Keys whose change would not reach a checkpointed model (they are part of the saved one).
MODEL_KEYS = (
    "backbone", "backbone_args", "schedule", "num_timesteps", "zero_terminal_snr",
    "prediction_type", "weighting", "gamma", "label_dropout", "ema_decay", "mixed_precision",
    "init_from", "lora_rank", "lora_alpha", "lora_targets", "noise_offset",
    "input_perturbation",
)
# Keys of the run directory that may always change between sessions.
RUN_KEYS = ("checkpoint_every", "keep_checkpoints", "checkpoint_format")
BROKEN_SUFFIX = ".broken"


def checkpoint_interval(config):
    """Optimizer steps between checkpoints (``checkpoint_every``, default one epoch)."""
    every = config.get("checkpoint_every") or config["steps_per_epoch"]
    if int(every) != every or every < 1:
        raise ValueError(f"checkpoint_every must be an integer >= 1, got {every!r}.")
    return int(every)


def resume_points(run):
    """The states a run could resume from, newest first, and notes on damaged files.

    Each state is the one saved with its checkpoint: from ``state.json`` when it names
    the file, else from the file's sidecar, else only the step of the file's name (a
    checkpoint from before sidecars; its random-generator states are then unknown, which
    ``state["inexact"]`` records). Reads only.

    Args:
        run: a `checkpointing.RunDirectory`.

    Returns:
        ``(states, notes)``.
    """
    notes = []
    current = None
    if os.path.exists(run.state_path):
        try:
            current = _read_json(run.state_path)
            current.setdefault("checkpoint", "latest.keras")  # before step files
            int(current["step"])
        except (ValueError, KeyError, TypeError) as error:
            notes.append(f"{run.state_path} is damaged ({_one_line(error)}).")
            current = None
    states = {}
    for step, name in run.checkpoint_files():
        state = None
        if os.path.exists(run.sidecar_path(name)):
            try:
                state = _read_json(run.sidecar_path(name))
            except ValueError:
                state = None
        if current is not None and current["checkpoint"] == name:
            state = current
        if state is None:
            state = {"step": step, "checkpoint": name, "epoch": None, "inexact": True}
        states[name] = state
    if current is not None and current["checkpoint"] not in states:
        if os.path.exists(run.checkpoint_path(current)):
            states[current["checkpoint"]] = current
        else:
            notes.append(f"{run.state_path} names {current['checkpoint']}, which is missing.")
    if states and current is None and not os.path.exists(run.state_path):
        notes.append(f"{run.state_path} is missing.")
    ordered = sorted(states.values(), key=lambda s: int(s["step"]), reverse=True)
    return ordered, notes


def newest_step(run):
    """The step of the newest checkpoint on disk (loadable or not), or None. Reads only."""
    states, _ = resume_points(run)
    return int(states[0]["step"]) if states else None


def load_newest(run, optimizer=None, verbose=True, move_broken=False, build=None):
    """``(model, state)`` of the newest checkpoint that loads, or ``(None, None)``.

    A checkpoint that does not load is skipped for the one before it; with
    ``move_broken`` (the process that holds the run's lock) it is also renamed
    ``step-N.keras.broken``, kept for inspection and out of the way of later resumes.
    What was done about damaged files is printed. ``build`` makes the fresh compiled
    model an Orbax checkpoint is restored into (`load_checkpoint_file`).

    Raises:
        ValueError: checkpoints exist but none loads (restart with ``restart=True``).
    """
    states, notes = resume_points(run)
    failures = []
    for state in states:
        path = run.checkpoint_path(state)
        try:
            model = load_checkpoint_file(path, state, optimizer, build)
        except Exception as error:  # a truncated or zeroed file fails in many ways
            failures.append(f"{os.path.basename(path)} ({_one_line(error)[:200]})")
            notes.append(f"{path} does not load ({_one_line(error)[:200]}).")
            if move_broken and os.path.exists(path):
                os.replace(path, path + BROKEN_SUFFIX)
                notes[-1] += f" Moved it to {os.path.basename(path)}{BROKEN_SUFFIX}."
            continue
        if notes or state.get("inexact"):
            notes.append(f"Resuming from {os.path.basename(path)} (step {state['step']}), "
                         "the newest checkpoint that loads.")
        if state.get("inexact"):
            notes.append(f"{os.path.basename(path)} has no sidecar with its random-generator "
                         "state: the run continues correctly but not bit for bit as an "
                         "uninterrupted one.")
        if verbose:
            for note in notes:
                print(note)
        return model, state
    if failures:
        raise ValueError(
            f"No checkpoint of {run.run_dir} loads ({'; '.join(failures)}). Start again "
            "from step 0 with --restart (train(..., restart=True)), which moves the old "
            "files aside."
        )
    if verbose:
        for note in notes:
            print(note)
    return None, None


def chosen_point(run, resume_from):
    """The state of the checkpoint ``resume_from`` (a path or a file name in
    ``checkpoints/``). Reads only.

    Raises:
        ValueError: it is not one of the run's checkpoints (the message lists them).
    """
    name = os.path.basename(os.fspath(resume_from))
    states, _ = resume_points(run)
    for state in states:
        if state["checkpoint"] == name:
            return state
    available = ", ".join(sorted(s["checkpoint"] for s in states)) or "none"
    raise ValueError(
        f"--resume-from {os.fspath(resume_from)!r} is not a checkpoint of {run.run_dir}. "
        f"Available: {available}."
    )


def rewind(run, resume_from, optimizer=None, build=None):
    """``(model, state)`` of the checkpoint ``resume_from``; the newer ones move aside.

    The checkpoints after it (and their sidecars) go to ``replaced-TIME/checkpoints/``, so
    a later resume cannot pick up the abandoned branch; ``state.json`` then names the
    chosen checkpoint and ``history.jsonl`` records the rewind. The chosen checkpoint's
    sidecar holds its random-generator states, so the run continues as it would have from
    there.
    """
    state = chosen_point(run, resume_from)
    model = load_checkpoint_file(run.checkpoint_path(state), state, optimizer, build)
    states, _ = resume_points(run)
    newer = [s for s in states if int(s["step"]) > int(state["step"])]
    if newer and run.writes:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        moved = os.path.join(run.run_dir, f"replaced-{stamp}", "checkpoints")
        os.makedirs(moved, exist_ok=True)
        for later in newer:
            name = later["checkpoint"]
            for path in (run.checkpoint_path(later), run.sidecar_path(name)):
                if os.path.exists(path):
                    os.replace(path, os.path.join(moved, os.path.basename(path)))
        checkpointing.atomic_write_json(run.state_path, state)
        run.record_change(int(state["step"]), "resume_from", newer[0]["checkpoint"],
                          state["checkpoint"])
        print(f"Resuming from {state['checkpoint']} instead of the newest checkpoint "
              f"({newer[0]['checkpoint']}); the newer checkpoints are in {moved}.")
    if state.get("inexact"):
        print(f"{state['checkpoint']} has no sidecar with its random-generator state: the "
              "run continues correctly but not bit for bit as it did the first time.")
    return model, state


def load_checkpoint_file(path, state, optimizer=None, build=None):
    """The model of one checkpoint with ``state``'s random-generator states.

    A ``step-N.orbax`` folder (`keras_minsnr.sharded_checkpoint`) is restored into the
    model ``build()`` returns (built from the run's config, in the current distribution
    scope, compiled with the optimizer it uses), each array laid out as that model's
    variables are.

    The `.keras` file's compile settings are not trusted: `jit_compile` is
    backend-specific (a TensorFlow checkpoint says ``False``, which would run JAX op by
    op), so the model is recompiled with the current backend's default. With
    ``optimizer`` (a fresh one built from the run's config, so that an allowed change of
    the learning rate or betas takes effect) the saved optimizer state is carried over
    into it.
    """
    if os.path.isdir(path):
        if build is None:
            raise ValueError(f"{path} is a sharded checkpoint: restoring it needs the run's "
                             "config to build the model first.")
        from keras_minsnr import sharded_checkpoint

        model = sharded_checkpoint.restore(build(), path)
        if "seed_states" in state:
            checkpointing.restore_seed_states(model, state["seed_states"])
        return model
    model = keras.models.load_model(path)
    if "seed_states" in state:
        checkpointing.restore_seed_states(model, state["seed_states"])
    if optimizer is None:
        optimizer = model.optimizer
    else:
        optimizer.build(model.trainable_variables)
        _copy_optimizer_state(model.optimizer, optimizer)
    model.compile(optimizer=optimizer)  # jit_compile="auto": this backend's default
    return model


def load_checkpoint(run_dir, optimizer=None, build=None):
    """The model of a run directory's newest checkpoint that loads; None before the first.

    See `load_newest` (damaged files) and `load_checkpoint_file` (the optimizer,
    ``build`` for Orbax checkpoints).
    """
    model, _ = load_newest(checkpointing.RunDirectory(run_dir), optimizer, build=build)
    return model


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


def check_steps(run_dir, config, reached):
    """Refuses ``steps`` below the step the run directory already reached."""
    if reached is not None and int(config["steps"]) < int(reached):
        raise ValueError(
            f"steps={config['steps']} is below step {reached}, which {run_dir} already "
            f"reached; give --steps {reached} or more to resume it, or a new --output-dir."
        )


def move_aside_for_restart(run):
    """Moves checkpoints, metrics and the final model into ``replaced-TIME/``.

    Returns the folder (None when there was nothing to move).
    """
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    moved = os.path.join(run.run_dir, f"replaced-{stamp}")
    names = [name for name in ("checkpoints", "metrics.csv", "model.keras")
             if os.path.exists(os.path.join(run.run_dir, name))]
    if not names:
        return None
    os.makedirs(moved, exist_ok=True)
    for name in names:
        os.replace(os.path.join(run.run_dir, name), os.path.join(moved, name))
    return moved


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


def _run_config(run_dir):
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json).")
    with open(config_path) as f:
        return json.load(f)


def one_device_builder(config):
    """A function that builds the run's fresh compiled model on this process's default
    device (an Orbax checkpoint of any mesh is restored into it)."""

    def build():
        from keras_minsnr.builders import build_dataset
        from keras_minsnr.builders import build_model

        _, info = build_dataset(config)  # the image shape and classes the model takes
        return build_model(config, info)

    return build


def load_run(run_dir):
    """The config and model of a run directory (final model, else last checkpoint)."""
    config = _run_config(run_dir)
    final = os.path.join(run_dir, "model.keras")
    if os.path.exists(final):
        return config, keras.models.load_model(final)
    model = load_checkpoint(run_dir, build=one_device_builder(config))
    if model is None:
        raise FileNotFoundError(
            f"{run_dir} has no model.keras nor a checkpoint yet; train it first."
        )
    return config, model


def export(run_dir, path):
    """Writes the newest checkpoint of ``run_dir`` (``.keras`` or Orbax) as one ``.keras``
    file ``path`` that loads and samples on one device.

    Returns the exported checkpoint's state (its ``step``, ``checkpoint``).
    """
    config = _run_config(run_dir)
    model, state = load_newest(checkpointing.RunDirectory(run_dir),
                               build=one_device_builder(config))
    if model is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet; train it first.")
    checkpointing.atomic_save_model(model, os.fspath(path))
    return state


def _read_json(path):
    with open(path) as f:
        value = json.load(f)
    if not isinstance(value, dict) or "step" not in value:
        raise ValueError("not a checkpoint state")
    return value


def _one_line(error):
    return " ".join(str(error).split()) or type(error).__name__
