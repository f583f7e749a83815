"""Unconditional CIFAR-10 (32x32) with the DDPM UNet and Min-SNR-5 weighting.

Paper source: the Min-SNR paper (Hang et al. 2023, arXiv 2303.09556) reports no CIFAR-10
run, so this recipe puts its training settings (cosine schedule, T=1000, ε target,
Min-SNR γ=5, AdamW 1e-4 with β=(0.99, 0.99), weight decay 0.03, EMA 0.9999) on the
DDPM CIFAR-10 setup (Ho et al. 2020, Sec. 4 and Appendix B): the 35.7M-parameter UNet
(`unet_cifar10`), batch size 128, 800k steps, random horizontal flips, no labels.

Data: TFDS `cifar10`, prepared in a TFDS data_dir (`tfds build cifar10 --data_dir DIR`
on a machine with internet), then::

    keras-minsnr train cifar10_unet --output-dir runs/cifar10 \\
        --set data_args.data_dir=~/tensorflow_datasets
    python -m recipes.cifar10_unet --output-dir runs/cifar10 --set data_args.data_dir=DIR
"""

from ._main import run_recipe

RECIPE = {
    "description": "Unconditional DDPM UNet (35.7M) on CIFAR-10 32x32, ε target, Min-SNR-5.",
    "paper_source": "Min-SNR-γ (Hang et al. 2023) training settings on the DDPM CIFAR-10 "
    "UNet and schedule of runs (Ho et al. 2020, Appendix B: batch 128, 800k steps); the "
    "Min-SNR paper itself has no CIFAR-10 table.",
    "data": "cifar10",
    # The labels are dropped: the UNet is unconditional (DDPM's CIFAR-10 model).
    "data_args": {"split": "train", "label_key": False, "random_flip": True},
    "batch_size": 128,
    "backbone": "unet_cifar10",
    "backbone_args": {"num_classes": None},
    "prediction_type": "epsilon",
    "weighting": "min_snr",
    "gamma": 5.0,
    "label_dropout": 0.0,
    "steps": 800_000,
    "steps_per_epoch": 5000,
    "sample_every_epochs": 4,
    "num_samples": 64,
    "sampler": "ddim",
    "sample_steps": 100,
    "guidance_scale": 1.0,
}

if __name__ == "__main__":
    run_recipe("cifar10_unet")
