"""What the rest of the library may ask of a backbone.

Two parts, both optional for a plain functional model:

- `BackboneContract`: what `DiffusionModel` reads from a built backbone (image shape,
  conditioning kind, classes, context shape), from attributes or from its inputs.
- Class-level hooks through which a backbone class owns everything specific to it, so
  that `lora`, `distribution` and `builders` name no backbone. Each is a classmethod the
  backbone may define; the functions here give the generic default when it does not:

  ``data_arguments(info, config)``
      constructor arguments a run takes from its data (`data.DatasetInfo`: image
      shape, classes) and its config (e.g. the flow timesteps a backbone embeds).
      Default: none.
  ``lora_target_groups()``
      ``{group: [(enclosing-class regex or None, path regex), ...]}``: which layers
      each LoRA target group names (see `keras_minsnr.lora`). Default:
      `GENERIC_LORA_GROUPS`.
  ``layout_rules(config, model_shards)``
      ``[(variable-path regex, axes), ...]`` for `keras.distribution.LayoutMap` on a
      ``(data, model)`` mesh, given the constructor arguments; raises `ValueError` when a
      split dimension does not divide by ``model_shards``. Default: none (replicated).

One instance attribute is part of the contract too:

  ``gradient_checkpointing``
      a bool (class default and instance attribute) read when the backbone is traced:
      recompute its blocks in the backward pass (`keras_minsnr.backbones.remat`; the
      backbone picks the block boundaries). A backbone without it cannot checkpoint
      (`check_gradient_checkpointing`).
"""

import keras
from keras import ops

CONDITIONINGS = (None, "class", "context")
# The axes of the `keras.distribution` mesh that `layout_rules` may shard over.
DATA_AXIS = "data"
MODEL_AXIS = "model"

# Groups any backbone has: Keras' attention layers, and every eligible layer.
GENERIC_LORA_GROUPS = {
    "attention": [(r".*Attention.*", r".*")],
    "all": [(None, r".*")],
}


def data_arguments(backbone_class, info, config):
    """The constructor arguments ``backbone_class`` takes from the data and the run."""
    hook = getattr(backbone_class, "data_arguments", None)
    return dict(hook(info, config)) if hook is not None else {}


def image_and_class_arguments(info):
    """``{"image_shape", "num_classes"}`` of a dataset: the `data_arguments` of a
    class-conditional pixel or latent backbone."""
    return {"image_shape": tuple(info.image_shape), "num_classes": info.num_classes}


def lora_target_groups(backbone):
    """The LoRA groups of a backbone (instance or class): generic ones plus its own."""
    backbone_class = backbone if isinstance(backbone, type) else type(backbone)
    hook = getattr(backbone_class, "lora_target_groups", None)
    groups = {name: list(rules) for name, rules in GENERIC_LORA_GROUPS.items()}
    for name, rules in (hook() if hook is not None else {}).items():
        groups.setdefault(name, [])
        groups[name] = [rule for rule in rules if rule not in groups[name]] + groups[name]
    return groups


def layout_rules(backbone_class, config, model_shards):
    """``[(path regex, axes)]`` that shard ``backbone_class`` over ``model_shards``."""
    hook = getattr(backbone_class, "layout_rules", None)
    return list(hook(config, model_shards)) if hook is not None else []


def check_gradient_checkpointing(backbone, enabled):
    """`ValueError` when ``enabled`` and the backbone (instance or class) has no
    ``gradient_checkpointing`` attribute: it does not say where its blocks are."""
    if enabled and not hasattr(backbone, "gradient_checkpointing"):
        name = backbone.__name__ if isinstance(backbone, type) else type(backbone).__name__
        raise ValueError(
            f"gradient_checkpointing=True: the backbone {name} has no "
            "gradient_checkpointing attribute, so it cannot recompute its blocks. Pick a "
            "backbone that has one (docs/backbones.md) or set gradient_checkpointing=false."
        )


def set_gradient_checkpointing(backbone, enabled):
    """Turns the backbone's gradient checkpointing on or off (before it is traced)."""
    check_gradient_checkpointing(backbone, enabled)
    if hasattr(backbone, "gradient_checkpointing"):
        backbone.gradient_checkpointing = bool(enabled)


def check_divisible(widths, model_shards):
    """`ValueError` unless every ``{name: width}`` divides by ``model_shards``."""
    for name, width in widths.items():
        if width % model_shards:
            raise ValueError(
                f"Cannot split the backbone over a model axis of size {model_shards}: its "
                f"{name} {width} is not divisible by {model_shards}. Pick a model-axis "
                f"size that divides {width}."
            )


