"""LoRA adapters for any backbone, on Keras' built-in `layer.enable_lora`.

Low-rank adaptation replaces a layer's kernel ``W`` by ``W + (alpha / rank) · A·B`` with
``W`` frozen and only the small ``A`` (``fan_in × rank``) and ``B`` (``rank × fan_out``)
trained; ``B`` starts at zero, so an adapter starts as the identity change. Keras'
`Dense`, `EinsumDense`, convolution and `Embedding` layers carry the adapter themselves
(``lora_kernel_a`` / ``lora_kernel_b``, scaled by ``lora_alpha / lora_rank``); this module
picks the layers of a backbone, freezes everything else, writes and reads adapter-only
files and folds adapters into the kernels.

Layers are named by their attribute path inside the backbone (``blocks/3/attn/qkv``),
which stays the same across processes, unlike Keras' auto-generated layer names.

Two departures from plain `layer.enable_lora`, both needed for training runs:

- With LoRA on, every backbone weight but the adapters is frozen (norms, biases and the
  layers without an adapter too), as in the LoRA paper.
- Keras writes a LoRA layer to a `.keras` file with the adapter folded into the kernel and
  zeroes both ``A`` and ``B`` on load, after which the adapter can never train again
  (both gradients are zero). The layers this module adapts save ``W``, ``A`` and ``B`` as
  they are, so a checkpoint resumes exactly; use `merge_lora` for a plain model.
"""

import os
import re
import types

import h5py
import keras
import numpy as np
from keras import ops

from keras_minsnr.backbones.contract import lora_target_groups

SUPPORTED_LAYERS = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Embedding,
)
DEFAULT_TARGETS = ("attention", "mlp")
FILE_FORMAT = "keras_minsnr.lora"
FILE_VERSION = 1

# The group names targets may use. Each backbone class says which of its layers a group
# holds (`lora_target_groups`, see `keras_minsnr.backbones.contract`); a group it does
# not fill selects nothing there.
GROUP_NAMES = ("attention", "mlp", "modulation", "conv", "embedding", "all")


class _LoraState:
    """Plain holder on a backbone (Keras does not track it): the weights LoRA froze."""

    def __init__(self):
        self.frozen = []


# -- finding layers ---------------------------------------------------------------------


def _is_diffusion_model(model):
    """Whether ``model`` wraps a backbone and keeps LoRA state of its own (as
    `DiffusionModel` does, whose methods call this module on its backbone)."""
    return isinstance(getattr(model, "backbone", None), keras.layers.Layer) and callable(
        getattr(model, "merge_lora", None)
    )


def _backbone(model):
    """The backbone of a `DiffusionModel`, or ``model`` itself."""
    return model.backbone if _is_diffusion_model(model) else model


def _children(value, prefix):
    """``(path, layer)`` for the layers held in an attribute value (nested containers too)."""
    if isinstance(value, keras.layers.Layer):
        yield prefix, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _children(item, f"{prefix}/{i}")
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _children(value[key], f"{prefix}/{key}")


def named_layers(backbone):
    """``{path: (layer, enclosing layer)}`` for every layer inside ``backbone``.

    A path joins attribute names (and container indices) from the backbone down, e.g.
    ``blocks/0/attn/qkv``; a functional model's layers are named by their layer names.
    A layer reachable twice keeps its first path (attributes visited in sorted order).
    """
    found = {}
    seen = {id(backbone)}

    def visit(layer, prefix):
        items = []
        for attr in sorted(vars(layer)):
            if not attr.startswith("_"):
                items.extend(_children(getattr(layer, attr, None), attr))
        if isinstance(layer, keras.Model):
            # A functional model holds its layers in no public attribute.
            items.extend((child.name, child) for child in layer.layers)
        for name, child in items:
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}{name}"
            found[path] = (child, layer)
            visit(child, path + "/")

    visit(backbone, "")
    return found


def eligible_layers(model):
    """``{path: layer}`` of the layers that can take an adapter (see `SUPPORTED_LAYERS`)."""
    return {
        path: layer
        for path, (layer, _) in named_layers(_backbone(model)).items()
        if isinstance(layer, SUPPORTED_LAYERS)
    }


