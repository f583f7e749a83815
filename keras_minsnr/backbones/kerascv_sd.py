"""What keras_minsnr takes from KerasCV's Stable Diffusion (0.9): its constants, where
its weight files live, and its UNet rebuilt from KerasCV's own blocks at any widths.

`stable_diffusion` wraps the UNet as a backbone and loads the files;
`diffusers_conversion` fills the same blocks from diffusers-format folders.
"""

import keras
from keras import ops

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


def check_version(version):
    if version not in CONTEXT_DIMS:
        raise ValueError(
            f"Unknown Stable Diffusion version {version!r}; use one of {sorted(CONTEXT_DIMS)}."
        )


def load_legacy_h5(model, path):
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
