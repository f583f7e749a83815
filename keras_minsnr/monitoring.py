"""Watching a run: sample grids, validation images and per-step scalars.

`RunLogger` ends each logged interval (metrics row, checkpoint, ``samples.png``);
`StepLogger` writes the loss, the per-quarter MSE, the learning rate and the throughput
every ``log_every`` optimizer steps to TensorBoard (and Weights & Biases with
``report_to``) at the run's global step, so a resumed run continues the same curves; and
every ``validation_every`` steps it writes ``samples/step-NNNNNNNN.png`` from a fixed
seed and logs that grid as a TensorBoard image.
"""

import os
import time
import uuid

import keras
import numpy as np
from keras import ops

from keras_minsnr import checkpointing
from keras_minsnr import resume
from keras_minsnr.backbones import autoencoders
from keras_minsnr.data.preparation import decode_for_display
from keras_minsnr.data.preparation import resolve_encode_config
from keras_minsnr.data.preparation import sample_context
from keras_minsnr.optimizers import grad_accum
from keras_minsnr.visualization import image_grid
from keras_minsnr.visualization import save_image_grid

WANDB_ID_FILE = "wandb_run_id.txt"  # in logs/: a resumed run continues the same W&B run


def sample_labels(model, num_samples):
    """Class ids for ``num_samples`` samples of a class model: the classes in order, each
    repeated so the grid has one row per class when it can; None for other models."""
    if model.conditioning != "class":
        return None
    per_class = max(num_samples // model.num_classes, 1)
    return np.resize(np.repeat(np.arange(model.num_classes), per_class), num_samples)


def write_samples(model, path, config, num_samples=None, seed=0, labels=None, **overrides):
    """Generates ``num_samples`` images with the config's sampler and saves a grid.

    ``labels`` (class models) default to `sample_labels`; a text model's ``context``
    (an override) defaults to the first captions of the run's data. Returns the images
    as the grid shows them (decoded when the run has a VAE decoder). ``path`` None: only
    generate (a host of a multi-host run that does not write the run directory).
    """
    num_samples = num_samples or config["num_samples"]
    if labels is None:
        labels = sample_labels(model, num_samples)
    if model.conditioning == "context" and "context" not in overrides:
        overrides["context"] = sample_context(config, num_samples)
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
        images = model.generate(labels=np.asarray(labels, "int32"), **kwargs)
    per_class = 0 if labels is None else len(labels) // model.num_classes
    # One row per class when every class gets a full row; otherwise a square-ish grid.
    columns = per_class if per_class > 1 else int(np.ceil(np.sqrt(len(images))))
    shown = decode_for_display(images, config)
    if path is not None:
        save_image_grid(shown, path, columns=columns)
    return shown


def validation_condition(model, config):
    """``{"labels": ...}`` or ``{"context": ...}`` for the validation grid of ``model``.

    Raises `ValueError` when the keys do not fit the model: prompts on a model without
    text conditioning, labels on one without classes, labels outside its classes.
    """
    prompts, labels = config.get("validation_prompts"), config.get("validation_labels")
    if prompts is not None and model.conditioning != "context":
        raise ValueError(
            f"validation_prompts={prompts!r}: this model is not text-conditional "
            f"(conditioning {model.conditioning!r}); use validation_labels for a class "
            "model, or neither."
        )
    if labels is not None and model.conditioning != "class":
        raise ValueError(
            f"validation_labels={labels!r}: this model has no classes (conditioning "
            f"{model.conditioning!r}); use validation_prompts for a text model, or neither."
        )
    if labels is not None:
        bad = [label for label in labels if not 0 <= int(label) < model.num_classes]
        if bad:
            raise ValueError(
                f"validation_labels holds {bad[0]!r}; this model's classes are "
                f"0 ... {model.num_classes - 1}."
            )
        return {"labels": np.asarray(labels, "int32")}
    if prompts is not None:
        encoders = autoencoders.from_encode_config(resolve_encode_config(config), text=True)
        return {"context": np.asarray(encoders.encode_text(list(prompts)), "float32")}
    if model.conditioning == "class":
        return {"labels": np.arange(model.num_classes, dtype="int32")}
    if model.conditioning == "context":
        return {"context": sample_context(config, min(config["num_samples"], 8))}
    return {}


def validation_path(run_dir, step):
    return os.path.join(run_dir, "samples", f"step-{step:08d}.png")


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
        step_logger: the session's `StepLogger`, told about every completed update.

    Example:
    ```python
    logger = RunLogger(run, config, 0, 100, initial_epoch=0, epoch_steps=10)
    model.fit(dataset, epochs=10, steps_per_epoch=10, callbacks=[logger])
    ```

    Reference:
        `keras.callbacks.Callback`; the layout of a run directory in
        `keras_minsnr.training`.
    """

    def __init__(self, run, config, start_step, end_step, initial_epoch, epoch_steps,
                 start_batches=None, step_logger=None):
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
        self.step_logger = step_logger

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
        if self.step_logger is not None and self.step_logger.due(self.last_step):
            # `self.model` syncs the JAX training state, which the logger reads.
            self.step_logger.after_update(self.last_step, self.model)
        if self.last_step >= self.end_step:
            self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if self.step_logger is not None:
            self.step_logger.on_epoch_begin(self.last_step)

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
            write_samples(self.model, self.samples_path if self.run.writes else None,
                          self.config)


class StepLogger:
    """Per-step scalars and validation grids of one training session.

    Every ``log_every`` optimizer steps it writes, at the run's global step, ``loss`` and
    ``mse_q1`` … ``mse_q4`` (their means over the micro-batches since the last point, read
    from the model's metric totals), ``learning_rate`` (the rate of the next update) and
    ``images_per_second`` (examples trained on since the last point over the wall time,
    validation excluded) to TensorBoard (``logs/``) and, with ``report_to`` ``wandb`` or
    ``all``, to Weights & Biases. Every ``validation_every`` steps it writes
    ``samples/step-NNNNNNNN.png`` (seed ``validation_seed``) and logs it as the image
    ``validation``. `RunLogger` calls it after each completed update.

    Args:
        run_dir: the run directory.
        config: the run's config.
        model: the `DiffusionModel` being trained (its metrics are read).
        writes: False on a host that does not write the run directory: it still draws
            the validation grids (all hosts run the sampling program) but writes nothing.

    Example:
    ```python
    logger = StepLogger("runs/digits", config, model)
    # RunLogger(..., step_logger=logger) calls logger.after_update(step, logs)
    logger.close()
    ```

    Reference:
        `tf.summary` (TensorBoard event files); ``wandb.init(resume="allow")``.
    """

    def __init__(self, run_dir, config, model, validation=None, writes=True):
        self.run_dir = run_dir
        self.writes = writes
        self.config = config
        self.model = model
        self.log_every = int(config.get("log_every", 10))
        self.validation_every = config.get("validation_every")
        self.images_per_step = int(config["batch_size"]) * grad_accum(config)
        report_to = config.get("report_to", "tensorboard")
        self.validation = None
        if self.validation_every:  # `validation`: the condition the caller already made
            self.validation = (validation if validation is not None
                               else validation_condition(model, config))
        self._wandb = (_start_wandb(run_dir, config)
                       if writes and report_to in ("wandb", "all") else None)
        self._writer = None
        if writes and report_to in ("tensorboard", "all"):
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(os.path.join(run_dir, "logs"))
        self._previous = None
        self._mark = (time.time(), None)
        self._first_epoch = True

    def on_epoch_begin(self, step):
        """Keras resets the metrics at each epoch: their totals start again from zero.
        The first epoch of a session includes compiling: no throughput until its end."""
        self._previous = None
        self._mark = (time.time(), None if self._first_epoch else step)
        self._first_epoch = False

    def due(self, step):
        """Whether step ``step`` logs scalars or writes a validation grid."""
        return step % self.log_every == 0 or bool(
            self.validation_every and step % self.validation_every == 0)

    def _metric_totals(self, model):
        return {m.name: (float(ops.convert_to_numpy(m.total)),
                         float(ops.convert_to_numpy(m.count))) for m in model.metrics}

    def after_update(self, step, model=None):
        """Logs and validates at ``step`` where due; ``model``: the synced model."""
        model = model or self.model
        log_now = step % self.log_every == 0
        validate = bool(self.validation_every) and step % self.validation_every == 0
        if not (log_now or validate):
            return
        now = time.time()
        start_time, start_step = self._mark
        totals = self._metric_totals(model)
        if log_now:
            scalars = {}
            for name, (total, count) in totals.items():
                old_total, old_count = (self._previous or {}).get(name, (0.0, 0.0))
                if count > old_count:
                    scalars[name] = (total - old_total) / (count - old_count)
            scalars["learning_rate"] = float(ops.convert_to_numpy(model.optimizer.learning_rate))
            if start_step is not None and now > start_time:
                scalars["images_per_second"] = (
                    (step - start_step) * self.images_per_step / (now - start_time)
                )
            self._write_scalars(step, scalars)
            self._previous = totals
        if validate:
            self._validate(step, model)
        self._mark = (time.time(), step)

    def _write_scalars(self, step, scalars):
        if self._writer is not None:
            import tensorflow as tf

            with self._writer.as_default(step=step):
                for name, value in scalars.items():
                    tf.summary.scalar(name, value)
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def _validate(self, step, model):
        path = validation_path(self.run_dir, step) if self.writes else None
        images = write_samples(model, path, self.config, seed=self.config.get(
            "validation_seed", 0), num_samples=_validation_count(self.validation, self.config),
            **self.validation)
        grid = image_grid(images)
        if self._writer is not None:
            import tensorflow as tf

            with self._writer.as_default(step=step):
                tf.summary.image("validation", grid[None])
            self._writer.flush()
        if self._wandb is not None:
            import wandb

            self._wandb.log({"validation": wandb.Image(grid)}, step=step)

    def close(self):
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()


def _validation_count(condition, config):
    for key in ("labels", "context"):
        if key in condition:
            return len(condition[key])
    return min(config["num_samples"], 16)


def _start_wandb(run_dir, config):
    """A W&B run for ``run_dir``: the same one again when the run resumes."""
    try:
        import wandb
    except ImportError:
        raise ValueError(
            "report_to=wandb needs the wandb package: pip install 'keras-minsnr[wandb]' "
            "(or report_to=tensorboard)."
        ) from None
    logs = os.path.join(run_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    id_path = os.path.join(logs, WANDB_ID_FILE)
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        checkpointing.atomic_write_text(id_path, run_id)
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "keras-minsnr"),
        name=os.path.basename(os.path.abspath(run_dir)),
        id=run_id,
        resume="allow",
        dir=logs,
        config=config,
    )
