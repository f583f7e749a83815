"""Train the offline FID/KID feature network on scikit-learn's 8x8 digits and ship it.

Trains `keras_minsnr.metrics.build_digits_classifier()` on the "train" split of
`keras_minsnr.data.digits.digits_arrays` (1617 images), reports accuracy on the held-out
"test" split (180 images, never used for training or model selection), and writes

    keras_minsnr/metrics/weights/digits_classifier.weights.h5   (model.save_weights)
    keras_minsnr/metrics/weights/digits_classifier.json         (accuracy, seed, settings)

Usage:
    KERAS_BACKEND=tensorflow python scripts/train_digits_classifier.py [--seed 0] [--epochs 40]

The weights file is backend-independent (Keras 3 stores the same kernel layout on every
backend); `tests/test_metrics.py` checks the shipped file on both.
"""

import argparse
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_minsnr.data.digits import DIGITS_MAX_VALUE  # noqa: E402
from keras_minsnr.data.digits import digits_arrays  # noqa: E402
from keras_minsnr.metrics.feature_extractors import DIGITS_RECORD_PATH  # noqa: E402
from keras_minsnr.metrics.feature_extractors import DIGITS_WEIGHTS_PATH  # noqa: E402
from keras_minsnr.metrics.feature_extractors import build_digits_classifier  # noqa: E402


def to_unit_range(images):
    """0..16 grey `(N, 8, 8)` → float32 `(N, 8, 8, 1)` in [-1, 1], as the data pipeline does."""
    return (images[..., None] / (DIGITS_MAX_VALUE / 2.0) - 1.0).astype(np.float32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--weights-path", default=DIGITS_WEIGHTS_PATH)
    parser.add_argument("--record-path", default=DIGITS_RECORD_PATH)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    train_images, train_labels = digits_arrays("train")
    test_images, test_labels = digits_arrays("test")
    x_train, x_test = to_unit_range(train_images), to_unit_range(test_images)

    model = build_digits_classifier()
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        x_train,
        train_labels,
        batch_size=args.batch_size,
        epochs=args.epochs,
        shuffle=True,
        verbose=2,
    )
    train_acc = float(np.mean(np.argmax(model.predict(x_train, verbose=0), -1) == train_labels))
    test_acc = float(np.mean(np.argmax(model.predict(x_test, verbose=0), -1) == test_labels))
    print(f"train accuracy {train_acc:.4f}  held-out test accuracy {test_acc:.4f} "
          f"({len(test_labels)} images)")
    if test_acc < 0.95:
        print("WARNING: test accuracy below 0.95; not fit to ship.", file=sys.stderr)

    os.makedirs(os.path.dirname(os.path.abspath(args.weights_path)), exist_ok=True)
    # Save from a fresh, uncompiled copy so the file holds no optimizer state (size).
    shipped = build_digits_classifier()
    shipped.set_weights(model.get_weights())
    shipped.save_weights(args.weights_path)
    with open(args.weights_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    record = {
        "test_accuracy": test_acc,
        "train_accuracy": train_acc,
        "num_train": int(len(train_labels)),
        "num_test": int(len(test_labels)),
        "split": "keras_minsnr.data.digits.digits_arrays train/test (seed 0, 10% test)",
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "num_parameters": int(model.count_params()),
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "weights_file": os.path.basename(args.weights_path),
        "weights_bytes": os.path.getsize(args.weights_path),
        "weights_sha256": digest,
        "command": "python scripts/train_digits_classifier.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    with open(args.record_path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    print(f"wrote {args.weights_path} ({record['weights_bytes']} bytes) and {args.record_path}")
    return record


if __name__ == "__main__":
    main()
