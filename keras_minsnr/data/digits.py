"""The embedded offline dataset: scikit-learn's 8x8 handwritten digits.

`sklearn.datasets.load_digits()` ships 1797 real 8x8 grey images (values 0..16, labels
0..9) inside the scikit-learn package, so this pipeline works with no network and no
files to place. It is the default data of the `digits` recipe and of `make demo`.
"""

import numpy as np
import tensorflow as tf

from keras_minsnr.data import transforms
from keras_minsnr.data.info import DatasetInfo

DIGITS_MAX_VALUE = 16.0
DIGITS_NUM_CLASSES = 10
DIGITS_SPLITS = ("train", "test", "all")
# The split is a fixed permutation of the 1797 examples: the first 10% are "test".
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.1


def digits_arrays(split="train"):
    """`(images, labels)` numpy arrays of one split: float64 `(N, 8, 8)` in 0..16, int32 `(N,)`.

    `"all"` keeps scikit-learn's order; `"train"` (1617) and `"test"` (180) partition it
    with a fixed permutation (seed 0), the same on every machine.
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"split must be one of {DIGITS_SPLITS}, got {split!r}.")
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)
    labels = np.asarray(bunch.target, dtype=np.int32)
    if split == "all":
        return images, labels
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(images))
    num_test = int(round(DIGITS_TEST_FRACTION * len(images)))
    chosen = order[:num_test] if split == "test" else order[num_test:]
    chosen = np.sort(chosen)  # keep scikit-learn's order inside each split
    return images[chosen], labels[chosen]


def load_digits(
    image_size=8,
    split="train",
    *,
    batch_size=64,
    shuffle=True,
    repeat=False,
    seed=None,
    random_flip=False,
    drop_remainder=True,
    resize_method="bilinear",
):
    """The scikit-learn 8x8 digits as a `tf.data` pipeline of batch dicts.

    Args:
        image_size: output side; 8 keeps the native pixels, 16 or 32 upsamples.
        split: "train" (1617 images), "test" (180) or "all" (1797).
        batch_size: examples per batch, or None for unbatched elements.
        shuffle: a fresh seeded permutation every epoch.
        repeat: repeat forever (for `fit(steps_per_epoch=...)`).
        seed: seed for the order and flips (None: random).
        random_flip: random horizontal flips (off by default: flipped digits are wrong).
        drop_remainder: drop the last partial batch.
        resize_method: one of `transforms.RESIZE_METHODS`.

    Returns:
        `(dataset, info)`: batches `{"images": float32 (B, S, S, 1) in [-1, 1],
        "labels": int32 (B,)}` with 0 -> -1 and 16 -> +1, and a `DatasetInfo`.

    Example:
        >>> ds, info = load_digits(image_size=16, batch_size=128, repeat=True, seed=0)
    """
    image_size = transforms.check_image_size(image_size)
    batch_size = transforms.check_batch_size(batch_size)
    transforms.check_resize_method(resize_method)
    images, labels = digits_arrays(split)
    # Scale first (exact at 0 and 16), then resize: the resize is linear, so the order
    # does not change the values except for the final clip.
    images = tf.constant(
        (images[..., None] / (DIGITS_MAX_VALUE / 2.0) - 1.0).astype(np.float32)
    )
    if image_size != 8:
        images = transforms.resize_images(images, image_size, resize_method)
        images = tf.clip_by_value(images, -1.0, 1.0)
    ds = transforms.build_array_pipeline(
        {"images": images, "labels": tf.constant(labels)},
        batch_size=batch_size,
        shuffle=shuffle,
        repeat=repeat,
        seed=seed,
        random_flip=random_flip,
        drop_remainder=drop_remainder,
    )
    info = DatasetInfo(
        name="digits",
        image_shape=(image_size, image_size, 1),
        num_classes=DIGITS_NUM_CLASSES,
        class_names=tuple(str(d) for d in range(DIGITS_NUM_CLASSES)),
        size=int(images.shape[0]),
    )
    return ds, info
