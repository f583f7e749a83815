"""Scale-out on JAX with `keras.distribution`: meshes, layout maps and multi-host setup.

`DiffusionModel` needs nothing special to run on many devices: set a Keras
`Distribution` *before* the backbone and the model are built, then call `fit()` as usual.
This module picks the distribution for a backbone:

- ``"data_parallel"``: every variable replicated, the global batch split over all
  devices (`keras.distribution.DataParallel`). Right for every backbone that fits on one
  device (UNet, SD UNet, MLP, DiT up to XL with bf16 on 16 GB+ devices).
- ``"model_parallel"``: a 2-D ``(data, model)`` mesh; each backbone class says which of
  its variables split over the ``model`` axis (its ``layout_rules`` classmethod, see
  `keras_minsnr.backbones.contract`; the transformers split their blocks Megatron-style),
  the rest is replicated and the batch split over ``data``
  (`keras.distribution.ModelParallel`). A backbone that declares no layout rules (the
  UNets, the MLP), or whose rules match none of its weights, is refused: the devices of
  its model axis would repeat the same work.
- ``"fsdp"``: fully sharded data parallelism. The batch splits over ``data`` as in
  ``data_parallel``, and so do the weights, their EMA copies and the optimizer slots:
  each float variable of rank >= 2 is split over ``data`` along its largest dimension
  that the data-axis size divides (`fsdp_axes`); biases, norms, scalars and anything
  not divisible stay replicated. Generic over backbones: the decision reads only the
  variable's shape. With a ``(data, model)`` mesh whose model axis is > 1, the
  backbone's model-axis rules apply first and the data axis takes another dimension.
  Per-device state is then about 1/``data`` of the data-parallel state; XLA gathers
  each weight where a layer needs it (`FullyShardedDataParallel`).

Every piece of training state follows its weight:

- the EMA copy of a weight is named after the weight's path, and every backbone's rule
  is a regex with ``.`` between path parts and ``.*`` around it, so it matches the EMA
  copy too (whether the EMA path is ``ema/<weight path>`` or ``ema_<weight_path>``);
- Keras creates each optimizer slot from its weight with the weight's layout
  (`Optimizer.add_variable_from_reference`); the trailing ``.*`` also matches the slot
  names (``..._kernel_momentum``) should a slot be created without its reference.

Multi-host: call `initialize_multihost()` first on every host; `fit()` on a batched
`tf.data.Dataset` then reads a per-host shard (Keras' `TFDatasetAdapter` calls
`Distribution.distribute_dataset`, which re-batches the *global* batch to
``global / num_processes`` and keeps shard ``process_id``).

This is JAX-only (`keras.distribution` is the JAX path; on TensorFlow use
`tf.distribute` strategies instead).
"""

import re

import keras

from keras_minsnr import backbones
from keras_minsnr import backend
from keras_minsnr.backbones.contract import DATA_AXIS
from keras_minsnr.backbones.contract import MODEL_AXIS
from keras_minsnr.backbones.contract import layout_rules

KINDS = ("data_parallel", "model_parallel", "fsdp")


def _check_jax():
    if keras.backend.backend() != "jax":
        raise RuntimeError(
            "keras_minsnr.distribution uses keras.distribution, which runs on the JAX "
            f"backend only; the current backend is {keras.backend.backend()!r}. Set "
            "KERAS_BACKEND=jax, or use a tf.distribute strategy on TensorFlow."
        )


def _class_and_config(backbone):
    """``(class, constructor arguments)`` of a backbone instance or preset name."""
    if isinstance(backbone, str):
        if backbone not in backbones.PRESETS:
            raise ValueError(
                f"Unknown backbone preset {backbone!r}. Available presets: "
                f"{', '.join(sorted(backbones.PRESETS))}."
            )
        preset = backbones.PRESETS[backbone]
        return preset["class"], dict(preset["config"])
    if not hasattr(type(backbone), "layout_rules"):
        return type(backbone), {}  # no rules: its config is never read
    return type(backbone), backbone.get_config()