class BackboneContract:
    """The shapes and conditioning a denoiser backbone expects.

    A backbone is called with ``{"x": x_t, "t": t, "y": condition}`` and returns a tensor
    shaped like ``x_t``. This object holds what the model reads from it: the image shape,
    the conditioning kind (``None``, ``"class"`` or ``"context"``), the number of classes
    (class-conditional) and the context shape (text-conditional).

    Args:
        image_shape: ``(H, W, C)``.
        conditioning: ``None``, ``"class"`` or ``"context"``.
        num_classes: number of classes; the null class used by guidance is
            ``num_classes``.
        context_shape: ``(L, D)`` of the text context.

    Example:
    ```python
    contract = BackboneContract.from_backbone(backbone)
    contract.dummy_inputs(2)  # {"x": zeros (2, H, W, C), "t": zeros (2,), ...}
    ```
    """

    def __init__(self, image_shape, conditioning=None, num_classes=None, context_shape=None):
        if conditioning not in CONDITIONINGS:
            raise ValueError(
                f"backbone.conditioning must be None, 'class' or 'context', got "
                f"{conditioning!r}."
            )
        self.image_shape = tuple(int(d) for d in image_shape)
        self.conditioning = conditioning
        self.num_classes = int(num_classes) if conditioning == "class" else None
        self.context_shape = (
            tuple(int(d) for d in context_shape) if conditioning == "context" else None
        )

    @classmethod
    def from_backbone(cls, backbone, num_classes=None):
        """Reads the contract from the backbone's attributes, else from its inputs.

        Attributes (``image_shape``, ``conditioning``, ``num_classes``,
        ``context_shape``) override what the inputs say. The inputs are those of a
        functional model, or the shapes a subclassed model was first called with. A
        ``"y"`` input of an integer dtype means class-conditional, a float one with
        per-sample rank >= 2 means context (text) conditional. ``num_classes`` is for a
        class-conditional backbone that does not say how many classes it has.
        """
        name = type(backbone).__name__
        inputs = _declared_inputs(backbone)
        image_shape = getattr(backbone, "image_shape", None)
        if image_shape is None:
            if inputs is None or "x" not in inputs:
                raise ValueError(
                    f"Cannot tell the image shape of the backbone {name}: it has no "
                    "`image_shape` attribute and no declared 'x' input. Build it with "
                    "keras.Input inputs {'x', 't', ...}, call it once on an example batch "
                    "or set backbone.image_shape = (H, W, C)."
                )
            image_shape = inputs["x"][0][1:]
            if len(image_shape) != 3 or any(d is None for d in image_shape):
                raise ValueError(
                    f"The backbone {name}'s 'x' input has shape {inputs['x'][0]}; "
                    "DiffusionModel needs a fixed (batch, H, W, C). Set "
                    "backbone.image_shape = (H, W, C)."
                )
        if hasattr(backbone, "conditioning"):
            conditioning = backbone.conditioning
        else:
            conditioning = _conditioning_from_inputs(name, inputs)
        context_shape = None
        if conditioning == "context":
            context_shape = getattr(backbone, "context_shape", None)
            if context_shape is None:
                if inputs is None or "y" not in inputs or None in inputs["y"][0][1:]:
                    raise ValueError(
                        f"Cannot tell the context shape of the text-conditional backbone "
                        f"{name}: set backbone.context_shape = (L, D) or give it a 'y' "
                        "input of fixed shape (batch, L, D)."
                    )
                context_shape = inputs["y"][0][1:]
        own_classes = getattr(backbone, "num_classes", None)
        if conditioning == "class":
            if own_classes is not None and num_classes is not None:
                if int(own_classes) != int(num_classes):
                    raise ValueError(
                        f"num_classes={num_classes} disagrees with the backbone's own "
                        f"num_classes={own_classes}."
                    )
            num_classes = own_classes if own_classes is not None else num_classes
            if num_classes is None:
                raise ValueError(
                    f"The backbone {name} is class-conditional but does not say how many "
                    "classes it has: pass num_classes= to DiffusionModel (or set "
                    "backbone.num_classes)."
                )
            if int(num_classes) < 1:
                raise ValueError(f"num_classes must be >= 1, got {num_classes!r}.")
        elif num_classes is not None:
            raise ValueError(
                f"num_classes={num_classes} is only for a class-conditional backbone; "
                f"this backbone's conditioning is {conditioning!r}."
            )
        return cls(image_shape, conditioning, num_classes, context_shape)

    def dummy_inputs(self, batch_size):
        """Zero inputs of the right shapes and dtypes, e.g. to build the backbone."""
        inputs = {
            "x": ops.zeros((batch_size,) + self.image_shape),
            "t": ops.zeros((batch_size,), dtype="int32"),
        }
        if self.conditioning == "class":
            inputs["y"] = ops.zeros((batch_size,), dtype="int32")
        elif self.conditioning == "context":
            inputs["y"] = ops.zeros((batch_size,) + self.context_shape)
        return inputs


def _declared_inputs(backbone):
    """``{name: (shape, dtype or None)}`` of the backbone's inputs, or None if unknown."""
    struct = getattr(backbone, "_inputs_struct", None)  # functional models
    if struct is not None:
        if isinstance(struct, dict):
            items = struct.items()
        else:
            items = [(t.name, t) for t in keras.tree.flatten(struct)]
        return {k: (tuple(t.shape), t.dtype) for k, t in items}
    # A subclassed model that was called once records the shapes it was built with.
    shapes = getattr(backbone, "_build_shapes_dict", None) or {}
    if len(shapes) == 1:
        shapes = next(iter(shapes.values()))
        if isinstance(shapes, dict):
            return {k: (tuple(v), None) for k, v in shapes.items()}
    return None


def _conditioning_from_inputs(name, inputs):
    if inputs is None or "y" not in inputs:
        return None
    shape, dtype = inputs["y"]
    if dtype is not None and "int" in str(dtype) and len(shape) == 1:
        return "class"
    if (dtype is None or "float" in str(dtype)) and len(shape) >= 3:
        return "context"
    if dtype is None and len(shape) == 1:
        return "class"
    raise ValueError(
        f"Cannot tell the conditioning of the backbone {name} from its 'y' input "
        f"(shape {shape}, dtype {dtype}): integer labels (batch,) mean 'class', a float "
        "context (batch, L, D) means 'context'. Set backbone.conditioning."
    )
