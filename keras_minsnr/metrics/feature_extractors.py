"""Feature extractors for FID / KID: InceptionV3 pool features and an offline digits net.

An extractor is any callable that takes a float batch of images in [-1, 1], shaped
`(B, H, W, C)`, and returns float `(B, D)` numpy features, with the attributes `name`
(str), `input_shape` (the `(H, W, C)` its network sees after preprocessing) and
`feature_dim` (D). `FeatureExtractor` implements the common part (input checks, resizing,
batching through a Keras model); `evaluate_samples` accepts any object of that shape.

- `InceptionFeatureExtractor`: the usual choice -- 2048-d average-pool features of Keras'
  ImageNet InceptionV3. Its weights are never downloaded unless asked; note that they are
  not the TF-slim graph weights behind published FID numbers, so values are comparable
  only with other FIDs computed by this class.
- `DigitsFeatureExtractor`: the offline choice -- the 64-d penultimate layer of a small
  convnet trained on scikit-learn's 8x8 digits by `scripts/train_digits_classifier.py`;
  its weights ship inside the package.
"""

import json
import os

import keras
import numpy as np

__all__ = [
    "FeatureExtractor",
    "InceptionFeatureExtractor",
    "DigitsFeatureExtractor",
    "build_digits_classifier",
    "check_images",
    "get_feature_extractor",
    "FEATURE_EXTRACTORS",
    "DIGITS_WEIGHTS_PATH",
    "DIGITS_RECORD_PATH",
    "INCEPTION_WEIGHTS_FILENAME",
]

# Values a rounding error outside [-1, 1] (resizes, float16 decoding) are accepted and
# clipped; anything further out is almost certainly [0, 1] or [0, 255] data.
RANGE_TOLERANCE = 1e-3

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DIGITS_WEIGHTS_PATH = os.path.join(WEIGHTS_DIR, "digits_classifier.weights.h5")
DIGITS_RECORD_PATH = os.path.join(WEIGHTS_DIR, "digits_classifier.json")

# The file name and source keras.applications.InceptionV3(include_top=False) uses.
INCEPTION_WEIGHTS_FILENAME = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
INCEPTION_WEIGHTS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
    + INCEPTION_WEIGHTS_FILENAME
)
INCEPTION_WEIGHTS_MD5 = "bcbd6486424b2319ff4ef7d526e38f63"


def check_images(images, channels=None, name="images"):
    """`images` as float32 `(B, H, W, C)` in [-1, 1], or a ValueError saying what is wrong.

    Args:
        images: array-like batch.
        channels: allowed channel counts (tuple), or None for any.
        name: how the batch is called in error messages.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(
            f"{name} must be a batch shaped (batch, height, width, channels), "
            f"got shape {images.shape}."
        )
    if images.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch.")
    if channels is not None and images.shape[-1] not in channels:
        raise ValueError(
            f"{name} has {images.shape[-1]} channels; this extractor accepts "
            f"{' or '.join(str(c) for c in channels)} (channels last)."
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(
            f"{name} must be floats in [-1, 1], got dtype {images.dtype} "
            "(for uint8 images use x / 127.5 - 1)."
        )
    images = images.astype(np.float32)
    if not np.all(np.isfinite(images)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    low, high = float(images.min()), float(images.max())
    if low < -1.0 - RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
        raise ValueError(
            f"{name} must lie in [-1, 1], got values in [{low:.4g}, {high:.4g}] "
            "(for [0, 1] data use 2 * x - 1; for [0, 255] use x / 127.5 - 1)."
        )
    return np.clip(images, -1.0, 1.0)


class FeatureExtractor:
    """Base class: input checks, resizing and a Keras model that maps images to features.

    Subclasses set `name`, `input_shape`, `feature_dim`, `accepted_channels` and
    `self.model` (a Keras model from `input_shape` images to `(B, feature_dim)`), and may
    override `preprocess`.

    Args:
        model: Keras model from preprocessed images to features.
        name: short name recorded in evaluation results.
        input_shape: `(H, W, C)` the model sees.
        accepted_channels: channel counts `__call__` accepts.

    Example:
        >>> extractor = get_feature_extractor("digits")
        >>> extractor(np.zeros((4, 8, 8, 1), "float32")).shape
        (4, 64)
    """

    def __init__(self, model, name, input_shape, accepted_channels):
        self.model = model
        self.name = name
        self.input_shape = tuple(int(s) for s in input_shape)
        self.accepted_channels = tuple(accepted_channels)
        self.feature_dim = int(model.output.shape[-1])

    def preprocess(self, images):
        """Checked [-1, 1] images → the model's input (resize to `input_shape`)."""
        height, width, _ = self.input_shape
        if images.shape[1:3] != (height, width):
            # antialias only matters when shrinking (e.g. 32x32 samples to 8x8).
            images = keras.ops.image.resize(
                images,
                (height, width),
                interpolation="bilinear",
                antialias=images.shape[1] > height or images.shape[2] > width,
            )
        return images

    def __call__(self, images):
        """Features `(B, feature_dim)` float32 numpy for a batch `(B, H, W, C)` in [-1, 1]."""
        images = check_images(images, self.accepted_channels)
        inputs = self.preprocess(keras.ops.convert_to_tensor(images))
        # predict_on_batch runs a compiled function (jit on JAX, tf.function on TF).
        features = self.model.predict_on_batch(inputs)
        return np.asarray(keras.ops.convert_to_numpy(features), dtype=np.float32)

    def __repr__(self):
        return (
            f"{type(self).__name__}(name={self.name!r}, input_shape={self.input_shape}, "
            f"feature_dim={self.feature_dim})"
        )


