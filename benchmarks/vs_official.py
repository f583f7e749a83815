"""One training step of the paper's own PyTorch code vs this library, side by side.

The official repository (``TiankaiHang/Min-SNR-Diffusion-Training``) is read from a
checkout the user gives (``--official PATH``; nothing is downloaded); torch comes from the
``official`` extra. Its ``guided_diffusion/vision_transformer.py`` imports three helpers
from ``timm``, which this script provides as a minimal stand-in (`install_timm_stand_in`),
so timm is not needed.

Both sides train the same task: ViT-B/2 (the official ``vit_base_patch2_32``, 89.1M
parameters, vs ``vit_b_2_in256``, 86.8M; the difference is the official 4000-row timestep
table), batch ``--batch-size`` of 32×32×4 latents, class-conditional, label drop 0.15,
cosine schedule, Min-SNR-5 with an x₀ target, AdamW (1e-4, β = (0.99, 0.99), weight decay
0.03; ours is the run's `keras_minsnr.optimizers.AdamW`) and an EMA of the weights (0.9999)
updated after every step. The official step is its own code:
`GaussianDiffusion.training_losses` with ``mse_loss_weight_type="min_snr_5"``,
``torch.optim.AdamW`` and `guided_diffusion.nn.update_ema`, as its trainer calls them. Ours
is `DiffusionModel.train_on_batch`.

One child process per (backend, precision) (Keras fixes its backend at import) holds both
models and alternates one step of each (the order flipping every pair), so a shared
machine's load hits both alike; it reports medians. Precisions: ``float32``, and
``bfloat16`` = the official step under ``torch.autocast(device, dtype=torch.bfloat16)``
vs ours under the ``mixed_bfloat16`` policy. Each child also times a ``--matmul``² matmul
in torch and in the backend at its precision: the machine's rates the steps are measured
against. On a GPU (torch on ``cuda``, the backend on its GPU) the steps run there
unchanged and the report adds the MFU against the device's bfloat16 data-sheet peak
(benchmarks/flops.py). The JSON holds the machine, the versions and the load averages
before and after each child.

Usage::

    python benchmarks/vs_official.py --official /path/to/Min-SNR-Diffusion-Training
    python benchmarks/vs_official.py --official PATH --backend jax --precision float32
    python benchmarks/vs_official.py --official PATH --quick   # a tiny ViT, one step
    # where a full-size step takes too long (bf16 on a CPU without bf16 kernels):
    python benchmarks/vs_official.py --official PATH --width 256 --depth 2 --matmul 512

Without ``--official`` only our side is timed; an ``--official`` path without the
official ViT, or without torch installed, is refused (exit 2). Writes
``benchmarks/results/vs_official[_quick|_wW_dD].json`` (``--output-dir``).
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

import _common  # noqa: E402

BACKENDS = ("jax", "tensorflow")
PRECISIONS = ("float32", "bfloat16")
# The task, as in the official configs/in256/vit-b_*_pred_x0__min_snr_5_*.sh.
VIT_B = {"image_size": 32, "channels": 4, "hidden_size": 768, "depth": 12, "num_heads": 12,
         "num_classes": 1000}
QUICK = {"image_size": 8, "channels": 4, "hidden_size": 64, "depth": 2, "num_heads": 2,
         "num_classes": 10}
LEARNING_RATE, BETAS, WEIGHT_DECAY = 1e-4, (0.99, 0.99), 0.03
EMA_DECAY, LABEL_DROPOUT, GAMMA, TIMESTEPS = 0.9999, 0.15, 5.0, 1000


# -- the official side (torch) ------------------------------------------------------------

# torch imports triton when it is installed (the default Linux wheels bring it); loading
# triton's native module in a process that has loaded TensorFlow crashed it (torch
# 2.14.1+cu130, TensorFlow 2.21: a segfault in triton/knobs.py). Neither side compiles
# with triton here, so torch is told it is absent.
sys.modules.setdefault("triton", None)


def install_timm_stand_in():
    """``timm.models.layers.{drop_path, to_2tuple, trunc_normal_}`` and
    ``timm.models.registry.register_model``: all the official ViT imports from timm."""
    import torch

    def to_2tuple(value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value, value)

    def drop_path(x, drop_prob=0.0, training=False):
        if drop_prob == 0.0 or not training:
            return x
        keep = 1.0 - drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
        return torch.nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)

    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    registry = types.ModuleType("timm.models.registry")
    layers.drop_path, layers.to_2tuple, layers.trunc_normal_ = drop_path, to_2tuple, trunc_normal_
    registry.register_model = lambda fn: fn
    timm.models, models.layers, models.registry = models, layers, registry
    for name, module in (("timm", timm), ("timm.models", models),
                         ("timm.models.layers", layers), ("timm.models.registry", registry)):
        sys.modules.setdefault(name, module)


def official_available(official_dir):
    """None when the official side can run, else why not (one line)."""
    if not official_dir:
        return "no --official checkout given"
    if not os.path.isfile(os.path.join(official_dir, "guided_diffusion",
                                       "vision_transformer.py")):
        return f"{official_dir} has no guided_diffusion/vision_transformer.py"
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed (pip install keras-minsnr[official])"
    return None


class OfficialStep:
    """The official model, diffusion loss, AdamW and EMA; ``step(batch)`` trains once."""

    def __init__(self, official_dir, task, precision, device):
        import torch

        install_timm_stand_in()
        if official_dir not in sys.path:
            sys.path.insert(0, official_dir)
        from guided_diffusion import gaussian_diffusion as gd
        from guided_diffusion import nn as official_nn
        from guided_diffusion.vision_transformer import VisionTransformer

        torch.manual_seed(0)
        # vit_base_patch2_32's arguments (its factory fixes the width at 768).
        self.model = VisionTransformer(
            img_size=task["image_size"], patch_size=2, in_chans=task["channels"],
            embed_dim=task["hidden_size"], depth=task["depth"], num_heads=task["num_heads"],
            mlp_ratio=4, qkv_bias=True, norm_layer=_layer_norm(1e-6),
            num_classes=task["num_classes"], use_fp16=False, drop_label_prob=LABEL_DROPOUT,
        ).to(device)
        self.model.train()
        self.diffusion = gd.GaussianDiffusion(
            betas=gd.get_named_beta_schedule("cosine", TIMESTEPS),
            model_mean_type=gd.ModelMeanType.START_X,
            model_var_type=gd.ModelVarType.FIXED_LARGE,
            loss_type=gd.LossType.MSE,
            mse_loss_weight_type=f"min_snr_{GAMMA:g}",
        )
        params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=BETAS,
                                           weight_decay=WEIGHT_DECAY)
        self.ema = [p.detach().clone() for p in params]
        self.update_ema = official_nn.update_ema
        self.params = params
        self.precision, self.device = precision, device
        self.num_params = sum(p.numel() for p in params)

    def step(self, images, labels):
        import torch

        t = torch.randint(0, TIMESTEPS, (images.shape[0],), device=self.device)
        autocast = torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16,
                                  enabled=self.precision == "bfloat16")
        with autocast:
            terms = self.diffusion.training_losses(self.model, images, t,
                                                   model_kwargs={"y": labels})
            loss = terms["loss"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.update_ema(self.ema, self.params, rate=EMA_DECAY)
        return float(loss.detach())  # waits for the device


def _layer_norm(eps):
    import functools

    import torch

    return functools.partial(torch.nn.LayerNorm, eps=eps)


# -- our side -----------------------------------------------------------------------------


def build_ours(task, precision):
    import keras

    from keras_minsnr import backbones
    from keras_minsnr.diffusion_model import DiffusionModel
    from keras_minsnr.optimizers import AdamW

    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(
        "mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        keras.utils.set_random_seed(0)
        backbone = backbones.get(
            "vit_b_2_in256", image_shape=(task["image_size"], task["image_size"],
                                          task["channels"]),
            hidden_size=task["hidden_size"], depth=task["depth"],
            num_heads=task["num_heads"], num_classes=task["num_classes"])
        model = DiffusionModel(backbone, "cosine", prediction_type="sample",
                               weighting="min_snr", gamma=GAMMA, label_dropout=LABEL_DROPOUT,
                               ema_decay=EMA_DECAY, seed=0)
        model.compile(optimizer=AdamW(
            LEARNING_RATE, beta_1=BETAS[0], beta_2=BETAS[1], weight_decay=WEIGHT_DECAY))
    finally:
        keras.mixed_precision.set_dtype_policy(previous)
    return model


# -- the machine ---------------------------------------------------------------------------


def _best_seconds(run, repeats):
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rates(size, device, with_torch, precisions=PRECISIONS):
    """GFLOP/s of a ``size``² matmul in torch and in this backend, at each precision.

    A child times only its own precision: without native bf16 (no AVX-512-BF16 or AMX) a
    4096² bfloat16 matmul takes minutes on a small CPU.
    """
    import keras
    from keras import ops

    rates = {}
    flop = 2 * size**3 / 1e9
    if with_torch:
        import torch

        for dtype in precisions:
            a = torch.ones((size, size), dtype=getattr(torch, dtype), device=device) / size
            sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
            (a @ a).sum().item()
            rates[f"torch_{dtype}"] = flop / _best_seconds(lambda: ((a @ a), sync()), 3)
    backend = keras.backend.backend()
    for dtype in precisions:
        a = ops.ones((size, size), dtype=dtype) / size
        if backend == "jax":
            import jax

            matmul = jax.jit(lambda x: x @ x)
            matmul(a).block_until_ready()
            seconds = _best_seconds(lambda: matmul(a).block_until_ready(), 3)
        else:
            import tensorflow as tf

            matmul = tf.function(lambda x: tf.matmul(x, x), jit_compile=False)
            matmul(a).numpy()
            seconds = _best_seconds(lambda: matmul(a).numpy(), 3)
        rates[f"{backend}_{dtype}"] = flop / seconds
    return rates


def machine():
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = [line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("model name")]
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                      if line.startswith("flags")), [])
        info["cpu"] = model[0] if model else None
        info["cpu_flags_of_note"] = sorted(f for f in flags if f.startswith(("avx512", "amx")))
    except OSError:
        pass
    return info


# -- one child: both sides, one backend, one precision --------------------------------------


def child(args):
    # First, as a user would: it sets the XLA:CPU flag before JAX starts and TensorFlow's
    # oneDNN default before TensorFlow starts (keras_minsnr.xla_flags, .tf_onednn).
    import keras_minsnr  # noqa: F401

    import keras
    import numpy as np

    backend = keras.backend.backend()
    load_before = os.getloadavg()
    task = task_of(args)
    gpu = _common.gpu_name(backend)
    why_not = official_available(args.official)
    official = None
    if why_not is None:
        import torch

        device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        official = OfficialStep(args.official, task, args.precision, device)
    ours = build_ours(task, args.precision)
    rng = np.random.default_rng(0)
    shape = (args.batch_size, task["image_size"], task["image_size"], task["channels"])
    images = rng.normal(size=shape).astype("float32")
    labels = rng.integers(0, task["num_classes"], args.batch_size).astype("int32")
    batch = {"images": images, "labels": labels}
    sides = {"ours": lambda: float(ours.train_on_batch(batch, return_dict=True)["loss"])}
    if official is not None:
        import torch

        nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(official.device)
        y = torch.from_numpy(labels.astype("int64")).to(official.device)
        sides["official"] = lambda: official.step(nchw, y)
    order = list(sides)
    times = {name: [] for name in order}
    losses = {name: [] for name in order}
    for i in range(args.warmup + args.steps):
        for name in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            losses[name].append(sides[name]())
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    result = {
        "backend": backend,
        "precision": args.precision,
        "ours": "vit_b_2_in256" + (" (quick size)" if args.quick else
                                   " (reduced size)" if task != VIT_B else ""),
        "ours_params": int(ours.backbone.count_params()),
        "official_params": official.num_params if official else None,
        "official_skipped": why_not,
        "device": gpu or "CPU",
        "step_s": {name: statistics.median(t) for name, t in times.items()},
        "step_s_all": times,
        "losses": losses,
        "load_average_before": load_before,
    }
    if backend == "tensorflow":
        from keras_minsnr import tf_onednn

        result["tensorflow_onednn"] = tf_onednn.is_enabled()
    if official is not None:
        # > 1: ours is faster. The pairs share the machine's load at that moment.
        result["speed_ours_over_official"] = statistics.median(
            o / u for o, u in zip(times["official"], times["ours"]))
        import torch

        result["torch"] = torch.__version__
        result["torch_threads"] = torch.get_num_threads()
    if backend == "jax":
        import flops
        from throughput import example_batch

        inputs = example_batch(ours.backbone, args.batch_size)
        forward, _ = flops.backbone_forward_flops(ours.backbone, {
            "x": inputs["images"], "t": np.zeros(args.batch_size, "int32"),
            "y": inputs["labels"]})
        result["model_flops_per_step"] = flops.TRAIN_STEP_FORWARDS * forward
    result["matmul_gflops"] = matmul_rates(args.matmul, "cuda" if official is not None and
                                           official.device == "cuda" else "cpu",
                                           official is not None, (args.precision,))
    result["load_average_after"] = os.getloadavg()
    return result


def add_rates(row, model_flops):
    """Achieved TFLOP/s per side, as a fraction of the matmul rate of its own framework
    at the same precision, and the MFU against the GPU's bf16 peak."""
    import flops

    if not model_flops:
        return
    peak = flops.peak_tflops(row["device"], "bfloat16")
    backend_key = f"{row['backend']}_{row['precision']}"
    for side, seconds in row["step_s"].items():
        tflops = model_flops / seconds / 1e12
        matmul_key = f"torch_{row['precision']}" if side == "official" else backend_key
        matmul = row["matmul_gflops"].get(matmul_key)
        row.setdefault("rates", {})[side] = {
            "tflops": tflops,
            "fraction_of_matmul_rate": tflops * 1e3 / matmul if matmul else None,
            "mfu_vs_bf16_peak": tflops / peak if peak else None,
        }


