"""Training runs: a recipe config in, a run directory out.

A run directory holds::

    config.json      the resolved configuration (recipe + overrides)
    metrics.csv      one row per epoch (loss and the per-SNR-quarter MSE)
    logs/            TensorBoard logs
    checkpoints/     latest.keras (model, optimizer, EMA, RNG state) + state.json
    samples.png      a grid of samples, refreshed during training
    model.keras      the final model

Checkpoints are written to a temporary file and renamed, so a killed run never leaves a
half-written one; starting the same run again resumes from the last checkpoint.
"""

import ast
import copy
import json
import os
import sys
import time

import keras
import numpy as np
from keras import ops

from keras_minsnr import backbones
from keras_minsnr.diffusion_model import DiffusionModel
from keras_minsnr.schedules import NoiseSchedule
from keras_minsnr.visualization import save_image_grid

# The config schema lives in run_config; these names stay importable from here.
from keras_minsnr.run_config import DEFAULTS  # noqa: F401
from keras_minsnr.run_config import ENCODE_KEYS  # noqa: F401
from keras_minsnr.run_config import RESUMABLE_KEYS  # noqa: F401
from keras_minsnr.run_config import _set_nested  # noqa: F401
from keras_minsnr.run_config import parse_overrides  # noqa: F401
from keras_minsnr.run_config import resolve_config  # noqa: F401


def make_encoders(encode, needs_text):
    """The frozen Stable Diffusion VAE encoder (and text encoder) named by ``encode``.

    Missing weight files raise `FileNotFoundError` naming the file and KerasCV's URL
    before anything is built; ``None`` paths give random weights (tests only).
    """
    from keras_minsnr.backbones import stable_diffusion as sd

    version = encode.get("version", "v1")
    sd.resolve_weights(encode.get("image_encoder_weights"), version, "image_encoder")
    kwargs = dict(
        version=version,
        image_encoder_weights=encode.get("image_encoder_weights"),
        sample_posterior=bool(encode.get("sample_posterior", False)),
        seed=0,
    )
    if needs_text:
        sd.resolve_weights(encode.get("text_encoder_weights"), version, "text_encoder")
        return sd.StableDiffusionEncoders(
            vocabulary=encode.get("vocabulary"),
            text_encoder_weights=encode.get("text_encoder_weights"),
            **kwargs,
        )

    class ImageOnlyEncoders(sd.StableDiffusionEncoders):
        def _make_tokenizer(self, vocabulary):
            return None  # no captions: no BPE vocabulary needed

    return ImageOnlyEncoders(**kwargs)


def prepare_data(config):
    """Encodes ``encode.source`` into the latent cache ``config["data"]`` once.

    A no-op unless ``config["encode"]`` is set. When ``data`` already holds a complete
    cache it is reused; otherwise the raw data ``encode.source`` (a TFDS name or a
    folder, loaded with ``encode.source_args``) is encoded with the Stable Diffusion VAE
    (latents x 0.18215) and, for caption folders, the text encoder (``"context"``).
    """
    encode = config.get("encode") or {}
    if not encode:
        return None
    unknown = sorted(set(encode) - set(ENCODE_KEYS))
    if unknown:
        raise ValueError(
            f"Unknown encode key(s) {unknown}. Valid keys: {', '.join(ENCODE_KEYS)}."
        )
    if encode.get("decoder_weights"):  # a typo should fail now, not at the first samples
        backbones.stable_diffusion.resolve_weights(
            encode["decoder_weights"], encode.get("version", "v1"), "decoder"
        )
    from keras_minsnr.data import latents
    from keras_minsnr.data import make_dataset

    cache_dir = os.path.expanduser(str(config["data"]))
    manifest = latents.read_manifest(cache_dir) if os.path.isdir(cache_dir) else None
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
    if config["backbone"] in backbones.stable_diffusion.PRESETS:
        # Fail on a missing UNet file before spending time on encoding.
        version = backbones.PRESETS[config["backbone"]]["config"]["version"]
        version = config["backbone_args"].get("version", version)
        backbones.stable_diffusion.resolve_weights(
            config["backbone_args"].get("weights"), version, "diffusion_model"
        )
    source_args = dict(encode.get("source_args") or {})
    dataset, info = make_dataset(
        encode["source"],
        batch_size=int(encode.get("batch_size", 16)),
        shuffle=False,
        repeat=False,
        drop_remainder=False,
        **source_args,
    )
    encoders = make_encoders(encode, needs_text=info.has_text)
    print(f"Encoding {encode['source']} into the latent cache {cache_dir} (once).")
    return latents.cache_latents(
        dataset,
        encoders.encode_images,
        cache_dir,
        scale=latents.SD_LATENT_SCALE,
        text_encode_fn=encoders.encode_text if info.has_text else None,
        info=info,
        verbose=1 if sys.stdout.isatty() else 0,
    )


