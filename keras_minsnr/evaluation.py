"""FID / KID of a model's samples against its training data (`keras-minsnr evaluate`)."""

import csv
import json
import os
import sys

import keras
import numpy as np

from keras_minsnr.metrics import evaluate_samples


def real_images_for(config, num_images):
    """Up to ``num_images`` real images from a run's data source, in [-1, 1]."""
    from keras_minsnr.data import make_dataset

    kwargs = dict(config.get("data_args") or {})
    if config.get("image_size") is not None:
        kwargs.setdefault("image_size", config["image_size"])
    dataset, _ = make_dataset(
        config["data"], batch_size=256, shuffle=False, repeat=False,
        drop_remainder=False, seed=0, **kwargs,
    )
    images, count = [], 0
    for batch in dataset:
        images.append(np.asarray(batch["images"]))
        count += images[-1].shape[0]
        if count >= num_images:
            break
    return np.concatenate(images)[:num_images]


def default_extractor(config):
    return "digits" if config.get("data") == "digits" else "inception"


# What the numbers of each extractor can be compared with.
EXTRACTOR_DESCRIPTIONS = {
    "digits": "features of this library's 8x8 digits classifier: comparable only with other "
              "digits-classifier FID/KID, not with published (Inception) FIDs",
    "inception": "Inception-v3 pool features (the standard FID/KID features)",
}


def kid_subset_size(num_samples):
    """KID's subset size for ``num_samples`` generated images: half of them (at most the
    usual 1000), so the subsets differ and the reported spread means something."""
    return int(max(2, min(1000, num_samples // 2)))


def balanced_labels(model, num_samples):
    if model.conditioning != "class":
        return None
    return np.arange(num_samples) % model.num_classes


def evaluate_model(model, real_images, num_samples, extractor, sampler="ddim", num_steps=50,
                   guidance_scale=1.0, clip_denoised=True, seed=0, verbose=False,
                   subset_size=None):
    """Generates ``num_samples`` images and compares them with ``real_images``; KID uses
    subsets of ``subset_size`` (default `kid_subset_size`)."""
    labels = balanced_labels(model, num_samples)
    kwargs = dict(num_steps=num_steps, sampler=sampler, guidance_scale=guidance_scale,
                  clip_denoised=clip_denoised, seed=seed, batch_size=500, verbose=verbose)
    if labels is None:
        fake = model.generate(num_samples, **kwargs)
    else:
        fake = model.generate(labels=labels, **kwargs)
    subset_size = subset_size or kid_subset_size(num_samples)
    result = evaluate_samples(real_images, fake, extractor=extractor, progress=verbose,
                              subset_size=subset_size)
    result["kid_subset_size"] = subset_size
    if isinstance(extractor, str) and extractor in EXTRACTOR_DESCRIPTIONS:
        result["features"] = EXTRACTOR_DESCRIPTIONS[extractor]
    return result


def evaluate_run(run_dir, num_samples=1000, extractor=None, sampler=None, num_steps=None,
                 seed=0):
    """Evaluates a run directory's model and writes ``RUN_DIR/eval.json``."""
    from keras_minsnr.resume import load_run

    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 for FID, got {num_samples}.")
    config, model = load_run(run_dir)
    extractor = extractor or default_extractor(config)
    real = real_images_for(config, max(num_samples, 1000))
    result = evaluate_model(
        model,
        real,
        num_samples,
        extractor,
        sampler=sampler or config["sampler"],
        num_steps=num_steps or config["sample_steps"],
        # The recipe's guidance is for conditional models; generate refuses it otherwise.
        guidance_scale=config["guidance_scale"] if model.conditioning else 1.0,
        clip_denoised=config["clip_denoised"],
        seed=seed,
        verbose=sys.stdout.isatty(),  # progress bars (on stdout) only on a terminal
    )
    result.update(sampler=sampler or config["sampler"], num_steps=num_steps or config["sample_steps"],
                  step=int(keras.ops.convert_to_numpy(model.optimizer.iterations))
                  if model.optimizer is not None else None)
    path = os.path.join(run_dir, "eval.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    return result


class FIDCallback(keras.callbacks.Callback):
    """Appends FID/KID of fresh samples to a CSV file every ``every_epochs`` epochs.

    Args:
        real_images: reference images in [-1, 1].
        path: CSV file to append ``epoch, step, fid, kid_mean, kid_std`` rows to.
        num_samples: samples generated per evaluation.
        extractor: ``"digits"``, ``"inception"`` or a `FeatureExtractor`.
        every_epochs: evaluation period.
        **sample_kwargs: passed to `evaluate_model` (sampler, num_steps, ...).
    """

    def __init__(self, real_images, path, num_samples=500, extractor="digits", every_epochs=1,
                 **sample_kwargs):
        super().__init__()
        self.real_images = real_images
        self.path = path
        self.num_samples = num_samples
        self.extractor = extractor
        self.every_epochs = every_epochs
        self.sample_kwargs = sample_kwargs

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_epochs:
            return
        result = evaluate_model(self.model, self.real_images, self.num_samples, self.extractor,
                                **self.sample_kwargs)
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        new_file = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new_file:
                writer.writerow(["epoch", "step", "fid", "kid_mean", "kid_std"])
            writer.writerow([epoch, step, result["fid"], result["kid_mean"], result["kid_std"]])
        if logs is not None:
            logs["fid"] = result["fid"]
