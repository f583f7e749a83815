"""Runs the keras.distribution checks on 4 virtual CPU devices; prints one JSON report.

Started by tests/test_distribution.py in a subprocess, because the device count must be
fixed (``XLA_FLAGS=--xla_force_host_platform_device_count=4``) before JAX starts.
Computes; the assertions live in the test.
"""

import importlib.util
import json
import os
import sys
import tempfile

os.environ["KERAS_BACKEND"] = "jax"
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_minsnr as kms  # noqa: E402
from keras_minsnr import distribution as kd  # noqa: E402

GLOBAL_BATCH = 8
IMAGE_SHAPE = (8, 8, 4)
NUM_CLASSES = 10


# The smallest transformer and UNet of the presets' families.
TINY_BACKBONES = {
    "dit": ("dit_s_2", dict(depth=1, hidden_size=32, num_heads=2)),
    "unet": ("unet_cifar10", dict(base_channels=8, channel_multipliers=(1, 2),
                                  num_res_blocks=1, attention_resolutions=(4,),
                                  dropout=0.0, num_groups=4)),
}


def make_model(backbone="dit", optimizer=None):
    preset, overrides = TINY_BACKBONES[backbone]
    backbone = kms.backbones.get(preset, image_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES,
                                 **overrides)
    model = kms.DiffusionModel(
        backbone, kms.NoiseSchedule("cosine"), weighting="min_snr", ema_decay=0.9,
        ema_warmup=False, label_dropout=0.0, seed=0,
    )
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.1, momentum=0.9))
    model.optimizer.build(model.trainable_variables)
    return model


def adamw():
    return keras.optimizers.AdamW(1e-3, weight_decay=0.1)


def sample(model):
    return model.generate(labels=[0, 1, 2, 3], num_steps=3, seed=0, clip_denoised=True)


def batches(n):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        out.append({
            "images": rng.uniform(-1, 1, (GLOBAL_BATCH,) + IMAGE_SHAPE).astype("float32"),
            "labels": rng.integers(0, NUM_CLASSES, GLOBAL_BATCH).astype("int32"),
            "timesteps": rng.integers(0, 1000, GLOBAL_BATCH).astype("int32"),
            "noise": rng.normal(size=(GLOBAL_BATCH,) + IMAGE_SHAPE).astype("float32"),
        })
    return out


def fit_one(model, batch):
    history = model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0)
    return float(history.history["loss"][-1])


def state(model):
    """Host copies of the backbone weights, the EMA and the optimizer slots."""
    weights = [np.asarray(v.value) for v in model.backbone.trainable_variables]
    ema = [np.asarray(v.value) for v in model.ema_weights]
    slots = [np.asarray(v.value) for v in model.optimizer.variables if len(v.shape)]
    return weights, ema, slots


def max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def compare(ref_state, other_state):
    return {
        name: max_diff(r, o) for name, r, o in zip(("weights", "ema", "slots"), ref_state,
                                                 other_state)
    }


def set_state(model, values):
    for v, x in zip(model.variables, values):
        v.assign(x)


def device0_bytes(variables):
    """``(bytes on the first device, bytes of the whole arrays)`` of float variables."""
    first = jax.devices()[0]
    local = total = 0
    for v in variables:
        array = v.value
        total += array.nbytes
        local += sum(s.data.nbytes for s in array.addressable_shards if s.device == first)
    return local, total


def state_groups(model):
    """Weights, EMA copies and optimizer slots (variables with a shape)."""
    return {
        "weights": model.backbone.trainable_variables,
        "ema": model.ema_weights,
        "slots": [v for v in model.optimizer.variables if len(v.shape)],
    }


_FSDP_REFERENCES = {}


def fsdp_reference(backbone, two_batches):
    """``(initial values, loss, state)`` of two AdamW steps on one device."""
    if backbone not in _FSDP_REFERENCES:
        kd.configure(None)
        ref = make_model(backbone, adamw())
        init = [np.asarray(v.value) for v in ref.variables]
        loss = ref.fit(two_batches, epochs=1, verbose=0).history["loss"][-1]
        _FSDP_REFERENCES[backbone] = init, loss, state(ref)
    return _FSDP_REFERENCES[backbone]


