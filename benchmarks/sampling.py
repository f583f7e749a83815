"""Sampling speed: the compiled sampling loop against one compiled call per step.

For the small DiT of ``throughput.py`` (case ``dit_small``: 2 blocks, width 128, 16x16x3,
10 classes) the script reports, per backend:

* the forward time of the backbone on a batch: per pass inside a compiled loop of
  ``CHAIN`` passes (``forward_ms``, the network alone) and as one compiled call
  (``forward_single_call_ms``, with the call's dispatch and transfer);
* DDIM-50 and EDM-Heun-20 images/s through `DiffusionModel.generate`, with the sampling
  loop compiled once (``loop``, the default) and with one compiled call per step from a
  Python loop (``per_step``, `samplers.sample(..., loop=False)`);
* the limit for each sampler: network evaluations × ``forward_ms``, the speed the sampler
  would have if only the network counted (DDIM-50: 50 evaluations; EDM-Heun-20: 2·L − 1
  for its L distinct σ levels).

On TensorFlow every variant is timed twice: with XLA, as the library compiles it, and with
a plain `tf.function` (``compile_function(fn, jit_compile=False)``), to show which is faster.

Each figure is the median of ``--repeats`` timed calls after one compiling call.

Usage::

    python benchmarks/sampling.py                        # both backends, one process each
    python benchmarks/sampling.py --backend jax --quick  # a smoke run

Writes ``docs/results/sampling_<backend>.json`` (``--output-dir``).
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

CASE = "dit_small"
SAMPLERS = {"ddim50": ("ddim", 50), "edm_heun20": ("edm_heun", 20)}
CHAIN = 20  # forward passes per compiled call when timing the network alone


def compilers(backend):
    """The ways to compile a pure function this backend is timed with, by name."""
    from keras_minsnr.backend import compile_function

    if backend == "jax":
        return {"jit": compile_function}
    return {
        "tf_function": lambda fn: compile_function(fn, jit_compile=False),
        "tf_function_xla": compile_function,  # the library's default
    }


def timed(fn, repeats):
    """Median seconds of ``repeats`` calls of ``fn`` after one untimed (compiling) call."""
    fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def make_model():
    import keras

    from keras_minsnr import backbones
    from keras_minsnr.diffusion_model import DiffusionModel
    from throughput import CASES

    preset, overrides = CASES[CASE]
    keras.utils.set_random_seed(0)
    backbone = backbones.get(preset, **overrides)
    model = DiffusionModel(backbone, "cosine", prediction_type="epsilon", ema_decay=0.0)
    return model, preset, overrides


def forward_seconds(model, compile_fn, batch_size, repeats):
    """Seconds of one backbone forward pass: as one compiled call (with its dispatch and
    transfer), and per call inside a compiled loop of `CHAIN` calls (the network alone)."""
    import numpy as np
    from keras import ops

    backbone = model.backbone
    trainable = [v.value for v in backbone.trainable_variables]
    non_trainable = [v.value for v in backbone.non_trainable_variables]
    rng = np.random.default_rng(0)
    inputs = {
        "x": ops.convert_to_tensor(
            rng.standard_normal((batch_size,) + tuple(model.image_shape)).astype("float32")
        ),
        "t": ops.convert_to_tensor(np.full((batch_size,), 500, "int32")),
    }
    if model.conditioning == "class":
        inputs["y"] = ops.convert_to_tensor(np.arange(batch_size, dtype="int32") % 10)

    def forward(trainable, non_trainable, inputs):
        out, _ = backbone.stateless_call(trainable, non_trainable, inputs)
        return out

    def chained(trainable, non_trainable, inputs):
        # Each call feeds the next, so none can be skipped or hoisted out of the loop.
        def body(i, x):
            return ops.tanh(forward(trainable, non_trainable, {**inputs, "x": x}))

        return ops.fori_loop(0, CHAIN, body, inputs["x"])

    compiled = compile_fn(forward)
    single = timed(
        lambda: ops.convert_to_numpy(compiled(trainable, non_trainable, inputs)), repeats
    )
    compiled_chain = compile_fn(chained)
    in_loop = timed(
        lambda: ops.convert_to_numpy(compiled_chain(trainable, non_trainable, inputs)), repeats
    ) / CHAIN
    return single, in_loop


def sampling_seconds(model, sampler, num_steps, batch_size, repeats, loop):
    """Median seconds of one `generate` call of ``batch_size`` images."""
    import functools

    from keras_minsnr import samplers

    labels = [i % model.num_classes for i in range(batch_size)] if (
        model.conditioning == "class") else None
    kwargs = dict(num_steps=num_steps, sampler=sampler, seed=0)
    if labels is None:
        kwargs["num_samples"] = batch_size
    else:
        kwargs["labels"] = labels
    original = samplers.sample
    # generate() calls samplers.sample with the default loop=True; the per-step figure
    # comes from the same call with loop=False.
    samplers.sample = functools.partial(original, loop=loop)
    try:
        return timed(lambda: model.generate(**kwargs), repeats)
    finally:
        samplers.sample = original


def child(batch_size, repeats):
    import keras

    from keras_minsnr import samplers

    backend = keras.backend.backend()
    schedule_levels = None
    results = []
    for name, compile_fn in compilers(backend).items():
        original_compile = samplers.compile_function
        # The model compiles its sampler steps through samplers.compile_function the first
        # time it samples, so each compiler gets a fresh model.
        samplers.compile_function = compile_fn
        try:
            model, preset, overrides = make_model()
            single, forward = forward_seconds(model, compile_fn, batch_size, repeats)
            if schedule_levels is None:
                schedule_levels = len(samplers.karras_timesteps(model.schedule, 20))
            row = {
                "compiler": name,
                "forward_ms": 1e3 * forward,
                "forward_single_call_ms": 1e3 * single,
            }
            for key, (sampler, num_steps) in SAMPLERS.items():
                evaluations = num_steps if sampler != "edm_heun" else 2 * schedule_levels - 1
                row[f"{key}_network_evaluations"] = evaluations
                row[f"{key}_limit_images_per_s"] = batch_size / (evaluations * forward)
                for loop in (True, False):
                    seconds = sampling_seconds(
                        model, sampler, num_steps, batch_size, repeats, loop
                    )
                    path = "loop" if loop else "per_step"
                    row[f"{key}_{path}_images_per_s"] = batch_size / seconds
                    row[f"{key}_{path}_fraction_of_limit"] = (
                        row[f"{key}_{path}_images_per_s"] / row[f"{key}_limit_images_per_s"]
                    )
            results.append(row)
        finally:
            samplers.compile_function = original_compile
    return {
        "case": CASE,
        "backbone": preset,
        "backbone_overrides": {
            k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()
        },
        "params": int(model.backbone.count_params()),
        "image_shape": list(model.image_shape),
        "batch_size": batch_size,
        "repeats": repeats,
        "edm_heun20_levels": schedule_levels,
        "results": results,
    }


def run_child(backend, arguments):
    return _common.run_child(__file__, backend, arguments, ROOT)


def report_lines(result):
    for row in result["results"]:
        yield (
            f"  [{row['compiler']}] forward {row['forward_ms']:.2f} ms in a compiled loop, "
            f"{row['forward_single_call_ms']:.2f} ms as one call"
        )
        for key in SAMPLERS:
            yield (
                f"    {key}: loop {row[f'{key}_loop_images_per_s']:.2f} img/s, per step "
                f"{row[f'{key}_per_step_images_per_s']:.2f} img/s, limit "
                f"{row[f'{key}_limit_images_per_s']:.2f} img/s "
                f"({row[f'{key}_network_evaluations']} evaluations)"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["jax", "tensorflow", "both"], default="both")
    parser.add_argument("--batch-size", type=int, default=None, help="images per call (16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (5; quick 1)")
    parser.add_argument("--quick", action="store_true", help="batch 2, one timed call")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "docs", "results"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (2 if args.quick else 16)
    args.repeats = args.repeats or (1 if args.quick else 5)
    if args.batch_size < 1 or args.repeats < 1:
        parser.error(
            f"--batch-size and --repeats must be >= 1, got {args.batch_size} and {args.repeats}."
        )

    if args.child:
        sys.path.insert(0, ROOT)
        print("RESULT " + json.dumps(child(args.batch_size, args.repeats)))
        return 0

    backends = ["tensorflow", "jax"] if args.backend == "both" else [args.backend]
    os.makedirs(args.output_dir, exist_ok=True)
    for backend in backends:
        print(f"[{backend}] {CASE}: batch {args.batch_size}, {args.repeats} timed calls ...",
              flush=True)
        result = run_child(backend, ["--child", "--batch-size", str(args.batch_size),
                                     "--repeats", str(args.repeats)])
        for line in report_lines(result):
            print(line, flush=True)
        description = subprocess.run(
            [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
             "import _common, keras; print(_common.device_description("
             "keras.backend.backend()))", HERE],
            env=dict(os.environ, KERAS_BACKEND=backend), capture_output=True, text=True,
        ).stdout.strip().splitlines()
        report = {
            "backend": backend,
            "device": description[-1] if description else "unknown",
            "quick": args.quick,
            "note": "images/s of generate() with the sampling loop compiled once ('loop') "
            "and with one compiled call per step ('per_step'); the limit is batch / "
            "(network evaluations x forward time). Median of the timed calls after one "
            "compiling call. Absolute times on a shared CPU are noisy.",
            "load_average_at_end": os.getloadavg(),
            **result,
        }
        path = os.path.join(args.output_dir, f"sampling_{backend}.json")
        _common.write_report(path, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
