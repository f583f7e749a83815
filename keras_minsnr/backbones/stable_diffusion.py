"""KerasCV Stable Diffusion (v1 / v2) UNet as a backbone, and the loading of KerasCV's files.

The frozen VAE and text encoder are `autoencoders.StableDiffusionAutoencoder`.

KerasCV (0.9) is imported lazily so that `import keras_minsnr` stays light.
"""

import os

import keras
from keras import ops

from keras_minsnr.backbones.layers import sinusoidal_embedding

MAX_TEXT_LENGTH = 77
TIMESTEP_FEATURES = 320  # KerasCV feeds 320 sinusoidal features to the UNet
CONTEXT_DIMS = {"v1": 768, "v2": 1024}

# (origin, sha256) of the files KerasCV 0.9 downloads, as written in
# keras_cv/src/models/stable_diffusion/{diffusion_model,text_encoder,image_encoder,
# clip_tokenizer}.py. tests/test_stable_diffusion.py checks them against that source.
_HF = "https://huggingface.co"
WEIGHT_URLS = {
    "v1": {
        "diffusion_model": (
            f"{_HF}/fchollet/stable-diffusion/resolve/main/kcv_diffusion_model.h5",
            "8799ff9763de13d7f30a683d653018e114ed24a6a819667da4f5ee10f9e805fe",
        ),
        "text_encoder": (
            f"{_HF}/fchollet/stable-diffusion/resolve/main/kcv_encoder.h5",
            "4789e63e07c0e54d6a34a29b45ce81ece27060c499a709d556c7755b42bb0dc4",
        ),
        "image_encoder": (
            f"{_HF}/fchollet/stable-diffusion/resolve/main/vae_encoder.h5",
            "c60fb220a40d090e0f86a6ab4c312d113e115c87c40ff75d11ffcf380aab7ebb",
        ),
        "decoder": (
            f"{_HF}/fchollet/stable-diffusion/resolve/main/kcv_decoder.h5",
            "ad350a65cc8bc4a80c8103367e039a3329b4231c2469a1093869a345f55b1962",
        ),
    },
    "v2": {
        "diffusion_model": (
            f"{_HF}/ianstenbit/keras-sd2.1/resolve/main/diffusion_model_v2_1.h5",
            "c31730e91111f98fe0e2dbde4475d381b5287ebb9672b1821796146a25c5132d",
        ),
        "text_encoder": (
            f"{_HF}/ianstenbit/keras-sd2.1/resolve/main/text_encoder_v2_1.h5",
            "985002e68704e1c5c3549de332218e99c5b9b745db7171d5f31fcd9a6089f25b",
        ),
        # KerasCV's StableDiffusionV2 reuses the v1 VAE (encoder and decoder).
        "image_encoder": (
            f"{_HF}/fchollet/stable-diffusion/resolve/main/vae_encoder.h5",
            "c60fb220a40d090e0f86a6ab4c312d113e115c87c40ff75d11ffcf380aab7ebb",
        ),
        "decoder": (
            f"{_HF}/fchollet/stable-diffusion/resolve/main/kcv_decoder.h5",
            "ad350a65cc8bc4a80c8103367e039a3329b4231c2469a1093869a345f55b1962",
        ),
    },
}
VOCABULARY_URL = (
    "https://github.com/openai/CLIP/blob/main/clip/bpe_simple_vocab_16e6.txt.gz?raw=true",
    "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
)


def _check_version(version):
    if version not in CONTEXT_DIMS:
        raise ValueError(
            f"Unknown Stable Diffusion version {version!r}; use one of {sorted(CONTEXT_DIMS)}."
        )


def resolve_weights(path, version, component, allow_download=False):
    """Returns a local path to a KerasCV weights file, or None for random weights.

    ``path`` None: random init, unless ``allow_download`` (then KerasCV's file is fetched
    into the Keras cache). An existing ``path`` is used as is; a missing one raises
    `FileNotFoundError` naming it and KerasCV's URL, or is downloaded there when
    ``allow_download`` is set. A diffusers-format folder (``unet/``, ``vae/``,
    ``text_encoder/``) is converted on first use into a cached KerasCV file
    (`diffusers_conversion.converted_weights_file`).
    """
    _check_version(version)
    if path is not None and os.path.isdir(path):
        from keras_minsnr.backbones.diffusers_conversion import converted_weights_file

        return converted_weights_file(path, version, component)
    origin, file_hash = WEIGHT_URLS[version][component]
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