def backbone_rules(backbone, model_shards=1):
    """``[(variable-path regex, axes)]`` a backbone (instance or preset name) declares
    for a model axis of ``model_shards`` devices; empty: every variable replicated.

    Raises:
        ValueError: a dimension the rules split does not divide by ``model_shards``.
    """
    backbone_class, config = _class_and_config(backbone)
    return layout_rules(backbone_class, config, model_shards)


def parse_mesh(text):
    """``"2x4"`` -> ``(2, 4)`` (data, model); ``None`` or ``""`` -> ``None``.

    For command lines such as ``--mesh 2x4``.
    """
    if text in (None, ""):
        return None
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(
            f"A mesh is written DATAxMODEL with two positive integers, e.g. '8x1' or "
            f"'2x4'; got {text!r}."
        )
    return int(parts[0]), int(parts[1])


def device_mesh(mesh_shape=None, devices=None):
    """A ``(data, model)`` `keras.distribution.DeviceMesh`.

    Args:
        mesh_shape: ``(data, model)`` sizes whose product is the number of devices;
            ``None`` means ``(num_devices, 1)``.
        devices: the devices to use (default: all, `keras.distribution.list_devices()`).

    Example:
    ```python
    mesh = kms.distribution.device_mesh((2, 4))  # 8 devices: 2 replicas x 4 shards
    ```
    """
    _check_jax()
    devices = list(devices) if devices is not None else keras.distribution.list_devices()
    if mesh_shape is None:
        mesh_shape = (len(devices), 1)
    mesh_shape = tuple(int(s) for s in mesh_shape)
    if len(mesh_shape) != 2 or min(mesh_shape) < 1:
        raise ValueError(
            f"mesh_shape must be two positive sizes (data, model), got {mesh_shape!r}."
        )
    if mesh_shape[0] * mesh_shape[1] != len(devices):
        raise ValueError(
            f"mesh_shape={mesh_shape} needs {mesh_shape[0] * mesh_shape[1]} devices, but "
            f"{len(devices)} are available. Give a mesh whose product is {len(devices)}."
        )
    return keras.distribution.DeviceMesh(
        shape=mesh_shape, axis_names=(DATA_AXIS, MODEL_AXIS), devices=devices
    )


def layout_map(backbone, mesh):
    """The `keras.distribution.LayoutMap` of a backbone on a ``(data, model)`` mesh.

    The backbone's own `backbone_rules` (the transformers split their attention, MLP and
    adaLN kernels over ``model``); a backbone without rules gets an empty map, so all its
    variables are replicated (data parallelism over the ``data`` axis).

    Args:
        backbone: a backbone instance, or a preset name of `kms.backbones.PRESETS` (use
            the name to build the map *before* the backbone, so its variables are
            created where they belong).
        mesh: a `keras.distribution.DeviceMesh` with a ``model`` axis (see
            `device_mesh`).

    Example:
    ```python
    mesh = kms.distribution.device_mesh((2, 4))
    layouts = kms.distribution.layout_map("dit_xl_2", mesh)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="data"))
    ```
    """
    if MODEL_AXIS not in mesh.axis_names:
        raise ValueError(
            f"The mesh needs a {MODEL_AXIS!r} axis; its axes are {tuple(mesh.axis_names)}."
        )
    layouts = keras.distribution.LayoutMap(mesh)
    shards = mesh.shape[list(mesh.axis_names).index(MODEL_AXIS)]
    for pattern, axes in backbone_rules(backbone, shards):
        layouts[pattern] = axes
    return layouts


