"""`evaluate_samples`: FID and KID between real and generated images in one call.

This is the function the CLI's `evaluate` command, the FID callback and the convergence
benchmark call.
"""

import numpy as np
import keras

from keras_minsnr.metrics.feature_extractors import check_images
from keras_minsnr.metrics.feature_extractors import get_feature_extractor
from keras_minsnr.metrics.fid import fid_from_features
from keras_minsnr.metrics.kid import kid_from_features

__all__ = ["extract_features", "evaluate_samples"]


def extract_features(images, extractor, batch_size=256, progress=True, name="images"):
    """Features `(N, D)` float64 of `images` `(N, H, W, C)` in [-1, 1], in batches.

    Args:
        images: array-like of images in [-1, 1].
        extractor: a feature extractor instance or name ("digits", "inception").
        batch_size: images per forward pass.
        progress: show a `keras.utils.Progbar` over the images.
        name: how the images are called in error messages.
    """
    extractor = get_feature_extractor(extractor)
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    batch_size = int(batch_size)
    # Check the whole set up front so a bad range fails before any forward pass.
    images = check_images(images, getattr(extractor, "accepted_channels", None), name)
    num = images.shape[0]
    bar = keras.utils.Progbar(num, unit_name="image") if progress else None
    chunks = []
    for start in range(0, num, batch_size):
        batch = images[start : start + batch_size]
        count = batch.shape[0]
        if 0 < start and count < batch_size:
            # Pad the last batch to the common size so compiled extractors don't retrace.
            pad = np.repeat(batch[-1:], batch_size - count, axis=0)
            batch = np.concatenate([batch, pad], axis=0)
        features = np.asarray(extractor(batch), dtype=np.float64)
        if features.ndim != 2 or features.shape[0] != batch.shape[0]:
            raise ValueError(
                f"extractor {getattr(extractor, 'name', extractor)!r} returned shape "
                f"{features.shape} for a batch of {batch.shape[0]}; expected (B, D)."
            )
        chunks.append(features[:count])
        if bar is not None:
            bar.update(start + count)
    return np.concatenate(chunks, axis=0)


def evaluate_samples(
    real_images,
    fake_images,
    extractor="digits",
    batch_size=256,
    num_subsets=100,
    subset_size=1000,
    seed=0,
    progress=True,
):
    """FID and KID between real and generated images.

    Args:
        real_images: `(N_real, H, W, C)` images in [-1, 1] (numpy or tensor).
        fake_images: `(N_fake, H, W, C)` images in [-1, 1].
        extractor: a `FeatureExtractor` (or compatible callable) or a name for
            `get_feature_extractor` ("digits", the offline default, or "inception").
        batch_size: images per forward pass of the extractor.
        num_subsets, subset_size, seed: KID subset averaging (see `kid_from_features`).
        progress: show a progress bar during feature extraction.

    Returns:
        dict with `fid`, `kid_mean`, `kid_std` (floats), `num_real`, `num_fake` (ints),
        `extractor` (its name) and `feature_dim`.

    Raises:
        ValueError: fewer than 2 images in a set, images outside [-1, 1] or with channels
            the extractor does not accept. With no more images than feature dimensions
            a `FewSamplesWarning` says FID is biased.

    Example:
        >>> from keras_minsnr.data.digits import digits_arrays
        >>> real = digits_arrays("test")[0][..., None] / 8.0 - 1.0
        >>> evaluate_samples(real, model.generate(180), extractor="digits")["fid"]
    """
    extractor = get_feature_extractor(extractor)
    real = extract_features(real_images, extractor, batch_size, progress, "real_images")
    fake = extract_features(fake_images, extractor, batch_size, progress, "fake_images")
    fid = fid_from_features(real, fake)
    kid_mean, kid_std = kid_from_features(
        real, fake, num_subsets=num_subsets, subset_size=subset_size, seed=seed
    )
    return {
        "fid": fid,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "num_real": int(real.shape[0]),
        "num_fake": int(fake.shape[0]),
        "extractor": getattr(extractor, "name", type(extractor).__name__),
        "feature_dim": int(real.shape[1]),
    }
