"""KerasCV Stable Diffusion (v1 / v2) UNet as a backbone, and the loading of KerasCV's files.

The frozen VAE and text encoder are `autoencoders.StableDiffusionAutoencoder`.

KerasCV (0.9) is imported lazily so that `import keras_minsnr` stays light.
"""

import os

import keras
from keras import ops

from keras_minsnr.backbones import kerascv_sd
from keras_minsnr.backbones.layers import sinusoidal_embedding

def resolve_weights(path, version, component, allow_download=False):
    """Returns a local path to a KerasCV weights file, or None for random weights.

    ``path`` None: random init, unless ``allow_download`` (then KerasCV's file is fetched
    into the Keras cache). An existing ``path`` is used as is; a missing one raises
    `FileNotFoundError` naming it and KerasCV's URL, or is downloaded there when
    ``allow_download`` is set. A diffusers-format folder (``unet/``, ``vae/``,
    ``text_encoder/``) is converted on first use into a cached KerasCV file
    (`diffusers_conversion.converted_weights_file`).
    """
    kerascv_sd.check_version(version)
    if path is not None and os.path.isdir(path):
        from keras_minsnr.backbones.diffusers_conversion import converted_weights_file

        return converted_weights_file(path, version, component)
    origin, file_hash = kerascv_sd.WEIGHT_URLS[version][component]
    if path is None and not allow_download:
        return None
    if path is not None and os.path.exists(path):
        return path
    if not allow_download:
        raise FileNotFoundError(
            f"Stable Diffusion {version} {component} weights file {path!r} not found. "
            f"KerasCV downloads it from {origin} (sha256 {file_hash}); put that file at "
            "this path, or pass allow_download=True (command line: --allow-download)."
        )
    fname = os.path.abspath(path) if path is not None else origin.rsplit("/", 1)[-1]
    return keras.utils.get_file(fname=fname, origin=origin, file_hash=file_hash)