def run(args):
    report = {
        "what": __doc__.split("\n")[0],
        "task": task_of(args),
        "batch_size": args.batch_size,
        "steps_timed": args.steps,
        "warmup_steps": args.warmup,
        "official": args.official,
        "machine": machine(),
        "rows": [],
    }
    common = ["--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--matmul", str(args.matmul)]
    if args.official:
        common += ["--official", args.official]
    if args.quick:
        common.append("--quick")
    for name in ("width", "depth"):
        if getattr(args, name) is not None:
            common += [f"--{name}", str(getattr(args, name))]
    model_flops = None
    for backend in args.backends:
        for precision in args.precisions:
            print(f"[{backend}] {precision}: alternating steps ...", flush=True)
            row = _common.run_child(__file__, backend,
                                    ["--child", "--precision", precision, *common], ROOT)
            model_flops = row.get("model_flops_per_step") or model_flops
            report["rows"].append(row)
            print("  " + json.dumps({k: row.get(k) for k in (
                "step_s", "speed_ours_over_official", "official_skipped")}), flush=True)
            # Written after every child: a full-size run takes hours on a small CPU, and a
            # stopped one keeps the rows it finished.
            report["model_flops_per_step"] = model_flops
            for done in report["rows"]:
                add_rates(done, model_flops)
            name = "vs_official" + report_suffix(args)
            _common.write_report(os.path.join(args.output_dir, name + ".json"), report)
    return report


