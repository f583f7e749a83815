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

Devices: the paper trained on 8 GPUs x 32 images. The defaults expect the same: the
global batch of 256 split data-parallel over every device (``distribution:
data_parallel``, ``mesh: null`` = all devices on the data axis, ``grad_accum: 1``), 32
per device on 8 devices, about 22 GiB per device with ``--set
mixed_precision=mixed_bfloat16`` (docs/scaling.md, memory plan; about twice the
activations in float32). On fewer devices keep 32 per device and accumulate the rest,
so every update still averages 256 images (``batch_size`` is the micro-batch over all
devices; the effective batch is ``grad_accum x batch_size``)::

    8 devices, one host (the paper)       (the defaults)
    8 devices on 2 hosts (TPU v4-16)      --multihost
    4 devices                             --set batch_size=128 --grad-accum 2
    2 devices                             --set batch_size=64 --grad-accum 4
    1 device                              --set batch_size=32 --grad-accum 8

``--steps`` and every other step count are optimizer updates, whatever ``grad_accum``
is. On TensorFlow ``grad_accum`` > 1 needs ``--distribution none`` (one device): use
KERAS_BACKEND=jax to accumulate on several. docs/scaling.md has the full multi-GPU,
TPU pod and multi-host commands.
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
    # The paper's global batch of 256 on 8 data-parallel devices (32 each); see above
    # for fewer devices.
    "batch_size": 256,
    "grad_accum": 1,
    "distribution": "data_parallel",
    "mesh": None,
}

if __name__ == "__main__":
    run_recipe("imagenet256_vit_xl2")
