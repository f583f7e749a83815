"""Shared `tf.data` transforms: centre crop, resize, flip, scaling, batching.

Every loader in `keras_minsnr.data` builds its pipeline from these pieces, so that all
of them behave the same way:

* images are centre-cropped to a square and resized to `image_size`;
* pixel values are mapped linearly so that 0 -> -1 and `max_value` -> +1;
* shuffling is a full per-epoch permutation of the example indices drawn with stateless
  ops from `(seed, epoch)`, and random flips use stateless ops seeded by
  `(seed, position in the stream)`, so the same seed gives the same order and the same
  flips in every run, independently of TensorFlow's global seed (TFDS pipelines, which
  cannot be indexed, use a seeded shuffle buffer instead);
* batches are prefetched with `AUTOTUNE` and the pipeline is marked deterministic.
"""

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE

RESIZE_METHODS = ("bilinear", "area", "bicubic", "nearest", "lanczos3")


def check_positive_int(name, value, allow_none=False):
    """Returns `value` as an int (None passes when allowed), or raises a ValueError naming it."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        allowed = "a positive integer or None" if allow_none else "a positive integer"
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")
    return int(value)


def check_image_size(image_size, allow_none=False):
    """Returns `image_size` as an int, or raises a `ValueError` naming the value."""
    return check_positive_int("image_size", image_size, allow_none=allow_none)


def check_batch_size(batch_size):
    """Returns `batch_size` as an int (or None for unbatched), or raises a ValueError."""
    return check_positive_int("batch_size", batch_size, allow_none=True)


def check_resize_method(method):
    if method not in RESIZE_METHODS:
        raise ValueError(
            f"resize_method must be one of {RESIZE_METHODS}, got {method!r}."
        )
    return method


def resolve_seed(seed):
    """An int seed; a fresh random one when `seed` is None."""
    if seed is None:
        return int(np.random.randint(0, 2**31 - 1))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}.")
    return int(seed)


def scale_to_unit_range(images, max_value=255.0):
    """Maps `[0, max_value]` linearly onto `[-1, 1]` as float32 (0 -> -1, max -> 1).

    Dividing by `max_value / 2` (rather than multiplying by `2 / max_value`) keeps the
    end points exact in float32.
    """
    images = tf.cast(images, tf.float32)
    return images / (float(max_value) / 2.0) - 1.0


def center_crop_to_square(image):
    """Crops the central `s x s` square, `s = min(H, W)`, from an `(H, W, C)` image.

    When `H - s` is odd the extra row is dropped from the bottom (the offset rounds down),
    and likewise for columns on the right.
    """
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    side = tf.minimum(height, width)
    top = (height - side) // 2
    left = (width - side) // 2
    return image[top : top + side, left : left + side, :]


def resize_square(image, image_size, method="bilinear"):
    """Resizes a square `(s, s, C)` float image to `(image_size, image_size, C)`.

    `bilinear`/`bicubic`/`lanczos3` use an anti-aliasing kernel when shrinking (close to
    PIL's filters); `area` averages the covered pixels. An image already at the target
    size is returned unchanged.
    """
    channels = image.shape[-1]
    side = tf.shape(image)[0]
    out = tf.cond(
        tf.equal(side, image_size),
        lambda: image,
        lambda: resize_images(image, image_size, method),
    )
    out.set_shape([image_size, image_size, channels])
    return out


def resize_images(images, image_size, method="bilinear"):
    """`tf.image.resize` to a square with this module's filter choice (3-D or 4-D input)."""
    out = tf.image.resize(
        images,
        [image_size, image_size],
        method=method,
        antialias=method not in ("area", "nearest"),
    )
    return tf.cast(out, images.dtype)


def center_crop_and_resize(image, image_size, method="bilinear"):
    """Centre-crops an `(H, W, C)` image to a square and resizes it (float32 out)."""
    image = tf.cast(image, tf.float32)
    image = center_crop_to_square(image)
    return resize_square(image, image_size, method)


def preprocess_image(image, image_size=None, max_value=255.0, method="bilinear"):
    """uint8-like `(H, W, C)` image -> float32 in `[-1, 1]`, square, `image_size` wide.

    With `image_size=None` the image is only scaled (it must already be square). Resizing
    can overshoot slightly (bicubic, lanczos), so the result is clipped to `[-1, 1]`.
    """
    image = tf.cast(image, tf.float32)
    if image_size is not None:
        image = center_crop_and_resize(image, image_size, method)
    image = scale_to_unit_range(image, max_value)
    return tf.clip_by_value(image, -1.0, 1.0)


def index_dataset(num_examples, shuffle=False, repeat=False, seed=0):
    """Example indices in `[0, num_examples)`, one full permutation per epoch.

    Epoch `e` uses the permutation `argsort(stateless_uniform(seed=(seed, e)))`, so it
    depends only on `seed` and `e`. The cardinality is `num_examples` (or infinite with
    `repeat=True`).
    """
    num_examples = int(num_examples)

    def epoch(e):
        if not shuffle:
            return tf.data.Dataset.range(num_examples)
        keys = tf.random.stateless_uniform(
            [num_examples], seed=tf.stack([tf.cast(seed, tf.int64), e])
        )
        return tf.data.Dataset.from_tensor_slices(
            tf.cast(tf.argsort(keys), tf.int64)
        )

    if not repeat:
        return epoch(tf.constant(0, tf.int64))
    ds = tf.data.Dataset.counter().flat_map(epoch)
    return ds.apply(
        tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY)
    )


