"""The frozen autoencoders of latent diffusion, each the one owner of its latent convention.

A latent diffusion model trains on ``z = (μ − shift) · scale`` of its VAE's posterior mean
``μ`` (or a posterior sample). That factor must be applied exactly once: here. Each class
below wraps one pretrained VAE (and the text encoders trained with it) behind one small
interface, and declares its ``name``, ``scale`` and ``shift`` once:

- ``encode_images(images in [-1, 1]) → latents in the space the diffusion model trains in``;
- ``encode_text(captions) → the text condition`` (cached per caption);
- ``decode(latents) → images in [-1, 1]``;
- ``convention`` → ``{"vae", "scale", "shift"}``, what a latent cache records.

`keras_minsnr.data.cache_latents` stores exactly what ``encode_images`` returns and the
``convention`` in its manifest; a run refuses a cache whose VAE is not the one it names.

| class | VAE | latents |
|---|---|---|
| `StableDiffusionAutoencoder` | SD 1.x / 2.x (KerasCV) | ``0.18215 · μ``, (H/8, W/8, 4) |
| `StableDiffusion3Autoencoder` | SD3 (KerasHub) | ``(μ − 0.0609) · 1.5305``, (H/8, W/8, 16) |

KerasCV and KerasHub are imported lazily so that `import keras_minsnr` stays light.
"""

import gzip
import os

import keras
import numpy as np
from keras import ops

from keras_minsnr.backbones import sd3
from keras_minsnr.backbones import kerascv_sd
from keras_minsnr.backbones import stable_diffusion as sd

SD_VAE = "sd_vae"  # KerasCV's SD 1.x/2.x VAE (v2 reuses v1's)
SD3_VAE = "sd3_vae"  # KerasHub's SD3 VAE
SD_LATENT_SCALE = 0.18215  # diffusers' AutoencoderKL scaling_factor for SD 1.x/2.x
SD_LATENT_SHIFT = 0.0
DOWNSAMPLING = 8  # both VAEs: latents are (H/8, W/8)
DOWNLOAD_HINT = "allow_download=True (command line: --allow-download)"


def vae_name(version):
    """The VAE an ``encode.version`` (``"v1"``, ``"v2"``, ``"sd3"``) names."""
    return SD3_VAE if version == "sd3" else SD_VAE


def check_image_shape(shape, vae=None):
    """Raises `ValueError` unless the image height and width are multiples of 8."""
    height, width = (int(d) for d in tuple(shape)[:2])
    if height % DOWNSAMPLING or width % DOWNSAMPLING or height <= 0 or width <= 0:
        raise ValueError(
            f"Images of {height}x{width} cannot be encoded by the {vae or 'VAE'}: height "
            f"and width must be positive multiples of {DOWNSAMPLING} (set "
            f"encode.source_args.image_size to e.g. {max(8, round(height / 8) * 8)})."
        )


class LatentAutoencoder:
    """What every autoencoder here offers; subclasses set ``name``, ``scale``, ``shift``.

    Args:
        sample_posterior: latents are a sample of the VAE posterior instead of its mean.
        seed: seed of posterior sampling.
    """

    name = None

    def __init__(self, sample_posterior=False, seed=None):
        self.sample_posterior = bool(sample_posterior)
        self._seed = keras.random.SeedGenerator(seed)
        self.text_cache = {}

    @property
    def convention(self):
        """``{"vae": name, "scale": scale, "shift": shift}``, as a cache manifest records."""
        return {"vae": self.name, "scale": float(self.scale), "shift": float(self.shift)}

    def _latents(self, moments):
        """``(μ or a posterior sample − shift) · scale`` of the posterior moments."""
        mean, logvar = ops.split(moments, 2, axis=-1)
        if self.sample_posterior:
            logvar = ops.clip(logvar, -30.0, 20.0)
            noise = keras.random.normal(ops.shape(mean), seed=self._seed)
            mean = mean + ops.exp(0.5 * logvar) * noise
        latents = (mean - self.shift) * self.scale
        return np.asarray(ops.convert_to_numpy(latents), dtype="float32")

    @staticmethod
    def _check_images(images):
        images = np.asarray(images, dtype="float32")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"encode_images expects (batch, height, width, 3) images in [-1, 1], got "
                f"shape {images.shape}."
            )
        check_image_shape(images.shape[1:3])
        return images

    def encode_text(self, captions):
        """Captions (list of str) → text conditions, float32, cached per caption."""
        if isinstance(captions, str):
            captions = [captions]
        captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in captions]
        missing = list(dict.fromkeys(c for c in captions if c not in self.text_cache))
        if missing:
            for caption, row in zip(missing, self._encode_new_text(missing)):
                self.text_cache[caption] = row
        return np.stack([self.text_cache[c] for c in captions])


