"""Image folders: one sub-folder per class (labelled), or a flat folder (unlabelled).

Layout::

    path/cat/0001.png     path/dog/a.jpg    ...   -> labels by sorted class name
    path/0001.png         path/0002.jpg     ...   -> unlabelled

Files ending in .png/.jpg/.jpeg/.bmp/.gif (any case) are read; hidden files and folders
(names starting with ".") are ignored; class folders are searched recursively. Every file
is decoded once, with the decoder training uses, when the pipeline is built: files it
cannot use (corrupt, empty, too large, a format TensorFlow cannot read such as TIFF data
named .png) are skipped, counted in `DatasetInfo.num_skipped` and named with their reason
in one warning; "Found N images in C classes (skipped K: ...)" is printed, and a folder
where nothing decodes fails at once instead of letting a repeated pipeline spin.
"""

import os
import re
import warnings

import tensorflow as tf

from keras_minsnr.data import transforms
from keras_minsnr.data.info import DatasetInfo

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def is_image_file(name):
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(folder):
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, f) for f in sorted(files) if is_image_file(f))
    return found


def check_folder(path):
    """Returns `path` as a string, or raises FileNotFoundError / NotADirectoryError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Image folder {path!r} does not exist.")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path!r} is not a folder.")
    return path


def list_image_folder(path):
    """`(files, labels, class_names)` for a class-folder or flat layout.

    Immediate sub-folders that contain at least one image are classes (labels in sorted
    name order); if there are none, the images directly in `path` are unlabelled
    (`labels` and `class_names` are None).
    """
    path = check_folder(path)
    entries = sorted(e for e in os.listdir(path) if not e.startswith("."))
    class_names, files, labels = [], [], []
    for entry in entries:
        sub = os.path.join(path, entry)
        if not os.path.isdir(sub):
            continue
        found = _walk_images(sub)
        if found:
            labels.extend([len(class_names)] * len(found))
            class_names.append(entry)
            files.extend(found)
    if class_names:
        return files, labels, class_names
    files = [
        os.path.join(path, e)
        for e in entries
        if is_image_file(e) and os.path.isfile(os.path.join(path, e))
    ]
    if not files:
        raise ValueError(
            f"Image folder {path!r} contains no images (looked for "
            f"{', '.join(IMAGE_EXTENSIONS)} files, directly or in class sub-folders)."
        )
    return files, None, None


# Formats tf.io.decode_image reads (PIL's names); anything else is skipped up front.
TENSORFLOW_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "GIF")


def _max_image_pixels():
    from PIL import Image

    # PIL refuses larger files as decompression bombs; so do we, saying so.
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None


def skip_reason(filename, channels=3):
    """Why `filename` cannot be trained on (None: it decodes as training decodes it).

    The check is the training pipeline's own decoder (`decode_image_file`), preceded by a
    look at the header so that a huge image is named as such, and a file in a format
    TensorFlow cannot read (e.g. TIFF data named .png) says which format it holds.
    """
    from PIL import Image

    if os.path.getsize(filename) == 0:
        return "empty"
    try:
        with Image.open(filename) as image:
            width, height, kind = image.size[0], image.size[1], image.format
    except Image.DecompressionBombError as error:  # its message holds the size
        found = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{found.group(1)} pixels" if found else "too many pixels"
        return f"too large: {size} (at most {_max_image_pixels()})"
    except Exception:  # PIL raises many types for files it does not recognise
        width = height = kind = None
    limit = _max_image_pixels()
    if width is not None and limit and width * height > limit:
        return f"too large: {width * height} pixels (at most {limit})"
    if kind is not None and kind not in TENSORFLOW_FORMATS:
        return f"{kind} data that TensorFlow cannot decode"
    try:
        decode_image_file(filename, channels)
    except (tf.errors.InvalidArgumentError, tf.errors.OpError):
        return "corrupt or not an image"
    return None


def _summary(reasons):
    """``{reason: [files]}`` → ``2 empty (a.png, b.png), 1 corrupt ... (c.png)``."""
    parts = []
    for reason, files in sorted(reasons.items(), key=lambda item: -len(item[1])):
        shown = ", ".join(os.path.basename(f) for f in files[:3])
        more = "" if len(files) <= 3 else f" and {len(files) - 3} more"
        parts.append(f"{len(files)} {reason} ({shown}{more})")
    return ", ".join(parts)


def filter_readable(files, *extra, validate=True, source="", channels=3):
    """Drops files the training pipeline cannot decode (and the matching `extra` entries).

    Returns `(files, extra_lists, skipped)` where `skipped` maps each reason (see
    `skip_reason`) to its files; one warning names the reasons and counts.
    """
    if not validate:
        return files, extra, {}
    reasons = [skip_reason(f, channels) for f in files]
    skipped = {}
    for filename, reason in zip(files, reasons):
        if reason is not None:
            skipped.setdefault(reason, []).append(filename)
    if skipped:
        warnings.warn(
            f"Skipped {sum(map(len, skipped.values()))} image file(s) in {source!r}: "
            f"{_summary(skipped)}.",
            stacklevel=4,  # the user's call of image_folder_dataset or caption_folder_dataset
        )
    keep = [r is None for r in reasons]
    files = [f for f, k in zip(files, keep) if k]
    extra = tuple(
        None if lst is None else [x for x, k in zip(lst, keep) if k] for lst in extra
    )
    return files, extra, skipped


def decode_image_file(filename, channels=3):
    """Reads and decodes a png/jpeg/bmp/gif file to uint8 `(H, W, channels)` (GIF: 1st frame)."""
    data = tf.io.read_file(filename)
    image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def check_channels(channels):
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}.")
    return channels


def check_pipeline_args(image_size, batch_size, resize_method, channels):
    """Validates a folder pipeline's arguments; returns `(image_size, batch_size)` as ints."""
    image_size = transforms.check_image_size(image_size)
    batch_size = transforms.check_batch_size(batch_size)
    transforms.check_resize_method(resize_method)
    check_channels(channels)
    return image_size, batch_size


