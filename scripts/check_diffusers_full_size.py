"""convert-diffusers at Stable Diffusion 1.5's real sizes, against KerasCV's own classes.

The committed test (tests/test_diffusers_conversion.py) uses 32-channel models. This
manual check builds the full SD 1.5 UNet (860M parameters), VAE and CLIP ViT-L/14 text
encoder with random weights in diffusers/transformers, stores them as fp16 (VAE, UNet) /
fp32 (text) safetensors, converts them, and loads the files into KerasCV's own
`DiffusionModel`, `ImageEncoder`, `Decoder` and `TextEncoder`. The references use
KerasCV's tanh GELU and 1e-5 group-norm epsilon (docs/recipes.md says why).

    # 1. with torch, diffusers and transformers (a scratch venv; ~4 GB of files in DIR)
    /tmp/difvenv/bin/python scripts/check_diffusers_full_size.py make DIR
    # 2. with the project's venv (about 7 GB of memory)
    python scripts/check_diffusers_full_size.py check DIR
"""

import os
import sys

import numpy as np


def make(root):
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL
    from diffusers import UNet2DConditionModel
    from diffusers.models.activations import GEGLU
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    GEGLU.gelu = lambda self, gate: F.gelu(gate, approximate="tanh")

    def as_stored(module):  # fp16 values, KerasCV's epsilon
        module = module.half().float().eval()
        for m in module.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.eps = 1e-5
        return module

    def nchw(a):
        return torch.from_numpy(a).permute(0, 3, 1, 2)

    def nhwc(t):
        return t.permute(0, 2, 3, 1).numpy()

    ref = {"x": rng.standard_normal((1, 16, 16, 4)).astype("float32"),
           "t": np.array([500], "int32"),
           "context": rng.standard_normal((1, 77, 768)).astype("float32"),
           "images": rng.uniform(-1, 1, (1, 64, 64, 3)).astype("float32"),
           "latents": (0.18215 * rng.standard_normal((1, 8, 8, 4))).astype("float32"),
           "tokens": rng.integers(0, 49408, (1, 77)).astype("int32")}
    # diffusers' defaults are SD 1.5's UNet and VAE.
    unet = as_stored(UNet2DConditionModel(sample_size=64, cross_attention_dim=768))
    vae = as_stored(AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512))
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        max_position_embeddings=77, hidden_act="quick_gelu")).eval()
    with torch.no_grad():
        ref["unet_out"] = nhwc(unet(nchw(ref["x"]), torch.from_numpy(ref["t"]).long(),
                                    encoder_hidden_states=torch.from_numpy(ref["context"])).sample)
        ref["vae_mean"] = nhwc(vae.encode(nchw(ref["images"])).latent_dist.mean)
        ref["decoded"] = nhwc(vae.decode(nchw(ref["latents"]) / 0.18215).sample)
        ref["hidden"] = text(torch.from_numpy(ref["tokens"]).long()).last_hidden_state.numpy()
    unet.half().save_pretrained(os.path.join(root, "sd", "unet"))
    vae.half().save_pretrained(os.path.join(root, "sd", "vae"))
    text.save_pretrained(os.path.join(root, "sd", "text_encoder"))
    np.savez(os.path.join(root, "reference.npz"), **ref)


def check(root):
    import resource
    import time

    import keras
    from keras_cv.src.models.stable_diffusion.decoder import Decoder
    from keras_cv.src.models.stable_diffusion.diffusion_model import DiffusionModel
    from keras_cv.src.models.stable_diffusion.image_encoder import ImageEncoder
    from keras_cv.src.models.stable_diffusion.text_encoder import TextEncoder

    from keras_minsnr.backbones import diffusers_conversion as dc
    from keras_minsnr.backbones.layers import sinusoidal_embedding

    ref = dict(np.load(os.path.join(root, "reference.npz")))
    start = time.time()
    paths = dc.convert_diffusers(os.path.join(root, "sd"), os.path.join(root, "kerascv"),
                                 overwrite=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"converted in {time.time() - start:.0f} s, peak memory {peak:.1f} GB")

    def gap(name, ours, theirs):
        ours = keras.ops.convert_to_numpy(ours)
        print(f"{name}: max |KerasCV - diffusers| / std = "
              f"{np.abs(ours - theirs).max() / theirs.std():.2e}")

    t_features = keras.ops.convert_to_numpy(sinusoidal_embedding(ref["t"], 320))
    unet = DiffusionModel(128, 128, 77, download_weights=False)
    unet.load_weights(paths["diffusion_model"])
    gap("DiffusionModel", unet.predict_on_batch([ref["x"], t_features, ref["context"]]),
        ref["unet_out"])
    del unet
    encoder = ImageEncoder(download_weights=False)
    encoder.load_weights(paths["image_encoder"])
    gap("ImageEncoder", encoder.predict_on_batch(ref["images"]), 0.18215 * ref["vae_mean"])
    decoder = Decoder(64, 64, download_weights=False)
    decoder.load_weights(paths["decoder"])
    gap("Decoder", decoder.predict_on_batch(ref["latents"]), ref["decoded"])
    text = TextEncoder(77, download_weights=False)
    text.load_weights(paths["text_encoder"])
    positions = np.arange(77, dtype="int32")[None]
    gap("TextEncoder", text.predict_on_batch({"tokens": ref["tokens"], "positions": positions}),
        ref["hidden"])


if __name__ == "__main__":
    {"make": make, "check": check}[sys.argv[1]](sys.argv[2])
