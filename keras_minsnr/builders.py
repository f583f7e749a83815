"""What a training run builds from its config: the model, and where it lives.

Generic over backbones: a backbone class says itself which constructor arguments it takes
from the data (`data_arguments`, see `keras_minsnr.backbones.contract`), so nothing here
names a backbone, a preset family or a Stable Diffusion version.
"""

import contextlib
import os

import keras
import numpy as np

from keras_minsnr import backbones
from keras_minsnr import backend
from keras_minsnr import distribution
from keras_minsnr import weighting as weighting_lib
from keras_minsnr.backbones.contract import check_gradient_checkpointing
from keras_minsnr.backbones.contract import data_arguments
from keras_minsnr.diffusion_model import DiffusionModel
from keras_minsnr.flow import FlowMatchingSchedule
from keras_minsnr.optimizers import grad_accum
from keras_minsnr.optimizers import make_optimizer
from keras_minsnr.schedules import NoiseSchedule


@contextlib.contextmanager
def dtype_policy_scope(policy):
    """Layers made inside take ``policy`` (e.g. ``"mixed_bfloat16"``; ``None``: keep the
    current one); the global policy is restored on exit."""
    if not policy:
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_schedule(config):
    """The run's noise schedule: `FlowMatchingSchedule` for ``schedule=flow``."""
    if config["schedule"] == "flow":
        return FlowMatchingSchedule(config["num_timesteps"], config.get("flow_shift", 1.0))
    return NoiseSchedule(config["schedule"], config["num_timesteps"], config["zero_terminal_snr"])


def build_backbone(config, info):
    """The config's backbone preset, shaped by the data (the class's `data_arguments`);
    ``backbone_args`` override."""
    preset = backbones.PRESETS.get(config["backbone"])
    if preset is None:
        backbones.get(config["backbone"])  # raises with the list of presets
    args = dict(config["backbone_args"])
    for key, value in data_arguments(preset["class"], info, config).items():
        args.setdefault(key, value)
    return backbones.get(config["backbone"], **args)


def check_backbone_options(config):
    """Refuses options the config's backbone class cannot honour (before a run writes)."""
    preset = backbones.PRESETS.get(config["backbone"])
    if preset is not None:
        check_gradient_checkpointing(preset["class"], config.get("gradient_checkpointing"))


def _check_backbone_schedule(backbone, schedule, config):
    """A backbone that embeds flow times itself must get the run's schedule exactly."""
    if not hasattr(backbone, "flow_schedule"):
        return
    expected = backbone.flow_schedule()
    if config["schedule"] != "flow" or (
        expected.num_timesteps, expected.shift) != (schedule.num_timesteps, schedule.shift):
        raise ValueError(
            f"The backbone {config['backbone']} embeds the times of {expected!r}, but "
            f"the run's schedule is {schedule!r}: set schedule=flow, num_timesteps="
            f"{expected.num_timesteps} and flow_shift={expected.shift}."
        )


def build_dataset(config):
    """``(dataset, info)``: the run's repeated, shuffled training batches (prepared first,
    e.g. a latent cache encoded) and what the model needs to know about them."""
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


def build_model(config, info):
    """The backbone (shaped by the data) wrapped in a `DiffusionModel`, compiled.

    Layers are made under ``config["mixed_precision"]`` (`dtype_policy_scope`); the
    global dtype policy is left as it was.
    """
    with dtype_policy_scope(config["mixed_precision"]):
        backbone = build_backbone(config, info)
        schedule = build_schedule(config)
        _check_backbone_schedule(backbone, schedule, config)
        conditional = getattr(backbone, "conditioning", None) is not None
        weighting = weighting_lib.get(config["weighting"], gamma=config["gamma"],
                                      terminal_weight=config.get("terminal_weight", 1.0))
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
        model.compile(optimizer=make_optimizer(config))
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


def distribution_scope(config):
    """The context a run builds and trains its model in, for ``config["distribution"]``.

    Returns a function that makes the context (enter one to build, another to train).
    JAX: the scope of the `keras.distribution` that `kms.distribution.configure` makes.
    TensorFlow: ``data_parallel`` is a `tf.distribute.MirroredStrategy`
    (``MultiWorkerMirroredStrategy`` with ``multihost``); ``model_parallel`` and
    ``fsdp`` are refused.
    The global batch ``batch_size`` must divide evenly over the data-parallel devices.
    """
    kind = config.get("distribution", "none")
    if kind == "none":
        return contextlib.nullcontext
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
        strategy = (backend.multi_worker_strategy() if config.get("multihost")
                    else tf.distribute.MirroredStrategy())
        data_devices = strategy.num_replicas_in_sync
        scope = strategy.scope
    if config["batch_size"] % data_devices:
        raise ValueError(
            f"batch_size={config['batch_size']} must be a multiple of the {data_devices} "
            "data-parallel devices (it is the global batch, split over them)."
        )
    return scope
