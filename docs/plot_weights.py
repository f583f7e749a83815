"""Draws every loss weighting against log-SNR for the three targets and the rectified
flow's velocity (docs/weights.png). Density × weight: docs/plot_effective_weights.py.

    python docs/plot_weights.py
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import keras_minsnr as kms  # noqa: E402

TITLES = {
    "epsilon": "ε target",
    "sample": "x₀ target",
    "v_prediction": "v target",
    "flow": "rectified flow, velocity target u = ε − x₀",
}


def main(path=os.path.join(os.path.dirname(__file__), "weights.png"), gamma=5.0):
    cosine = kms.NoiseSchedule("cosine", num_timesteps=1000)
    flow = kms.FlowMatchingSchedule(num_timesteps=1000)
    # Drop the last step (SNR ~ 1e-9, 0 for the flow) so the axis shows the range
    # training actually uses.
    t = np.arange(cosine.num_timesteps - 1)
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.8), sharex=True)
    for ax, target in zip(axes, (*kms.PREDICTION_TYPES, "flow")):
        snr = (flow if target == "flow" else cosine).snr(t)
        for i, strategy in enumerate(kms.STRATEGIES):
            weight = kms.loss_weight(snr, strategy, target, gamma=gamma)
            # Several curves coincide in some spaces (e.g. constant and snr for ε), so
            # dashes keep each visible.
            style = dict(lw=1.6, ls=["-", "--", ":", "-."][i % 4])
            if strategy == "min_snr":
                style = dict(lw=3.0, color="black")
            ax.plot(np.log(snr), weight, label=strategy, **style)
        ax.set_yscale("log")
        ax.set_ylim(1e-4, 1e4)
        name = "flow schedule" if target == "flow" else "cosine schedule"
        ax.set_xlabel(f"log SNR(t)   ({name}, T = 1000; noisy ← → clean)")
        ax.set_title(TITLES[target])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss weight in the target's space")
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), title=f"γ = {gamma:g}")
    fig.suptitle("Loss weightings: Min-SNR-γ (black) caps the weight of easy, low-noise steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
