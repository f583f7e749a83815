"""Run by tests/test_tf_distribute.py in a fresh process: MirroredStrategy over 2 logical
CPUs against one device, with fixed timesteps and noise. Writes a JSON report."""

import json
import sys

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_minsnr as kms  # noqa: E402
from tests.tiny_backbones import TinyConvBackbone  # noqa: E402


def make_data(num_batches, nan_at=None, random_draws=False):
    rng = np.random.default_rng(0)
    n = 16  # two global batches of 8; the first num_batches are used
    data = {
        "images": rng.uniform(-1, 1, size=(n, 8, 8, 1)).astype("float32"),
        "labels": rng.integers(0, 10, size=n).astype("int32"),
        "timesteps": rng.integers(0, 1000, size=n).astype("int32"),
        "noise": rng.normal(size=(n, 8, 8, 1)).astype("float32"),
    }
    if nan_at is not None:
        data["images"][nan_at] = np.nan
    if random_draws:  # the model draws timesteps, noise and label dropout itself
        del data["timesteps"], data["noise"]
    return {k: v[: 8 * num_batches] for k, v in data.items()}


def train(strategy, data, **model_args):
    with strategy.scope():
        model = kms.DiffusionModel(
            TinyConvBackbone((8, 8, 1), num_classes=10, width=4), "cosine", ema_decay=0.9,
            **model_args
        )
        rng = np.random.default_rng(1)
        for v in model.backbone.trainable_variables:
            v.assign(rng.normal(scale=0.2, size=v.shape).astype("float32"))
        model.reset_ema()
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    error = None
    losses = []
    try:
        history = model.fit(data, batch_size=8, epochs=1, shuffle=False, verbose=0)
        losses = history.history["loss"]
    except FloatingPointError as e:
        error = str(e)
    state = [keras.ops.convert_to_numpy(v).tolist()
             for v in model.backbone.trainable_variables + model.ema_weights]
    steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    return {"loss": losses, "state": state, "error": error, "steps": steps}


mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
report = {
    "replicas": mirrored.num_replicas_in_sync,
    "one_device": train(tf.distribute.get_strategy(), make_data(2)),
    "mirrored": train(mirrored, make_data(2)),
    # Sample 14 is in the second replica's half of the second global batch.
    "mirrored_nan": train(mirrored, make_data(2, nan_at=14)),
    "one_device_first_batch": train(tf.distribute.get_strategy(), make_data(1)),
    # Timesteps, noise and label dropout drawn by the model from its seed.
    "one_device_random": train(tf.distribute.get_strategy(), make_data(2, random_draws=True),
                               seed=3, label_dropout=0.5),
    "mirrored_random": train(mirrored, make_data(2, random_draws=True), seed=3,
                             label_dropout=0.5),
}
json.dump(report, open(sys.argv[1], "w"))
