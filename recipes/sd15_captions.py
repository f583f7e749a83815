"""Min-SNR-5 fine-tuning of Stable Diffusion 1.5 on a caption folder.

Paper source: Hang et al. 2023 (arXiv 2303.09556) give the weighting; the fine-tuning
settings follow diffengine's `configs/min_snr_loss/stable_diffusion_v15_snr_pokemon_blip.py`
(okotaku/diffengine, the common Min-SNR text-to-image setup): SD 1.5 UNet on the
`scaled_linear` schedule (T=1000) with the ε target, `SNRL2Loss(snr_gamma=5.0)`, AdamW
lr 1e-5, weight decay 1e-2, gradient clipping at norm 1.0, batch size 4, 50 epochs of
the 833 Pokémon BLIP captions at 512x512 (≈ 10,400 steps), no EMA, frozen VAE and text
encoder. Differences: the images are encoded once into a latent cache (so diffengine's
random flips and crops are not redrawn each epoch) and Adam's betas are PyTorch's
defaults (0.9, 0.999) as in diffengine, not the paper's (0.99, 0.99).

Data: a caption folder — images plus `metadata.jsonl` with one
`{"file_name": ..., "text": ...}` per line. Weights: KerasCV's SD 1.5 files, local
(nothing is downloaded; a missing file's error names it and KerasCV's URL)::

    keras-minsnr train sd15_captions --output-dir runs/sd15 \\
        --set encode.source=/data/pokemon_blip \\
        --set data=/data/latents/pokemon_sd15 \\
        --set backbone_args.weights=/weights/kcv_diffusion_model.h5 \\
        --set encode.image_encoder_weights=/weights/vae_encoder.h5 \\
        --set encode.text_encoder_weights=/weights/kcv_encoder.h5 \\
        --set encode.vocabulary=/weights/bpe_simple_vocab_16e6.txt.gz

The first run encodes the images (VAE posterior mean x 0.18215), the captions (CLIP
text embeddings (77, 768) as the context) and the empty caption (the null context of
label dropout and guidance) into `data`; later runs reuse the cache.
Samples use the first cached captions. Add
`--set encode.decoder_weights=/weights/kcv_decoder.h5` (KerasCV's VAE decoder) to see them
decoded in `samples.png`; without it the grid shows the first three latent channels.
"""

from ._main import run_recipe

WEIGHTS_DIR = "weights/sd15"

RECIPE = {
    "description": "Stable Diffusion 1.5 UNet fine-tuned on a caption folder with "
    "Min-SNR-5 (ε target, scaled_linear), frozen VAE and CLIP text encoder.",
    "paper_source": "Min-SNR-γ (Hang et al. 2023) weighting; settings of diffengine "
    "configs/min_snr_loss/stable_diffusion_v15_snr_pokemon_blip.py (AdamW 1e-5, wd 1e-2, "
    "clip 1.0, batch 4, 50 epochs).",
    "data": "latents/sd15_captions",
    "encode": {
        "source": None,  # the caption folder: --set encode.source=PATH
        "source_args": {"image_size": 512},
        "version": "v1",
        "image_encoder_weights": f"{WEIGHTS_DIR}/vae_encoder.h5",
        "text_encoder_weights": f"{WEIGHTS_DIR}/kcv_encoder.h5",
        "vocabulary": f"{WEIGHTS_DIR}/bpe_simple_vocab_16e6.txt.gz",
        "batch_size": 4,
    },
    "batch_size": 4,
    "backbone": "sd15_unet",
    "backbone_args": {"weights": f"{WEIGHTS_DIR}/kcv_diffusion_model.h5"},
    "schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "weighting": "min_snr",
    "gamma": 5.0,
    # diffengine's config drops no captions. The null context is the cached embedding of
    # the empty caption, so `--set label_dropout=0.1` trains for classifier-free guidance.
    "label_dropout": 0.0,
    "ema_decay": 0.0,
    "learning_rate": 1e-5,
    "beta_1": 0.9,
    "beta_2": 0.999,
    "weight_decay": 1e-2,
    "clipnorm": 1.0,
    "steps": 10_400,
    "steps_per_epoch": 1000,
    "sample_every_epochs": 2,
    "num_samples": 4,
    "sampler": "ddim",
    "sample_steps": 25,
    "guidance_scale": 1.0,
    "clip_denoised": False,
}

if __name__ == "__main__":
    run_recipe("sd15_captions")
