"""Draws the effective weight, density × weight, of every strategy against log-SNR
for the rectified-flow and cosine schedules (docs/effective_weights.png).

    PYTHONPATH=. python docs/plot_effective_weights.py

The y axis is what the training loss puts on the x₀-space error ‖x̂₀ − x₀‖² per unit of
log SNR: (probability of the step / its width in log SNR) × (weight in the target's space)
× (the factor that turns the target's error into the x₀ error: 1/t² for the velocity,
SNR for ε). On this common footing every strategy except ``constant`` contributes its
own w₀(SNR) in both rows; what differs between schedules is the density.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import keras_minsnr as kms  # noqa: E402
from keras_minsnr.flow import FlowMatchingSchedule  # noqa: E402
from keras_minsnr.weighting import flow_weight  # noqa: E402
from keras_minsnr.timestep_sampling import TimestepSampling  # noqa: E402

DENSITIES = [
    ("uniform", {}),
    ("logit_normal", {"logit_mean": 0.0, "logit_std": 1.0}),
    ("mode", {"mode_scale": 1.29}),
    ("laplace", {"laplace_mu": 0.0, "laplace_b": 0.5}),
]


def effective_weights(schedule, target, sampling, strategy, gamma):
    """log SNR of the interior steps and their x₀-space effective weight per unit log SNR."""
    T = schedule.num_timesteps
    steps = np.arange(1, T - 1)  # the end cells reach ±∞ in log SNR: no finite width
    lam = schedule.log_snr(np.arange(T))
    width = 0.5 * (lam[steps - 1] - lam[steps + 1])
    density = sampling.probabilities(schedule)[steps] / width
    snr = schedule.snr(steps)
    if target == "flow":
        weight = flow_weight(snr, strategy, gamma=gamma) * (1.0 + np.sqrt(snr)) ** 2
    else:
        weight = kms.loss_weight(snr, strategy, target, gamma=gamma) * snr
    return lam[steps], density * weight


def main(path=os.path.join(os.path.dirname(__file__), "effective_weights.png"), gamma=5.0):
    rows = [
        (FlowMatchingSchedule(num_timesteps=1000), "flow", "rectified flow, velocity target"),
        (kms.NoiseSchedule("cosine", num_timesteps=1000), "epsilon", "cosine, ε target"),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(20, 8), sharex=True, sharey=True)
    for (schedule, target, row_title), row_axes in zip(rows, axes):
        for (kind, params), ax in zip(DENSITIES, row_axes):
            sampling = TimestepSampling(kind, **params)
            for i, strategy in enumerate(kms.STRATEGIES):
                lam, eff = effective_weights(schedule, target, sampling, strategy, gamma)
                style = dict(lw=1.5, ls=["-", "--", ":", "-."][i % 4])
                if strategy == "min_snr":
                    style = dict(lw=3.0, color="black")
                ax.plot(lam, eff, label=strategy, **style)
            ax.set_yscale("log")
            ax.set_ylim(1e-4, 1e3)
            ax.set_xlim(-15, 15)
            ax.grid(alpha=0.3)
            described = ", ".join(f"{k.split('_')[-1]}={v:g}" for k, v in params.items())
            ax.set_title(f"{row_title}\n{kind}{f' ({described})' if described else ''}")
        row_axes[0].set_ylabel("density × weight on ‖x̂₀ − x₀‖²\nper unit log SNR")
    for ax in axes[-1]:
        ax.set_xlabel("log SNR   (noisy ← → clean)")
    axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.02, 0.0), title=f"γ = {gamma:g}")
    fig.suptitle(
        "Effective weight = timestep density × loss weight (Min-SNR-γ in black), "
        "on the x₀ error so both schedules share one axis"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
