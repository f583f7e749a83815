"""`make_dataset`: one front door from a name or a path to `(dataset, DatasetInfo)`."""

import os

from keras_minsnr.data import captions
from keras_minsnr.data import digits
from keras_minsnr.data import folders
from keras_minsnr.data import hf_datasets
from keras_minsnr.data import latents
from keras_minsnr.data import tfds as tfds_source

TFDS_PREFIX = "tfds:"
FOLDER_PREFIX = "folder:"
EMBEDDED = ("digits",)


def _looks_like_path(source):
    return (
        os.sep in source
        or (os.altsep is not None and os.altsep in source)
        or source.startswith((".", "~"))
    )


def _folder_kind(path):
    if os.path.isfile(os.path.join(path, latents.MANIFEST)):
        return "latents"
    if os.path.isfile(os.path.join(path, captions.METADATA_FILE)):
        return "captions"
    return "images"


def _load_folder(path, kwargs):
    path = os.path.expanduser(path)
    if hf_datasets.is_hf_dataset(path):
        if "image_size" not in kwargs:
            raise ValueError(f"Loading the Hugging Face dataset {path!r} needs image_size=...")
        return hf_datasets.hf_dataset(path, kwargs.pop("image_size"), **kwargs)
    path = folders.check_folder(path)
    kind = _folder_kind(path)
    if kind == "latents":
        kwargs.pop("split", None)
        return latents.load_latent_cache(path, **kwargs)
    kwargs.pop("split", None)
    if "image_size" not in kwargs:
        raise ValueError(f"Loading the folder {path!r} needs image_size=...")
    image_size = kwargs.pop("image_size")
    if kind == "captions":
        return captions.caption_folder_dataset(path, image_size, **kwargs)
    return folders.image_folder_dataset(path, image_size, **kwargs)


def make_dataset(source, **kwargs):
    """Builds a pipeline of batch dicts from a name or a folder.

    Args:
        source: one of
            * `"digits"`: the embedded scikit-learn 8x8 digits (`load_digits`);
            * a TFDS name such as `"cifar10"`, `"celeb_a"`, `"oxford_flowers102"`,
              `"imagenet2012"`, `"cifar10:3.0.2"`, or any name with a `"tfds:"` prefix
              (`tfds_dataset`);
            * a folder path (anything with a path separator, starting with "." or "~",
              an existing folder, or a `"folder:"` prefix): a latent cache if it holds
              `manifest.json` (`load_latent_cache`), a caption folder if it holds
              `metadata.jsonl` (`caption_folder_dataset`), a local Hugging Face
              dataset if it was written by `save_to_disk` or holds parquet files, or
              is a ``.parquet`` file (`hf_dataset`), else an image folder
              (`image_folder_dataset`).
        **kwargs: passed on to the loader (`image_size`, `split`, `batch_size`,
            `shuffle`, `repeat`, `seed`, `random_flip`, `data_dir`, ...).

    Returns:
        `(dataset, info)`: a `tf.data.Dataset` of batch dicts and a `DatasetInfo`.

    Example:
        >>> ds, info = make_dataset("digits", image_size=16, batch_size=128, seed=0)
        >>> ds, info = make_dataset("cifar10", split="train", data_dir="/data/tfds")
        >>> ds, info = make_dataset("./my_images", image_size=64)
    """
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"source must be a dataset name or a folder path, got {source!r}."
        )
    source = os.fspath(source)
    if source in EMBEDDED:
        return digits.load_digits(**kwargs)
    if source.startswith(TFDS_PREFIX):
        return tfds_source.tfds_dataset(source[len(TFDS_PREFIX):], **kwargs)
    if source.startswith(FOLDER_PREFIX):
        return _load_folder(source[len(FOLDER_PREFIX):], kwargs)
    if _looks_like_path(source) or hf_datasets.is_hf_dataset(source):
        return _load_folder(source, kwargs)
    # A bare name: a TFDS dataset first, else an existing folder of that name.
    import tensorflow_datasets as tfds

    registered = set(tfds.list_builders())
    if source.split(":")[0].split("/")[0] in registered:
        return tfds_source.tfds_dataset(source, **kwargs)
    if os.path.isdir(source):
        return _load_folder(source, kwargs)
    import difflib

    close = difflib.get_close_matches(source, list(EMBEDDED) + sorted(registered), n=5)
    hint = f" Did you mean one of {close}?" if close else ""
    raise ValueError(
        f"Unknown dataset {source!r}: not 'digits', not a TFDS name and not an "
        f"existing folder.{hint}"
    )
