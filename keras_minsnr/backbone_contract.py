"""What `DiffusionModel` needs to know about a backbone: image shape and conditioning."""

import keras
from keras import ops

CONDITIONINGS = (None, "class", "context")


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
