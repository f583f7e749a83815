"""A run's latent data: encode ``encode.source`` into the cache ``data`` once, check a
cache against the VAE the run names, and show latent samples as pictures.

The VAE and text encoders are the autoencoders of `keras_minsnr.backbones.autoencoders`,
which own each VAE's scale and shift; this module only reads a run's config.
"""

import json
import os
import sys

import numpy as np

from keras_minsnr import backbones
from keras_minsnr.backbones import autoencoders
from keras_minsnr.data import latents
from keras_minsnr.run_config import ENCODE_KEYS


def resolve_encode_config(config):
    """``config["encode"]`` checked, with the defaults it takes from the run ({} if unset).

    ``allow_download`` defaults to ``backbone_args.allow_download``; SD3's ``preset`` to
    the backbone's, and the preset is resolved now (no network unless
    ``allow_download``), so one that is not available fails before anything is encoded.
    """
    encode = dict(config.get("encode") or {})
    if not encode:
        return encode
    unknown = sorted(set(encode) - set(ENCODE_KEYS))
    if unknown:
        raise ValueError(
            f"Unknown encode key(s) {unknown}. Valid keys: {', '.join(ENCODE_KEYS)}."
        )
    args = config.get("backbone_args") or {}
    encode.setdefault("allow_download", args.get("allow_download", False))
    if encode.get("version") == "sd3":
        preset_config = backbones.PRESETS.get(config.get("backbone"), {}).get("config", {})
        encode.setdefault("preset", args.get("preset", preset_config.get("preset")))
        if not encode["preset"]:
            raise ValueError(
                "encode.version 'sd3' needs a KerasHub preset: --set "
                "backbone_args.preset=DIR (or encode.preset=DIR)."
            )
        backbones.sd3.resolve_preset(encode["preset"], bool(encode["allow_download"]))
    return encode


def check_latent_cache(config, encode=None):
    """The manifest of the complete latent cache in ``config["data"]``, or None.

    Raises `ValueError` (one line, nothing written) for a cache of an older format and
    for a cache encoded with another VAE than the one ``encode.version`` names.
    """
    cache_dir = os.path.expanduser(str(config.get("data")))
    if not os.path.isfile(os.path.join(cache_dir, latents.MANIFEST)):
        return None
    manifest = latents.read_manifest(cache_dir)  # refuses an older format
    if encode is None:
        encode = resolve_encode_config(config)
    if manifest is None or not encode:
        return manifest
    version = encode.get("version", "v1")
    wanted = autoencoders.vae_name(version)
    if manifest.get("vae") is not None and manifest["vae"] != wanted:
        raise ValueError(
            f"The latent cache in {cache_dir!r} was encoded with "
            f"{latents.describe_convention(manifest)}, but this run names the VAE "
            f"{wanted!r} (encode.version={version!r}): re-encode the data into another "
            "data= folder, or set encode.version to the cache's VAE."
        )
    return manifest


def check_data(config):
    """Everything about a run's data that can be checked before anything is written:
    the ``encode`` keys, an existing cache (format and VAE), and the image size to
    encode (multiples of 8). Returns the cache's manifest, or None."""
    encode = resolve_encode_config(config)
    manifest = check_latent_cache(config, encode)
    if manifest is None and encode.get("source"):
        _check_image_size(encode, autoencoders.vae_name(encode.get("version", "v1")))
    return manifest


def _check_image_size(encode, vae):
    size = (encode.get("source_args") or {}).get("image_size")
    if isinstance(size, int) and not isinstance(size, bool):
        autoencoders.check_image_shape((size, size), vae)