def build_dataset(config):
    from keras_minsnr.data import make_dataset

    prepare_data(config)
    kwargs = dict(config["data_args"])
    if config["image_size"] is not None:
        kwargs.setdefault("image_size", config["image_size"])
    return make_dataset(
        config["data"],
        batch_size=config["batch_size"],
        repeat=True,
        shuffle=True,
        seed=config["seed"],
        **kwargs,
    )


def build_model(config, info):
    """The backbone (shaped by the data) wrapped in a `DiffusionModel`, compiled."""
    if config["mixed_precision"]:
        keras.mixed_precision.set_dtype_policy(config["mixed_precision"])
    preset = backbones.PRESETS.get(config["backbone"])
    if preset is None:
        backbones.get(config["backbone"])  # raises with the list of presets
    args = dict(config["backbone_args"])
    if "image_shape" in preset["config"]:
        args.setdefault("image_shape", tuple(info.image_shape))
    if "num_classes" in preset["config"]:
        args.setdefault("num_classes", info.num_classes)
    backbone = backbones.get(config["backbone"], **args)
    conditional = getattr(backbone, "conditioning", None) is not None
    model = DiffusionModel(
        backbone,
        NoiseSchedule(config["schedule"], config["num_timesteps"], config["zero_terminal_snr"]),
        prediction_type=config["prediction_type"],
        weighting=config["weighting"],
        gamma=config["gamma"],
        label_dropout=config["label_dropout"] if conditional else 0.0,
        ema_decay=config["ema_decay"],
        seed=config["seed"],
        clip_denoised=config["clip_denoised"],
    )
    if model.conditioning == "context" and getattr(info, "null_context_file", None):
        model.set_null_context(np.load(info.null_context_file))
    learning_rate = config["learning_rate"]
    if config["warmup_steps"]:
        learning_rate = keras.optimizers.schedules.CosineDecay(
            0.0,
            decay_steps=1,
            alpha=1.0,
            warmup_target=learning_rate,
            warmup_steps=config["warmup_steps"],
        )
    optimizer = keras.optimizers.AdamW(
        learning_rate,
        beta_1=config["beta_1"],
        beta_2=config["beta_2"],
        weight_decay=config["weight_decay"],
        clipnorm=config["clipnorm"],
    )
    model.compile(optimizer=optimizer)
    return model


def _atomic_save_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def atomic_save_model(model, path):
    tmp = path + ".tmp.keras"
    model.save(tmp)
    os.replace(tmp, path)


class RunCheckpoint(keras.callbacks.Callback):
    """Saves the whole model (weights, optimizer, EMA, RNG state) atomically each epoch."""

    def __init__(self, run_dir):
        super().__init__()
        self.directory = os.path.join(run_dir, "checkpoints")
        os.makedirs(self.directory, exist_ok=True)
        self.model_path = os.path.join(self.directory, "latest.keras")
        self.state_path = os.path.join(self.directory, "state.json")

    def on_epoch_end(self, epoch, logs=None):
        atomic_save_model(self.model, self.model_path)
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        _atomic_save_json(self.state_path, {"epoch": epoch + 1, "step": step})

    def load(self):
        """``(model, epochs_done)`` from the last checkpoint, or ``(None, 0)``."""
        if not (os.path.exists(self.state_path) and os.path.exists(self.model_path)):
            return None, 0
        with open(self.state_path) as f:
            state = json.load(f)
        return keras.models.load_model(self.model_path), int(state["epoch"])


class SampleGrid(keras.callbacks.Callback):
    """Writes a grid of samples (one row per class for class-conditional models)."""

    def __init__(self, path, config, every_epochs=1):
        super().__init__()
        self.path = path
        self.config = config
        self.every_epochs = max(int(every_epochs), 1)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_epochs == 0:
            write_samples(self.model, self.path, self.config)


