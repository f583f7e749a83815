"""The embedded default: class-conditional Min-SNR-5 training on scikit-learn's 8x8 digits.

Runs offline in a few minutes on a laptop CPU (`make demo`); samples are one row per digit.

    python -m recipes.digits --output-dir runs/digits [--steps N] [--set key=value ...]
"""

from ._main import run_recipe

RECIPE = {
    "description": "Class-conditional residual MLP on the 8x8 scikit-learn digits.",
    "paper_source": "Min-SNR-γ (Hang et al. 2023) weighting, cosine schedule, ε target; "
    "small-scale stand-in for the paper's pixel-space experiments.",
    "data": "digits",
    "image_size": 8,
    "batch_size": 128,
    # An MLP over the 64 pixels: minutes on a CPU where a UNet of the same quality
    # needs an hour (see docs/backbones.md for the step times).
    "backbone": "mlp_digits",
    "prediction_type": "epsilon",
    "weighting": "min_snr",
    "gamma": 5.0,
    "label_dropout": 0.15,
    # A short run needs a faster EMA and a larger step than the paper's ImageNet setting.
    "ema_decay": 0.999,
    "learning_rate": 1e-3,
    "beta_1": 0.9,
    "beta_2": 0.99,
    "weight_decay": 0.03,
    "warmup_steps": 100,
    "steps": 6000,
    "steps_per_epoch": 1000,
    "sample_every_epochs": 2,
    "num_samples": 100,
    "sampler": "ddim",
    "sample_steps": 50,
    "guidance_scale": 2.0,
}

if __name__ == "__main__":
    run_recipe("digits")
