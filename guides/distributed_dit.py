"""
Title: Train DiT on a TPU pod with keras.distribution
Author: keras_minsnr
Date created: 2026-11-24
Last modified: 2026-12-06
Description: Data- and model-parallel Min-SNR training of a DiT with keras.distribution on JAX, run here on 8 virtual CPU devices, with the TPU-pod, multi-GPU and multi-host commands.
Accelerator: None (8 virtual CPU devices, about a minute); the same code runs on a TPU pod
"""

"""
## Introduction

The Min-SNR paper trains its ViT-XL/2 and DiT-XL/2 models with a global batch of 256 on
many accelerators. On the JAX backend Keras spreads a model over devices with
`keras.distribution`: a `DeviceMesh` names the device axes, a `LayoutMap` says how each
variable is split over them, and a `Distribution` (`DataParallel` or `ModelParallel`)
puts both to work for `model.fit()`, which then shards every batch over the devices.
Nothing in the training loop changes.

`keras_minsnr.distribution` picks the layouts for the built-in backbones:

- **data parallel**: every variable replicated, the global batch split over all devices;
- **model parallel** on a `(data, model)` mesh: in every DiT / in-context ViT block the
  attention `qkv` and MLP `fc1` kernels are split by output column, `proj` and `fc2` by
  input row, the adaLN `modulation` by column (Megatron-style), over the `model` axis;
  the batch is split over `data`.

Each weight's EMA copy and optimizer slots get the weight's layout, so model parallelism
divides *all* the training state, not only the weights.

This guide runs on a laptop: XLA can pretend the CPU is 8 devices. The flag must be set
before JAX starts. On a TPU VM or a GPU machine, leave it out and the same code uses the
real devices.
"""

"""
## Setup

`keras_minsnr` is not published on PyPI: install it from a checkout of its source tree
(`make venv` there installs it with the versions its tests passed with). From this
notebook's folder, `guides/`:
"""

