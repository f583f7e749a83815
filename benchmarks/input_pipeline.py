"""Input-pipeline throughput: images/s that each `tf.data` pipeline delivers.

Builds, in a temporary folder, the three kinds of data a run reads and times how fast the
library's own pipelines (`keras_minsnr.data.make_dataset`, as training builds them:
shuffled, repeated, batched) hand out batches:

* ``folder``: a class folder of JPEG files (decode, centre crop, resize, flip);
* ``tfds``: a TFDS dataset (``cifar10`` served by ``tfds.testing.mock_data``, so the
  reading, decoding and preprocessing are TFDS's and ours, the pixels are random);
* ``latent_cache``: a latent cache (``cache_latents`` output, as the ImageNet-256 recipes
  read it).

Compare the figures with the train step's images/s (``throughput.py``): a pipeline is
fast enough when it delivers many times more images per second than the step consumes.

Usage::

    python benchmarks/input_pipeline.py [--images 2048] [--batch-size 256] [--seconds 5]

Writes ``docs/results/input_pipeline.json``.
"""

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

from _common import device_description  # noqa: E402
from _common import write_report  # noqa: E402


def write_class_folder(root, num_images, size, num_classes=4):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(num_images):
        folder = os.path.join(root, f"class_{i % num_classes}")
        os.makedirs(folder, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def write_latent_cache(root, num_images, latent_shape):
    import numpy as np

    from keras_minsnr.data import cache_latents

    rng = np.random.default_rng(0)
    batches = [
        {"images": rng.standard_normal((256,) + latent_shape).astype("float32"),
         "labels": rng.integers(0, 1000, (256,)).astype("int32")}
        for _ in range(max(num_images // 256, 1))
    ]
    cache_latents(batches, lambda x: x, root, scale=1.0, verbose=0)


def images_per_second(dataset, batch_size, seconds):
    iterator = iter(dataset)
    next(iterator)  # builds the pipeline and fills the prefetch buffer
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)
        count += batch_size
    return count / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--image-size", type=int, default=256, help="stored JPEG size")
    parser.add_argument("--train-size", type=int, default=64, help="size the pipeline emits")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "results",
                                                         "input_pipeline.json"))
    args = parser.parse_args(argv)

    import tensorflow_datasets as tfds

    from keras_minsnr.data import make_dataset

    common = dict(batch_size=args.batch_size, shuffle=True, repeat=True, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "folder")
        write_class_folder(folder, args.images, args.image_size)
        cache = os.path.join(tmp, "cache")
        write_latent_cache(cache, args.images, (32, 32, 4))
        cases = {
            "folder": lambda: make_dataset(folder, image_size=args.train_size,
                                           random_flip=True, **common),
            "tfds": lambda: make_dataset("tfds:cifar10", **common),
            "latent_cache": lambda: make_dataset(cache, **common),
        }
        for name, build in cases.items():
            with tfds.testing.mock_data(num_examples=args.images):
                dataset, info = build()
                rate = images_per_second(dataset, args.batch_size, args.seconds)
            rows.append({"pipeline": name, "images_per_s": rate,
                         "image_shape": list(info.image_shape)})
            print(f"{name:>13}: {rate:9.0f} images/s  {tuple(info.image_shape)}", flush=True)
    report = {
        "device": device_description("tensorflow"),
        "load_average_at_end": os.getloadavg(),
        "batch_size": args.batch_size,
        "stored_jpeg_size": args.image_size,
        "results": rows,
    }
    write_report(args.output, report)


if __name__ == "__main__":
    sys.exit(main())
