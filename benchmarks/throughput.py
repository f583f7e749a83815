"""Throughput benchmark: train-step time, MFU, peak memory, Min-SNR overhead, sampling.

Two sets of cases, one backend per process and a child process per backbone:

* ``--cases small`` (default): a small DiT and a small UNet (class-conditional, 16x16x3,
  batch 16);
* ``--cases paper``: the presets at their own sizes, batch 8: ``dit_s_2`` and
  ``vit_b_2_in256`` (32x32x4 latents, 1000 classes) and ``unet_cifar10`` (32x32x3).

For each case the child

* builds two `DiffusionModel`s on identically initialised backbones, one with ``constant``
  and one with ``min_snr`` (γ=5) weighting (ε target), compiled with AdamW;
* times ``train_on_batch`` on a fixed batch for both, interleaved step by step (the order
  alternates) so that the noise of a shared machine hits both alike; reports the median
  step time of each after warm-up and their ratio (Min-SNR / constant);
* reports model FLOPs per step (3 x the forward pass's matmul and convolution FLOPs,
  counted from the backbone's jaxpr; XLA's cost analysis of the forward pass beside it,
  see ``flops.py``), the achieved TFLOP/s and MFU against the device's peak: the
  data-sheet bf16 (or float32) peak of a known GPU/TPU, or on a CPU the measured float32
  rate of a 4096² matmul;
* times `generate` with DDIM-50 (after one compiling call) and reports images/s;
* reports the peak memory: growth of the process's peak RSS over its size before the models
  were built, and on a GPU the device allocator's peak.

With a GPU the models run under the ``mixed_bfloat16`` policy; ``--policy`` sets it.

Usage::

    python benchmarks/throughput.py                       # both backends, one process each
    python benchmarks/throughput.py --backend jax --quick
    python benchmarks/throughput.py --cases paper --policy mixed_bfloat16

Writes ``docs/results/throughput_<backend>.json`` (``throughput_paper_<backend>[_policy].json``
for the paper cases; ``--output-dir``).
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

import _common  # noqa: E402
from _common import device_description  # noqa: E402,F401 - the child prints it
from _common import device_peak_mb  # noqa: E402
from _common import gpu_name  # noqa: E402
from _common import rss_mb  # noqa: E402
from flops import TRAIN_STEP_FORWARDS  # noqa: E402

SMALL = {"image_shape": (16, 16, 3), "num_classes": 10}
CASES = {
    "dit_small": (
        "dit_s_2",
        {**SMALL, "depth": 2, "hidden_size": 128, "num_heads": 4, "patch_size": 2},
    ),
    "unet_small": (
        "unet_cifar10",
        {**SMALL, "base_channels": 32, "channel_multipliers": (1, 2), "num_res_blocks": 1,
         "attention_resolutions": (16,), "dropout": 0.0},
    ),
    # The presets as they are (batch 8 by default with --cases paper).
    "dit_s_2": ("dit_s_2", {}),
    "vit_b_2_in256": ("vit_b_2_in256", {}),
    "unet_cifar10": ("unet_cifar10", {}),
}
CASE_SETS = {
    "small": ("dit_small", "unet_small"),
    "paper": ("dit_s_2", "vit_b_2_in256", "unet_cifar10"),
}


def example_batch(backbone, batch_size, seed=0):
    """Random images (and labels for a class-conditional backbone) of the backbone's shape."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (batch_size,) + tuple(backbone.image_shape)
    batch = {"images": rng.uniform(-1, 1, shape).astype("float32")}
    if backbone.conditioning == "class":
        batch["labels"] = rng.integers(0, backbone.num_classes, (batch_size,)).astype("int32")
    return batch


def flops_child(case, batch_size):
    """Model and XLA forward FLOPs of a case, and this device's peak (JAX)."""
    import keras

    import flops
    from keras_minsnr import backbones

    preset, overrides = CASES[case]
    backbone = backbones.get(preset, **overrides)
    batch = example_batch(backbone, batch_size)
    inputs = {"x": batch["images"], "t": (batch["images"][:, 0, 0, 0] * 0).astype("int32")}
    if "labels" in batch:
        inputs["y"] = batch["labels"]
    model_flops, xla_flops = flops.backbone_forward_flops(backbone, inputs)
    gpu = gpu_name("jax")
    return {
        "forward_flops_model": model_flops,
        "forward_flops_xla": xla_flops,
        "device_kind": gpu,
        "peak_tflops_bf16": flops.peak_tflops(gpu, "bfloat16") if gpu else None,
        "peak_tflops_fp32": flops.peak_tflops(gpu, "float32") if gpu
        else flops.measure_matmul_tflops(),
        "keras_backend_for_count": keras.backend.backend(),
    }