class StableDiffusionAutoencoder(LatentAutoencoder):
    """Stable Diffusion 1.x / 2.x: KerasCV's VAE, CLIP text encoder and tokenizer, frozen.

    Latents are ``0.18215 · μ`` (``μ`` the VAE posterior mean, or a posterior sample with
    ``sample_posterior=True``): exactly KerasCV's `ImageEncoder` output and what diffusers'
    ``train_text_to_image.py`` trains on (``latents * vae.config.scaling_factor``).
    `decode` is KerasCV's `Decoder`, which divides by 0.18215 first. Weights come from
    local KerasCV `.h5` files (`stable_diffusion.resolve_weights`); ``None`` gives random
    weights (tests only).

    Args:
        version: ``"v1"`` or ``"v2"`` (picks the text encoder and context width; both use
            the same VAE).
        vocabulary: path of CLIP's BPE merges file (gzip, as CLIP ships it).
        image_encoder_weights, text_encoder_weights, decoder_weights: local KerasCV
            `.h5` paths (`vae_encoder.h5`, `kcv_encoder.h5`, `kcv_decoder.h5`).
        allow_download: fetch missing files from KerasCV's URLs.
        sample_posterior: latents are a posterior sample instead of the mean.
        seed: seed of posterior sampling.
        text: whether captions will be encoded; the tokenizer (and its vocabulary file)
            is then needed and checked now.
        check_weights: resolve the encoders' weights files now, so that a missing one
            fails before any encoding (models are still built on first use).
        image_encoder: optional Keras model from images to the 8 posterior channels
            (mean, log-variance), replacing KerasCV's.
        text_encoder: optional Keras model from ``{"tokens", "positions"}`` to
            ``(B, 77, D)``, replacing KerasCV's.

    Example:
    ```python
    vae = StableDiffusionAutoencoder("v1", vocabulary="bpe_simple_vocab_16e6.txt.gz",
                                     image_encoder_weights="vae_encoder.h5",
                                     text_encoder_weights="kcv_encoder.h5",
                                     decoder_weights="kcv_decoder.h5")
    latents = vae.encode_images(images)               # (B, H/8, W/8, 4), 0.18215 · μ
    context = vae.encode_text(["a red pokemon", ""])  # (2, 77, 768)
    pictures = vae.decode(latents)                    # (B, H, W, 3) in about [-1, 1]
    ```

    Reference:
        Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models",
        CVPR 2022; Radford et al., "Learning Transferable Visual Models From Natural
        Language Supervision" (CLIP), 2021; KerasCV `StableDiffusion`.
    """

    name = SD_VAE
    scale = SD_LATENT_SCALE
    shift = SD_LATENT_SHIFT

    def __init__(
        self,
        version="v1",
        vocabulary=None,
        image_encoder_weights=None,
        text_encoder_weights=None,
        decoder_weights=None,
        allow_download=False,
        sample_posterior=False,
        seed=None,
        text=True,
        check_weights=False,
        image_encoder=None,
        text_encoder=None,
    ):
        super().__init__(sample_posterior, seed)
        kerascv_sd.check_version(version)
        self.version = version
        self.context_dim = kerascv_sd.CONTEXT_DIMS[version]
        self.allow_download = bool(allow_download)
        self.image_encoder_weights = image_encoder_weights
        self.text_encoder_weights = text_encoder_weights
        self.decoder_weights = decoder_weights
        self._image_encoder = image_encoder
        self._text_encoder = text_encoder
        self._decoders = {}
        if check_weights:
            sd.resolve_weights(image_encoder_weights, version, "image_encoder", allow_download)
            if text:
                sd.resolve_weights(text_encoder_weights, version, "text_encoder",
                                   allow_download)
        self.tokenizer = self._make_tokenizer(vocabulary) if text else None

    def _make_tokenizer(self, vocabulary):
        from keras_cv.src.models.stable_diffusion.clip_tokenizer import SimpleTokenizer

        if vocabulary is not None and os.path.exists(vocabulary):
            with gzip.open(vocabulary) as f:  # fail early on a file that is not gzip
                f.read(1)
            return SimpleTokenizer(vocabulary)
        if self.allow_download:
            return SimpleTokenizer(
                keras.utils.get_file(
                    fname=os.path.abspath(vocabulary) if vocabulary
                    else "bpe_simple_vocab_16e6.txt.gz",
                    origin=kerascv_sd.VOCABULARY_URL[0],
                    file_hash=kerascv_sd.VOCABULARY_URL[1],
                )
            )
        raise FileNotFoundError(
            f"CLIP BPE vocabulary {vocabulary!r} not found. KerasCV downloads "
            f"bpe_simple_vocab_16e6.txt.gz from {kerascv_sd.VOCABULARY_URL[0]}; put it at a local "
            f"path and pass vocabulary=PATH, or pass {DOWNLOAD_HINT}."
        )

    @property
    def image_encoder(self):
        """Model from images in [-1, 1] to the 8 posterior channels (mean, log-variance)."""
        if self._image_encoder is None:
            from keras_cv.src.models.stable_diffusion.image_encoder import ImageEncoder

            path = sd.resolve_weights(self.image_encoder_weights, self.version,
                                      "image_encoder", self.allow_download)
            full = ImageEncoder(download_weights=False)
            if path is not None:
                kerascv_sd.load_legacy_h5(full, path)
            # KerasCV's last layer keeps the mean and multiplies by 0.18215; `_latents`
            # applies this class's scale instead, and keeps the log-variance for sampling.
            self._image_encoder = keras.Model(full.inputs, full.layers[-2].output)
        return self._image_encoder

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from keras_cv.src.models.stable_diffusion.text_encoder import TextEncoder
            from keras_cv.src.models.stable_diffusion.text_encoder import TextEncoderV2

            path = sd.resolve_weights(self.text_encoder_weights, self.version,
                                      "text_encoder", self.allow_download)
            cls = TextEncoder if self.version == "v1" else TextEncoderV2
            self._text_encoder = cls(kerascv_sd.MAX_TEXT_LENGTH, download_weights=False)
            if path is not None:
                kerascv_sd.load_legacy_h5(self._text_encoder, path)
        return self._text_encoder

    def encode_images(self, images):
        """Images ``(B, H, W, 3)`` in [-1, 1] → latents ``0.18215 · μ`` ``(B, H/8, W/8, 4)``."""
        images = self._check_images(images)
        return self._latents(self.image_encoder.predict_on_batch(images))

    def tokenize(self, captions):
        """Captions → int32 ``(B, 77)``: start, BPE ids, end, then end-token padding
        (KerasCV's convention). Longer captions are truncated to 77 tokens, the last one
        the end token."""
        if self.tokenizer is None:
            raise ValueError("This autoencoder was built with text=False: no tokenizer.")
        if isinstance(captions, str):
            captions = [captions]
        end = self.tokenizer.end_of_text
        rows = []
        for caption in captions:
            ids = self.tokenizer.encode(caption)
            if len(ids) > kerascv_sd.MAX_TEXT_LENGTH:
                ids = ids[: kerascv_sd.MAX_TEXT_LENGTH - 1] + [end]
            rows.append(ids + [end] * (kerascv_sd.MAX_TEXT_LENGTH - len(ids)))
        return np.asarray(rows, dtype="int32")

    def _encode_new_text(self, captions):
        tokens = self.tokenize(captions)
        positions = np.tile(np.arange(kerascv_sd.MAX_TEXT_LENGTH, dtype="int32"), (len(captions), 1))
        context = self.text_encoder.predict_on_batch({"tokens": tokens, "positions": positions})
        return np.asarray(ops.convert_to_numpy(context), dtype="float32")

    def decoder(self, height, width):
        """KerasCV's `Decoder` for ``height`` x ``width`` images (built once per size)."""
        key = (int(height), int(width))
        if key not in self._decoders:
            self._decoders[key] = sd.latent_decoder(
                self.version, self.decoder_weights, key[0], key[1], self.allow_download
            )
        return self._decoders[key]

    def decode(self, latents):
        """Latents ``(B, h, w, 4)`` (``0.18215 · μ``) → images ``(B, 8h, 8w, 3)``."""
        latents = np.asarray(latents, dtype="float32")
        decoder = self.decoder(latents.shape[1] * DOWNSAMPLING, latents.shape[2] * DOWNSAMPLING)
        chunks = [decoder.predict_on_batch(latents[i : i + 4]) for i in range(0, len(latents), 4)]
        return np.concatenate([np.asarray(ops.convert_to_numpy(c), "float32") for c in chunks])