def _load_legacy_h5(model, path):
    # KerasCV ships TF-Keras 2 .h5 files: Keras 3 reads them by layer order.
    model.load_weights(path)


def _built(layer):
    layer.built = True


def _build_conv(layer, in_channels):
    """Builds a KerasCV PaddedConv2D; returns its output channels."""
    layer.conv2d.build((None, None, None, in_channels))
    _built(layer.padding2d)
    _built(layer)
    return layer.conv2d.filters


def _build_kerascv_block(layer, inputs):
    """Builds a KerasCV SD block from channel counts (they have no shape-only build()).

    ``inputs`` mirrors the block's call: ``c`` or ``[c, emb_or_context_dim]``. Returns
    the output channels.
    """
    from keras_cv.src.models.stable_diffusion.diffusion_model import ResBlock
    from keras_cv.src.models.stable_diffusion.diffusion_model import SpatialTransformer
    from keras_cv.src.models.stable_diffusion.diffusion_model import Upsample
    from keras_cv.src.models.stable_diffusion.padded_conv2d import PaddedConv2D

    def shape(c):
        return (None, None, None, c)

    if isinstance(layer, PaddedConv2D):
        return _build_conv(layer, inputs)
    if isinstance(layer, keras.layers.GroupNormalization):
        layer.build(shape(inputs))
        return inputs
    if isinstance(layer, Upsample):
        _built(layer.ups)
        _built(layer)
        return _build_conv(layer.conv, inputs)
    if isinstance(layer, ResBlock):
        c, emb = inputs
        out = layer.output_dim
        layer.entry_flow[0].build(shape(c))
        _build_conv(layer.entry_flow[2], c)
        layer.embedding_flow[1].build((None, emb))
        layer.exit_flow[0].build(shape(out))
        _build_conv(layer.exit_flow[2], out)
        for act in (layer.entry_flow[1], layer.embedding_flow[0], layer.exit_flow[1]):
            _built(act)
        layer.build([shape(c), (None, emb)])  # creates the 1x1 skip projection if needed
        if c != out:
            _build_conv(layer.residual_projection, c)
        return out
    if isinstance(layer, SpatialTransformer):
        c, context_dim = inputs
        layer.norm.build(shape(c))
        for proj in (layer.proj1, layer.proj2):
            if isinstance(proj, PaddedConv2D):
                _build_conv(proj, c)
            else:
                proj.build((None, None, c))
        block = layer.transformer_block
        for norm in (block.norm1, block.norm2, block.norm3):
            norm.build((None, None, c))
        for attn, kv_dim in ((block.attn1, c), (block.attn2, context_dim)):
            attn.to_q.build((None, None, c))
            attn.to_k.build((None, None, kv_dim))
            attn.to_v.build((None, None, kv_dim))
            attn.out_proj.build((None, None, c))
            _built(attn)
        block.geglu.dense.build((None, None, c))
        _built(block.geglu)
        block.dense.build((None, None, block.geglu.output_dim))
        _built(block)
        _built(layer)
        return c
    raise TypeError(f"Unexpected layer {layer!r} in the Stable Diffusion UNet.")