def inception_weights_cache_path():
    """Where `keras.applications` caches the no-top InceptionV3 weights."""
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(
        os.path.expanduser("~"), ".keras"
    )
    return os.path.join(keras_home, "models", INCEPTION_WEIGHTS_FILENAME)


def _resolve_inception_weights(weights_path, allow_download):
    if weights_path is not None:
        weights_path = os.path.expanduser(os.fspath(weights_path))
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"InceptionV3 weights file not found: {weights_path!r}. Pass the path of "
                f"{INCEPTION_WEIGHTS_FILENAME} (downloadable from {INCEPTION_WEIGHTS_URL})."
            )
        return weights_path
    cached = inception_weights_cache_path()
    if os.path.isfile(cached):
        return cached
    if allow_download:
        return keras.utils.get_file(
            INCEPTION_WEIGHTS_FILENAME,
            INCEPTION_WEIGHTS_URL,
            cache_subdir="models",
            file_hash=INCEPTION_WEIGHTS_MD5,
        )
    raise FileNotFoundError(
        f"InceptionV3 weights {INCEPTION_WEIGHTS_FILENAME!r} not found at {cached!r} "
        "(the Keras cache). Download it from "
        f"{INCEPTION_WEIGHTS_URL} and put it there, or pass weights_path=..., or pass "
        "allow_download=True on a machine with internet; for fully offline evaluation "
        "use the 'digits' extractor."
    )


class InceptionFeatureExtractor(FeatureExtractor):
    """2048-d average-pool features of the ImageNet InceptionV3 from `keras.applications`.

    Images in [-1, 1] are resized to 299x299 (bilinear), grey images repeated to 3
    channels; [-1, 1] is exactly the scaling InceptionV3's `preprocess_input` produces, so
    no rescaling is needed.

    Args:
        weights_path: path of `inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5`;
            None looks in the Keras cache (`$KERAS_HOME` or `~/.keras`, then `models/`).
        weights: "imagenet" (load the file above) or None for random initialisation
            (only useful for testing shapes; its features are meaningless for FID).
        allow_download: when the file is in neither place, download it with
            `keras.utils.get_file` (off by default: nothing downloads silently).

    Raises:
        FileNotFoundError: the weights file is missing; the message names the file, the
            cache location and the download URL.

    Example:
        >>> extractor = InceptionFeatureExtractor("/data/weights/" +
        ...     "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5")
        >>> extractor(images).shape  # images: (B, H, W, 1 or 3) in [-1, 1]
        (B, 2048)

    Reference:
        Szegedy et al., "Rethinking the Inception Architecture for Computer Vision",
        CVPR 2016; Heusel et al. 2017 (FID uses its pool features).
    """

    def __init__(self, weights_path=None, *, weights="imagenet", allow_download=False):
        if weights not in ("imagenet", None):
            raise ValueError(f"weights must be 'imagenet' or None, got {weights!r}.")
        resolved = None
        if weights == "imagenet":
            resolved = _resolve_inception_weights(weights_path, allow_download)
        model = keras.applications.InceptionV3(
            include_top=False, weights=None, input_shape=(299, 299, 3), pooling="avg"
        )
        if resolved is not None:
            model.load_weights(resolved)
        self.weights_path = resolved
        super().__init__(model, "inception", (299, 299, 3), accepted_channels=(1, 3))

    def preprocess(self, images):
        images = super().preprocess(images)
        if images.shape[-1] == 1:
            images = keras.ops.repeat(images, 3, axis=-1)
        return images