def _in_group(rules, parent, path):
    for parent_pattern, leaf_pattern in rules:
        if parent_pattern is not None and not re.fullmatch(
            parent_pattern, type(parent).__name__
        ):
            continue
        parts = leaf_pattern.count("/") + 1
        if re.fullmatch(leaf_pattern, "/".join(path.split("/")[-parts:])):
            return True
    return False


def check_targets(targets):
    """``targets`` as a tuple of group names / regexes (default `DEFAULT_TARGETS`), or
    `ValueError` naming the bad entry."""
    if targets is None:
        return tuple(DEFAULT_TARGETS)
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    targets = tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(
            f"LoRA targets must be a non-empty list of group names ({', '.join(GROUP_NAMES)}) "
            f"or regular expressions over layer paths; got {targets!r}."
        )
    for target in targets:
        if target not in GROUP_NAMES:
            try:
                re.compile(target)
            except re.error as error:
                raise ValueError(
                    f"LoRA target {target!r} is neither a group name ({', '.join(GROUP_NAMES)}) "
                    f"nor a valid regular expression: {error}."
                ) from None
    return targets


def target_layers(model, targets=None):
    """``{path: layer}`` of the eligible layers that ``targets`` selects.

    Args:
        model: a backbone or a `DiffusionModel`.
        targets: group names from `GROUP_NAMES` (the backbone class says which of
            its layers each holds: `lora_target_groups`) and/or regular expressions searched in
            the layer paths (e.g. ``"blocks/[0-3]/"``); a comma-separated string works
            too. Default: `DEFAULT_TARGETS` (attention and MLP projections).

    Raises:
        ValueError: no eligible layer matches; the message names the backbone and lists
            its eligible layers.
    """
    targets = check_targets(targets)
    backbone = _backbone(model)
    groups = lora_target_groups(backbone)
    layers = named_layers(backbone)
    chosen = {}
    for path, (layer, parent) in layers.items():
        if not isinstance(layer, SUPPORTED_LAYERS):
            continue
        for target in targets:
            if target in GROUP_NAMES or target in groups:
                hit = _in_group(groups.get(target, ()), parent, path)
            else:
                hit = re.search(target, path) is not None
            if hit:
                chosen[path] = layer
                break
    if not chosen:
        eligible = [f"{p} ({type(l).__name__})" for p, (l, _) in layers.items()
                    if isinstance(l, SUPPORTED_LAYERS)]
        listing = ", ".join(eligible[:40]) + (" ..." if len(eligible) > 40 else "")
        raise ValueError(
            f"LoRA targets {list(targets)} match no layer of backbone {backbone.name!r} "
            f"({type(backbone).__name__}). Eligible layers (Dense, EinsumDense, Conv, "
            f"Embedding): {listing or 'none'}. Pass targets as group names "
            f"({', '.join(GROUP_NAMES)}) or regular expressions over these paths."
        )
    return chosen


def lora_layers(model):
    """``{path: layer}`` of the layers that carry an adapter now."""
    return {
        path: layer
        for path, layer in eligible_layers(model).items()
        if getattr(layer, "lora_enabled", False)
    }


def adapter_names(layer):
    """The attribute names of a layer's ``A`` and ``B`` (Keras names them per layer type)."""
    if isinstance(layer, keras.layers.Embedding):
        return ("lora_embeddings_a", "lora_embeddings_b")
    return ("lora_kernel_a", "lora_kernel_b")


def lora_variables(model):
    """The adapter variables ``[A, B, A, B, ...]`` in path order."""
    variables = []
    for layer in lora_layers(model).values():
        variables += [getattr(layer, name) for name in adapter_names(layer)]
    return variables


# -- enabling ---------------------------------------------------------------------------


