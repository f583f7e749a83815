"""`tf.data` input pipelines for diffusion training.

Front door::

    from keras_minsnr.data import make_dataset
    ds, info = make_dataset("digits", image_size=16, batch_size=128, repeat=True, seed=0)
    ds, info = make_dataset("cifar10", split="train", data_dir="~/tensorflow_datasets")
    ds, info = make_dataset("imagenet2012", image_size=64, manual_dir="/data/imagenet")
    ds, info = make_dataset("path/to/class_folders", image_size=64, random_flip=True)
    ds, info = make_dataset("path/to/caption_folder", image_size=512)  # metadata.jsonl
    ds, info = make_dataset("path/to/latent_cache", batch_size=256)    # manifest.json

`source` is `"digits"` (the offline scikit-learn 8x8 digits), a TFDS name (or
`"tfds:NAME"`), or a folder path (or `"folder:PATH"`); keyword arguments go to the loader.
Every loader returns `(dataset, info)`: `dataset` yields batch dicts

* `{"images": float32 (B, H, W, C) in [-1, 1], "labels": int32 (B,)}` for labelled data,
* `{"images": ...}` for unlabelled data,
* `{"images": ..., "text": tf.string (B,)}` for caption folders,
* `{"images": float32 latents (B, h, w, c), ...}` from a latent cache (as the VAE's
  autoencoder returned them, see `keras_minsnr.backbones.autoencoders`), plus
  `"context"` float32 (B, L, D) when text embeddings were cached,

and `info` is a `DatasetInfo` (image shape, num_classes, class_names, size, skipped files).

Common keywords: `batch_size` (None: unbatched), `shuffle`, `repeat`, `seed` (same seed ->
same order and same flips), `random_flip`, `drop_remainder` (default True: static batch
shapes), `resize_method` ("bilinear" with anti-aliasing, "area", ...). Images are
centre-cropped to a square and resized to `image_size`; uint8 0 -> -1 and 255 -> +1.

TFDS data is never downloaded unless `download=True`: a dataset missing from `data_dir`
raises `DatasetNotPreparedError` (a `FileNotFoundError`) saying where to put the files.
"""

from keras_minsnr.data.captions import caption_folder_dataset
from keras_minsnr.data.digits import load_digits
from keras_minsnr.data.factory import make_dataset
from keras_minsnr.data.folders import IMAGE_EXTENSIONS
from keras_minsnr.data.folders import image_folder_dataset
from keras_minsnr.data.info import DatasetInfo
from keras_minsnr.data.latents import cache_latents
from keras_minsnr.data.latents import load_latent_cache
from keras_minsnr.data.tfds import DatasetNotPreparedError
from keras_minsnr.data.tfds import tfds_dataset
from keras_minsnr.data.transforms import center_crop_and_resize
from keras_minsnr.data.transforms import scale_to_unit_range