class _SDUNetCore(keras.Model):
    """The KerasCV Stable Diffusion UNet with configurable widths, from KerasCV's blocks.

    Same blocks, wiring and weight order as `keras_cv...DiffusionModel` (v1) /
    `DiffusionModelV2` (v2), so KerasCV's `.h5` files load by layer order. Built by one
    eager pass on a minimal input: KerasCV's blocks have no shape-only `build`, and a
    symbolic functional build takes about a minute even for a tiny model, so the blocks
    are built from channel counts (`_build_kerascv_block`).
    Called with ``[latent, timestep_features (B, 320), context (B, L, D)]``.
    """

    def __init__(self, widths, num_heads, version, context_dim, out_channels=4, **kwargs):
        super().__init__(**kwargs)
        self.widths = tuple(widths)
        self.num_heads = num_heads
        self.version = version
        self.out_channels = out_channels
        self.seq = []
        # The creation pass runs on channel counts: layers are built from shapes alone,
        # no op is executed (an eager pass costs minutes of op compilation on JAX).
        self._creating = True
        self._forward(out_channels, TIMESTEP_FEATURES, context_dim)
        self._creating = False
        self.built = True

    def _forward(self, latent, t_features, context, training=None):
        from keras_cv.src.models.stable_diffusion.diffusion_model import ResBlock
        from keras_cv.src.models.stable_diffusion.diffusion_model import SpatialTransformer
        from keras_cv.src.models.stable_diffusion.diffusion_model import Upsample
        from keras_cv.src.models.stable_diffusion.padded_conv2d import PaddedConv2D

        creating = self._creating
        stored = iter(self.seq[3:])

        def run(factory, *inputs):
            # Creation order = call order = KerasCV's functional layer order (the order
            # KerasCV's .h5 files are read in), except conv_in, see below.
            if not creating:
                return next(stored)(*inputs)
            new = factory()
            self.seq.append(new)
            return _build_kerascv_block(new, *inputs)

        def cat(a, b):
            return a + b if creating else ops.concatenate([a, b], axis=-1)

        def transformer(width):
            # v1: 8 heads per level; v2: 64-channel heads (KerasCV's choices).
            heads = self.num_heads or (8 if self.version == "v1" else width // 64)
            return SpatialTransformer(
                heads, width // heads, fully_connected=self.version == "v2"
            )

        w0, bottom = self.widths[0], self.widths[-1]
        if creating:  # KerasCV's layer order starts Dense, conv_in, Dense.
            self.seq.extend(
                [keras.layers.Dense(4 * w0), PaddedConv2D(w0, kernel_size=3, padding=1),
                 keras.layers.Dense(4 * w0)]
            )
        dense_1, conv_in, dense_2 = self.seq[:3]
        if creating:
            dense_1.build((None, t_features))
            dense_2.build((None, 4 * w0))
            t_emb = 4 * w0
            x = _build_kerascv_block(conv_in, latent)
        else:
            t_emb = dense_2(ops.silu(dense_1(t_features)))
            x = conv_in(latent)
        outputs = [x]
        for width in self.widths:
            for _ in range(2):
                x = run(lambda: ResBlock(width), [x, t_emb])
                x = run(lambda: transformer(width), [x, context])
                outputs.append(x)
            x = run(lambda: PaddedConv2D(width, 3, strides=2, padding=1), x)
            outputs.append(x)
        for _ in range(2):
            x = run(lambda: ResBlock(bottom), [x, t_emb])
            outputs.append(x)

        x = run(lambda: ResBlock(bottom), [x, t_emb])
        x = run(lambda: transformer(bottom), [x, context])
        x = run(lambda: ResBlock(bottom), [x, t_emb])

        for _ in range(3):
            x = cat(x, outputs.pop())
            x = run(lambda: ResBlock(bottom), [x, t_emb])
        x = run(lambda: Upsample(bottom), x)
        for level, width in enumerate(reversed(self.widths)):
            for _ in range(3):
                x = cat(x, outputs.pop())
                x = run(lambda: ResBlock(width), [x, t_emb])
                x = run(lambda: transformer(width), [x, context])
            if level < len(self.widths) - 1:
                x = run(lambda: Upsample(width), x)

        x = run(lambda: keras.layers.GroupNormalization(epsilon=1e-5), x)
        x = x if creating else ops.silu(x)
        return run(lambda: PaddedConv2D(self.out_channels, kernel_size=3, padding=1), x)

    def call(self, inputs, training=None):
        latent, t_features, context = inputs
        return self._forward(latent, t_features, context, training=training)


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
        _check_version(version)
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
        self.context_shape = (MAX_TEXT_LENGTH, CONTEXT_DIMS[version])
        path = resolve_weights(weights, version, "diffusion_model", allow_download)
        self.diffusion_model = _SDUNetCore(
            widths, num_heads, version, CONTEXT_DIMS[version], name="diffusion_model"
        )
        if path is not None:
            _load_legacy_h5(self.diffusion_model, path)
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
        t_features = sinusoidal_embedding(inputs["t"], TIMESTEP_FEATURES)
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
        _load_legacy_h5(decoder, path)
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
