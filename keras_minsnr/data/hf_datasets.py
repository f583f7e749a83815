"""Local Hugging Face datasets as a data source: a `save_to_disk` folder or parquet files.

Read with the `datasets` library (the ``hf`` extra: ``pip install 'keras-minsnr[hf]'``),
never from the network: ``data=PATH`` names a folder written by `Dataset.save_to_disk`
(or `DatasetDict.save_to_disk`, whose ``split`` is then chosen), a ``.parquet`` file, or a
folder of ``.parquet`` files. The image column holds images as the `datasets.Image`
feature stores them (encoded bytes or a file path); the caption column, if any, becomes
the batches' ``"text"``, as in a caption folder.
"""

import glob
import os

import tensorflow as tf

from keras_minsnr.data import folders
from keras_minsnr.data import transforms
from keras_minsnr.data.info import DatasetInfo

SAVE_TO_DISK_FILES = ("dataset_info.json", "dataset_dict.json")
CAPTION_COLUMNS = ("text", "caption", "prompt")  # tried in this order when not named


def is_hf_dataset(path):
    """Whether ``path`` is a parquet file or a folder of `save_to_disk` / parquet files."""
    if os.path.isfile(path):
        return path.endswith(".parquet")
    return os.path.isdir(path) and (
        any(os.path.isfile(os.path.join(path, name)) for name in SAVE_TO_DISK_FILES)
        or bool(_parquet_files(path))
    )


def _parquet_files(path):
    return sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))


def _load(path, split):
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"data={path!r} is a Hugging Face dataset; reading it needs the datasets "
            "package: pip install 'keras-minsnr[hf]'."
        ) from None
    if os.path.isfile(path) or not any(
            os.path.isfile(os.path.join(path, name)) for name in SAVE_TO_DISK_FILES):
        files = [path] if os.path.isfile(path) else _parquet_files(path)
        return datasets.Dataset.from_parquet(files)
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        split = split or "train"
        if split not in loaded:
            raise ValueError(
                f"{path!r} holds the splits {', '.join(loaded)}; split={split!r} is not one "
                "(set data_args.split)."
            )
        loaded = loaded[split]
    return loaded


def hf_dataset(path, image_size, *, split=None, image_column="image", caption_column=None,
               channels=3, batch_size=64, shuffle=True, repeat=False, seed=None,
               random_flip=False, drop_remainder=True, resize_method="bilinear"):
    """Images (and captions) of a local Hugging Face dataset as a pipeline of batch dicts.

    Args:
        path: a `save_to_disk` folder, a ``.parquet`` file or a folder of them.
        image_size: output side; images are centre-cropped to a square and resized.
        split: the split of a saved `DatasetDict` (default ``"train"``).
        image_column: the column of images (a `datasets.Image` feature).
        caption_column: the column of captions; default the first of ``text``,
            ``caption``, ``prompt`` that exists, else none (images only).
        channels, batch_size, shuffle, repeat, seed, random_flip, drop_remainder,
        resize_method: as in `image_folder_dataset`.

    Returns:
        `(dataset, info)`: batches ``{"images": float32 (B, S, S, C) in [-1, 1]}`` and,
        with captions, ``"text"``; ``info.has_text`` says which.

    Example:
        >>> ds, info = hf_dataset("pokemon_saved/", 64, batch_size=16, seed=0)

    Reference:
        `datasets.Dataset.save_to_disk`, `datasets.load_from_disk`,
        `datasets.Dataset.from_parquet` (Hugging Face datasets).
    """
    import datasets

    image_size, batch_size = folders.check_pipeline_args(
        image_size, batch_size, resize_method, channels)
    table = _load(path, split)
    if image_column not in table.column_names:
        raise ValueError(
            f"{path!r} has no image column {image_column!r}; its columns are "
            f"{', '.join(table.column_names)} (set data_args.image_column)."
        )
    if caption_column is None:
        caption_column = next((c for c in CAPTION_COLUMNS if c in table.column_names), None)
    elif caption_column not in table.column_names:
        raise ValueError(
            f"{path!r} has no caption column {caption_column!r}; its columns are "
            f"{', '.join(table.column_names)} (set data_args.caption_column)."
        )
    # Encoded bytes (or a file path) rather than decoded PIL images: TensorFlow decodes.
    table = table.cast_column(image_column, datasets.Image(decode=False))
    encoded = []
    for record in table[image_column]:
        data = record.get("bytes")
        if data is None:
            with open(record["path"], "rb") as f:
                data = f.read()
        encoded.append(data)
    if not encoded:
        raise ValueError(f"{path!r} holds no rows.")
    images_t = tf.constant(encoded, dtype=tf.string)
    texts_t = (None if caption_column is None
               else tf.constant([str(t) for t in table[caption_column]], dtype=tf.string))

    def load(index):
        image = tf.io.decode_image(images_t[index], channels=channels, expand_animations=False)
        image.set_shape([None, None, channels])
        element = {"images": transforms.preprocess_image(image, image_size, 255.0,
                                                         resize_method)}
        if texts_t is not None:
            element["text"] = texts_t[index]
        return element

    dataset = transforms.build_indexed_pipeline(
        len(encoded), load, batch_size=batch_size, shuffle=shuffle, repeat=repeat, seed=seed,
        random_flip=random_flip, drop_remainder=drop_remainder)
    info = DatasetInfo(name=path, image_shape=(image_size, image_size, channels),
                       size=len(encoded), has_text=texts_t is not None)
    return dataset, info