@keras.saving.register_keras_serializable(package="keras_minsnr")
class StableDiffusionUNet(keras.Model):
    """The KerasCV Stable Diffusion UNet behind the `keras_minsnr.backbones` contract.

    Called with ``{"x": latents (B, h, w, 4), "t": int timesteps (B,), "y": text context
    (B, 77, 768) for v1 or (B, 77, 1024) for v2}``; returns the prediction shaped like
    ``x`` (float32). The 320-dim sinusoidal timestep features KerasCV expects are computed
    from ``t`` inside the model. Fine-tune v1 with the epsilon target and v2 with
    v-prediction, both on the ``scaled_linear`` schedule.

    Args:
        version: ``"v1"`` (SD 1.x, CLIP ViT-L/14 context) or ``"v2"`` (SD 2.x, OpenCLIP
            ViT-H context, linear projections in the transformers).
        img_height, img_width: image size in pixels, multiples of 64; the latents are
            ``(img_height // 8, img_width // 8, 4)``.
        weights: ``None`` (random init) or a local KerasCV ``.h5`` file
            (`kcv_diffusion_model.h5` / `diffusion_model_v2_1.h5`).
        allow_download: let KerasCV's `keras.utils.get_file` fetch missing weights.
        widths: the three level widths; ``(320, 640, 1280)`` is Stable Diffusion, smaller
            values (multiples of 32) build the same architecture small for tests.
        num_heads: attention heads per transformer; ``None`` uses KerasCV's (v1: 8,
            v2: width // 64).
        tiny: shorthand for ``widths=(32, 64, 64), num_heads=2``.

    Example:
    ```python
    unet = StableDiffusionUNet("v1", img_height=64, img_width=64, tiny=True)
    eps = unet({"x": keras.ops.ones((2, 8, 8, 4)), "t": keras.ops.array([10, 900]),
                "y": keras.ops.zeros((2, 77, 768))})  # (2, 8, 8, 4)
    ```

    Reference:
        Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models",
        CVPR 2022; KerasCV `keras_cv.models.stable_diffusion.DiffusionModel`.
    """

    @classmethod
    def lora_target_groups(cls):
        """KerasCV's layers: cross-attention is generic; the feed-forward (with GEGLU)
        and every convolution (each wrapped in a `PaddedConv2D`)."""
        return {
            "mlp": [(r"BasicTransformerBlock", r"dense"), (r"GEGLU", r"dense")],
            "conv": [(r"PaddedConv2D", r"conv2d")],
        }

    def __init__(
        self,
        version="v1",
        img_height=512,
        img_width=512,
        weights=None,
        allow_download=False,
        widths=(320, 640, 1280),
        num_heads=None,
        tiny=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        kerascv_sd.check_version(version)
        if tiny:
            widths, num_heads = (32, 64, 64), 2
        widths = tuple(int(w) for w in widths)
        if len(widths) != 3 or any(w < 32 or w % 32 for w in widths):
            raise ValueError(
                f"widths must be three positive multiples of 32 (GroupNormalization uses "
                f"32 groups), got {widths}."
            )
        for name, size in (("img_height", img_height), ("img_width", img_width)):
            if size < 64 or size % 64:
                raise ValueError(
                    f"{name}={size}: must be a positive multiple of 64 (latents are /8 "
                    f"and the UNet halves them three times)."
                )
        if num_heads is not None and any(w % num_heads for w in widths):
            raise ValueError(f"num_heads={num_heads} must divide every width {widths}.")
        self.version = version
        self.img_height = int(img_height)
        self.img_width = int(img_width)
        self.widths = widths
        self.num_heads = num_heads
        self.image_shape = (self.img_height // 8, self.img_width // 8, 4)
        self.conditioning = "context"
        self.num_classes = None
        self.context_shape = (kerascv_sd.MAX_TEXT_LENGTH, kerascv_sd.CONTEXT_DIMS[version])
        path = resolve_weights(weights, version, "diffusion_model", allow_download)
        self.diffusion_model = kerascv_sd._SDUNetCore(
            widths, num_heads, version, kerascv_sd.CONTEXT_DIMS[version], name="diffusion_model"
        )
        if path is not None:
            kerascv_sd.load_legacy_h5(self.diffusion_model, path)
        self.built = True

    def _check_inputs(self, inputs):
        if not isinstance(inputs, dict) or "x" not in inputs or "t" not in inputs:
            raise ValueError(
                "StableDiffusionUNet expects a dict {'x': latents, 't': timesteps, "
                f"'y': text context}}, got {type(inputs).__name__}."
            )
        shape = tuple(inputs["x"].shape)
        if len(shape) != 4 or tuple(shape[1:]) != self.image_shape:
            raise ValueError(
                f"StableDiffusionUNet input 'x' has shape {shape}; expected "
                f"(batch, {', '.join(map(str, self.image_shape))}) latents for "
                f"{self.img_height}x{self.img_width} images."
            )
        if inputs.get("y") is None:
            raise ValueError(
                "StableDiffusionUNet needs the text context 'y' of shape "
                f"(batch, {self.context_shape[0]}, {self.context_shape[1]}); encode the "
                "empty caption for the unconditional branch."
            )
        if tuple(inputs["y"].shape[1:]) != self.context_shape:
            raise ValueError(
                f"StableDiffusionUNet {self.version} context 'y' has shape "
                f"{tuple(inputs['y'].shape)}; expected (batch, {self.context_shape[0]}, "
                f"{self.context_shape[1]})."
            )

    def call(self, inputs, training=None):
        self._check_inputs(inputs)
        t_features = sinusoidal_embedding(inputs["t"], kerascv_sd.TIMESTEP_FEATURES)
        out = self.diffusion_model._forward(
            inputs["x"], t_features, inputs["y"], training=training
        )
        return ops.cast(out, "float32")

    def compute_output_shape(self, input_shape):
        return tuple(input_shape["x"])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "version": self.version,
                "img_height": self.img_height,
                "img_width": self.img_width,
                # Loaded weights are saved with the model; never reload the .h5.
                "weights": None,
                "allow_download": False,
                "widths": self.widths,
                "num_heads": self.num_heads,
                "tiny": False,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def latent_decoder(version="v1", weights=None, img_height=512, img_width=512,
                   allow_download=False):
    """KerasCV's VAE decoder: latents ``x 0.18215`` ``(B, h/8, w/8, 4)`` → images in [-1, 1].

    Latents from `keras_minsnr.data.cache_latents` (and samples of a model trained on
    them) are already scaled by 0.18215, which this decoder undoes first.

    Args:
        version: ``"v1"`` or ``"v2"`` (both use the same VAE).
        weights: local path of ``kcv_decoder.h5``; ``None`` gives random weights (tests).
        img_height, img_width: the decoded image size (multiples of 8).
        allow_download: fetch a missing file from KerasCV's URL.

    Example:
    ```python
    decoder = latent_decoder("v1", "weights/sd15/kcv_decoder.h5", 512, 512)
    images = decoder.predict_on_batch(model.generate(context=context))
    ```
    """
    from keras_cv.src.models.stable_diffusion.decoder import Decoder

    path = resolve_weights(weights, version, "decoder", allow_download)
    for name, size in (("img_height", img_height), ("img_width", img_width)):
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 8:
            raise ValueError(f"{name} must be a positive multiple of 8, got {size!r}.")
    decoder = Decoder(img_height, img_width, download_weights=False)
    if path is not None:
        kerascv_sd.load_legacy_h5(decoder, path)
    return decoder


PRESETS = {
    "sd15_unet": {
        "class": StableDiffusionUNet,
        "config": {"version": "v1", "img_height": 512, "img_width": 512},
        "description": (
            "KerasCV Stable Diffusion v1 UNet (512x512 images, 64x64x4 latents, CLIP "
            "(77, 768) context). Recommended: scaled_linear schedule, epsilon target "
            "(diffengine's stable_diffusion_v15_snr_pokemon_blip). Weights: "
            "kcv_diffusion_model.h5 via weights=PATH."
        ),
        "paper_params": 860_000_000,
        "schedule": "scaled_linear",
        "prediction_type": "epsilon",
    },
    "sd2_unet": {
        "class": StableDiffusionUNet,
        "config": {"version": "v2", "img_height": 768, "img_width": 768},
        "description": (
            "KerasCV Stable Diffusion v2.1 UNet (768x768 images, 96x96x4 latents, "
            "OpenCLIP (77, 1024) context). Recommended: scaled_linear schedule, "
            "v_prediction target. Weights: diffusion_model_v2_1.h5 via weights=PATH."
        ),
        "paper_params": 860_000_000,
        "schedule": "scaled_linear",
        "prediction_type": "v_prediction",
    },
}