def build_digits_classifier(num_classes=10, feature_dim=64):
    """The digits classifier: 8x8x1 in [-1, 1] → `feature_dim` features → logits.

    The one definition used both by `scripts/train_digits_classifier.py` and by
    `DigitsFeatureExtractor`, so the shipped weights always match the architecture.
    The layer named "features" is the (post-ReLU) penultimate layer.
    """
    inputs = keras.Input((8, 8, 1), name="images")
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    features = keras.layers.Dense(feature_dim, activation="relu", name="features")(x)
    x = keras.layers.Dropout(0.3, name="dropout")(features)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name="digits_classifier")


class DigitsFeatureExtractor(FeatureExtractor):
    """64-d penultimate features of a small convnet trained on the embedded 8x8 digits.

    Works offline: the weights (trained by `scripts/train_digits_classifier.py` on the
    "train" split of `keras_minsnr.data.digits_arrays`) ship with the package. Inputs are
    grey `(B, H, W, 1)` images in [-1, 1] (0 → -1, 16 → +1, as the digits pipeline
    produces); sizes other than 8x8 are resized to 8x8 (bilinear, antialiased).

    Args:
        weights_path: weights file; defaults to the shipped
            `keras_minsnr/metrics/weights/digits_classifier.weights.h5`.

    Raises:
        FileNotFoundError: the weights file is missing (re-create it with
            `python scripts/train_digits_classifier.py`).

    Example:
        >>> extractor = DigitsFeatureExtractor()
        >>> extractor(np.zeros((2, 32, 32, 1), "float32")).shape
        (2, 64)
    """

    def __init__(self, weights_path=None):
        weights_path = os.fspath(weights_path or DIGITS_WEIGHTS_PATH)
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"digits classifier weights not found: {weights_path!r}. Train them with "
                "`python scripts/train_digits_classifier.py` (writes "
                f"{DIGITS_WEIGHTS_PATH!r}) or pass weights_path=..."
            )
        self.classifier = build_digits_classifier()
        self.classifier.load_weights(weights_path)
        self.weights_path = weights_path
        model = keras.Model(
            self.classifier.input,
            self.classifier.get_layer("features").output,
            name="digits_features",
        )
        super().__init__(model, "digits", (8, 8, 1), accepted_channels=(1,))

    def predict_labels(self, images):
        """Predicted digit classes `(B,)` int for a batch in [-1, 1]."""
        images = check_images(images, self.accepted_channels)
        inputs = self.preprocess(keras.ops.convert_to_tensor(images))
        logits = self.classifier.predict_on_batch(inputs)
        return np.argmax(keras.ops.convert_to_numpy(logits), axis=-1)

    @staticmethod
    def training_record():
        """The JSON record written beside the shipped weights (test accuracy, seed, ...)."""
        with open(DIGITS_RECORD_PATH) as f:
            return json.load(f)


FEATURE_EXTRACTORS = {
    "inception": InceptionFeatureExtractor,
    "digits": DigitsFeatureExtractor,
}


def get_feature_extractor(name, **kwargs):
    """A feature extractor by name ("inception" or "digits"); kwargs go to its class.

    An extractor instance passes through unchanged.

    Example:
        >>> get_feature_extractor("inception", weights_path="/data/inception_notop.h5")
    """
    if not isinstance(name, str):
        if callable(name) and hasattr(name, "name"):
            return name
        raise ValueError(f"expected an extractor name or instance, got {name!r}.")
    key = name.lower()
    if key not in FEATURE_EXTRACTORS:
        raise ValueError(
            f"unknown feature extractor {name!r}; choose one of "
            f"{sorted(FEATURE_EXTRACTORS)}."
        )
    return FEATURE_EXTRACTORS[key](**kwargs)