class StableDiffusion3Autoencoder(LatentAutoencoder):
    """Stable Diffusion 3: KerasHub's VAE and CLIP-L/G (and T5) text encoders, frozen.

    Latents are ``(μ − shift) · scale`` with the preset VAE's own ``shift`` and ``scale``
    (SD3 medium: 0.0609 and 1.5305), what KerasHub's ``encode_image_step`` gives with the
    posterior mean. Text becomes the packed condition of `sd3.pack_context`.

    Args:
        preset: a preset directory, name or handle (`sd3.resolve_preset`).
        allow_download: let KerasHub download a preset that is not cached.
        sample_posterior: latents are a posterior sample instead of the mean.
        seed: seed of posterior sampling.
        backbone, preprocessor: a loaded `StableDiffusion3Backbone` and
            `StableDiffusion3TextToImagePreprocessor` instead of a preset.

    Example:
    ```python
    vae = StableDiffusion3Autoencoder("sd3_preset/")
    latents = vae.encode_images(images)           # images in [-1, 1] → (B, H/8, W/8, 16)
    y = vae.encode_text(["a red bird", ""])       # (2, L + 1, W)
    pictures = vae.decode(latents)                # back to [-1, 1]
    ```

    Reference:
        Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image
        Synthesis", 2024; KerasHub `StableDiffusion3Backbone`.
    """

    name = SD3_VAE

    def __init__(self, preset=None, allow_download=False, sample_posterior=False, seed=None,
                 backbone=None, preprocessor=None):
        super().__init__(sample_posterior, seed)
        if backbone is None:
            backbone, preprocessor = sd3.load_preset(preset, allow_download)
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.context_length = sd3.text_context_length(backbone, preprocessor)

    @property
    def scale(self):
        return float(self.backbone.vae.scale)

    @property
    def shift(self):
        return float(self.backbone.vae.shift)

    def encode_images(self, images):
        """Images ``(B, H, W, 3)`` in [-1, 1] → SD3 latents ``(B, H/8, W/8, 16)``."""
        images = self._check_images(images)
        return self._latents(self.backbone.vae.encoder(images, training=False))

    def _encode_new_text(self, captions):
        ids = self.preprocessor.generate_preprocess(captions)
        # encode_text_step also encodes a negative prompt; one empty row is enough.
        negative = self.preprocessor.generate_preprocess([""])
        context, _, pooled, _ = self.backbone.encode_text_step(ids, negative)
        return sd3.pack_context(ops.convert_to_numpy(context), ops.convert_to_numpy(pooled))

    def decode(self, latents):
        """SD3 latents ``(B, h, w, 16)`` → images ``(B, 8h, 8w, 3)``, about [-1, 1]."""
        latents = np.asarray(latents, dtype="float32")
        chunks = [self.backbone.decode_step(ops.convert_to_tensor(latents[i : i + 4]))
                  for i in range(0, len(latents), 4)]
        return np.concatenate([np.asarray(ops.convert_to_numpy(c), "float32") for c in chunks])


def from_encode_config(encode, text=False, check=True):
    """The autoencoder an ``encode`` config (see docs/recipes.md) names.

    Args:
        encode: the run's ``encode`` dict, after `keras_minsnr.data.preparation.
            resolve_encode_config` (SD3: ``preset`` filled in).
        text: whether captions will be encoded.
        check: resolve the SD encoders' weights files now; off for decoding only.
    """
    version = encode.get("version", "v1")
    allow_download = bool(encode.get("allow_download", False))
    sample_posterior = bool(encode.get("sample_posterior", False))
    if version == "sd3":
        # One preset holds the VAE and the text encoders; text needs no extra files.
        return StableDiffusion3Autoencoder(encode.get("preset"), allow_download=allow_download,
                                           sample_posterior=sample_posterior, seed=0)
    return StableDiffusionAutoencoder(
        version,
        vocabulary=encode.get("vocabulary"),
        image_encoder_weights=encode.get("image_encoder_weights"),
        text_encoder_weights=encode.get("text_encoder_weights"),
        decoder_weights=encode.get("decoder_weights"),
        allow_download=allow_download,
        sample_posterior=sample_posterior,
        seed=0,
        text=text,
        check_weights=check,
    )
