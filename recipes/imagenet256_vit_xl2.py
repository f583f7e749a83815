"""Class-conditional ImageNet 256x256 in latent space with the in-context ViT-XL/2, Min-SNR-5.

Paper source: Hang et al. 2023 (arXiv 2303.09556), the ImageNet 256x256 system-level
table: ViT-XL/2 (28 layers, width 1152, 16 heads, patch 2; 451M parameters) on 32x32x4
SD-VAE latents x 0.18215, FID 2.06 with classifier-free guidance 1.5 and the EDM Heun
sampler at 50 steps (official `configs/in256/inference.sh`: `vit_xl_patch2_32`, depth 28,
`PRED_X0=True`, so the x0 target). Training settings as for ViT-B/2: cosine schedule,
T=1000, Min-SNR γ=5, AdamW 1e-4 with β=(0.99, 0.99), weight decay 0.03, EMA 0.9999,
label drop 0.15, batch 256. Steps: our default (400k); the FID-2.06 model trained much
longer (see the paper's table).

Two steps: encode once, then train (see `recipes/imagenet256_vit_b2.py`; both recipes
can share one cache)::

    keras-minsnr train imagenet256_vit_xl2 --output-dir runs/in256_xl2 \\
        --set data=/data/latents/imagenet256 \\
        --set encode.image_encoder_weights=/weights/vae_encoder.h5
"""

import copy

from ._main import run_recipe
from .imagenet256_vit_b2 import RECIPE as VIT_B2_RECIPE

# Same data, cache, encoder, target, weighting, CFG and sampler as ViT-B/2: only the
# backbone differs.
RECIPE = {
    **copy.deepcopy(VIT_B2_RECIPE),
    "description": "Class-conditional in-context ViT-XL/2 (451M) on ImageNet-256 SD-VAE "
    "latents (32x32x4 x 0.18215), x0 target, CFG 1.5.",
    "paper_source": "Min-SNR-γ (Hang et al. 2023), ImageNet 256x256 table, ViT-XL/2, FID "
    "2.06 (CFG 1.5, EDM Heun 50 steps; official configs/in256/inference.sh, x0 target).",
    "backbone": "vit_xl_2_in256",
}

if __name__ == "__main__":
    run_recipe("imagenet256_vit_xl2")
