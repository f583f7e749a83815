"""Throughput benchmark: DiffusionModel train-step time, peak memory, Min-SNR overhead, sampling.

For a small DiT and a small UNet (class-conditional, 16x16x3, batch 16) and one backend
per process, a child process per backbone:

* builds two `DiffusionModel`s on identically initialised backbones, one with ``constant``
  and one with ``min_snr`` (γ=5) weighting (ε target), compiled with AdamW;
* times ``train_on_batch`` on a fixed batch for both, interleaved step by step (the order
  alternates) so that the noise of a shared machine hits both alike; reports the median
  step time of each after warm-up and their ratio (Min-SNR / constant);
* times `generate` with DDIM-50 (after one compiling call) and reports images/s;
* reports the peak memory: growth of the process's peak RSS over its size before the models
  were built, and on a GPU the device allocator's peak.

With a GPU the models run under the ``mixed_bfloat16`` policy.

Usage::

    python benchmarks/throughput.py                       # both backends, one process each
    python benchmarks/throughput.py --backend jax --quick
    python benchmarks/throughput.py --backend tensorflow --steps 30

Writes ``docs/results/throughput_<backend>.json`` (``--output-dir``).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _common import device_description  # noqa: E402,F401 - the child prints it
from _common import device_peak_mb  # noqa: E402
from _common import gpu_name  # noqa: E402
from _common import rss_mb  # noqa: E402

IMAGE_SHAPE = (16, 16, 3)
NUM_CLASSES = 10
CASES = {
    "dit_small": (
        "dit_s_2",
        {"depth": 2, "hidden_size": 128, "num_heads": 4, "patch_size": 2},
    ),
    "unet_small": (
        "unet_cifar10",
        {"base_channels": 32, "channel_multipliers": (1, 2), "num_res_blocks": 1,
         "attention_resolutions": (16,), "dropout": 0.0},
    ),
}


def child(case, batch_size, steps, warmup, sample_batch):
    import keras
    import numpy as np

    from keras_minsnr import backbones
    from keras_minsnr.diffusion_model import DiffusionModel

    backend = keras.backend.backend()
    gpu = gpu_name(backend)
    if gpu:
        keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    rss_before = rss_mb("VmRSS")
    preset, overrides = CASES[case]

    def make(weighting):
        keras.utils.set_random_seed(0)
        backbone = backbones.get(preset, image_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES,
                                 **overrides)
        model = DiffusionModel(backbone, "cosine", prediction_type="epsilon",
                               weighting=weighting, gamma=5.0, label_dropout=0.1,
                               ema_decay=0.999, seed=0)
        model.compile(optimizer=keras.optimizers.AdamW(1e-4))
        return model

    models = {"constant": make("constant"), "min_snr": make("min_snr")}
    rng = np.random.default_rng(0)
    batch = {
        "images": rng.uniform(-1, 1, (batch_size,) + IMAGE_SHAPE).astype("float32"),
        "labels": rng.integers(0, NUM_CLASSES, (batch_size,)).astype("int32"),
    }
    times = {name: [] for name in models}
    order = list(models)
    for i in range(warmup + steps):
        for name in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            loss = models[name].train_on_batch(batch, return_dict=True)["loss"]
            float(loss)  # waits for the step on asynchronous backends
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}

    model = models["min_snr"]
    labels = np.arange(sample_batch) % NUM_CLASSES
    model.generate(labels=labels, num_steps=50, sampler="ddim", seed=0)  # compiles
    start = time.perf_counter()
    images = model.generate(labels=labels, num_steps=50, sampler="ddim", seed=1)
    np.asarray(images)
    sample_seconds = time.perf_counter() - start
    return {
        "case": case,
        "backbone": preset,
        "backbone_overrides": {k: list(v) if isinstance(v, tuple) else v
                               for k, v in overrides.items()},
        "params": int(model.backbone.count_params()),
        "image_shape": list(IMAGE_SHAPE),
        "batch_size": batch_size,
        "dtype_policy": keras.mixed_precision.dtype_policy().name,
        "steps_timed": steps,
        "warmup_steps": warmup,
        "step_ms_constant": 1e3 * medians["constant"],
        "step_ms_min_snr": 1e3 * medians["min_snr"],
        "min_snr_overhead_ratio": medians["min_snr"] / medians["constant"],
        "images_per_s_train": batch_size / medians["min_snr"],
        "ddim50_images_per_s": sample_batch / sample_seconds,
        "sample_batch": sample_batch,
        "peak_rss_growth_mb": rss_mb("VmHWM") - rss_before,
        "device_peak_mb": device_peak_mb(backend),
    }


def run_backend(backend, args):
    results = []
    for case in CASES:
        command = [sys.executable, os.path.abspath(__file__), "--child", case,
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--sample-batch", str(args.sample_batch)]
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        print(f"[{backend}] {case}: {args.warmup} warm-up + {args.steps} timed steps per "
              "weighting, interleaved ...", flush=True)
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            sys.stderr.write(done.stderr[-4000:])
            raise RuntimeError(f"{backend}/{case} failed (exit {done.returncode}).")
        result = json.loads(lines[-1][len("RESULT "):])
        print(f"  step {result['step_ms_constant']:.1f} ms (constant) / "
              f"{result['step_ms_min_snr']:.1f} ms (min_snr), ratio "
              f"{result['min_snr_overhead_ratio']:.3f}; DDIM-50 "
              f"{result['ddim50_images_per_s']:.1f} img/s; peak RSS +"
              f"{result['peak_rss_growth_mb']:.0f} MB", flush=True)
        results.append(result)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["jax", "tensorflow", "both"], default="both")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (10; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (2; quick 1)")
    parser.add_argument("--sample-batch", type=int, default=None,
                        help="images per DDIM-50 call (16; quick 4)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "docs", "results"))
    parser.add_argument("--child", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (3 if quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.sample_batch = args.sample_batch or (4 if quick else 16)

    if args.child:
        sys.path.insert(0, ROOT)
        result = child(args.child, args.batch_size, args.steps, args.warmup, args.sample_batch)
        print("RESULT " + json.dumps(result))
        return 0

    backends = ["tensorflow", "jax"] if args.backend == "both" else [args.backend]
    os.makedirs(args.output_dir, exist_ok=True)
    for backend in backends:
        results = run_backend(backend, args)
        env = dict(os.environ, KERAS_BACKEND=backend)
        description = subprocess.run(
            [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
             "import throughput, keras; print(throughput.device_description("
             "keras.backend.backend()))", HERE],
            env=env, capture_output=True, text=True,
        ).stdout.strip().splitlines()
        report = {
            "backend": backend,
            "device": description[-1] if description else "unknown",
            "quick": quick,
            "note": "median over the timed steps after warm-up; the two weightings are "
            "interleaved in one process so the overhead ratio cancels machine noise. "
            "Absolute times on a shared 2-core CPU are noisy.",
            "results": results,
        }
        path = os.path.join(args.output_dir, f"throughput_{backend}.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
