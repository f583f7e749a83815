"""TensorFlow Datasets pipelines (`cifar10`, `celeb_a`, `oxford_flowers102`, `imagenet2012`, ...).

Any TFDS name whose features contain an image works; a `ClassLabel` feature (by default
`"label"`) becomes `batch["labels"]`. Nothing is downloaded unless `download=True`: by
default a dataset that is not prepared in `data_dir` raises `DatasetNotPreparedError`
(a `FileNotFoundError`) that says where the files go, instead of a TFDS stack trace.
Datasets that need a manual download (ImageNet) need `manual_dir` too.
"""

import difflib
import os

import tensorflow as tf

from keras_minsnr.data import transforms
from keras_minsnr.data.info import DatasetInfo

DEFAULT_DATA_DIR = os.path.join("~", "tensorflow_datasets")


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS dataset is neither prepared in `data_dir` nor downloadable here."""


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


def _builder(name, data_dir):
    tfds = _tfds()
    if not isinstance(name, str) or not name:
        raise ValueError(f"TFDS name must be a non-empty string, got {name!r}.")
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        base = name.split("/")[0].split(":")[0]
        close = difflib.get_close_matches(base, tfds.list_builders(), n=5)
        hint = f" Did you mean one of {close}?" if close else ""
        raise ValueError(
            f"Unknown TFDS dataset {name!r}.{hint} See tfds.list_builders() for all "
            "names, or pass a folder path or 'digits'."
        ) from None


def _default_manual_dir(data_dir):
    # Where TFDS looks when no manual_dir is given.
    return os.path.join(
        os.path.expanduser(data_dir or DEFAULT_DATA_DIR), "downloads", "manual"
    )


def _where_message(builder, name, data_dir, manual_dir, download=False):
    target = os.path.expanduser(data_dir or DEFAULT_DATA_DIR)
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    lines = [
        f"TFDS dataset {name!r} is not prepared in data_dir {target!r} "
        f"(expected {builder.data_dir!r}).",
        f"  * Prepare it (`tfds build {name} --data_dir DIR"
        + (" --manual_dir M`" if manual else "` on a machine with internet")
        + f") and copy DIR/{builder.name} to {target!r}, then pass data_dir={target!r};",
    ]
    if not download and not manual:
        lines.append(
            "  * or pass download=True here to download and prepare it (needs internet)."
        )
    if manual:
        lines.append(
            f"  * or place the files below in a folder, pass manual_dir=that folder "
            f"(got {manual_dir!r}; default {_default_manual_dir(data_dir)!r}) and "
            "download=True to prepare them here:\n  " + manual.strip()
        )
    return "\n".join(lines)


def _prepare(builder, name, data_dir, manual_dir):
    tfds = _tfds()
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        folder = manual_dir or _default_manual_dir(data_dir)
        if not os.path.isdir(os.path.expanduser(folder)):
            raise DatasetNotPreparedError(
                _where_message(builder, name, data_dir, manual_dir, download=True)
            )
    config = tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else os.path.expanduser(manual_dir)
    )
    try:
        builder.download_and_prepare(download_config=config)
    except Exception as err:  # network errors come in many types
        raise DatasetNotPreparedError(
            f"Could not download and prepare {name!r}: {type(err).__name__}: {err}\n"
            + _where_message(builder, name, data_dir, manual_dir, download=True)
        ) from err


def _pick_keys(features, image_key, label_key, name):
    tfds = _tfds()
    image_keys = [
        k for k, f in features.items() if isinstance(f, tfds.features.Image)
    ]
    if image_key is None:
        if not image_keys:
            raise ValueError(
                f"TFDS dataset {name!r} has no image feature (features: "
                f"{sorted(features)})."
            )
        image_key = "image" if "image" in image_keys else image_keys[0]
    elif image_key not in features:
        raise ValueError(
            f"image_key {image_key!r} is not a feature of {name!r} "
            f"(features: {sorted(features)})."
        )
    if label_key is None:
        has_label = "label" in features and isinstance(
            features["label"], tfds.features.ClassLabel
        )
        label_key = "label" if has_label else None
    elif label_key is not False:
        if label_key not in features:
            raise ValueError(
                f"label_key {label_key!r} is not a feature of {name!r} "
                f"(features: {sorted(features)})."
            )
    return image_key, (label_key or None)


def tfds_dataset(
    name,
    split="train",
    image_size=None,
    *,
    data_dir=None,
    manual_dir=None,
    download=False,
    image_key=None,
    label_key=None,
    batch_size=64,
    shuffle=True,
    shuffle_buffer=10_000,
    repeat=False,
    seed=None,
    random_flip=False,
    drop_remainder=True,
    resize_method="bilinear",
    cache=False,
):
    """A TFDS dataset as a pipeline of batch dicts.

    Args:
        name: TFDS name, e.g. "cifar10", "celeb_a", "oxford_flowers102", "imagenet2012".
        split: TFDS split string ("train", "test", "train[:90%]", ...).
        image_size: output side (centre crop + resize); None keeps the native size, which
            must then be fixed and square (cifar10: 32).
        data_dir: TFDS data directory (default `~/tensorflow_datasets`).
        manual_dir: folder with manually downloaded files (imagenet2012: the two tars).
        download: download and prepare when missing (needs internet). Default False: a
            missing dataset raises `DatasetNotPreparedError` saying where files go.
        image_key: image feature (default "image" or the first image feature).
        label_key: label feature (default "label" when it is a ClassLabel; False for none).
        batch_size: examples per batch, or None for unbatched elements.
        shuffle: shuffle files and a buffer of `shuffle_buffer` examples.
        shuffle_buffer: shuffle buffer size.
        repeat: repeat forever.
        seed: seed of file and buffer shuffling and of flips (None: random). The buffer
            order is reproducible for a given seed and TensorFlow global seed.
        random_flip: random horizontal flips.
        drop_remainder: drop the last partial batch.
        resize_method: one of `transforms.RESIZE_METHODS`.
        cache: cache the preprocessed examples in memory (True) or in a file (a path).

    Returns:
        `(dataset, info)`: batches `{"images": float32 (B, S, S, C) in [-1, 1]}` (0 -> -1,
        255 -> 1) plus `"labels"` int32 (B,) when the dataset has class labels.

    Example:
        >>> ds, info = tfds_dataset("cifar10", "train", batch_size=128, random_flip=True)
    """
    tfds = _tfds()
    image_size = transforms.check_image_size(image_size, allow_none=True)
    batch_size = transforms.check_batch_size(batch_size)
    transforms.check_resize_method(resize_method)
    seed = transforms.resolve_seed(seed)
    if data_dir is not None:
        data_dir = os.path.expanduser(os.fspath(data_dir))
    builder = _builder(name, data_dir)
    if download:
        _prepare(builder, name, data_dir, manual_dir)
    features = builder.info.features
    image_key, label_key = _pick_keys(features, image_key, label_key, name)
    shape = features[image_key].shape
    channels = shape[-1]
    if image_size is None:
        if shape[0] is None or shape[0] != shape[1]:
            raise ValueError(
                f"TFDS dataset {name!r} has images of shape {shape}; pass image_size "
                "to centre-crop and resize them to a fixed square."
            )

    read_config = tfds.ReadConfig(shuffle_seed=seed)
    try:
        ds = builder.as_dataset(
            split=split, shuffle_files=shuffle, read_config=read_config
        )
    except AssertionError as err:  # TFDS asserts when the files are missing
        raise DatasetNotPreparedError(
            _where_message(builder, name, data_dir, manual_dir)
        ) from err

    def convert(example):
        element = {
            "images": transforms.preprocess_image(
                example[image_key], image_size, 255.0, resize_method
            )
        }
        if label_key is not None:
            element["labels"] = tf.cast(example[label_key], tf.int32)
        return element

    ds = ds.map(convert, num_parallel_calls=transforms.AUTOTUNE)
    if cache:
        ds = ds.cache() if cache is True else ds.cache(os.fspath(cache))
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if random_flip:
        ds = transforms.random_flip_images(ds, seed)
    ds = transforms.finalize(ds, batch_size, drop_remainder)

    num_classes = class_names = None
    if label_key is not None and isinstance(
        features[label_key], tfds.features.ClassLabel
    ):
        num_classes = features[label_key].num_classes
        class_names = tuple(features[label_key].names)
    try:
        size = int(builder.info.splits[split].num_examples) or None
    except Exception:  # unknown split sizes (e.g. under tfds.testing.mock_data)
        size = None
    side = image_size or shape[0]
    info = DatasetInfo(
        name=name,
        image_shape=(side, side, channels),
        num_classes=num_classes,
        class_names=class_names,
        size=size,
    )
    return ds, info