def fsdp_report(backbone, mesh, data):
    """Two AdamW steps with fsdp on ``mesh`` against one device, from the same values;
    then a `.keras` round trip of the sharded model, loaded sharded and on one device."""
    two_batches = tf.data.Dataset.from_tensors(data[0]).concatenate(
        tf.data.Dataset.from_tensors(data[1]))
    init, ref_loss, ref_state = fsdp_reference(backbone, two_batches)

    kd.configure("fsdp", mesh, backbone_name=TINY_BACKBONES[backbone][0],
                 devices=jax.devices()[: mesh[0] * mesh[1]])
    model = make_model(backbone, adamw())
    set_state(model, init)
    loss = model.fit(two_batches, epochs=1, verbose=0).history["loss"][-1]
    layouts = kd.describe(model)
    groups = state_groups(model)
    out = {
        "loss_diff": abs(loss - ref_loss),
        **compare(ref_state, state(model)),
        "batch_axes": list(
            keras.distribution.distribution().get_data_layout((GLOBAL_BATCH, 4)).axes),
        "shapes": {v.path: list(v.shape) for vs in groups.values() for v in vs},
        "layouts": {p: list(a) for p, a in layouts.items()},
        "paths": {k: [v.path for v in vs] for k, vs in groups.items()},
        "device0_bytes": {k: device0_bytes(vs) for k, vs in groups.items()},
    }
    saved = state(model)
    path = os.path.join(tempfile.mkdtemp(), f"fsdp_{backbone}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)  # under the same fsdp distribution
    out["loaded_sharded"] = {
        **compare(saved, state(loaded)),
        "device0_bytes": {k: device0_bytes(vs) for k, vs in state_groups(loaded).items()},
    }
    kd.configure(None)
    loaded = keras.saving.load_model(path)
    out["loaded_one_device"] = {
        **compare(saved, state(loaded)),
        "devices": len(loaded.backbone.trainable_variables[0].value.sharding.device_set),
    }
    return out


def main():
    report = {"num_devices": jax.device_count()}
    data = batches(2)
    keras.distribution.set_distribution(None)

    # Reference: one device, two steps.
    ref = make_model()
    init = [np.asarray(v.value) for v in ref.variables]
    ref_losses = [fit_one(ref, data[0])]
    ref_after_1 = state(ref)
    ref_sample = sample(ref)
    ref_losses.append(fit_one(ref, data[1]))
    ref_after_2 = state(ref)

    # Data-parallel over 2 and 4 devices from the same initial values.
    for n in (2, 4):
        kd.configure("data_parallel", devices=jax.devices()[:n])
        model = make_model()
        set_state(model, init)
        loss = fit_one(model, data[0])
        report[f"dp{n}"] = {
            "loss_diff": abs(loss - ref_losses[0]),
            **compare(ref_after_1, state(model)),
            "sample_diff": float(np.max(np.abs(
                sample(model) - ref_sample))),
            "batch_sharding": str(
                keras.distribution.distribution().get_data_layout((GLOBAL_BATCH, 4)).axes
            ),
        }
        if n == 4:
            path = os.path.join(tempfile.mkdtemp(), "dp4.keras")
            model.save(path)

    # Resume the 4-device run on one device; one more step equals the reference's step 2.
    kd.configure(None)
    resumed = keras.saving.load_model(path)
    loss = fit_one(resumed, data[1])
    report["resume1"] = {
        "loss_diff": abs(loss - ref_losses[1]),
        "iterations": int(resumed.optimizer.iterations.value),
        "devices": sorted({str(d) for d in resumed.backbone.trainable_variables[0]
                           .value.sharding.device_set}),
        **compare(ref_after_2, state(resumed)),
    }

    # Model-parallel: a (2 data x 2 model) mesh.
    kd.configure("model_parallel", (2, 2), backbone_name="dit_s_2")
    model = make_model()
    set_state(model, init)
    loss = fit_one(model, data[0])
    layouts = kd.describe(model)
    report["mp"] = {
        "loss_diff": abs(loss - ref_losses[0]),
        **compare(ref_after_1, state(model)),
        "sample_diff": float(np.max(np.abs(
            sample(model) - ref_sample))),
        "layouts": {p: list(a) for p, a in layouts.items()},
        "ema_paths": [v.path for v in model.ema_weights],
        "weight_paths": [v.path for v in model.backbone.trainable_variables],
        "slot_paths": [v.path for v in model.optimizer.variables if len(v.shape)],
    }

    # Sharded checkpoint (Orbax, when installed): written by the 2x2 model-parallel run,
    # restored onto a 2-device data-parallel layout.
    report["orbax"] = None
    if importlib.util.find_spec("orbax") and importlib.util.find_spec("orbax.checkpoint"):
        directory = tempfile.mkdtemp()
        callback = keras.callbacks.OrbaxCheckpoint(
            directory, save_freq=1, save_on_background=False
        )
        model.fit(tf.data.Dataset.from_tensors(data[1]), epochs=1, verbose=0,
                  callbacks=[callback])
        saved = state(model)
        kd.configure("data_parallel", devices=jax.devices()[:2])
        restored = keras.saving.load_model(directory)
        report["orbax"] = {
            "iterations": int(restored.optimizer.iterations.value),
            **compare(saved, state(restored)),
            "layouts": {p: list(a) for p, a in kd.describe(restored).items()},
            "devices": len(restored.backbone.trainable_variables[0].value.sharding.device_set),
        }
        kd.configure(None)

    # FSDP: a transformer on 4 devices, on a 2x2 mesh (plus model axis), and a UNet on 2.
    report["fsdp"] = {
        "dit_4x1": fsdp_report("dit", (4, 1), data),
        "dit_2x2": fsdp_report("dit", (2, 2), data),
        "unet_2x1": fsdp_report("unet", (2, 1), data),
    }

    # Per-host dataset sharding as Keras does it inside fit() (two pretend hosts).
    distribution = keras.distribution.DataParallel(devices=jax.devices())
    distribution._num_processes, distribution._process_id = 2, 1
    distribution._is_multi_process = True
    dataset = tf.data.Dataset.range(32).batch(8)
    shards = [b.numpy().tolist() for b in distribution.distribute_dataset(dataset)]
    report["host_shard"] = shards
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
