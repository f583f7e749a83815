"""Draws every loss weighting against log-SNR for the three targets (docs/weights.png).

    python docs/plot_weights.py
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import keras_minsnr as kms  # noqa: E402

TITLES = {"epsilon": "ε target", "sample": "x₀ target", "v_prediction": "v target"}


def main(path=os.path.join(os.path.dirname(__file__), "weights.png"), gamma=5.0):
    schedule = kms.NoiseSchedule("cosine", num_timesteps=1000)
    # Drop the last step (SNR ~ 1e-9) so the axis shows the range training actually uses.
    t = np.arange(schedule.num_timesteps - 1)
    snr = schedule.snr(t)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharex=True)
    for ax, target in zip(axes, kms.PREDICTION_TYPES):
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
        ax.set_xlabel("log SNR(t)   (cosine schedule, T = 1000; noisy ← → clean)")
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
