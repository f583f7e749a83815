"""Unpacking and checking the batches `DiffusionModel` trains on."""

import keras
import numpy as np
from keras import ops

BATCH_KEYS = ("images", "labels", "context", "text", "timesteps", "noise")


def unpack_batch(data, contract):
    """Splits a batch into ``(images, condition, timesteps, noise)`` and checks it.

    A batch is an image tensor, ``(images, labels)``, or a dict with ``"images"`` and
    optionally ``"labels"`` / ``"context"``, ``"timesteps"`` and ``"noise"``.
    ``contract`` is the backbone's `BackboneContract`.
    """
    timesteps = noise = condition = None
    if isinstance(data, tuple):
        # Keras hands batches over as (x,), (x, y) or (x, y, sample_weight).
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        data = x if y is None else (x, y)
    if isinstance(data, dict):
        unknown = set(data) - set(BATCH_KEYS)
        if "images" not in data or unknown:
            raise ValueError(
                "A dict batch needs the key 'images' and may hold 'labels', "
                f"'context', 'timesteps' and 'noise'; got keys {sorted(data)}."
            )
        if "text" in data and "context" not in data:
            raise ValueError(
                "The batch holds raw 'text': encode captions into a 'context' first "
                "(see keras_minsnr.backbones.stable_diffusion)."
            )
        images = data["images"]
        condition = data.get("labels", data.get("context"))
        timesteps, noise = data.get("timesteps"), data.get("noise")
    elif isinstance(data, (tuple, list)):
        images = data[0]
        condition = data[1] if len(data) > 1 else None
    else:
        images = data
    check_images(images, contract)
    condition = check_condition(condition, contract)
    return images, condition, timesteps, noise


def check_images(images, contract):
    shape = tuple(images.shape)
    if len(shape) != 4 or tuple(shape[1:]) != contract.image_shape:
        raise ValueError(
            f"Expected images of shape (batch, {', '.join(map(str, contract.image_shape))}) "
            f"for this backbone, got shape {shape}."
        )


def check_condition(condition, contract):
    """Checks labels / context against the backbone; returns int32 labels or the context."""
    if contract.conditioning is None:
        if condition is not None:
            raise ValueError(
                "This backbone is unconditional but the batch carries labels or a "
                "context; drop them or use a conditional backbone."
            )
        return None
    if condition is None:
        raise ValueError(
            f"This backbone is {contract.conditioning}-conditional: batches need "
            + ("'labels'." if contract.conditioning == "class" else "a 'context'.")
        )
    if contract.conditioning == "class":
        if len(condition.shape) != 1:
            raise ValueError(f"Labels must have shape (batch,), got {tuple(condition.shape)}.")
        return ops.cast(condition, "int32")
    if tuple(condition.shape[1:]) != contract.context_shape:
        raise ValueError(
            f"Context must have shape (batch, {', '.join(map(str, contract.context_shape))}),"
            f" got {tuple(condition.shape)}."
        )
    return condition


def check_labels(labels, contract):
    """Raises if any numpy label lies outside ``[0, num_classes)``."""
    labels = np.asarray(labels)
    if contract.conditioning != "class":
        return
    bad = labels[(labels < 0) | (labels >= contract.num_classes)]
    if bad.size:
        raise ValueError(
            f"Labels must lie in [0, {contract.num_classes - 1}] for this backbone, got "
            f"{sorted(set(bad.tolist()))[:10]}."
        )


# Marks the tf.data assertion of `with_label_check`, so `fit` can tell it from others.
LABEL_CHECK_TAG = "keras_minsnr: labels outside the classes"


def with_label_check(data, contract):
    """``data`` (a `tf.data.Dataset`) with every batch's labels checked as it is read.

    Labels outside ``[0, num_classes)`` in a later batch than the first would train
    silently (``num_classes`` is the null class of guidance) or fail deep in the step
    (past the embedding). The check runs in the input pipeline, on the host, for every
    backend; a failure raises an error whose message holds `LABEL_CHECK_TAG` and the bad
    labels. Other data is returned as is.
    """
    import tensorflow as tf

    if contract.conditioning != "class" or not isinstance(data, tf.data.Dataset):
        return data
    num_classes = contract.num_classes

    def check(*parts):
        batch = parts if len(parts) > 1 else parts[0]
        if isinstance(batch, dict):
            labels = batch.get("labels")
        elif isinstance(batch, tuple) and len(batch) > 1:
            labels = batch[1]
        else:
            labels = None
        if labels is None:
            return batch
        labels = tf.cast(labels, "int64")
        inside = (labels >= 0) & (labels < num_classes)
        assertion = tf.debugging.Assert(
            tf.reduce_all(inside), [LABEL_CHECK_TAG, tf.boolean_mask(labels, ~inside)],
            summarize=10)
        with tf.control_dependencies([assertion]):
            return tf.nest.map_structure(tf.identity, batch)

    return data.map(check)


def label_check_error(error, contract):
    """The `ValueError` for an error raised by `with_label_check`, else None."""
    text = str(error)
    if LABEL_CHECK_TAG not in text:
        return None
    bad = text.split(LABEL_CHECK_TAG, 1)[1].split("[", 1)[-1].split("]", 1)[0]
    return ValueError(
        f"Labels must lie in [0, {contract.num_classes - 1}] for this backbone "
        f"({contract.num_classes} is the null class of classifier-free guidance); a "
        f"training batch holds {' '.join(bad.split())}."
    )


def first_batch(data):
    """The first batch of `fit()`'s data as numpy, or None when it cannot be peeked at."""
    import tensorflow as tf

    if isinstance(data, tf.data.Dataset):
        first = next(iter(data.take(1)), None)
        if first is None:
            raise ValueError("The training dataset is empty.")
        return tf.nest.map_structure(lambda v: v.numpy(), first)
    if isinstance(data, (np.ndarray, tuple, list, dict)):
        return data
    return None  # generators / PyDatasets are checked when the step is traced
