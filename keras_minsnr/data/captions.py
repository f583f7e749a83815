"""Caption folders: images plus a `metadata.jsonl` with one caption per image.

The common image-folder convention (as used by Hugging Face `imagefolder` and the
diffusers text-to-image scripts)::

    path/metadata.jsonl     {"file_name": "0001.png", "text": "a red bird on a branch"}
    path/0001.png           ...

`file_name` is relative to `path` (sub-folders allowed). Blank lines are ignored; a line
that is not a JSON object, lacks a key, or names a missing file raises an error that
names the line. Files that exist but cannot be decoded are skipped and counted.
"""

import json
import os

from keras_minsnr.data import folders

METADATA_FILE = "metadata.jsonl"


def read_caption_metadata(path, metadata=METADATA_FILE, image_key="file_name",
                          text_key="text"):
    """`(files, texts)` from `path/metadata`, validated line by line."""
    path = folders.check_folder(path)
    meta_path = os.path.join(path, metadata)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"Caption folder {path!r} has no {metadata!r}: write one JSON object per "
            f'line, e.g. {{"{image_key}": "0001.png", "{text_key}": "a caption"}}.'
        )
    files, texts = [], []
    with open(meta_path, "rb") as f:
        raw = f.read()
    try:
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{meta_path} line {line} is not UTF-8 text (byte 0x{raw[err.start]:02x}); "
            "save the file as UTF-8."
        ) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{meta_path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON ({err.msg}).") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {record!r}.")
        for key in (image_key, text_key):
            if key not in record:
                raise ValueError(
                    f"{where}: missing key {key!r} (keys: {sorted(record)})."
                )
        name, text = record[image_key], record[text_key]
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: {image_key!r} must be a file name, got {name!r}.")
        if not isinstance(text, str):
            raise ValueError(f"{where}: {text_key!r} must be a string, got {text!r}.")
        filename = os.path.join(path, name)
        if not os.path.isfile(filename):
            raise FileNotFoundError(
                f"{where}: image {name!r} does not exist in {path!r}."
            )
        files.append(filename)
        texts.append(text)
    if not files:
        raise ValueError(f"{meta_path} lists no images.")
    return files, texts


def caption_folder_dataset(
    path,
    image_size,
    *,
    metadata=METADATA_FILE,
    image_key="file_name",
    text_key="text",
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
    """Images and captions from a folder with a `metadata.jsonl`.

    Args:
        path: the folder.
        image_size: output side; images are centre-cropped to a square and resized.
        metadata: name of the JSON-lines file inside `path`.
        image_key: key of the relative file name in each line.
        text_key: key of the caption in each line.
        channels, batch_size, shuffle, repeat, seed, random_flip, drop_remainder,
        resize_method, validate: as in `image_folder_dataset`.

    Returns:
        `(dataset, info)`: batches `{"images": float32 (B, S, S, C) in [-1, 1],
        "text": tf.string (B,)}`; `info.has_text` is True.

    Example:
        >>> ds, info = caption_folder_dataset("pokemon/", 512, batch_size=4, seed=0)
    """
    path = folders.check_folder(path)
    image_size, batch_size = folders.check_pipeline_args(
        image_size, batch_size, resize_method, channels
    )
    files, texts = read_caption_metadata(path, metadata, image_key, text_key)
    return folders.dataset_from_files(
        path,
        files,
        image_size,
        texts=texts,
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