def check_rank_alpha(rank, alpha):
    """``(rank, alpha)`` as ``(int, float)`` with ``alpha = rank`` by default, or
    `ValueError` naming the bad value."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}.")
    if alpha is None:
        return int(rank), float(rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not (
        np.isfinite(alpha) and alpha > 0
    ):
        raise ValueError(f"LoRA alpha must be a number > 0 (or None: alpha = rank), got {alpha!r}.")
    return int(rank), float(alpha)


def _base_variable(layer):
    """The frozen variable an adapter adds to (kernel or embedding table)."""
    return layer._embeddings if isinstance(layer, keras.layers.Embedding) else layer._kernel


def _save_raw(layer, store):
    # Keras' base `Layer` implementation: every own variable as it is (W, bias, A, B).
    keras.layers.Layer.save_own_variables(layer, store)


def _load_raw(layer, store):
    keras.layers.Layer.load_own_variables(layer, store)


def _keep_adapter_in_saves(layer):
    # Keras folds the adapter into the kernel on save and zeroes A and B on load; a
    # checkpoint must keep W, A and B apart to resume training (see the module doc).
    if getattr(layer, "quantization_mode", None) is None:
        object.__setattr__(layer, "save_own_variables", types.MethodType(_save_raw, layer))
        object.__setattr__(layer, "load_own_variables", types.MethodType(_load_raw, layer))


def _freeze_all_but_adapters(backbone):
    state = getattr(backbone, "_kms_lora_state", None)
    if state is None:
        state = _LoraState()
        object.__setattr__(backbone, "_kms_lora_state", state)
    adapters = {id(v) for v in lora_variables(backbone)}
    for weight in backbone.weights:
        if weight.trainable and id(weight) not in adapters:
            weight.trainable = False
            state.frozen.append(weight)


def enable_lora(model, rank, alpha=None, targets=None, seed=None):
    """Adds LoRA adapters to the targeted layers and freezes every other weight.

    The forward pass of an adapted layer uses ``W + (alpha / rank) · A·B``; ``A`` starts
    He-uniform, ``B`` at zero, so the model's outputs do not change until it trains. A
    layer that already carries an adapter (e.g. a functional model rebuilt from a config
    that has ``lora_rank``) keeps it.

    Args:
        model: a backbone, or a `DiffusionModel` (then its `enable_lora`, which also
            fixes the EMA and the optimizer).
        rank: the rank ``r`` of ``A·B``.
        alpha: the scale numerator; ``None`` means ``alpha = rank`` (scale 1).
        targets: which layers (see `target_layers`); default attention and MLP.
        seed: seed of ``A``'s initialiser.

    Returns:
        The paths of the adapted layers.

    Example:
    ```python
    backbone = kms.backbones.get("dit_s_2")
    kms.lora.enable_lora(backbone, rank=8, alpha=8)
    ```

    Reference:
        Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
    """
    if _is_diffusion_model(model):
        return model.enable_lora(rank, alpha=alpha, targets=targets)
    rank, alpha = check_rank_alpha(rank, alpha)
    layers = target_layers(model, targets)
    for i, (path, layer) in enumerate(layers.items()):
        if not layer.built:
            raise ValueError(f"Layer {path!r} is not built; build the backbone first.")
        if not layer.lora_enabled:
            a_init = keras.initializers.HeUniform(None if seed is None else seed + i)
            layer.enable_lora(rank, lora_alpha=alpha, a_initializer=a_init)
        _keep_adapter_in_saves(layer)
    _freeze_all_but_adapters(model)
    return list(layers)


# -- adapter files ----------------------------------------------------------------------


def save_lora(model, path):
    """Writes the adapters (only ``A``, ``B``, rank and alpha per layer) to an HDF5 file.

    Returns:
        The size of the file in bytes.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA adapter to save; call enable_lora first.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    backbone = _backbone(model)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = FILE_FORMAT
        f.attrs["version"] = FILE_VERSION
        f.attrs["backbone"] = type(backbone).__name__
        group = f.create_group("layers")
        for layer_path, layer in layers.items():
            entry = group.create_group(layer_path)
            entry.attrs["rank"] = int(layer.lora_rank)
            entry.attrs["alpha"] = float(layer.lora_alpha)
            entry.attrs["class"] = type(layer).__name__
            for name in adapter_names(layer):
                entry[name] = ops.convert_to_numpy(getattr(layer, name))
    return os.path.getsize(path)


