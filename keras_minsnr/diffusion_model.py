"""`DiffusionModel`: a `keras.Model` that trains any denoiser backbone with Min-SNR-γ."""

import math
import re

import keras
import numpy as np
from keras import ops

from keras_minsnr import backend as kms_backend
from keras_minsnr import batches
from keras_minsnr import lora as lora_lib
from keras_minsnr import optimizers  # noqa: F401  (registers AdamW for .keras files)
from keras_minsnr import sampling
from keras_minsnr import samplers
from keras_minsnr import timestep_sampling as timestep_sampling_lib
from keras_minsnr import weighting as weighting_lib
from keras_minsnr.backbones.contract import BackboneContract
from keras_minsnr.ema import ExponentialMovingAverage
from keras_minsnr.flow import FlowMatchingSchedule
from keras_minsnr.flow import check_flow_prediction_type
from keras_minsnr.schedules import NoiseSchedule
from keras_minsnr.schedules import check_prediction_type

NUM_SNR_BINS = 4
EVAL_TIMESTEP_FRACTIONS = (0.125, 0.375, 0.625, 0.875)


@keras.saving.register_keras_serializable(package="keras_minsnr")
class DiffusionModel(keras.Model):
    """A diffusion model trained with a loss weighting such as Min-SNR-γ.

    Each training step draws a step ``t ~ p`` (the timestep density, uniform on
    ``{0, …, T-1}`` by default) and ``ε ~ N(0, I)`` per image, forms
    ``x_t = α_t x_0 + σ_t ε``, asks the backbone for the configured target and minimises
    ``mean_b( w(SNR(t_b)) · mean_pixels((pred − target)²) )``: density × weight × target
    error. With a `FlowMatchingSchedule`, ``x_t = (1 − t)·x₀ + t·ε`` and the ``"flow"``
    target is the velocity ``ε − x₀`` (docs/flow_matching.md). The TensorFlow and JAX steps
    share this one loss function (`compute_training_loss`).

    The backbone follows the contract in `keras_minsnr.backbones`: it is called with
    ``{"x": x_t, "t": t, "y": condition}`` and returns a tensor shaped like ``x_t``. The
    image shape and the kind of condition are read from its inputs (a plain functional
    model works as it is); attributes ``image_shape``, ``conditioning``, ``num_classes``
    and ``context_shape`` on the backbone override them (see `BackboneContract`).

    A batch may be an image tensor, ``(images, labels)``, or a dict with ``"images"`` and
    optionally ``"labels"`` (class ids) or ``"context"`` (text embeddings). The dict may
    also carry ``"timesteps"`` (int, ``(B,)``) and ``"noise"`` (like images) to make a step
    deterministic, which the tests use.

    Logged metrics: ``loss`` (the weighted loss) and ``mse_q1`` … ``mse_q4``, the
    unweighted MSE over the quarters of the timestep range (``q1``: the least noisy
    quarter, highest SNR; ``q4``: the noisiest).

    Args:
        backbone: the denoiser, a `keras.Model` (see `keras_minsnr.backbones`).
        schedule: a `NoiseSchedule`, a `FlowMatchingSchedule` (rectified flow), or a
            schedule name (``"flow"`` for ``FlowMatchingSchedule()``); defaults to cosine
            with T=1000.
        prediction_type: ``"epsilon"``, ``"sample"`` (x₀) or ``"v_prediction"``; with a
            flow schedule also ``"flow"`` (the velocity ``ε − x₀``, SD3's target).
        weighting: a strategy name from `keras_minsnr.STRATEGIES` or a `LossWeighting`.
        gamma: γ of Min-SNR-γ (and of ``max_snr`` / ``soft_min_snr``) when `weighting` is
            a name. The paper's default is 5.
        timestep_sampling: the training density over steps: a kind name (``"uniform"``,
            ``"logit_normal"``, ``"mode"``, ``"laplace"``), a config dict such as
            ``{"kind": "laplace", "laplace_b": 0.5}`` or a `TimestepSampling`. ``"uniform"``
            draws exactly as before (`keras.random.randint`).
        noise_offset: ``c`` of the offset noise: each training step's ``ε`` becomes
            ``ε + c·δ`` with ``δ ~ N(0, 1)`` drawn once per image and channel (shared by
            its pixels), so the model learns to change an image's mean brightness; the
            target uses the offset noise too. 0 (default) is off. diffusers uses 0.1.
        input_perturbation: ``λ`` of input perturbation: the model's input is made with
            ``ε + λ·ξ`` (``ξ ~ N(0, I)``) while the target keeps ``ε``, which reduces the
            exposure bias between training and sampling. 0 (default) is off; the paper
            uses 0.1.
        label_dropout: probability of replacing a label (or text context) by the null
            condition during training, for classifier-free guidance (paper: 0.15).
        ema_decay: decay of the exponential moving average of the backbone's trainable
            weights (paper: 0.9999); ``None`` or 0 disables the EMA. Kept per weight by
            `ExponentialMovingAverage`, each copy named ``ema/<weight path>``.
        ema_warmup: use ``min(ema_decay, (1 + n) / (10 + n))`` at update ``n`` so the EMA
            is useful early in training.
        seed: seed of the model's random draws (timesteps, noise, label dropout).
        null_context: for a text-conditional backbone, the context that stands for "no
            caption" in label dropout and classifier-free guidance: the text encoder's
            embedding of the empty caption, ``(L, D)``. Kept as a non-trainable weight,
            so it is saved with the model; zeros until given (or `set_null_context`).
        num_classes: the number of classes of a class-conditional backbone that does not
            say it (a plain functional model with an integer ``"y"`` input); the null
            class of classifier-free guidance is ``num_classes``, so the backbone's label
            embedding needs ``num_classes + 1`` rows.
        clip_denoised: whether `generate` clips x̂₀ to [-1, 1] at each step by default.
            Keep True for pixel-space data in [-1, 1] (as the paper's code and
            diffusers' DDPM scheduler do: an ε model's x̂₀ = (x_t − σ ε̂)/α multiplies
            errors by 1/α ≈ 2·10⁴ at the first step of the cosine schedule); set False
            for latent models, whose data is not bounded.
        ema_weight_indices: which backbone weights (positions in ``backbone.weights``)
            have an EMA copy; recorded by `get_config` so a model saved after freezing or
            unfreezing layers loads back. Default: the trainable ones.
        lora: LoRA adapters to add to the backbone before the EMA is made, as recorded
            by `get_config` (``{"rank", "alpha", "targets", "layers"}``); use
            `enable_lora` to add them to an existing model.

    Example:
    ```python
    import keras, keras_minsnr as kms
    backbone = kms.backbones.get("dit_s_2", image_shape=(8, 8, 1), num_classes=10,
                                 depth=2, hidden_size=64, num_heads=2)
    model = kms.DiffusionModel(backbone, kms.NoiseSchedule("cosine"),
                               prediction_type="epsilon", weighting="min_snr", gamma=5.0)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4))
    model.fit(dataset, epochs=1)
    images = model.generate(16, num_steps=50, sampler="ddim", seed=0)

    # Rectified flow (SD3-style) with Min-SNR-5 in velocity space and logit-normal steps:
    flow_model = kms.DiffusionModel(backbone, kms.FlowMatchingSchedule(shift=1.0),
                                    prediction_type="flow", weighting="min_snr",
                                    timestep_sampling="logit_normal")
    images = flow_model.generate(16, num_steps=28, sampler="heun", seed=0)
    ```

    Reference:
        Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy",
        ICCV 2023 (arXiv 2303.09556); Esser et al. 2024 (SD3: rectified flow,
        logit-normal timesteps); Hang et al. 2024 (Laplace timesteps); Guttenberg,
        "Diffusion with Offset Noise" (2023); Ning et al., "Input Perturbation Reduces
        Exposure Bias in Diffusion Models", ICML 2023 (arXiv 2301.11706).
    """

    def __init__(
        self,
        backbone,
        schedule=None,
        prediction_type="epsilon",
        weighting="min_snr",
        gamma=5.0,
        timestep_sampling="uniform",
        noise_offset=0.0,
        input_perturbation=0.0,
        label_dropout=0.0,
        ema_decay=0.9999,
        ema_warmup=True,
        seed=None,
        null_context=None,
        num_classes=None,
        clip_denoised=True,
        ema_weight_indices=None,
        lora=None,
        **kwargs,
    ):
        kms_backend.check_backend()
        super().__init__(**kwargs)
        if isinstance(schedule, str):
            schedule = FlowMatchingSchedule() if schedule == "flow" else NoiseSchedule(schedule)
        self.schedule = schedule if schedule is not None else NoiseSchedule("cosine")
        if self.is_flow:
            self.prediction_type = check_flow_prediction_type(prediction_type)
        elif prediction_type == "flow":
            raise ValueError(
                "prediction_type 'flow' (the rectified-flow velocity) needs a "
                f"FlowMatchingSchedule; got {self.schedule!r}. Pass "
                "schedule=kms.FlowMatchingSchedule(...) or another prediction_type."
            )
        else:
            self.prediction_type = check_prediction_type(prediction_type)
        # A private copy: `build` fixes the table for this model's schedule.
        sampling_config = timestep_sampling_lib.get(timestep_sampling).get_config()
        self.timestep_sampling = timestep_sampling_lib.TimestepSampling(**sampling_config)
        self.timestep_sampling.build(self.schedule)
        if isinstance(weighting, str):
            weighting = weighting_lib.get(weighting, gamma=gamma)
        self.weighting = weighting_lib.get(weighting)
        for name, value in (("noise_offset", noise_offset),
                            ("input_perturbation", input_perturbation)):
            if not (isinstance(value, (int, float)) and 0.0 <= value < math.inf):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
        self.noise_offset = float(noise_offset)
        self.input_perturbation = float(input_perturbation)
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1), got {label_dropout!r}.")
        self.label_dropout = float(label_dropout)
        ema_decay = float(ema_decay or 0.0)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay!r}.")
        self.ema_decay = ema_decay
        self.ema_warmup = bool(ema_warmup)
        self.seed = seed
        self.clip_denoised = bool(clip_denoised)

        self.backbone = backbone
        self.contract = BackboneContract.from_backbone(backbone, num_classes=num_classes)
        self.image_shape = self.contract.image_shape
        self.conditioning = self.contract.conditioning
        self.num_classes = self.contract.num_classes
        self.context_shape = self.contract.context_shape
        if self.label_dropout and self.conditioning is None:
            raise ValueError(
                f"label_dropout={label_dropout} needs a conditional backbone; this "
                "backbone takes no condition."
            )
        self.null_context = None
        if self.conditioning == "context":
            self.null_context = self.add_weight(
                shape=self.context_shape, initializer="zeros", trainable=False,
                name="null_context",
            )
            if null_context is not None:
                self.set_null_context(null_context)
        elif null_context is not None:
            raise ValueError(
                "null_context is only for a text-conditional backbone (conditioning "
                f"'context'); this backbone's conditioning is {self.conditioning!r}."
            )
        self.seed_generator = keras.random.SeedGenerator(seed)
        if not backbone.built:
            backbone(self.contract.dummy_inputs(1))
        self.lora = None
        adapted = lora_lib.lora_layers(backbone)
        if not lora and adapted:  # a backbone that came with adapters
            first = next(iter(adapted.values()))
            lora = {"rank": int(first.lora_rank), "alpha": float(first.lora_alpha),
                    "layers": list(adapted)}
        if lora:
            self._apply_lora(lora["rank"], lora.get("alpha"), lora.get("targets"),
                             lora.get("layers"))
        self.ema = None
        if self.ema_decay > 0:
            self.ema = ExponentialMovingAverage(self.ema_decay, self.ema_warmup)
            self.ema.track(backbone, ema_weight_indices)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.mse_trackers = [
            keras.metrics.Mean(name=f"mse_q{i + 1}") for i in range(NUM_SNR_BINS)
        ]
        self._step_functions = None
        self._flow_step_functions = None
        self.built = True

    @property
    def is_flow(self):
        """Whether the model is a rectified flow (`FlowMatchingSchedule`)."""
        return isinstance(self.schedule, FlowMatchingSchedule)

    # -- conditions and batches ---------------------------------------------------------

    def null_condition(self, batch_size):
        """The condition classifier-free guidance treats as "no condition"."""
        if self.conditioning == "class":
            return ops.full((batch_size,), self.num_classes, dtype="int32")
        if self.conditioning == "context":
            return ops.broadcast_to(
                ops.cast(self.null_context, "float32"), (batch_size,) + self.context_shape
            )
        return None

    def set_null_context(self, null_context):
        """Sets the "no caption" context, e.g. ``encoders.encode_text([""])[0]``."""
        if self.conditioning != "context":
            raise ValueError("set_null_context needs a text-conditional backbone.")
        value = np.asarray(null_context, dtype="float32")
        if value.ndim == len(self.context_shape) + 1 and value.shape[0] == 1:
            value = value[0]
        if tuple(value.shape) != self.context_shape:
            raise ValueError(
                f"null_context must have shape {self.context_shape} (or (1, "
                f"{', '.join(map(str, self.context_shape))})), got {value.shape}."
            )
        if not np.all(np.isfinite(value)):
            raise ValueError("null_context holds NaN or Inf values.")
        self.null_context.assign(value)

    def unpack_batch(self, data):
        """Splits a batch into ``(images, condition, timesteps, noise)`` (checked)."""
        return batches.unpack_batch(data, self.contract)

    def check_labels(self, labels):
        """Raises if any numpy label lies outside ``[0, num_classes)``."""
        batches.check_labels(labels, self.contract)

    # -- the loss -----------------------------------------------------------------------

    def call(self, inputs, training=False):
        """Runs the backbone on a ``{"x", "t", "y"}`` dict."""
        return self.backbone(inputs, training=training)

    def diffusion_loss_terms(self, images, condition, timesteps, noise, training=False,
                             input_noise=None):
        """Weighted loss for given timesteps and noise, and the per-sample MSE.

        This is the deterministic core shared by training, evaluation and the tests; the
        timestep density enters through which ``timesteps`` are given, so the expected
        loss is density × weight × target error. ``input_noise`` (default ``noise``)
        makes the model's input, ``noise`` the target (input perturbation). Returns
        ``(loss, per_sample_mse)``, both float32.
        """
        x0 = ops.cast(images, "float32")
        noise = ops.cast(noise, "float32")
        input_noise = noise if input_noise is None else ops.cast(input_noise, "float32")
        timesteps = ops.cast(timesteps, "int32")
        x_t = self.schedule.add_noise(x0, input_noise, timesteps)
        target = self.schedule.target(x0, noise, timesteps, self.prediction_type)
        inputs = {"x": x_t, "t": timesteps}
        if condition is not None:
            inputs["y"] = condition
        prediction = ops.cast(self.backbone(inputs, training=training), "float32")
        reduce_axes = tuple(range(1, len(x0.shape)))
        per_sample_mse = ops.mean(ops.square(prediction - target), axis=reduce_axes)
        weight = self.weighting(self.schedule.snr(timesteps), self.prediction_type)
        loss = ops.mean(weight * per_sample_mse)
        return loss, per_sample_mse

    def compute_training_loss(self, data, training=True):
        """One training step's loss with random timesteps, noise and label dropout."""
        images, condition, timesteps, noise = self.unpack_batch(data)
        batch_size = ops.shape(images)[0]
        if timesteps is None:
            timesteps = self._draw_per_example(
                lambda shape: self.timestep_sampling.sample(shape[0], self.seed_generator),
                (batch_size,),
            )
        if noise is None:
            noise = self._draw_per_example(
                lambda shape: keras.random.normal(shape, seed=self.seed_generator),
                ops.shape(images),
            )
            noise = ops.cast(noise, "float32")
            if self.noise_offset > 0:
                channels = ops.shape(images)[-1]
                offset_shape = (batch_size,) + (1,) * (len(images.shape) - 2) + (channels,)
                offset = self._draw_per_example(
                    lambda shape: keras.random.normal(shape, seed=self.seed_generator),
                    offset_shape,
                )
                noise = noise + self.noise_offset * offset
        input_noise = None
        if training and self.input_perturbation > 0:
            perturbation = self._draw_per_example(
                lambda shape: keras.random.normal(shape, seed=self.seed_generator),
                ops.shape(images),
            )
            input_noise = ops.cast(noise, "float32") + self.input_perturbation * perturbation
        if training and self.label_dropout > 0:
            drop = self._draw_per_example(
                lambda shape: keras.random.uniform(shape, seed=self.seed_generator),
                (batch_size,),
            )
            drop = drop < self.label_dropout
            null = self.null_condition(batch_size)
            mask = ops.reshape(drop, (-1,) + (1,) * (len(condition.shape) - 1))
            condition = ops.where(mask, null, condition)
        loss, mse = self.diffusion_loss_terms(images, condition, timesteps, noise, training,
                                              input_noise)
        return loss, (mse, timesteps)

    def _draw_per_example(self, draw, shape):
        """``draw(shape)`` for this step's examples.

        Under `tf.distribute` every replica holds the same random state: each draws for
        the whole global batch and keeps its own slice, so replicas never share noise and
        the step equals one device's with the same seed.
        """
        index, count = kms_backend.replica_position()
        if count == 1:
            return draw(shape)
        rest = tuple(shape[1:])
        everything = draw((shape[0] * count,) + rest)
        return ops.take(ops.reshape(everything, (count, -1) + rest), index, axis=0)

    def compute_evaluation_loss(self, data):
        """The loss on a fixed grid of timesteps with fixed noise: deterministic."""
        images, condition, _, _ = self.unpack_batch(data)
        batch_size = ops.shape(images)[0]
        T = self.schedule.num_timesteps
        losses, mses, steps = [], [], []
        for i, fraction in enumerate(EVAL_TIMESTEP_FRACTIONS):
            t = ops.full((batch_size,), int(fraction * T), dtype="int32")
            noise = keras.random.normal(ops.shape(images), seed=1234 + i)
            loss, mse = self.diffusion_loss_terms(images, condition, t, noise, False)
            losses.append(loss)
            mses.append(mse)
            steps.append(t)
        loss = ops.mean(ops.stack(losses))
        return loss, (ops.concatenate(mses, axis=0), ops.concatenate(steps, axis=0))

    def update_metrics(self, loss, aux):
        mse, timesteps = aux
        self.loss_tracker.update_state(loss)
        quarter = (timesteps * NUM_SNR_BINS) // self.schedule.num_timesteps
        for i, tracker in enumerate(self.mse_trackers):
            tracker.update_state(mse, sample_weight=ops.cast(ops.equal(quarter, i), "float32"))
        return {m.name: m.result() for m in self.metrics}

    @property
    def metrics(self):
        return [self.loss_tracker, *self.mse_trackers]

    def train_step(self, *args):
        if keras.backend.backend() == "jax":
            return kms_backend.train_step_jax(self, *args)
        return kms_backend.train_step_tensorflow(self, *args)

    def test_step(self, *args):
        if keras.backend.backend() == "jax":
            return kms_backend.test_step_jax(self, *args)
        return kms_backend.test_step_tensorflow(self, *args)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # TensorFlow's trainer only: under a strategy it builds from its first batch,
        # which it reduces over the replicas in one call that fails on a dict batch
        # under MultiWorkerMirroredStrategy (keras-team/keras#20329).
        if iterator is not None and getattr(self, "_distribute_strategy", None) is not None:
            data_batch, iterator = kms_backend.first_local_batch(iterator), None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    @property
    def ema_weights(self):
        """The EMA variables (see `ExponentialMovingAverage`); empty without an EMA."""
        return list(self.ema.averages) if self.ema is not None else []

    def load_own_variables(self, store):
        own = self._trainable_variables + self._non_trainable_variables
        if self.ema is not None and len(store.keys()) == len(own) + len(self.ema.averages):
            # A file from before the EMA was its own sub-layer (e4ee228) kept the copies as
            # this model's weights, after its own, in the same order.
            for i, variable in enumerate(own + self.ema.averages):
                variable.assign(store[f"{i}"])
            self.ema.loaded_by_parent = True
            return
        super().load_own_variables(store)

    def reset_ema(self):
        """Copies the backbone's current weights into the EMA.

        Call it after loading pretrained weights into the backbone of an existing model.
        """
        if self.ema is not None:
            self.ema.reset()

    def ema_decay_at(self, step):
        """The EMA decay used at update number ``step`` (1-based; a tensor)."""
        if self.ema is None:
            return ops.convert_to_tensor(0.0, "float32")
        return self.ema.decay_at(step)

    # -- LoRA ---------------------------------------------------------------------------

    def enable_lora(self, rank, alpha=None, targets=None):
        """Adds LoRA adapters to the backbone; only they train from now on.

        The scale is ``alpha / rank`` (``alpha=None``: 1); `targets` picks the layers
        (default attention and MLP projections, see `keras_minsnr.lora.target_layers`).
        The EMA then tracks the adapters only (copies of the frozen weights are dropped)
        and a compiled model is compiled again with a fresh copy of its optimizer.

        Returns:
            The paths of the adapted layers.
        """
        paths = self._apply_lora(rank, alpha, targets)
        self._after_trainable_change()
        return paths

    def _apply_lora(self, rank, alpha, targets, layers=None):
        if self.lora is not None:
            raise ValueError(
                f"LoRA is already enabled (rank {self.lora['rank']}); merge_lora() first."
            )
        # A saved model re-enables exactly the layers it had adapted.
        exact = [f"^{re.escape(p)}$" for p in layers] if layers else targets
        paths = lora_lib.enable_lora(self.backbone, rank, alpha, exact, seed=self.seed)
        rank, alpha = lora_lib.check_rank_alpha(rank, alpha)
        self.lora = {
            "rank": rank,
            "alpha": alpha,
            "targets": None if targets is None and layers else list(
                lora_lib.check_targets(targets)),
            "layers": paths,
        }
        return paths

    def _after_trainable_change(self):
        if self.ema is not None:
            self.ema.sync(self.backbone)
        if self.compiled and self.optimizer is not None:
            optimizer = self.optimizer
            self.compile(optimizer=type(optimizer).from_config(optimizer.get_config()))

    def save_lora(self, path):
        """Writes only the adapter weights (see `keras_minsnr.lora.save_lora`); returns
        the file size in bytes."""
        return lora_lib.save_lora(self.backbone, path)

    def load_lora(self, path):
        """Loads an adapter file; a model without LoRA gets the file's adapters first."""
        if self.lora is None:
            paths = lora_lib.load_lora(self.backbone, path)
            layer = lora_lib.lora_layers(self.backbone)[paths[0]]
            self.lora = {"rank": int(layer.lora_rank), "alpha": float(layer.lora_alpha),
                         "targets": None, "layers": paths}
            self._after_trainable_change()
        else:
            paths = lora_lib.load_lora(self.backbone, path)
        if self.ema is not None:
            for weight in lora_lib.lora_variables(self.backbone):
                self.ema.average_of(weight).assign(weight)
        return paths

    def merge_lora(self, use_ema=False):
        """Folds the adapters into the backbone's kernels: a plain model again.

        With ``use_ema=False`` the outputs do not change. Every backbone weight trains
        again and the EMA starts from the merged weights.

        Args:
            use_ema: fold the EMA's averages of the adapters (what `generate` samples
                with) instead of their current values.
        """
        if self.lora is None:
            raise ValueError("The model has no LoRA adapters to merge.")
        if use_ema and self.ema is not None:
            for weight in lora_lib.lora_variables(self.backbone):
                weight.assign(self.ema.average_of(weight))
        paths = lora_lib.merge_lora(self.backbone)
        self.lora = None
        self._after_trainable_change()
        return paths

    # -- training entry points ----------------------------------------------------------

    def compile(self, optimizer="adamw", **kwargs):
        if kwargs.get("loss") is not None:
            raise ValueError(
                "DiffusionModel computes its own weighted loss; do not pass `loss` to "
                "compile()."
            )
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        # Restores the optimizer (and so its state) when a `.keras` file is loaded.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit` that checks the first batch and stops on a non-finite loss.

        A step whose loss is NaN or Inf (on any replica) leaves the weights, optimizer
        state and EMA untouched; training then stops with a `FloatingPointError` naming
        the step. Under gradient accumulation the micro-batches already accumulated
        towards that update are dropped with it. Steps count real updates: with the optimizer's
        ``gradient_accumulation_steps=N``, N batches make one update (and one EMA step).
        Weights unfrozen since the last call get an EMA copy here; recompile after
        changing which layers are trainable, as Keras requires.
        """
        self._check_first_batch(x if y is None else (x, y))
        self._check_backbone_output()
        if self.ema is not None:
            # Weights unfrozen since the last fit() get their EMA copy now.
            self.ema.track(self.backbone)
        if self.optimizer is not None and not self.optimizer.built and self.backbone.built:
            # Keras' TensorFlow trainer would build the slots inside the first traced
            # step, and TensorFlow traces a step that creates variables twice.
            self.optimizer.build(self.trainable_variables)
        guard = _StopOnNonFiniteLoss()
        callbacks = list(kwargs.pop("callbacks", None) or []) + [guard]
        x = batches.with_label_check(x, self.contract)
        try:
            history = super().fit(x, y, *args, callbacks=callbacks, **kwargs)
        except Exception as error:
            clear = batches.label_check_error(error, self.contract)
            if clear is None:
                raise
            raise clear from None
        if guard.bad_step is not None:
            self._drop_partial_update()
            raise FloatingPointError(
                f"The training loss became {guard.bad_value} at step {guard.bad_step} "
                f"(epoch {guard.bad_epoch + 1}, batch {guard.bad_batch + 1}). That step's "
                "update was skipped, so the weights are the last finite ones; lower the "
                "learning rate, clip gradients (clipnorm) or check the data."
            )
        return history

    def _drop_partial_update(self):
        """Forgets the micro-batches accumulated towards the update a non-finite loss
        interrupted, so the next `fit` starts a whole update (no stale gradients)."""
        optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        steps = int(getattr(optimizer, "gradient_accumulation_steps", None) or 1)
        if steps == 1:
            return
        calls = int(ops.convert_to_numpy(optimizer._iterations))
        optimizer._iterations.assign(calls - calls % steps)
        for accumulator in optimizer._accumulated_gradients:
            accumulator.assign(ops.zeros(accumulator.shape, accumulator.dtype))

    def _check_backbone_output(self):
        """Refuses a backbone whose output is not shaped like its ``x`` input (it would
        broadcast against the target, or fail deep inside the step)."""
        if getattr(self, "_output_checked", False):
            return
        inputs = self.contract.dummy_inputs(2)
        try:
            spec = self.backbone.compute_output_spec(inputs)
        except Exception:  # not traceable symbolically: the step shows any mismatch
            return
        shape = tuple(getattr(spec, "shape", ()) or ())
        if shape[1:] != self.contract.image_shape:
            dims = ", ".join(map(str, shape[1:]))
            wanted = ", ".join(map(str, self.contract.image_shape))
            raise ValueError(
                f"The backbone {type(self.backbone).__name__} returns an output of shape "
                f"(batch, {dims}) for an 'x' of shape (batch, {wanted}); it must return "
                "a prediction shaped like 'x'."
            )
        self._output_checked = True

    def _check_first_batch(self, data):
        first = batches.first_batch(data)
        if first is None:
            return
        _, condition, _, _ = self.unpack_batch(first)
        if condition is not None and self.conditioning == "class":
            self.check_labels(ops.convert_to_numpy(condition))

    # -- sampling -----------------------------------------------------------------------

    def denoise(self, params, x_t, t):
        """x̂₀ and ε̂ at ``x_t``; see `keras_minsnr.sampling.denoise`."""
        return sampling.denoise(self, params, x_t, t)

    def sampling_weights(self, use_ema=True):
        """Backbone weight values to sample with: ``(trainable, non_trainable)``."""
        trainable = []
        for weight in self.backbone.trainable_variables:
            average = self.ema.average_of(weight) if use_ema and self.ema else None
            trainable.append((weight if average is None else average).value)
        non_trainable = [v.value for v in self.backbone.non_trainable_variables]
        return trainable, non_trainable

    def generate(
        self,
        num_samples=None,
        num_steps=50,
        sampler=None,
        labels=None,
        guidance_scale=1.0,
        seed=None,
        context=None,
        eta=0.0,
        use_ema=True,
        clip_denoised=None,
        batch_size=None,
        verbose=False,
        shift=None,
        sigma_min=samplers.EDM_SIGMA_MIN,
        sigma_max=samplers.EDM_SIGMA_MAX,
        rho=samplers.EDM_RHO,
    ):
        """Draws samples from the model.

        Args:
            num_samples: how many images; may be omitted when `labels` or `context` is
                given.
            num_steps: sampler steps.
            sampler: ``"ddim"`` (the default), ``"ddpm"`` or ``"edm_heun"`` (the paper's
                sampler); for a flow schedule ``"euler"`` (the default) or ``"heun"``,
                ODE steps on the velocity from ``t = 1`` to ``t = 0``.
            labels: class ids for a class-conditional backbone (random classes from
                `seed` when omitted).
            guidance_scale: classifier-free guidance scale ``s`` in
                ``uncond + s (cond − uncond)``; 1 is the plain conditional model.
            seed: the same seed gives the same images.
            context: text embeddings ``(B, L, D)`` for a context-conditional backbone.
            eta: DDIM stochasticity.
            use_ema: sample with the EMA weights (when the model keeps an EMA).
            clip_denoised: clip x̂₀ to [-1, 1] at each step; None uses the model's
                ``clip_denoised`` (True for pixel-space models). The flow samplers clip
                x̂₀ = x − t·û and use the velocity ``(x − x̂₀)/t`` it implies.
            batch_size: generate in chunks of this size (default: all at once).
            verbose: show a progress bar.
            shift: flow samplers only: SD3's shift of the time grid (``> 1`` takes smaller
                steps near the noise); None uses the schedule's ``shift``.
            sigma_min, sigma_max, rho: EDM-Heun's σ range and ρ-spacing (EDM's 0.002, 80
                and 7), passed to `keras_minsnr.samplers.sample`.

        Returns:
            float32 numpy images of shape ``(num_samples, H, W, C)``.
        """
        if clip_denoised is None:
            clip_denoised = self.clip_denoised
        return sampling.generate(
            self, num_samples, num_steps, sampler, labels, guidance_scale, seed, context,
            eta, use_ema, clip_denoised, batch_size, verbose, shift=shift,
            sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
        )

    # -- serialisation ------------------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "schedule": keras.saving.serialize_keras_object(self.schedule),
                "prediction_type": self.prediction_type,
                "weighting": keras.saving.serialize_keras_object(self.weighting),
                "timestep_sampling": self.timestep_sampling.get_config(),
                "noise_offset": self.noise_offset,
                "input_perturbation": self.input_perturbation,
                "label_dropout": self.label_dropout,
                "ema_decay": self.ema_decay,
                "ema_warmup": self.ema_warmup,
                "seed": self.seed,
                "num_classes": self.num_classes,
                "clip_denoised": self.clip_denoised,
                "ema_weight_indices": self.ema.weight_indices if self.ema else None,
                "lora": self.lora,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("backbone", "schedule", "weighting"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


class _StopOnNonFiniteLoss(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.bad_step = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        self.bad_value = float(loss)
        self.bad_step = int(ops.convert_to_numpy(self.model.optimizer.iterations)) + 1
        self.bad_epoch, self.bad_batch = self._epoch, batch
        self.model.stop_training = True