def random_flip_batches(ds, seed, key="images"):
    """Like `random_flip_images` for batched `(B, H, W, C)` elements.

    Batch `k` flips example `i` when `stateless_uniform([B], seed=(seed, k))[i] < 1/2`.
    """

    def flip(position, element):
        element = dict(element)
        images = element[key]
        draws = tf.random.stateless_uniform(
            tf.shape(images)[:1], seed=tf.stack([tf.cast(seed, tf.int64), position])
        )
        mirrored = tf.reverse(images, axis=[2])
        element[key] = tf.where(draws[:, None, None, None] < 0.5, mirrored, images)
        return element

    return ds.enumerate().map(flip, num_parallel_calls=AUTOTUNE)


def random_flip_images(ds, seed, key="images"):
    """Flips `element[key]` left-right with probability 1/2, stateless per position.

    The flip of the k-th element of the stream is drawn from `(seed, k)`.
    """

    def flip(position, element):
        element = dict(element)
        element[key] = tf.image.stateless_random_flip_left_right(
            element[key], seed=tf.stack([tf.cast(seed, tf.int64), position])
        )
        return element

    return ds.enumerate().map(flip, num_parallel_calls=AUTOTUNE)


def deterministic_options():
    options = tf.data.Options()
    options.deterministic = True
    return options


def finalize(ds, batch_size=None, drop_remainder=True):
    """Batches (unless `batch_size` is None), prefetches and marks the pipeline deterministic."""
    if batch_size is not None:
        ds = ds.batch(
            batch_size, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE
        )
    ds = ds.prefetch(AUTOTUNE)
    return ds.with_options(deterministic_options())


def build_indexed_pipeline(
    num_examples,
    load_fn,
    *,
    batch_size=None,
    shuffle=False,
    repeat=False,
    seed=None,
    random_flip=False,
    drop_remainder=True,
    ignore_errors=False,
):
    """The common pipeline: indices -> `load_fn(index)` -> flip -> batch -> prefetch.

    Args:
        num_examples: number of examples addressable by index.
        load_fn: maps an int64 scalar index to a dict with at least `"images"`.
        batch_size: batch size, or None for unbatched elements.
        shuffle: a fresh permutation every epoch (from `seed`).
        repeat: repeat forever.
        seed: int seed for the order and the flips; None draws one at random.
        random_flip: random horizontal flips of `"images"`.
        drop_remainder: drop the last partial batch (static batch shapes for `fit`).
        ignore_errors: skip elements whose `load_fn` fails (e.g. undecodable files).
    """
    seed = resolve_seed(seed)
    ds = index_dataset(num_examples, shuffle=shuffle, repeat=repeat, seed=seed)
    ds = ds.map(load_fn, num_parallel_calls=AUTOTUNE)
    if ignore_errors:
        ds = ds.ignore_errors()
    if random_flip:
        ds = random_flip_images(ds, seed)
    return finalize(ds, batch_size, drop_remainder)


def build_array_pipeline(
    arrays,
    *,
    batch_size=None,
    shuffle=False,
    repeat=False,
    seed=None,
    random_flip=False,
    drop_remainder=True,
):
    """The pipeline for in-memory data: whole batches are gathered at once.

    Args:
        arrays: dict of tensors with equal first dimension (must hold `"images"`).
        batch_size, shuffle, repeat, seed, random_flip, drop_remainder: as in
            `build_indexed_pipeline`.
    """
    seed = resolve_seed(seed)
    num_examples = int(arrays["images"].shape[0])
    ds = index_dataset(num_examples, shuffle=shuffle, repeat=repeat, seed=seed)
    if batch_size is not None:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(
        lambda index: {k: tf.gather(v, index) for k, v in arrays.items()},
        num_parallel_calls=AUTOTUNE,
    )
    if random_flip:
        flip = random_flip_images if batch_size is None else random_flip_batches
        ds = flip(ds, seed)
    return finalize(ds, None)
