"""Min-SNR-5 fine-tuning of Stable Diffusion 3 (KerasHub) on a caption folder.

Paper source: Hang et al. 2023 (arXiv 2303.09556) give the weighting, carried over to
rectified flow in velocity space as ``min((1 − t)², 5t²)`` (docs/flow_matching.md); SD3
itself (Esser et al. 2024) trains the MMDiT on the velocity ``ε − x₀`` with logit-normal
timesteps and a time shift of 3.0 (KerasHub's `FlowMatchEulerDiscreteScheduler`). The
optimiser settings are those of diffusers' `examples/dreambooth/train_dreambooth_sd3.py`
full fine-tuning defaults (AdamW betas (0.9, 0.999), weight decay 1e-4, gradient clipping
at 1.0) with a full-fine-tune learning rate of 1e-5, batch 4, and the SD 1.5 recipe's
length (≈ 50 epochs of 833 captions).

Data: a caption folder — images plus `metadata.jsonl` with one
`{"file_name": ..., "text": ...}` per line. Weights: a KerasHub SD3 preset, either a
local preset directory or a preset name already in the kagglehub cache; nothing is
downloaded unless `--set backbone_args.allow_download=true` (a preset that is not
available names itself and how to place it locally). Save it once where the network is
reachable with `keras_minsnr.backbones.sd3.download_preset("stable_diffusion_3_medium",
"/weights/stable_diffusion_3_medium")`, then::

    keras-minsnr train sd3_captions --output-dir runs/sd3 \\
        --set encode.source=/data/pokemon_blip \\
        --set data=/data/latents/pokemon_sd3 \\
        --set backbone_args.preset=/weights/stable_diffusion_3_medium

The first run encodes the images with the preset's VAE (SD3 latents, 16 channels, its
shift and scale applied), the captions with its CLIP-L/G (and T5) encoders into the packed
context + pooled condition, and the empty caption (the null condition of label dropout and
guidance) into `data`; later runs reuse the cache. Only the MMDiT trains. Samples use the
first cached captions and are decoded with the preset's VAE in `samples.png`.
"""

from ._main import run_recipe

RECIPE = {
    "description": "Stable Diffusion 3 medium MMDiT (KerasHub preset) fine-tuned on a "
    "caption folder with Min-SNR-5 in velocity space (rectified flow, shift 3, "
    "logit-normal timesteps), frozen VAE and text encoders.",
    "paper_source": "Min-SNR-γ (Hang et al. 2023) weighting in flow form; SD3 (Esser et "
    "al. 2024) target, shift and timestep density; optimiser of diffusers' "
    "train_dreambooth_sd3.py (AdamW betas 0.9/0.999, wd 1e-4, clip 1.0), lr 1e-5, batch 4.",
    "data": "latents/sd3_captions",
    "encode": {
        "source": None,  # the caption folder: --set encode.source=PATH
        "source_args": {"image_size": 512},
        "version": "sd3",  # VAE and text encoders from backbone_args.preset
        "batch_size": 4,
    },
    "batch_size": 4,
    "backbone": "sd3_mmdit",
    "backbone_args": {"preset": "stable_diffusion_3_medium"},
    "schedule": "flow",
    "flow_shift": 3.0,
    "prediction_type": "flow",
    "weighting": "min_snr",
    "gamma": 5.0,
    "timestep_sampling": "logit_normal",
    # The empty caption's embedding is cached as the null condition, so
    # `--set label_dropout=0.1` keeps training the unconditional branch for guidance.
    "label_dropout": 0.0,
    "ema_decay": 0.0,
    "learning_rate": 1e-5,
    "beta_1": 0.9,
    "beta_2": 0.999,
    "weight_decay": 1e-4,
    "clipnorm": 1.0,
    "steps": 10_400,
    "steps_per_epoch": 1000,
    "sample_every_epochs": 2,
    "num_samples": 4,
    "sampler": "euler",
    "sample_steps": 28,
    "guidance_scale": 7.0,
    "clip_denoised": False,
}

if __name__ == "__main__":
    run_recipe("sd3_captions")