def _read_lora_file(path):
    """``{layer path: (rank, alpha, {name: array})}`` from a file written by `save_lora`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"No LoRA file at {path}.")
    entries = {}
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FILE_FORMAT or "layers" not in f:
            raise ValueError(f"{path} is not a LoRA file written by keras_minsnr.save_lora.")

        def collect(name, node):
            if isinstance(node, h5py.Group) and "rank" in node.attrs:
                arrays = {key: np.asarray(node[key]) for key in node}
                entries[name] = (int(node.attrs["rank"]), float(node.attrs["alpha"]), arrays)

        f["layers"].visititems(collect)
    return entries


def load_lora(model, path):
    """Loads adapters written by `save_lora` into ``model``.

    A model without adapters gets them first, on the file's layers with the file's rank
    and alpha (so a base model plus an adapter file gives the fine-tuned model). A model
    with adapters must match the file exactly.

    Raises:
        ValueError: listing the missing, unexpected and mis-shaped layer keys.
    """
    if _is_diffusion_model(model):
        return model.load_lora(path)
    entries = _read_lora_file(path)
    if not lora_layers(model):
        eligible = eligible_layers(model)
        missing = sorted(set(entries) - set(eligible))
        if missing:
            raise ValueError(
                f"{path} has adapters for layers this backbone does not have: {missing}."
            )
        for layer_path in entries:
            rank, alpha, _ = entries[layer_path]
            enable_lora(model, rank, alpha, targets=[f"^{re.escape(layer_path)}$"])
    layers = lora_layers(model)
    missing = sorted(set(layers) - set(entries))
    unexpected = sorted(set(entries) - set(layers))
    mismatched = []
    for layer_path in sorted(set(layers) & set(entries)):
        layer = layers[layer_path]
        rank, alpha, arrays = entries[layer_path]
        for name in adapter_names(layer):
            expected = tuple(getattr(layer, name).shape)
            found = tuple(arrays[name].shape) if name in arrays else "none"
            if found != expected:
                mismatched.append(f"{layer_path}/{name}: file {found}, model {expected}")
        if not np.isclose(alpha / rank, layer.lora_alpha / layer.lora_rank):
            mismatched.append(
                f"{layer_path}: file alpha/rank {alpha:g}/{rank}, model "
                f"{layer.lora_alpha:g}/{layer.lora_rank}"
            )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing from the file: {missing}")
        if unexpected:
            parts.append(f"not adapted in the model: {unexpected}")
        if mismatched:
            parts.append(f"mis-shaped: {mismatched}")
        raise ValueError(f"{path} does not fit this model's adapters; " + "; ".join(parts) + ".")
    for layer_path, layer in layers.items():
        for name in adapter_names(layer):
            getattr(layer, name).assign(entries[layer_path][2][name])
    return list(layers)


# -- merging ----------------------------------------------------------------------------


def merge_lora(model):
    """Folds every adapter into its kernel and removes it: a plain model again.

    ``W ← W + (alpha / rank) · A·B`` in the kernel's dtype; the weights LoRA froze become
    trainable again. The outputs equal those of the model with adapters (up to float
    rounding in ``W + ΔW``).

    Returns:
        The paths of the merged layers.
    """
    if _is_diffusion_model(model):
        return model.merge_lora()
    backbone = _backbone(model)
    layers = lora_layers(backbone)
    for layer in layers.values():
        base = _base_variable(layer)
        a_name, b_name = adapter_names(layer)
        delta = (layer.lora_alpha / layer.lora_rank) * ops.matmul(
            getattr(layer, a_name), getattr(layer, b_name)
        )
        base.assign(ops.cast(ops.add(ops.cast(base, "float32"), delta), base.dtype))
        delattr(layer, a_name)
        delattr(layer, b_name)
        layer.lora_enabled = False
        layer.lora_rank = None
        layer.lora_alpha = None
        base.trainable = True
        # Back to the class's own saving (the plain kernel).
        for name in ("save_own_variables", "load_own_variables"):
            if name in vars(layer):
                object.__delattr__(layer, name)
    state = getattr(backbone, "_kms_lora_state", None)
    if state is not None:
        for weight in state.frozen:
            weight.trainable = True
        state.frozen = []
    return list(layers)