def fsdp_axes(shape, data_shards, axes=None, dtype="float32"):
    """The axes a variable gets under FSDP: ``axes`` plus the data axis on one dimension.

    The data axis takes the largest dimension not already split (the last one on a tie)
    whose size ``data_shards`` divides, for float variables of rank >= 2 (kernels,
    embeddings); others (biases, norm scales, scalars, integer state, shapes with no
    divisible dimension) keep ``axes``.

    Args:
        shape: the variable's shape.
        data_shards: the size of the mesh's data axis.
        axes: the axes given before (a backbone's model-axis rule); default replicated.
        dtype: the variable's dtype.

    Example:
    ```python
    kms.distribution.fsdp_axes((1152, 3456), 16)                # ("data", None)
    kms.distribution.fsdp_axes((1152, 3456), 4, (None, "model"))  # ("data", "model")
    kms.distribution.fsdp_axes((1152,), 16)                      # (None,)
    ```
    """
    shape = tuple(int(d) for d in shape)
    axes = tuple(axes) if axes is not None else (None,) * len(shape)
    if len(shape) < 2 or data_shards < 2 or not keras.backend.is_float_dtype(dtype):
        return axes
    free = [i for i, (size, axis) in enumerate(zip(shape, axes))
            if axis is None and size % data_shards == 0]
    if not free:
        return axes
    split = max(free, key=lambda i: (shape[i], i))
    return tuple(DATA_AXIS if i == split else axis for i, axis in enumerate(axes))


class FullyShardedDataParallel(keras.distribution.ModelParallel):
    """`keras.distribution.ModelParallel` that also splits the state over the data axis.

    The batch is split over the mesh's ``data`` axis, and every variable gets the
    layout `fsdp_axes` gives it: its layout-map entry (a backbone's model-axis rules,
    if any) with one more dimension split over ``data``. Optimizer slots take their
    weight's layout (`Optimizer.add_variable_from_reference`) and EMA copies have their
    weight's shape, so both are split like the weight. Inside the compiled step XLA
    gathers a weight's shards where it is used and reduce-scatters its gradient, so a
    step computes what a data-parallel step does.

    Args:
        layout_map: a `keras.distribution.LayoutMap` on a mesh with ``data`` and
            ``model`` axes (see `layout_map`; empty for a model axis of 1).

    Example:
    ```python
    mesh = kms.distribution.device_mesh((8, 1))
    keras.distribution.set_distribution(kms.distribution.FullyShardedDataParallel(
        keras.distribution.LayoutMap(mesh)))
    ```

    Reference:
    - [Zhao et al., 2023](https://arxiv.org/abs/2304.11277) (PyTorch FSDP); the same
      split of parameters, gradients and optimizer state as ZeRO-3
      ([Rajbhandari et al., 2020](https://arxiv.org/abs/1910.02054)).
    """

    def __init__(self, layout_map):
        super().__init__(layout_map=layout_map, batch_dim_name=DATA_AXIS)
        mesh = layout_map.device_mesh
        self.data_shards = mesh.shape[list(mesh.axis_names).index(DATA_AXIS)]

    def get_variable_layout(self, variable):
        if getattr(variable, "_layout", None) is not None:  # an optimizer slot's
            return variable._layout
        rule = self._layout_map[variable.path]
        axes = fsdp_axes(variable.shape, self.data_shards,
                         rule.axes if rule is not None else None, variable.dtype)
        return keras.distribution.TensorLayout(axes, self.device_mesh)


def check_splits_something(backbone, kind="model_parallel"):
    """Refuses a model axis for a backbone whose layout rules split no weight.

    Args:
        backbone: a backbone instance (its weight paths are matched against its rules)
            or a preset name (only whether it declares rules is known before it is
            built).
        kind: the distribution kind, for the message.
    """
    name = backbone if isinstance(backbone, str) else type(backbone).__name__
    rules = backbone_rules(backbone)
    if rules and not isinstance(backbone, str):
        paths = [w.path for w in backbone.weights]
        if not any(re.fullmatch(pattern, path) for pattern, _ in rules for path in paths):
            rules = ()
    if not rules:
        raise ValueError(
            f"distribution={kind!r} with a model axis has nothing to split in the backbone {name}: "
            "it declares no layout rules for the model axis (or none matches a weight), "
            "so every device on that axis would repeat the same work. Use "
            "distribution=data_parallel, or fsdp with a model axis of 1."
        )


