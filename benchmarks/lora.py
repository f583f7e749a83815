"""LoRA against full fine-tuning: trainable parameters, step time and memory.

Usage::

    python benchmarks/lora.py                       # writes docs/results/lora.json
    python benchmarks/lora.py --steps 3 --batch-size 2 --skip-memory   # a quick look

1. Trainable parameters of each backbone, full versus LoRA (default targets: attention
   and MLP projections) at ranks 4, 8 and 16. The rank-4 count is measured on the model
   with adapters; 8 and 16 follow from the adapted layers' shapes (``A`` is
   ``fan_in × r``, ``B`` is ``r × fan_out``), checked against the measured rank 4.
2. One `DiffusionModel` training step (AdamW, EMA) of ``--backbone`` with and without
   LoRA, timed alternately in one process on the same batch shapes (median of
   ``--steps``), plus the state each keeps (weights, optimizer slots, EMA copies) counted
   from its variables.
3. Unless ``--skip-memory``: the peak resident memory of the same steps, one child
   process per mode (a process's peak cannot be split between two models).
"""

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

from _common import device_description  # noqa: E402
from _common import rss_mb  # noqa: E402
from _common import run_child  # noqa: E402
from _common import write_report  # noqa: E402

RANKS = (4, 8, 16)
# (label, preset, overrides, targets): full-size presets; the SD UNet at a small width
# (its full 860M-parameter build needs ~15 GB here), labelled as such.
COUNT_CASES = [
    ("dit_s_2", "dit_s_2", {}, None),
    ("vit_b_2_in256", "vit_b_2_in256", {}, None),
    ("unet_cifar10", "unet_cifar10", {}, None),
    ("unet_cifar10 +conv", "unet_cifar10", {}, ("attention", "conv")),
    ("sd15_unet_tiny_64px", "sd15_unet", {"img_height": 64, "img_width": 64, "tiny": True},
     None),
]


def _adapter_size(layer, rank):
    """Parameters of ``A`` and ``B`` at ``rank`` for a layer's kernel (or table) shape."""
    from keras_minsnr import lora

    shape = tuple(lora._base_variable(layer).shape)
    fan_in = 1
    for dim in shape[:-1]:
        fan_in *= dim
    return rank * (fan_in + shape[-1])


def count_parameters():
    import keras
    import numpy as np

    import keras_minsnr as kms
    from keras_minsnr import lora

    def size(variables):
        return int(sum(np.prod(v.shape) for v in variables))

    rows = []
    for label, preset, overrides, targets in COUNT_CASES:
        backbone = kms.backbones.get(preset, **overrides)
        full = size(backbone.trainable_weights)
        layers = lora.target_layers(backbone, targets)
        predicted = {r: sum(_adapter_size(l, r) for l in layers.values()) for r in RANKS}
        lora.enable_lora(backbone, rank=RANKS[0], targets=targets)
        measured = size(backbone.trainable_weights)
        if measured != predicted[RANKS[0]]:
            raise AssertionError(f"{label}: rank {RANKS[0]} measured {measured}, "
                                 f"shapes give {predicted[RANKS[0]]}")
        rows.append({
            "backbone": label,
            "preset": preset,
            "overrides": overrides,
            "targets": list(targets or lora.DEFAULT_TARGETS),
            "adapted_layers": len(layers),
            "full_trainable": full,
            "lora_trainable": {str(r): predicted[r] for r in RANKS},
            "lora_fraction": {str(r): predicted[r] / full for r in RANKS},
        })
        print(f"{label}: full {full:,}; LoRA " + ", ".join(
            f"r={r} {predicted[r]:,} ({100 * predicted[r] / full:.2f}%)" for r in RANKS))
        del backbone
        keras.backend.clear_session()
    return rows


