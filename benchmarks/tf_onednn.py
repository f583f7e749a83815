"""TensorFlow's oneDNN CPU kernels off and on: the train step of each backbone, A/B.

TensorFlow reads ``TF_ENABLE_ONEDNN_OPTS`` once, when it is imported, and by default turns
oneDNN on only on CPUs with AVX-512 VNNI/BF16 or AMX. `import keras_minsnr` turns it on
where TensorFlow left it off (`keras_minsnr.tf_onednn`); this benchmark measures what that
does, one child process per setting, the two settings alternated round by round, each
child timing every case (the variable set in a child's environment wins over the
library's default).

Cases (AdamW, Min-SNR-5, float32):

* ``vit_tiny_b128``: the evidence benchmark's in-context ViT (4 blocks of width 128, patch
  2, 8x8x1 digits, 10 classes), batch 128;
* ``dit_s_2``, ``unet_cifar10``: the presets at their own sizes, batch 8;
* ``vit_b_2_in256`` (``--large``): ViT-B/2, batch 8.

Usage::

    python benchmarks/tf_onednn.py                 # three cases, 2 rounds
    python benchmarks/tf_onednn.py --large --rounds 1

``speed_up`` is the median over rounds of each round's off/on ratio of median steps.
Writes ``benchmarks/results/tf_onednn.json``.
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
from throughput import example_batch  # noqa: E402

# label: (preset, overrides, batch size)
CASES = {
    "vit_tiny_b128": ("vit_b_2_in256", {"image_shape": (8, 8, 1), "patch_size": 2,
                                        "hidden_size": 128, "depth": 4, "num_heads": 4,
                                        "num_classes": 10}, 128),
    "dit_s_2": ("dit_s_2", {}, 8),
    "unet_cifar10": ("unet_cifar10", {}, 8),
    "vit_b_2_in256": ("vit_b_2_in256", {}, 8),
}
SMALL = ("vit_tiny_b128", "dit_s_2", "unet_cifar10")
QUICK = {"vit_tiny_b128": ("vit_b_2_in256", {"image_shape": (8, 8, 1), "patch_size": 2,
                                             "hidden_size": 32, "depth": 1, "num_heads": 2,
                                             "num_classes": 10}, 4)}


def child(labels, steps, warmup, quick):
    import keras

    from keras_minsnr import backbones
    from keras_minsnr import tf_onednn as library_onednn
    from keras_minsnr.diffusion_model import DiffusionModel
    from keras_minsnr.optimizers import AdamW

    cases = QUICK if quick else CASES
    out = {"onednn": library_onednn.is_enabled(), "step_s": {}}
    for label in labels:
        preset, overrides, batch_size = cases[label]
        keras.utils.set_random_seed(0)
        backbone = backbones.get(preset, **overrides)
        model = DiffusionModel(backbone, "cosine", prediction_type="epsilon",
                               weighting="min_snr", gamma=5.0, ema_decay=0.999, seed=0)
        model.compile(optimizer=AdamW(1e-4))
        batch = example_batch(backbone, batch_size)
        for _ in range(warmup + 1):
            model.train_on_batch(batch)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            model.train_on_batch(batch)
            times.append(time.perf_counter() - start)
        out["step_s"][label] = times
    return out


def run_child(setting, labels, args):
    arguments = ["--child", "--only", *labels, "--steps", str(args.steps), "--warmup",
                 str(args.warmup)] + (["--quick"] if args.quick else [])
    return _common.run_child(__file__, "tensorflow", arguments, ROOT,
                             env={"TF_ENABLE_ONEDNN_OPTS": setting})


def _rounds(children):
    """(off child, on child) of each round."""
    pairs = [children[i:i + 2] for i in range(0, len(children), 2)]
    return [sorted(pair, key=lambda c: c["setting"]) for pair in pairs]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="off/on child pairs")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--large", action="store_true", help="add ViT-B/2")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--quick", action="store_true", help="one tiny case, 1 round")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default=os.path.join(HERE, "results"))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.only, args.steps, args.warmup, args.quick)))
        return
    if args.quick:
        labels, args.rounds, args.steps, args.warmup = list(QUICK), 1, 1, 0
    else:
        labels = args.only or list(SMALL) + (["vit_b_2_in256"] if args.large else [])
    report = {"what": __doc__.splitlines()[0], "labels": labels, "steps": args.steps,
              "warmup": args.warmup, "rounds": args.rounds,
              "device": _common.device_description("tensorflow"),
              "load_average_before": os.getloadavg(), "children": []}
    for round_index in range(args.rounds):
        order = ("0", "1") if round_index % 2 == 0 else ("1", "0")
        for setting in order:
            print(f"round {round_index + 1}: TF_ENABLE_ONEDNN_OPTS={setting} ...", flush=True)
            result = run_child(setting, labels, args)
            if result["onednn"] != (setting == "1"):
                raise RuntimeError(f"TF_ENABLE_ONEDNN_OPTS={setting} but oneDNN is "
                                   f"{'on' if result['onednn'] else 'off'} in the child")
            report["children"].append({"setting": setting, **result})
    summary = {}
    for label in labels:
        medians = {}
        for setting in ("0", "1"):
            times = [t for c in report["children"] if c["setting"] == setting
                     for t in c["step_s"][label]]
            medians[setting] = statistics.median(times)
        # Each round's off/on pair ran back to back, so its ratio shares that moment's load.
        per_round = [statistics.median(off["step_s"][label]) / statistics.median(on["step_s"][label])
                     for off, on in _rounds(report["children"])]
        summary[label] = {"step_s_off": medians["0"], "step_s_on": medians["1"],
                          "speed_up_per_round": per_round,
                          "speed_up": statistics.median(per_round)}
        print(f"{label}: off {medians['0']:.4f} s, on {medians['1']:.4f} s, speed-up "
              f"{statistics.median(per_round):.3f} (rounds: "
              f"{', '.join(f'{r:.3f}' for r in per_round)})")
    report["summary"] = summary
    report["load_average_after"] = os.getloadavg()
    _common.write_report(os.path.join(args.output_dir, "tf_onednn.json"), report)


if __name__ == "__main__":
    main()
