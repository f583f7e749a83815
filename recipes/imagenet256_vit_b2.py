"""Class-conditional ImageNet 256x256 in latent space with the in-context ViT-B/2, Min-SNR-5.

Paper source: Hang et al. 2023 (arXiv 2303.09556), the ImageNet 256x256 table (ViT-B/2
rows and the convergence figure comparing weightings) and the official config
`configs/in256/vit-b_layer12_lr1e-4_099_099_pred_x0__min_snr_5__fp16_bs8x32.sh`:
`vit_base_patch2_32`, depth 12, 32x32x4 SD-VAE latents x 0.18215, cosine schedule,
T=1000, x0 target (`predict_xstart True`), `min_snr_5`, AdamW 1e-4 with β=(0.99, 0.99),
weight decay 0.03, label drop 0.15, batch 8x32 = 256, fp16 (here: `--set
mixed_precision=mixed_bfloat16` on accelerators), EMA 0.9999. Steps: our default
(400k). Samples: EDM Heun, CFG 1.5.

Two steps: encode once, then train. ``data`` names the latent cache; when it holds no
cache yet, `train` encodes ``encode.source`` into it with the Stable Diffusion VAE
encoder (KerasCV's `vae_encoder.h5`, a local file) and then trains; later runs reuse it::

    keras-minsnr train imagenet256_vit_b2 --output-dir runs/in256_b2 \\
        --set data=/data/latents/imagenet256 \\
        --set encode.image_encoder_weights=/weights/vae_encoder.h5 \\
        --set encode.source_args.data_dir=~/tensorflow_datasets \\
        --set encode.source_args.manual_dir=/data/imagenet

(add ``--set encode.source_args.download=true`` once to let TFDS extract the manual
tars), or write the cache yourself with `keras_minsnr.data.cache_latents` and pass
``--set data=CACHE_DIR``.

Devices: the paper's batch of 256 on 8 GPUs, 32 each. The defaults expect that:
``distribution: data_parallel`` over every device (``mesh: null``), ``grad_accum: 1``;
about 5.6 GiB per device in ``mixed_bfloat16`` (``python benchmarks/memory_plan.py
vit_b_2_in256 --devices 8 --batch 256 --precision bf16``), so even one 40 GB device
holds all 256 (about 34 GiB); on smaller ones keep the effective batch at 256 with
e.g. ``--set batch_size=64 --grad-accum 4`` (JAX; on TensorFlow accumulation needs
``--distribution none``). See docs/scaling.md.
"""

from ._main import run_recipe

RECIPE = {
    "description": "Class-conditional in-context ViT-B/2 on ImageNet-256 SD-VAE latents "
    "(32x32x4 x 0.18215), x0 target, CFG.",
    "paper_source": "Min-SNR-γ (Hang et al. 2023), ImageNet 256x256 table, ViT-B/2; "
    "official configs/in256/vit-b_layer12_lr1e-4_099_099_pred_x0__min_snr_5__fp16_"
    "bs8x32.sh (x0 target, batch 256).",
    "data": "latents/imagenet256_sd_vae",
    "encode": {
        "source": "imagenet2012",
        "source_args": {"split": "train", "image_size": 256, "download": False},
        "version": "v1",
        "image_encoder_weights": "weights/vae_encoder.h5",
        "batch_size": 32,
    },
    "batch_size": 256,
    # The paper's 8 x 32, data-parallel (see the docstring for fewer devices).
    "grad_accum": 1,
    "distribution": "data_parallel",
    "backbone": "vit_b_2_in256",
    "prediction_type": "sample",
    "weighting": "min_snr",
    "gamma": 5.0,
    "label_dropout": 0.15,
    "steps": 400_000,
    "steps_per_epoch": 5000,
    "sample_every_epochs": 4,
    "num_samples": 64,
    "sampler": "edm_heun",
    "sample_steps": 50,
    "guidance_scale": 1.5,
    # Latents are not confined to [-1, 1].
    "clip_denoised": False,
}

if __name__ == "__main__":
    run_recipe("imagenet256_vit_b2")