def configure(kind="data_parallel", mesh_shape=None, backbone_name=None, devices=None,
              set_global=True):
    """Creates (and by default sets) the Keras distribution for a run.

    Call it before the backbone and the `DiffusionModel` are built: variables get their
    layout when they are created.

    Args:
        kind: ``"data_parallel"``, ``"model_parallel"``, ``"fsdp"`` or ``None`` (one
            device; clears a distribution set before).
        mesh_shape: ``(data, model)``; default ``(num_devices, 1)``. A data-parallel mesh
            must have model size 1.
        backbone_name: the preset name of the backbone (needed for a model axis > 1,
            which takes its layout rules from it).
        devices: devices to use (default: all).
        set_global: also call `keras.distribution.set_distribution`.

    Returns:
        the `keras.distribution.Distribution`, or ``None`` for ``kind=None``.

    Example:
    ```python
    kms.distribution.configure("model_parallel", (2, 4), backbone_name="dit_xl_2")
    backbone = kms.backbones.get("dit_xl_2")
    model = kms.DiffusionModel(backbone, kms.NoiseSchedule("cosine"))
    ```
    """
    if kind in (None, "none"):
        if set_global and keras.backend.backend() == "jax":
            keras.distribution.set_distribution(None)
        return None
    if kind not in KINDS:
        raise ValueError(
            f"Unknown distribution kind {kind!r}; choose one of {KINDS} or None."
        )
    _check_jax()
    mesh = device_mesh(mesh_shape, devices)
    if kind == "data_parallel":
        if mesh.shape[1] != 1:
            raise ValueError(
                f"data_parallel uses every device for data; got mesh_shape={mesh_shape} "
                "with a model axis > 1. Use kind='model_parallel' for that mesh."
            )
        distribution = keras.distribution.DataParallel(
            devices=mesh.devices.reshape(-1).tolist()
        )
    elif kind == "fsdp" and mesh.shape[1] == 1:
        distribution = FullyShardedDataParallel(keras.distribution.LayoutMap(mesh))
    else:
        if backbone_name is None:
            raise ValueError(
                f"{kind} with a model axis needs backbone_name (a preset name such as "
                "'dit_xl_2') to pick the layout rules."
            )
        check_splits_something(backbone_name, kind)
        layouts = layout_map(backbone_name, mesh)
        distribution = (
            FullyShardedDataParallel(layouts) if kind == "fsdp"
            else keras.distribution.ModelParallel(layout_map=layouts,
                                                  batch_dim_name=DATA_AXIS))
    if set_global:
        keras.distribution.set_distribution(distribution)
    return distribution


def initialize_multihost(coordinator_address=None, num_processes=None, process_id=None):
    """Joins this process to a multi-host JAX cluster (`jax.distributed.initialize`).

    Call it first thing on every host, before any JAX computation. Arguments left
    ``None`` come from ``KERAS_DISTRIBUTION_JOB_ADDRESSES`` (the coordinator
    ``host:port`` first), ``KERAS_DISTRIBUTION_NUM_PROCESSES`` and
    ``KERAS_DISTRIBUTION_PROCESS_ID`` (JAX also reads the coordinator from
    ``JAX_COORDINATOR_ADDRESS``); when those are unset too, JAX detects the cluster itself
    on Cloud TPU pods, SLURM and Open MPI. Without a seed set, it also agrees on one
    global random seed across hosts.

    Returns:
        ``(process_index, process_count)``.
    """
    _check_jax()
    import jax

    keras.distribution.initialize(
        job_addresses=coordinator_address, num_processes=num_processes,
        process_id=process_id,
    )
    return jax.process_index(), jax.process_count()


def describe(model):
    """``{variable path: layout axes}`` of a model's weights, EMA and optimizer slots.

    Reads the sharding the arrays really have (``variable.value.sharding.spec``), so it
    shows where each piece of state lives after training started.
    """
    out = {}
    for v in backend.state_variables(model):
        sharding = getattr(v.value, "sharding", None)
        spec = getattr(sharding, "spec", None)
        axes = tuple(spec) if spec is not None else ()
        axes = axes + (None,) * (len(v.shape) - len(axes))
        out[v.path] = axes
    return out


def match_rules(backbone, path):
    """The axes a backbone's rules give a variable path (``None``: replicated)."""
    hits = [axes for pattern, axes in backbone_rules(backbone) if re.fullmatch(pattern, path)]
    return hits[0] if hits else None