def _model(args, rank):
    import keras

    import keras_minsnr as kms

    backbone = kms.backbones.get(args.backbone)
    # Non-zero adaLN gates and output layer, as in a pretrained model (zero-initialised
    # ones would give the adapters no gradient; the cost of a step is the same).
    for weight in backbone.trainable_weights:
        weight.assign(keras.random.normal(weight.shape, stddev=0.02, seed=1))
    model = kms.DiffusionModel(backbone, kms.NoiseSchedule("cosine"), ema_decay=0.9999,
                               seed=0)
    if rank:
        model.enable_lora(rank)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4))
    return model


def _batch(model, batch_size):
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size,) + tuple(model.image_shape)).astype("float32")
    labels = rng.integers(0, model.num_classes, (batch_size,)).astype("int32")
    return {"images": images, "labels": labels}


def _state_mb(model):
    import numpy as np

    def mb(variables):
        return float(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize
                         for v in variables)) / 2**20

    return {
        "weights_mb": mb(model.backbone.weights),
        "trainable_mb": mb(model.trainable_variables),
        "optimizer_mb": mb(model.optimizer.variables),
        "ema_mb": mb(model.ema_weights),
    }


def time_steps(args):
    import keras
    import numpy as np

    models = {"full": _model(args, None), "lora": _model(args, args.rank)}
    batch = _batch(models["full"], args.batch_size)
    times = {name: [] for name in models}
    for name, model in models.items():  # compile and warm up
        for _ in range(2):
            model.train_on_batch(batch)
    for _ in range(args.steps):  # alternate, so both see the same machine load
        for name, model in models.items():
            start = time.perf_counter()
            logs = model.train_on_batch(batch, return_dict=True)
            float(logs["loss"])  # wait for the step
            times[name].append(time.perf_counter() - start)
    result = {}
    for name, model in models.items():
        result[name] = {
            "median_step_s": statistics.median(times[name]),
            "step_times_s": times[name],
            "trainable_parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
            **_state_mb(model),
        }
    result["speedup"] = result["full"]["median_step_s"] / result["lora"]["median_step_s"]
    print(f"step {args.backbone} batch {args.batch_size} ({keras.backend.backend()}): "
          f"full {result['full']['median_step_s']:.3f} s, LoRA r={args.rank} "
          f"{result['lora']['median_step_s']:.3f} s (x{result['speedup']:.2f})")
    return result


def child_memory(args):
    import json

    before = rss_mb("VmRSS")
    model = _model(args, args.rank if args.mode == "lora" else None)
    batch = _batch(model, args.batch_size)
    for _ in range(2 + args.steps):
        float(model.train_on_batch(batch, return_dict=True)["loss"])
    print("RESULT " + json.dumps({"peak_rss_growth_mb": rss_mb("VmHWM") - before}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dit_s_2")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "results", "lora.json"))
    parser.add_argument("--mode", choices=("full", "lora"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:
        return child_memory(args)

    import keras

    backend = keras.backend.backend()
    report = {
        "backend": backend,
        "device": device_description(backend),
        "load_average_at_start": list(os.getloadavg()),
        "command": "python benchmarks/lora.py " + " ".join(argv or sys.argv[1:]),
        "parameters": count_parameters(),
        "step": {"backbone": args.backbone, "batch_size": args.batch_size, "rank": args.rank,
                 "steps": args.steps, **time_steps(args)},
    }
    if not args.skip_memory:
        common = ["--backbone", args.backbone, "--batch-size", str(args.batch_size),
                  "--rank", str(args.rank), "--steps", "2"]
        report["peak_memory"] = {
            mode: run_child(__file__, backend, common + ["--mode", mode], ROOT)
            for mode in ("full", "lora")
        }
        print("peak RSS growth: " + ", ".join(
            f"{m} {r['peak_rss_growth_mb']:.0f} MiB" for m, r in report["peak_memory"].items()))
    report["load_average_at_end"] = list(os.getloadavg())
    write_report(args.output, report)


if __name__ == "__main__":
    main()