"""shell
pip install -q -e "..[guides]"
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import keras
import numpy as np

import keras_minsnr as kms
from keras_minsnr.data import make_dataset

STEPS = int(os.environ.get("KMS_GUIDE_STEPS", 200))

"""
On several hosts (a TPU pod slice, or GPU machines), every host runs this same script and
first joins the cluster. `initialize_multihost()` wraps `keras.distribution.initialize()`:
on Cloud TPU, SLURM and Open MPI JAX finds the other hosts itself; elsewhere set
`KERAS_DISTRIBUTION_JOB_ADDRESSES` (the coordinator's `host:port` first),
`KERAS_DISTRIBUTION_NUM_PROCESSES` and `KERAS_DISTRIBUTION_PROCESS_ID` on each host.
"""

if os.environ.get("KMS_MULTIHOST") == "1":
    process, processes = kms.distribution.initialize_multihost()
    print(f"host {process} of {processes}")

devices = keras.distribution.list_devices()
print(len(devices), "devices:", devices)

"""
## Data

The global batch is what you ask the pipeline for; `fit()` splits it over the devices
(it must divide by the number of data shards). On several hosts Keras re-batches a
`tf.data` pipeline to `global / hosts` and each host reads every `hosts`-th batch, so
every host builds the same pipeline and reads only its share.

A tiny DiT on the 8x8 digits stands in for DiT-XL/2 on ImageNet latents here.
"""

GLOBAL_BATCH = 64
dataset, info = make_dataset("digits", image_size=8, batch_size=GLOBAL_BATCH, repeat=True,
                             seed=0)


def tiny_dit():
    return kms.backbones.get(
        "dit_s_2", image_shape=(8, 8, 1), depth=2, hidden_size=64, num_heads=4,
        num_classes=info.num_classes,
    )


def diffusion_model(backbone):
    model = kms.DiffusionModel(
        backbone, kms.NoiseSchedule("cosine"), weighting="min_snr", gamma=5.0,
        label_dropout=0.15, ema_decay=0.999, seed=0,
    )
    model.compile(optimizer=keras.optimizers.AdamW(1e-3, beta_2=0.99, weight_decay=0.03))
    return model


"""
## Data parallelism

Set the distribution *before* building the backbone: a variable gets its layout when it
is created. `configure("data_parallel")` makes a `keras.distribution.DataParallel` over
all devices and sets it globally.
"""

kms.distribution.configure("data_parallel")
model = diffusion_model(tiny_dit())
model.fit(dataset, steps_per_epoch=max(STEPS // 2, 1), epochs=1, verbose=2)

qkv = model.backbone.get_layer("block_0").attn.qkv.kernel
print("qkv kernel:", qkv.value.sharding.spec, "on", len(qkv.value.sharding.device_set),
      "devices (replicated)")

"""
## Model parallelism

On a `(2, 4)` mesh each weight of a block is split in 4 and every split is held by 2
data-parallel replicas. The rules match variable paths by regex, so each weight's EMA
copy and AdamW moments follow it; `describe()` reads the sharding the arrays really have.
"""

kms.distribution.configure("model_parallel", mesh_shape=(2, 4), backbone_name="dit_s_2")
model = diffusion_model(tiny_dit())
model.fit(dataset, steps_per_epoch=max(STEPS // 2, 1), epochs=1, verbose=2)

for path, axes in kms.distribution.describe(model).items():
    if "block_0" in path and "qkv_kernel" in path.replace("/", "_"):
        print(f"{path:55s} {axes}")

"""
`generate()` runs under the distribution as it is:
"""

images = model.generate(labels=np.arange(10), num_steps=20, seed=0, clip_denoised=True)
print("samples:", images.shape, float(images.min()), float(images.max()))

"""
## Saving and resuming on another device count

A `.keras` file stores full (gathered) arrays, so it loads on any device count: here the
8-device model continues on one device. For models too large to gather on one host,
`keras.callbacks.OrbaxCheckpoint` (with `pip install orbax-checkpoint`) writes each
host's shards itself; see `docs/scaling.md`.
"""

model.save("dit_distributed.keras")
kms.distribution.configure(None)
restored = keras.models.load_model("dit_distributed.keras")
restored.fit(dataset, steps_per_epoch=2, epochs=1, verbose=2)
print("resumed at step", int(restored.optimizer.iterations.value), "on",
      len(restored.backbone.trainable_variables[0].value.sharding.device_set), "device")

"""
## On real hardware

The script above is all a pod needs. **TPU pod slice** (e.g. a v5e-32, 8 hosts of 4
chips): copy the code to every worker and start it everywhere at once:

```shell
gcloud compute tpus tpu-vm ssh my-pod --zone=us-west4-a --worker=all \\
  --command="cd keras_minsnr && KERAS_BACKEND=jax KMS_MULTIHOST=1 python guides/distributed_dit.py"
```

**One multi-GPU machine**: `KERAS_BACKEND=jax python guides/distributed_dit.py` — JAX sees
all local GPUs; no multi-host setup. **Several GPU machines** (2 hosts here): on host `i`
in `0, 1`:

```shell
export KERAS_BACKEND=jax KMS_MULTIHOST=1
export KERAS_DISTRIBUTION_JOB_ADDRESSES=10.0.0.1:1234   # the coordinator, host 0
export KERAS_DISTRIBUTION_NUM_PROCESSES=2 KERAS_DISTRIBUTION_PROCESS_ID=$i
python guides/distributed_dit.py
```

How much memory each device needs for DiT-XL/2 (weights, EMA, AdamW slots, gradients
and activations, per mesh) is printed by
`python benchmarks/memory_plan.py dit_xl_2 --devices 8 --batch 256 --precision bf16`.
With the paper's global batch of 256 on 8 devices the activations dominate (about 13 of
26 GiB per device, data-parallel): model parallelism on the same 8 devices shrinks the
state but raises the batch each device sees, so on smaller devices lower the per-device
batch (more devices, or gradient accumulation) first.

This guide and the tests only ran on virtual CPU devices; the commands above follow the
JAX and Keras documentation but were not run on a pod here.
"""