def child(case, batch_size, steps, warmup, sample_batch, policy):
    import keras
    import numpy as np

    from keras_minsnr import backbones
    from keras_minsnr.diffusion_model import DiffusionModel

    backend = keras.backend.backend()
    gpu = gpu_name(backend)
    policy = policy or ("mixed_bfloat16" if gpu else "float32")
    keras.mixed_precision.set_dtype_policy(policy)
    rss_before = rss_mb("VmRSS")
    preset, overrides = CASES[case]

    def make(weighting):
        keras.utils.set_random_seed(0)
        backbone = backbones.get(preset, **overrides)
        conditional = backbone.conditioning is not None
        model = DiffusionModel(backbone, "cosine", prediction_type="epsilon",
                               weighting=weighting, gamma=5.0,
                               label_dropout=0.1 if conditional else 0.0,
                               ema_decay=0.999, seed=0)
        model.compile(optimizer=keras.optimizers.AdamW(1e-4))
        return model

    models = {"constant": make("constant"), "min_snr": make("min_snr")}
    batch = example_batch(models["min_snr"].backbone, batch_size)
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
    if model.conditioning == "class":
        sample_kwargs = {"labels": np.arange(sample_batch) % model.num_classes}
    else:
        sample_kwargs = {"num_samples": sample_batch}
    model.generate(num_steps=50, sampler="ddim", seed=0, **sample_kwargs)  # compiles
    start = time.perf_counter()
    images = model.generate(num_steps=50, sampler="ddim", seed=1, **sample_kwargs)
    np.asarray(images)
    sample_seconds = time.perf_counter() - start
    return {
        "case": case,
        "backbone": preset,
        "backbone_overrides": {k: list(v) if isinstance(v, tuple) else v
                               for k, v in overrides.items()},
        "params": int(model.backbone.count_params()),
        "image_shape": list(model.image_shape),
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


def run_child(backend, arguments):
    return _common.run_child(__file__, backend, arguments, ROOT)


def add_mfu(result, counts):
    """Model FLOPs per train step, achieved TFLOP/s and MFU against the device's peak."""
    step_flops = TRAIN_STEP_FORWARDS * counts["forward_flops_model"]
    achieved = step_flops / (result["step_ms_min_snr"] / 1e3) / 1e12
    bf16 = "bfloat16" in result["dtype_policy"]
    peak = counts["peak_tflops_bf16"] if bf16 and counts["peak_tflops_bf16"] else (
        counts["peak_tflops_fp32"])
    result.update(
        train_step_tflop_model=step_flops / 1e12,
        forward_tflop_xla=(counts["forward_flops_xla"] or 0) / 1e12 or None,
        achieved_tflops=achieved,
        peak_tflops=peak,
        peak_source=("data sheet, " + ("bf16" if bf16 else "fp32")) if counts["device_kind"]
        else "measured float32 4096^2 matmul (JAX)",
        mfu=achieved / peak if peak else None,
    )
    return result


def run_backend(backend, args, counts):
    results = []
    for case in CASE_SETS[args.cases]:
        print(f"[{backend}] {case}: {args.warmup} warm-up + {args.steps} timed steps per "
              "weighting, interleaved ...", flush=True)
        result = run_child(backend, [
            "--child", case, "--batch-size", str(args.batch_size), "--steps",
            str(args.steps), "--warmup", str(args.warmup), "--sample-batch",
            str(args.sample_batch)] + (["--policy", args.policy] if args.policy else []))
        result = add_mfu(result, counts[case])
        print(f"  step {result['step_ms_constant']:.1f} ms (constant) / "
              f"{result['step_ms_min_snr']:.1f} ms (min_snr), ratio "
              f"{result['min_snr_overhead_ratio']:.3f}; {result['achieved_tflops']:.3f} "
              f"TFLOP/s, MFU {result['mfu']:.1%}; DDIM-50 "
              f"{result['ddim50_images_per_s']:.1f} img/s; peak RSS +"
              f"{result['peak_rss_growth_mb']:.0f} MB", flush=True)
        results.append(result)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["jax", "tensorflow", "both"], default="both")
    parser.add_argument("--cases", choices=sorted(CASE_SETS), default="small")
    parser.add_argument("--batch-size", type=int, default=None, help="16 (paper cases: 8)")
    parser.add_argument("--policy", default=None,
                        help="Keras dtype policy (default: mixed_bfloat16 on a GPU, else float32)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (10; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (2; quick 1)")
    parser.add_argument("--sample-batch", type=int, default=None,
                        help="images per DDIM-50 call (16; quick 4)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "docs", "results"))
    parser.add_argument("--child", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--flops-child", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.batch_size = args.batch_size or (8 if args.cases == "paper" else 16)
    args.steps = args.steps or (3 if quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.sample_batch = args.sample_batch or (4 if quick else 16)

    if args.child or args.flops_child:
        sys.path.insert(0, ROOT)
        import keras_minsnr  # noqa: F401 - first: its CPU defaults (oneDNN, XLA:CPU flags)
        if args.flops_child:
            result = flops_child(args.flops_child, args.batch_size)
        else:
            result = child(args.child, args.batch_size, args.steps, args.warmup,
                           args.sample_batch, args.policy)
        print("RESULT " + json.dumps(result))
        return 0

    backends = ["tensorflow", "jax"] if args.backend == "both" else [args.backend]
    os.makedirs(args.output_dir, exist_ok=True)
    # FLOPs are a property of the architecture: counted once, on JAX, for both backends.
    counts = {case: run_child("jax", ["--flops-child", case, "--batch-size",
                                      str(args.batch_size)])
              for case in CASE_SETS[args.cases]}
    for backend in backends:
        results = run_backend(backend, args, counts)
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
            "load_average_at_end": os.getloadavg(),
            "results": results,
        }
        name = "throughput" if args.cases == "small" else f"throughput_{args.cases}"
        if args.policy:
            name += "_" + args.policy
        path = os.path.join(args.output_dir, f"{name}_{backend}.json")
        _common.write_report(path, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
