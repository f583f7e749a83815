"""Gradient checkpointing: peak memory and step time of a train step with and without it.

For each backend and each setting (``gradient_checkpointing`` off, on) a fresh child
process builds the backbone (default ``vit_xl_2_in256``, the paper's ViT-XL/2), wraps it
in `DiffusionModel` (Min-SNR-5, ε target, AdamW, EMA) and runs ``--warmup`` + ``--steps``
train steps on one fixed batch. It reports:

- the median step time (separate processes: compare them on a quiet machine only; the
  load averages are in the report);
- peak memory: on JAX XLA's memory analysis of the compiled train step (its temporary
  buffers are the activations the backward pass keeps plus workspace: exact and
  independent of the load); on every backend the process's peak resident set
  (``VmHWM``) and its growth over the resident set before the first step; on a GPU the
  allocator's peak.

One setting per process, so that one peak does not hide the other.

Usage::

    python benchmarks/remat.py --batch-size 8                       # ViT-XL/2, both backends
    python benchmarks/remat.py --backend jax --quick                # a smoke run, tiny ViT

Writes ``benchmarks/results/remat_<backbone>.json`` (``--output-dir``).
"""

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

import _common  # noqa: E402

BACKENDS = ("jax", "tensorflow")
QUICK_ARGS = {"depth": 2, "hidden_size": 64, "num_heads": 2, "image_shape": [8, 8, 4],
              "num_classes": 10}


def build_model(backbone_name, backbone_args, gradient_checkpointing):
    import keras

    from keras_minsnr import backbones
    from keras_minsnr.diffusion_model import DiffusionModel

    keras.utils.set_random_seed(0)
    backbone = backbones.get(backbone_name, gradient_checkpointing=gradient_checkpointing,
                             **(backbone_args or {}))
    model = DiffusionModel(backbone, "cosine", prediction_type="epsilon",
                           weighting="min_snr", gamma=5.0,
                           label_dropout=0.15 if backbone.conditioning else 0.0,
                           ema_decay=0.9999, seed=0)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4, beta_1=0.99, beta_2=0.99,
                                                   weight_decay=0.03))
    return model


def _jax_steps(model, batch):
    """The compiled train step (state donated, as Keras does), XLA's memory analysis of
    it, and a function running one step."""
    import jax

    from jax_gap import jax_state

    state = [jax_state(model, batch)]
    compiled = jax.jit(lambda s, d: model.train_step(s, d), donate_argnums=0).lower(
        state[0], batch).compile()
    analysis = compiled.memory_analysis()
    memory = {
        "xla_temp_mib": analysis.temp_size_in_bytes / 2**20,
        "xla_argument_mib": analysis.argument_size_in_bytes / 2**20,
        "xla_output_mib": analysis.output_size_in_bytes / 2**20,
    }

    def step():
        logs, state[0] = compiled(state[0], batch)
        return float(logs["loss"])

    return step, memory


def child(args):
    import keras

    backend = keras.backend.backend()
    load_before = os.getloadavg()
    model = build_model(args.backbone, args.backbone_args, args.checkpointing)
    from throughput import example_batch

    batch = example_batch(model.backbone, args.batch_size)
    rss_before = _common.rss_mb("VmRSS")
    memory = {}
    if backend == "jax":
        step, memory = _jax_steps(model, batch)
    else:
        def step():
            return float(model.train_on_batch(batch, return_dict=True)["loss"])
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        losses.append(step())
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = _common.rss_mb("VmHWM")
    return {
        "backend": backend,
        "gradient_checkpointing": args.checkpointing,
        "params": int(model.backbone.count_params()),
        "step_ms": 1e3 * statistics.median(times),
        "step_ms_all": [1e3 * t for t in times],
        "losses": losses,
        "peak_rss_mib": peak,
        "rss_before_first_step_mib": rss_before,
        "peak_rss_growth_mib": peak - rss_before,
        "device_peak_mib": _common.device_peak_mb(backend),
        **memory,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def run(args):
    report = {
        "backbone": args.backbone,
        "backbone_args": args.backbone_args,
        "batch_size": args.batch_size,
        "steps_timed": args.steps,
        "warmup_steps": args.warmup,
        "note": "one process per (backend, setting); step times from separate processes are "
        "comparable only on a quiet machine (load averages below). xla_temp_mib: XLA's "
        "temporary buffers of the compiled JAX step (activations + workspace).",
        "backends": {},
    }
    common = ["--batch-size", str(args.batch_size), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--backbone", args.backbone,
              "--backbone-args", json.dumps(args.backbone_args or {})]
    for backend in args.backends:
        rows = {}
        for setting in (False, True):
            print(f"[{backend}] {args.backbone}, gradient_checkpointing={setting} ...",
                  flush=True)
            rows["on" if setting else "off"] = _common.run_child(
                __file__, backend, ["--child", *common, "--checkpointing", str(int(setting))],
                ROOT)
        off, on = rows["off"], rows["on"]
        summary = {
            "step_time_ratio_on_over_off": on["step_ms"] / off["step_ms"],
            "peak_rss_growth_ratio_on_over_off": (
                on["peak_rss_growth_mib"] / off["peak_rss_growth_mib"]
                if off["peak_rss_growth_mib"] > 0 else None),
        }
        if "xla_temp_mib" in off:
            summary["xla_temp_ratio_on_over_off"] = on["xla_temp_mib"] / off["xla_temp_mib"]
        report["backends"][backend] = {"device": _common.device_description(backend),
                                       "off": off, "on": on, "summary": summary}
        print(f"  {json.dumps(summary)}", flush=True)
    name = f"remat_{args.backbone}" + ("_quick" if args.quick else "")
    _common.write_report(os.path.join(args.output_dir, name + ".json"), report)
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="vit_xl_2_in256")
    parser.add_argument("--backbone-args", type=json.loads, default=None,
                        help='JSON overrides of the preset, e.g. \'{"depth": 4}\'')
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="one backend (default: both)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: a 2-block ViT of width 64 on 8x8x4, batch 2, "
                        "one step")
    parser.add_argument("--output-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", type=int, choices=(0, 1), default=0,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.quick:
        args.backbone_args = {**QUICK_ARGS, **(args.backbone_args or {})}
        args.batch_size, args.steps, args.warmup = 2, 1, 0
    args.checkpointing = bool(args.checkpointing)
    args.backends = [args.backend] if args.backend else list(BACKENDS)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        import keras_minsnr  # noqa: F401 - on JAX it sets the XLA:CPU flag before JAX starts

        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