def task_of(args):
    """The task: ViT-B/2, the quick one, or ViT-B/2 narrowed or made shallower (for a CPU
    where a full-size step takes too long, e.g. bfloat16 without native bf16 kernels)."""
    if args.quick:
        return QUICK
    task = dict(VIT_B)
    if args.width is not None:
        task["hidden_size"], task["num_heads"] = args.width, max(1, args.width // 64)
    if args.depth is not None:
        task["depth"] = args.depth
    return task


def report_suffix(args):
    if args.quick:
        return "_quick"
    task = task_of(args)
    if task == VIT_B:
        return ""
    return f"_w{task['hidden_size']}_d{task['depth']}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", default=None,
                        help="a checkout of TiankaiHang/Min-SNR-Diffusion-Training")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="one backend (default: both)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="one precision (default: both)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps per side first (torch's oneDNN kernels on CPU "
                        "settle over about three steps)")
    parser.add_argument("--matmul", type=int, default=4096, help="side of the timed matmul")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: a 2-block ViT of width 64 on 8x8x4, batch 2, "
                        "one timed step, a 256² matmul")
    parser.add_argument("--width", type=int, default=None,
                        help="a narrower ViT (heads = width / 64) where full size is too slow")
    parser.add_argument("--depth", type=int, default=None, help="fewer blocks (default 12)")
    parser.add_argument("--output-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "matmul", "width", "depth"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.official is not None:
        args.official = os.path.abspath(args.official)
        if not args.child and official_available(args.official):
            parser.error(f"--official: {official_available(args.official)}")
    if args.quick:
        args.batch_size, args.steps, args.matmul = 2, 1, 256
    args.backends = [args.backend] if args.backend else list(BACKENDS)
    args.precisions = [args.precision] if args.precision else list(PRECISIONS)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        # On a GPU torch shares the device with the backend: neither JAX nor TensorFlow
        # may take all of its memory up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