def files_pipeline(
    files,
    image_size,
    *,
    labels=None,
    texts=None,
    channels=3,
    batch_size=64,
    shuffle=True,
    repeat=False,
    seed=None,
    random_flip=False,
    drop_remainder=True,
    resize_method="bilinear",
):
    """Pipeline over a list of image files (shared by image and caption folders)."""
    files_t = tf.constant(files, dtype=tf.string)
    labels_t = None if labels is None else tf.constant(labels, dtype=tf.int32)
    texts_t = None if texts is None else tf.constant(texts, dtype=tf.string)

    def load(index):
        image = decode_image_file(files_t[index], channels)
        element = {
            "images": transforms.preprocess_image(
                image, image_size, 255.0, resize_method
            )
        }
        if labels_t is not None:
            element["labels"] = labels_t[index]
        if texts_t is not None:
            element["text"] = texts_t[index]
        return element

    return transforms.build_indexed_pipeline(
        len(files),
        load,
        batch_size=batch_size,
        shuffle=shuffle,
        repeat=repeat,
        seed=seed,
        random_flip=random_flip,
        drop_remainder=drop_remainder,
        # Safety net for files PIL reads but TensorFlow cannot decode.
        ignore_errors=True,
    )


def image_folder_dataset(
    path,
    image_size,
    *,
    channels=3,
    batch_size=64,
    shuffle=True,
    repeat=False,
    seed=None,
    random_flip=False,
    drop_remainder=True,
    resize_method="bilinear",
    validate=True,
):
    """Images from a folder: labelled by class sub-folder, or unlabelled when flat.

    Args:
        path: the folder.
        image_size: output side; images are centre-cropped to a square and resized.
        channels: 3 (RGB) or 1 (grey); other modes are converted.
        batch_size: examples per batch, or None for unbatched elements.
        shuffle: a fresh seeded permutation of the files every epoch.
        repeat: repeat forever.
        seed: seed for the order and flips (None: random).
        random_flip: random horizontal flips.
        drop_remainder: drop the last partial batch.
        resize_method: one of `transforms.RESIZE_METHODS`.
        validate: decode every file once as training does, to skip and count the bad ones.

    Returns:
        `(dataset, info)`: batches `{"images": float32 (B, S, S, C) in [-1, 1]}` (0 -> -1,
        255 -> 1) plus `"labels"` int32 (B,) for class folders; `info.class_names` holds
        the sorted class names and `info.num_skipped` the count of unreadable files.

    Example:
        >>> ds, info = image_folder_dataset("photos/", 64, random_flip=True, seed=0)
    """
    path = check_folder(path)
    image_size, batch_size = check_pipeline_args(image_size, batch_size, resize_method, channels)
    files, labels, class_names = list_image_folder(path)
    return dataset_from_files(
        path,
        files,
        image_size,
        labels=labels,
        class_names=class_names,
        channels=channels,
        batch_size=batch_size,
        shuffle=shuffle,
        repeat=repeat,
        seed=seed,
        random_flip=random_flip,
        drop_remainder=drop_remainder,
        resize_method=resize_method,
        validate=validate,
    )


def dataset_from_files(
    source,
    files,
    image_size,
    *,
    labels=None,
    class_names=None,
    texts=None,
    channels=3,
    batch_size=64,
    validate=True,
    **pipeline_args,
):
    """Skips unreadable files and returns `(dataset, info)`.

    The common end of `image_folder_dataset` and `caption_folder_dataset`, which check
    their arguments with `check_pipeline_args` first: `labels` and `texts` are lists
    parallel to `files`; `pipeline_args` go to `files_pipeline`.
    """
    files, (labels, texts), skipped = filter_readable(
        files, labels, texts, validate=validate, source=source, channels=channels
    )
    num_skipped = sum(map(len, skipped.values()))
    why = f" (skipped {num_skipped}: {_summary(skipped)})" if skipped else ""
    if not files:
        kind = "Caption folder" if texts is not None else "Image folder"
        raise ValueError(
            f"{kind} {source!r} has no readable images: none decodes with TensorFlow{why}."
        )
    if validate:
        what = ("captioned images" if texts is not None
                else "images" if class_names is None
                else f"images in {len(class_names)} classes")
        print(f"Found {len(files)} {what} in {source!r}{why}.")
    ds = files_pipeline(
        files,
        image_size,
        labels=labels,
        texts=texts,
        channels=channels,
        batch_size=batch_size,
        **pipeline_args,
    )
    info = DatasetInfo(
        name=source,
        image_shape=(image_size, image_size, channels),
        num_classes=None if class_names is None else len(class_names),
        class_names=None if class_names is None else tuple(class_names),
        size=len(files),
        num_skipped=num_skipped,
        has_text=texts is not None,
    )
    return ds, info