def sample_labels(model, num_samples):
    if model.conditioning != "class":
        return None
    # Rows of one class each when the grid is square-ish.
    per_class = max(num_samples // model.num_classes, 1)
    return np.repeat(np.arange(model.num_classes), per_class)[:num_samples]


def sample_context(config, num_samples):
    """Text contexts for samples of a text-conditional model: the first captions of the
    run's latent cache (``config["data"]``), repeated as needed."""
    from keras_minsnr.data import latents

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


def write_samples(model, path, config, num_samples=None, seed=0, **overrides):
    """Generates ``num_samples`` images with the config's sampler and saves a grid."""
    num_samples = num_samples or config["num_samples"]
    labels = sample_labels(model, num_samples)
    if model.conditioning == "context":
        overrides.setdefault("context", sample_context(config, num_samples))
    kwargs = dict(
        num_steps=config["sample_steps"],
        sampler=config["sampler"],
        guidance_scale=config["guidance_scale"],
        clip_denoised=config["clip_denoised"],
        seed=seed,
    )
    kwargs.update(overrides)
    if labels is None:
        images = model.generate(num_samples, **kwargs)
    else:
        images = model.generate(labels=labels, **kwargs)
    per_class = 0 if labels is None else len(labels) // model.num_classes
    # One row per class when every class gets a full row; otherwise a square-ish grid.
    columns = per_class if per_class > 1 else int(np.ceil(np.sqrt(len(images))))
    save_image_grid(decode_for_display(images, config), path, columns=columns)
    return images


_DECODERS = {}


def decode_for_display(images, config):
    """Latent samples decoded to pictures with the VAE named by ``encode.decoder_weights``.

    Anything else (pixel samples, or latents without a decoder file, which the grid shows
    as their first three channels) is returned as is.
    """
    encode = config.get("encode") or {}
    images = np.asarray(ops.convert_to_numpy(images))
    if not encode.get("decoder_weights") or images.shape[-1] != 4:
        return images
    version = encode.get("version", "v1")
    height, width = images.shape[1] * 8, images.shape[2] * 8
    key = (version, encode["decoder_weights"], height, width)
    if key not in _DECODERS:
        _DECODERS[key] = backbones.stable_diffusion.latent_decoder(
            version, encode["decoder_weights"], height, width
        )
    decoder = _DECODERS[key]
    decoded = [decoder.predict_on_batch(images[i : i + 4]) for i in range(0, len(images), 4)]
    return np.concatenate([ops.convert_to_numpy(d) for d in decoded])


def check_run_directory(run_dir, config):
    """Refuses to resume a directory that holds a run with a different configuration."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        previous = json.load(f)
    current = json.loads(json.dumps(config, default=str))
    changed = sorted(
        k for k in set(previous) | set(current)
        if k not in RESUMABLE_KEYS and previous.get(k) != current.get(k)
    )
    if changed:
        raise ValueError(
            f"{run_dir} already holds a run with a different configuration (changed: "
            f"{', '.join(changed)}). It is never overwritten: pick a new --output-dir, or "
            "repeat the original settings to resume it."
        )


def train(config, run_dir, verbose=None):
    """Trains (or resumes) a run and returns the trained `DiffusionModel`.

    ``verbose`` defaults to a live progress bar on a terminal and one line per epoch
    otherwise (logs, CI).
    """
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    os.makedirs(run_dir, exist_ok=True)
    check_run_directory(run_dir, config)
    _atomic_save_json(os.path.join(run_dir, "config.json"), config)
    keras.utils.set_random_seed(config["seed"])

    dataset, info = build_dataset(config)
    checkpoint = RunCheckpoint(run_dir)
    model, epochs_done = checkpoint.load()
    if model is None:
        model = build_model(config, info)
    total_epochs = int(np.ceil(config["steps"] / config["steps_per_epoch"]))
    if epochs_done:
        print(f"Resuming {run_dir} after epoch {epochs_done} of {total_epochs}.")
    callbacks = [
        keras.callbacks.CSVLogger(os.path.join(run_dir, "metrics.csv"), append=True),
        keras.callbacks.TensorBoard(os.path.join(run_dir, "logs"), write_graph=False),
        checkpoint,
        SampleGrid(os.path.join(run_dir, "samples.png"), config, config["sample_every_epochs"]),
    ]
    start = time.time()
    if epochs_done < total_epochs:
        model.fit(
            dataset,
            epochs=total_epochs,
            initial_epoch=epochs_done,
            steps_per_epoch=config["steps_per_epoch"],
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,  # the tf.data pipeline shuffles with its own seed
        )
    atomic_save_model(model, os.path.join(run_dir, "model.keras"))
    if not os.path.exists(os.path.join(run_dir, "samples.png")):
        write_samples(model, os.path.join(run_dir, "samples.png"), config)
    print(f"Trained in {time.time() - start:.0f} s; run directory: {run_dir}")
    return model


def load_run(run_dir):
    """The config and model of a run directory (final model, else last checkpoint)."""
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json).")
    with open(config_path) as f:
        config = json.load(f)
    for name in ("model.keras", os.path.join("checkpoints", "latest.keras")):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            return config, keras.models.load_model(path)
    raise FileNotFoundError(
        f"{run_dir} has no model.keras nor checkpoints/latest.keras yet; train it first."
    )