def prepare_data(config):
    """Encodes ``encode.source`` into the latent cache ``config["data"]`` once.

    A no-op unless ``config["encode"]`` is set. When ``data`` already holds a complete
    cache of the run's VAE it is reused; otherwise the raw data ``encode.source`` (a TFDS
    name or a folder, loaded with ``encode.source_args``) is encoded with the
    autoencoder ``encode`` names (SD 1.x/2.x: ``0.18215 · μ``; SD3: its preset's
    convention) and, for caption folders, its text encoder (``"context"``).
    """
    encode = resolve_encode_config(config)
    if not encode:
        return None
    version = encode.get("version", "v1")
    vae = autoencoders.vae_name(version)
    if encode.get("decoder_weights"):  # a typo should fail now, not at the first samples
        backbones.stable_diffusion.resolve_weights(
            encode["decoder_weights"], version, "decoder", bool(encode["allow_download"])
        )
    cache_dir = os.path.expanduser(str(config["data"]))
    manifest = check_latent_cache(config, encode)
    if manifest is not None:
        return manifest
    if not encode.get("source"):
        raise FileNotFoundError(
            f"No latent cache in data={cache_dir!r}. Encode one first: name the raw "
            "data with --set encode.source=DATA (a TFDS name such as imagenet2012, an "
            "image folder, or a caption folder with metadata.jsonl) and the VAE weights "
            "with --set encode.image_encoder_weights=vae_encoder.h5; or write the cache "
            "with keras_minsnr.data.cache_latents and pass --set data=CACHE_DIR."
        )
    _check_image_size(encode, vae)
    if config.get("backbone") in backbones.stable_diffusion.PRESETS:
        # Fail on a missing UNet file before spending time on encoding.
        args = config.get("backbone_args") or {}
        unet_version = args.get(
            "version", backbones.PRESETS[config["backbone"]]["config"]["version"])
        backbones.stable_diffusion.resolve_weights(
            args.get("weights"), unet_version, "diffusion_model",
            bool(args.get("allow_download", False)),
        )
    from keras_minsnr.data import make_dataset

    dataset, info = make_dataset(
        encode["source"],
        batch_size=int(encode.get("batch_size", 16)),
        shuffle=False,
        repeat=False,
        drop_remainder=False,
        **dict(encode.get("source_args") or {}),
    )
    autoencoders.check_image_shape(info.image_shape, vae)
    autoencoder = autoencoders.from_encode_config(encode, text=info.has_text)
    print(f"Encoding {encode['source']} into the latent cache {cache_dir} (once).")
    return latents.cache_latents(
        dataset,
        autoencoder,
        cache_dir,
        text_encode_fn=autoencoder.encode_text if info.has_text else None,
        info=info,
        verbose=1 if sys.stdout.isatty() else 0,
    )


def sample_context(config, num_samples):
    """Text contexts for samples of a text-conditional model: the first captions of the
    run's latent cache (``config["data"]``), repeated as needed."""
    cache_dir = os.path.expanduser(str(config["data"]))
    manifest = latents.read_manifest(cache_dir) if os.path.isdir(cache_dir) else None
    if manifest is None or not manifest.get("context_shape"):
        raise ValueError(
            f"This model is text-conditional but data={cache_dir!r} holds no latent "
            "cache with text embeddings to sample from."
        )
    shard = manifest["shards"][0]
    context = np.load(os.path.join(cache_dir, shard["context"]), mmap_mode="r")
    context = np.asarray(context[:num_samples], dtype="float32")
    return np.resize(context, (num_samples,) + context.shape[1:])


_DISPLAY_AUTOENCODERS = {}


def decode_for_display(images, config):
    """Latent samples decoded to pictures by the run's autoencoder: SD 1.x/2.x with
    ``encode.decoder_weights`` (or ``encode.allow_download``), SD3 with its preset's VAE.

    Anything else (pixel samples, or SD latents without a decoder, which the grid shows
    as their first three channels) is returned as is.
    """
    from keras import ops

    images = np.asarray(ops.convert_to_numpy(images))
    encode = config.get("encode") or {}
    version = encode.get("version", "v1")
    channels = 16 if version == "sd3" else 4
    has_decoder = version == "sd3" or encode.get("decoder_weights") or encode.get(
        "allow_download")
    if not encode or images.ndim != 4 or images.shape[-1] != channels or not has_decoder:
        return images
    encode = resolve_encode_config(config)
    key = json.dumps(encode, sort_keys=True, default=str)
    if key not in _DISPLAY_AUTOENCODERS:
        _DISPLAY_AUTOENCODERS[key] = autoencoders.from_encode_config(
            encode, text=False, check=False)
    return _DISPLAY_AUTOENCODERS[key].decode(images)
