"""Writes the tiny diffusers-format Stable Diffusion folders and their reference outputs.

Run once, with the real diffusers/transformers (torch CPU) in a scratch venv outside the
project (the project never imports torch):

    python3 -m venv /tmp/difvenv
    /tmp/difvenv/bin/pip install torch==2.13.0+cpu diffusers==0.42.1 \
        transformers==5.25.0 safetensors numpy
    /tmp/difvenv/bin/python tests/data/make_diffusers_sd_fixture.py tests/data

It writes
  diffusers_sd_tiny/      an SD 1.x layout: unet/, vae/ (fp16 safetensors, as most published
                          checkpoints), text_encoder/ (fp32), each with its config.json, and
                          model_index.json
  diffusers_sd_tiny.npz   fixed inputs and what diffusers/transformers compute on them
The block layouts are Stable Diffusion's (3 cross-attention levels + 1 plain level, 2 layers
per block; a 4-level VAE with a mid attention; a causal CLIP text model) at the smallest widths
KerasCV's blocks allow (32 channels: its GroupNormalization uses 32 groups).

KerasCV's blocks differ from diffusers' in two constants no weight conversion can change:
its UNet GEGLU uses the tanh approximation of GELU (diffusers: exact), and all its group
norms use epsilon 1e-5 (diffusers' VAE and transformer group norms: 1e-6). So each output is
recorded twice: `*_out` / `vae_moments` / ... with diffusers set to KerasCV's two constants
(what a correct conversion must reproduce to float precision), and `*_as_shipped` with
diffusers as it ships (how far KerasCV's blocks are from it, whatever the weights).
"""

import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers import UNet2DConditionModel
from diffusers.models.activations import GEGLU
from transformers import CLIPTextConfig
from transformers import CLIPTextModel

CONTEXT_DIM = 32
UNET_ARGS = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 32, 32, 32),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=CONTEXT_DIM,
    attention_head_dim=2,  # diffusers reads this as the number of heads (SD 1.x config)
    norm_num_groups=32,
)


def perturb(module, generator):
    """Random norm scales/offsets and biases, so that a swapped tensor changes the output."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=generator))


def kerascv_epsilons(module, on):
    """Sets every GroupNorm epsilon to KerasCV's 1e-5 (on) or back to diffusers' own."""
    for m in module.modules():
        if isinstance(m, torch.nn.GroupNorm):
            if not hasattr(m, "shipped_eps"):
                m.shipped_eps = m.eps
            m.eps = 1e-5 if on else m.shipped_eps


def as_fp16_values(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())


def main(out_dir):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(0)
    folder = os.path.join(out_dir, "diffusers_sd_tiny")
    ref = {}

    unet = UNet2DConditionModel(**UNET_ARGS).eval()
    perturb(unet, gen)
    as_fp16_values(unet)  # stored in fp16, as most published SD checkpoints are
    x = rng.standard_normal((2, 8, 8, 4)).astype("float32")
    t = np.array([10, 700], dtype="int64")
    context = rng.standard_normal((2, 77, CONTEXT_DIM)).astype("float32")
    ref.update(unet_x=x, unet_t=t, unet_context=context)

    def run_unet(model):
        with torch.no_grad():
            out = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                        encoder_hidden_states=torch.from_numpy(context)).sample
        return out.permute(0, 2, 3, 1).numpy()

    ref["unet_out_as_shipped"] = run_unet(unet)
    exact = GEGLU.gelu
    GEGLU.gelu = lambda self, gate: F.gelu(gate, approximate="tanh")
    kerascv_epsilons(unet, True)
    ref["unet_out"] = run_unet(unet)
    kerascv_epsilons(unet, False)
    unet.half().save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)

    GEGLU.gelu = exact

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.18215,
    ).eval()
    perturb(vae, gen)
    as_fp16_values(vae)
    images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    latents = (0.18215 * rng.standard_normal((2, 4, 4, 4))).astype("float32")
    ref.update(vae_images=images, vae_scaled_latents=latents)
    for suffix, on in (("", True), ("_as_shipped", False)):
        kerascv_epsilons(vae, on)
        with torch.no_grad():
            pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
            moments = vae.quant_conv(vae.encoder(pixels))
            posterior_mean = vae.encode(pixels).latent_dist.mean
            decoded = vae.decode(
                torch.from_numpy(latents).permute(0, 3, 1, 2) / vae.config.scaling_factor
            ).sample
        ref["vae_moments" + suffix] = moments.permute(0, 2, 3, 1).numpy()
        ref["vae_posterior_mean" + suffix] = posterior_mean.permute(0, 2, 3, 1).numpy()
        ref["vae_decoded" + suffix] = decoded.permute(0, 2, 3, 1).numpy()
    kerascv_epsilons(vae, False)
    vae.half().save_pretrained(os.path.join(folder, "vae"), safe_serialization=True)

    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=1000,
            hidden_size=CONTEXT_DIM,
            intermediate_size=4 * CONTEXT_DIM,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        )
    ).eval()
    perturb(text, gen)
    tokens = rng.integers(0, 1000, (2, 77)).astype("int64")
    with torch.no_grad():
        hidden = text(torch.from_numpy(tokens)).last_hidden_state
    ref.update(text_tokens=tokens.astype("int32"), text_hidden=hidden.numpy())
    text.save_pretrained(os.path.join(folder, "text_encoder"), safe_serialization=True)

    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
            },
            f,
            indent=2,
        )
    np.savez_compressed(os.path.join(out_dir, "diffusers_sd_tiny.npz"), **ref)
    for key, value in ref.items():
        print(key, value.shape, float(np.std(value)))


if __name__ == "__main__":
    main(sys.argv[1])
