"""Resume across backends: the first epoch after a backend switch vs a fresh epoch.

A checkpoint written on one backend used to carry that backend's `jit_compile` (``False``
from TensorFlow), so a JAX resume ran op by op (46 s instead of 4 s for a
20-step digits epoch). `train` now recompiles with the current backend's default. For each
direction (TensorFlow -> JAX, JAX -> TensorFlow) this script, one process per step:

1. trains the digits recipe for one epoch of ``--steps`` steps on the writing backend;
2. resumes that run on the other backend for one more epoch and times the `train` call
   (load, compile, the epoch, the final save and samples);
3. times a fresh one-epoch run on the resuming backend the same way.

The two times should be close (the ratio near 1); the resumed model's `jit_compile` is
reported too. Results go to ``benchmarks/results/resume_backend_switch.json``.

Usage::

    python benchmarks/resume_backend_switch.py [--steps 20] [--output FILE]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _common import device_description  # noqa: E402

BACKENDS = ("tensorflow", "jax")


def _config(steps, epochs):
    from keras_minsnr import run_config
    from recipes.digits import RECIPE

    return run_config.resolve_config(
        RECIPE,
        {"steps": steps * epochs, "steps_per_epoch": steps, "warmup_steps": 0,
         "num_samples": 10, "sample_steps": 2, "sample_every_epochs": 1000},
    )


def child(role, run_dir, steps):
    import keras

    from keras_minsnr import training

    epochs = 2 if role == "resume" else 1
    start = time.perf_counter()
    model = training.train(_config(steps, epochs), run_dir, verbose=0)
    seconds = time.perf_counter() - start
    print("RESULT " + json.dumps({
        "role": role,
        "backend": keras.backend.backend(),
        "seconds": seconds,
        "jit_compile": bool(model.jit_compile),
        "step": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
    }))


def _run(role, backend, run_dir, steps):
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": ROOT,
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, __file__, "--child", role, "--run-dir", run_dir, "--steps", str(steps)],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{role} on {backend} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.split("RESULT ", 1)[1].splitlines()[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps of one epoch")
    parser.add_argument("--output", default=os.path.join(HERE, "results",
                                                         "resume_backend_switch.json"))
    parser.add_argument("--child", choices=("write", "resume", "fresh"), help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}.")
    if args.child:
        child(args.child, args.run_dir, args.steps)
        return
    results = {"steps_per_epoch": args.steps, "device": device_description("jax"),
               "directions": []}
    with tempfile.TemporaryDirectory() as tmp:
        for writer, reader in ((BACKENDS[0], BACKENDS[1]), (BACKENDS[1], BACKENDS[0])):
            run_dir = os.path.join(tmp, f"{writer}_to_{reader}")
            _run("write", writer, run_dir, args.steps)
            resumed = _run("resume", reader, run_dir, args.steps)
            fresh = _run("fresh", reader, os.path.join(tmp, f"fresh_{reader}"), args.steps)
            results["directions"].append({
                "written_on": writer,
                "resumed_on": reader,
                "resumed_epoch_s": round(resumed["seconds"], 2),
                "fresh_epoch_s": round(fresh["seconds"], 2),
                "ratio": round(resumed["seconds"] / fresh["seconds"], 3),
                "resumed_jit_compile": resumed["jit_compile"],
                "fresh_jit_compile": fresh["jit_compile"],
            })
            print(json.dumps(results["directions"][-1]))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
