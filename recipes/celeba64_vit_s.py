"""Unconditional CelebA 64x64 with a small in-context ViT (ViT-S/4) and Min-SNR-5.

Paper source: Hang et al. 2023 (arXiv 2303.09556), Sec. 4, the CelebA 64x64 experiment
(unconditional, ViT backbone, Min-SNR-5 vs. the constant/SNR/truncated-SNR baselines).
The official repository ships no CelebA config, so the width and depth here are the
U-ViT-S/4 sizes (patch 4, width 512, 13 blocks, 8 heads; Bao et al. 2023) that the
paper's CelebA table is compared against, with the paper's in-context conditioning
(timestep as an extra token). Data is centre-cropped and resized to 64x64 with random
flips (the paper follows ScoreSDE's CelebA processing). Batch size 128; steps: our
default of 500k (U-ViT's CelebA schedule) — check the paper's table before comparing FIDs.

Data: TFDS `celeb_a`, prepared in a TFDS data_dir (`tfds build celeb_a --data_dir DIR`
on a machine with internet), then::

    keras-minsnr train celeba64_vit_s --output-dir runs/celeba \\
        --set data_args.data_dir=~/tensorflow_datasets
"""

from ._main import run_recipe

RECIPE = {
    "description": "Unconditional in-context ViT-S/4 (512 wide, 13 blocks) on CelebA 64x64.",
    "paper_source": "Min-SNR-γ (Hang et al. 2023), Sec. 4 CelebA 64x64 (unconditional ViT); "
    "sizes from U-ViT-S/4 as the official repo has no CelebA config.",
    "data": "celeb_a",
    "data_args": {"split": "train", "random_flip": True},
    "image_size": 64,
    "batch_size": 128,
    "backbone": "vit_l_4_in64",
    "backbone_args": {
        "hidden_size": 512,
        "depth": 13,
        "num_heads": 8,
        "num_classes": None,
    },
    "prediction_type": "epsilon",
    "weighting": "min_snr",
    "gamma": 5.0,
    "label_dropout": 0.0,
    "steps": 500_000,
    "steps_per_epoch": 5000,
    "sample_every_epochs": 4,
    "sampler": "edm_heun",
    "sample_steps": 20,
    "guidance_scale": 1.0,
}

if __name__ == "__main__":
    run_recipe("celeba64_vit_s")
