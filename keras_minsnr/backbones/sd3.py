"""KerasHub Stable Diffusion 3: its MMDiT as a backbone, its presets.

KerasHub (>= 0.32) ships SD3 with `from_preset` but no training loop. This module puts
the MMDiT of a `keras_hub.models.StableDiffusion3Backbone` behind the
`keras_minsnr.backbones` contract so `DiffusionModel` trains it with the rectified-flow
target and any loss weighting. The VAE and the CLIP (and T5) encoders of a preset stay
frozen in `autoencoders.StableDiffusion3Autoencoder`.

The text condition of SD3 is two tensors: the token context ``(L, D)`` (CLIP-L and
CLIP-G hidden states, zero-padded to the T5 width D = 4096, then T5 or zero rows) and the
pooled projection ``(P,)`` (CLIP-L and CLIP-G pooled, P = 2048). The backbone contract
has one context tensor, so they travel packed as ``(L + 1, W)``, ``W = max(D, P)``: rows
``0 … L-1`` are the context, row ``L`` holds the pooled projection (zero-padded). Label
dropout and classifier-free guidance then swap both together for the empty prompt's,
as SD3 does. `pack_context` / `unpack_context` convert.

KerasHub is imported lazily so that `import keras_minsnr` stays light.
"""

import json
import os

import keras
import numpy as np
from keras import ops

from keras_minsnr.flow import FlowMatchingSchedule

# Files a KerasHub SD3 preset directory holds (`save_to_preset` writes them).
PRESET_FILES = ("config.json", "model.weights.h5", "preprocessor.json")
KAGGLE_PREFIX = "kaggle://"


# -- presets --------------------------------------------------------------------------


def _builtin_handles():
    """``{name: kaggle handle}`` of KerasHub's SD3 presets."""
    from keras_hub.src.models.stable_diffusion_3 import stable_diffusion_3_presets as p

    return {name: spec["kaggle_handle"] for name, spec in p.backbone_presets.items()}


def _kaggle_cache_dir(handle):
    """The kagglehub cache folder of a versioned handle, or None (no kagglehub / version)."""
    try:
        from kagglehub.cache import Cache
        from kagglehub.handle import parse_model_handle
    except ImportError:
        return None
    h = parse_model_handle(handle[len(KAGGLE_PREFIX):])
    if not h.is_versioned():
        return None
    config = Cache().load_from_cache(h, "config.json")
    return os.path.dirname(config) if config else Cache().get_path(h)


def _not_cached_message(preset, handle, folder):
    where = f" (kagglehub cache folder {folder})" if folder else ""
    return (
        f"The Stable Diffusion 3 preset {preset!r} is not available offline: "
        f"{handle or preset} is not in the local cache{where} and downloading is off. "
        "To place it locally, on a machine with network access (and the model's terms "
        "accepted on kaggle.com) run `keras_minsnr.backbones.sd3.download_preset("
        f"{preset!r}, 'sd3_preset')` "
        f"(or `kagglehub.model_download({(handle or preset).removeprefix(KAGGLE_PREFIX)!r}"
        ", output_dir='sd3_preset')`), copy the folder here and pass its path as the "
        "preset (e.g. --set backbone_args.preset=/path/sd3_preset); or copy it into the "
        "kagglehub cache (KAGGLEHUB_CACHE); or pass allow_download=True (command line: "
        "--allow-download) where the network is reachable."
    )


def resolve_preset(preset, allow_download=False):
    """Where to load a Stable Diffusion 3 preset from, without touching the network.

    Args:
        preset: a local preset directory (what ``save_to_preset`` writes), a KerasHub
            SD3 preset name such as ``"stable_diffusion_3_medium"``, or a
            ``kaggle://`` handle.
        allow_download: let KerasHub download a preset that is not cached.

    Returns:
        A local directory (a preset folder, or its folder in the kagglehub cache), or with
        ``allow_download`` the name itself for KerasHub to fetch.

    Raises:
        FileNotFoundError: the preset is not local or cached and ``allow_download`` is
            off; the message names it and says how to place it locally.
        ValueError: not a directory, not a known name and not a ``kaggle://`` handle.
    """
    if not isinstance(preset, str) or not preset:
        raise ValueError(f"preset must be a preset name or a directory, got {preset!r}.")
    path = os.path.expanduser(preset)
    if os.path.isdir(path):
        missing = [f for f in PRESET_FILES[:1] if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(
                f"{path!r} is not a KerasHub preset directory (no {missing[0]}). Write one "
                "with `StableDiffusion3Backbone.save_to_preset(dir)` and "
                "`StableDiffusion3TextToImagePreprocessor.save_to_preset(dir)`."
            )
        return path
    handles = _builtin_handles()
    if preset in handles:
        handle = handles[preset]
    elif preset.startswith(KAGGLE_PREFIX):
        handle = preset
    elif os.sep in preset or preset.startswith((".", "~")):
        raise FileNotFoundError(f"Stable Diffusion 3 preset directory {path!r} does not exist.")
    else:
        raise ValueError(
            f"Unknown Stable Diffusion 3 preset {preset!r}: not a directory, not a "
            f"kaggle:// handle, and not one of KerasHub's presets: {', '.join(handles)}."
        )
    folder = _kaggle_cache_dir(handle)
    if folder and all(os.path.isfile(os.path.join(folder, f)) for f in PRESET_FILES):
        return folder
    if allow_download:
        return handle
    raise FileNotFoundError(_not_cached_message(preset, handle, folder))


_LOADED = {}


def load_preset(preset, allow_download=False):
    """``(StableDiffusion3Backbone, StableDiffusion3TextToImagePreprocessor)`` of a preset.

    Loaded once per process and location (the adapter, the encoders and the decoder of a
    run share it); `clear_loaded_presets` frees them. Network errors while downloading
    (``allow_download=True``) are reported with the same advice as a missing preset.
    """
    import keras_hub

    location = resolve_preset(preset, allow_download)
    if location not in _LOADED:
        try:
            backbone = keras_hub.models.StableDiffusion3Backbone.from_preset(location)
            preprocessor = keras_hub.models.StableDiffusion3TextToImagePreprocessor.from_preset(
                location
            )
        except OSError as error:  # requests' ConnectionError is an OSError
            if os.path.isdir(location):
                raise
            raise FileNotFoundError(
                _not_cached_message(preset, location, None) + f" ({error})"
            ) from None
        except TypeError as error:
            if "clip_l_preprocessor" not in str(error):
                raise
            raise ValueError(
                f"The preprocessor.json of the preset {location!r} is not a Stable "
                "Diffusion 3 preprocessor: KerasHub's StableDiffusion3TextToImage."
                "save_to_preset lets the nested CLIP preprocessors overwrite it. Write the "
                "preset with keras_minsnr.backbones.sd3.save_preset(backbone, "
                "preprocessor, dir) (or download_preset(name, dir)) instead."
            ) from None
        _LOADED[location] = (backbone, preprocessor)
    return _LOADED[location]


def save_preset(backbone, preprocessor, path):
    """Writes an SD3 backbone and preprocessor as a preset directory that loads back.

    KerasHub's own ``save_to_preset`` of the SD3 preprocessor lets its nested CLIP
    preprocessors overwrite ``preprocessor.json``; this writes the SD3 preprocessor's
    config last. Returns ``path``.
    """
    backbone.save_to_preset(path)
    preprocessor.save_to_preset(path)
    config = keras.saving.serialize_keras_object(preprocessor)
    for key in ("compile_config", "build_config"):
        config.pop(key, None)
    with open(os.path.join(path, "preprocessor.json"), "w") as f:
        json.dump(config, f, indent=4)
    return path


def download_preset(preset, path):
    """Downloads a KerasHub SD3 preset (network needed) and saves it to ``path``.

    Run it once where the network is reachable (accept the model's terms on kaggle.com
    first), then use ``path`` as the preset anywhere.

    Example:
    ```python
    download_preset("stable_diffusion_3_medium", "/weights/stable_diffusion_3_medium")
    ```
    """
    backbone, preprocessor = load_preset(preset, allow_download=True)
    return save_preset(backbone, preprocessor, path)


def clear_loaded_presets():
    """Forgets the presets `load_preset` keeps in memory."""
    _LOADED.clear()


def text_context_length(backbone, preprocessor):
    """Rows of SD3's token context: CLIP's tokens then T5's (or as many zero rows)."""
    clip = preprocessor.clip_l_preprocessor.sequence_length
    if backbone.t5 is not None:
        return clip + preprocessor.t5_preprocessor.sequence_length
    return clip + backbone.clip_l.max_sequence_length


# -- the packed text condition --------------------------------------------------------


def pack_context(context, pooled):
    """``(B, L, D)`` context and ``(B, P)`` pooled projection → ``(B, L + 1, max(D, P))``.

    Numpy in and out; row ``L`` holds the pooled projection, zero-padded.
    """
    context = np.asarray(context, dtype="float32")
    pooled = np.asarray(pooled, dtype="float32")
    if context.ndim != 3 or pooled.ndim != 2 or pooled.shape[0] != context.shape[0]:
        raise ValueError(
            f"pack_context needs context (B, L, D) and pooled (B, P); got "
            f"{context.shape} and {pooled.shape}."
        )
    batch, length, dim = context.shape
    width = max(dim, pooled.shape[1])
    packed = np.zeros((batch, length + 1, width), dtype="float32")
    packed[:, :length, :dim] = context
    packed[:, length, : pooled.shape[1]] = pooled
    return packed


def unpack_context(packed, context_dim, pooled_dim):
    """The inverse of `pack_context`: ``(context (B, L, D), pooled (B, P))`` (tensors)."""
    return packed[:, :-1, :context_dim], packed[:, -1, :pooled_dim]


def flow_timestep(steps, num_train_timesteps=1000, shift=3.0):
    """SD3's MMDiT timestep of integer training steps: ``T · shift_time((i + 1) / T)``.

    `FlowMatchingSchedule(T, shift)` gives step ``i`` the flow time
    ``t_i = shift·u / (1 + (shift − 1)·u)``, ``u = (i + 1) / T``; KerasHub's
    `FlowMatchEulerDiscreteScheduler` calls that ``sigma`` and feeds the MMDiT
    ``sigma · num_train_timesteps``. Tensor in, float32 tensor out.
    """
    u = (ops.cast(steps, "float32") + 1.0) / float(num_train_timesteps)
    sigma = shift * u / (1.0 + (shift - 1.0) * u)
    return sigma * float(num_train_timesteps)


# -- the backbone ---------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="keras_minsnr")
class StableDiffusion3MMDiT(keras.Model):
    """The MMDiT of KerasHub's Stable Diffusion 3 behind the `keras_minsnr.backbones` contract.

    Called with ``{"x": latents (B, h, w, 16), "t": int32 steps (B,), "y": packed text
    condition (B, L + 1, W)}`` (see `pack_context`), it returns SD3's prediction, the
    rectified-flow velocity ``ε − x₀``, shaped like ``x`` (float32). Train it with
    ``DiffusionModel(backbone, backbone.flow_schedule(), prediction_type="flow")``: step
    ``i`` of that schedule is fed to the MMDiT as SD3's timestep
    ``1000 · shift_time((i + 1)/1000)`` (`flow_timestep`), the training grid of KerasHub's
    scheduler. Only the MMDiT's weights belong to this model; the VAE and text encoders
    stay frozen outside it (`autoencoders.StableDiffusion3Autoencoder`).

    Args:
        preset: a local KerasHub preset directory, a KerasHub SD3 preset name or a
            ``kaggle://`` handle (see `resolve_preset`); its MMDiT weights are loaded.
        mmdit: a `keras_hub.models.MMDiT` (or its serialised config) instead of a preset.
        latent_shape: ``(h, w)`` or ``(h, w, c)`` latents to train on (pixels / 8); the
            MMDiT's weights do not depend on it. Default: the preset's image size / 8.
        context_length: rows ``L`` of the token context; default from the preset
            (CLIP's 77 plus T5's tokens, or 77 zero rows without T5).
        num_train_timesteps: ``T`` of the flow schedule (KerasHub: 1000).
        shift: SD3's time shift; default the preset's (3.0 for SD3 medium).
        allow_download: let KerasHub download a preset that is not cached.

    Example:
    ```python
    backbone = StableDiffusion3MMDiT("sd3_preset/", latent_shape=(64, 64))
    model = kms.DiffusionModel(backbone, backbone.flow_schedule(), prediction_type="flow",
                               weighting="min_snr", gamma=5.0,
                               timestep_sampling="logit_normal")
    ```

    Reference:
        Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image
        Synthesis", 2024 (SD3, MMDiT); KerasHub `StableDiffusion3Backbone`.
    """

    @classmethod
    def data_arguments(cls, info, config):
        """The data's latent shape, and the run's flow timesteps and shift (the MMDiT
        embeds flow times itself; see `backbones.contract`)."""
        return {
            "latent_shape": tuple(info.image_shape),
            "num_train_timesteps": config["num_timesteps"],
            "shift": config.get("flow_shift", 1.0),
        }

    @classmethod
    def lora_target_groups(cls):
        """KerasHub's MMDiT: fused qkv/output of both streams, their MLPs (not those of
        the timestep and pooled embeddings) and the adaLN modulations."""
        return {
            "attention": [(r"DismantledBlock", r"attention_(qkv|proj)2?")],
            "mlp": [(r"MLP", r"(x|context)_block/mlp/dense[12]")],
            "modulation": [(r"AdaptiveLayerNormalization", r"dense")],
            "embedding": [(r"TimestepEmbedding", r".*")],
        }

    def __init__(
        self,
        preset=None,
        mmdit=None,
        latent_shape=None,
        context_length=None,
        num_train_timesteps=1000,
        shift=None,
        allow_download=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        import keras_hub  # noqa: F401  (registers MMDiT for deserialisation)

        if (preset is None) == (mmdit is None):
            raise ValueError("Give exactly one of preset= or mmdit=.")
        if preset is not None:
            backbone, preprocessor = load_preset(preset, allow_download)
            # A copy of its own (the loaded preset is shared with the encoders and other
            # adapters), in the current dtype policy (presets may store float16).
            mmdit = _copy_mmdit(backbone.diffuser, latent_shape, keras.config.dtype_policy())
            latent_shape = None
            shift = backbone.shift if shift is None else shift
            if context_length is None:
                context_length = text_context_length(backbone, preprocessor)
        elif isinstance(mmdit, dict):
            mmdit = keras.saving.deserialize_keras_object(mmdit)
        if context_length is None:
            raise ValueError("context_length is needed when building from an mmdit.")
        if int(num_train_timesteps) != num_train_timesteps or num_train_timesteps < 2:
            raise ValueError(
                f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}."
            )
        shift = 3.0 if shift is None else float(shift)
        if not (np.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {shift!r}.")
        if latent_shape is not None:
            mmdit = _copy_mmdit(mmdit, latent_shape)
        self.mmdit = mmdit
        self.context_length = int(context_length)
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = shift
        self.context_dim = int(mmdit.context_shape[-1])
        self.pooled_dim = int(mmdit.pooled_projection_shape[-1])
        self.image_shape = tuple(int(d) for d in mmdit.latent_shape)
        self.conditioning = "context"
        self.num_classes = None
        self.context_shape = (self.context_length + 1, max(self.context_dim, self.pooled_dim))
        self.built = True

    def flow_schedule(self):
        """The `FlowMatchingSchedule` whose steps this backbone's timesteps are."""
        return FlowMatchingSchedule(self.num_train_timesteps, self.shift)

    def call(self, inputs, training=None):
        if not isinstance(inputs, dict) or not {"x", "t", "y"} <= set(inputs):
            raise ValueError(
                "StableDiffusion3MMDiT expects {'x': latents, 't': steps, 'y': packed "
                "text condition}; encode the empty prompt for the unconditional branch."
            )
        y = inputs["y"]
        if tuple(y.shape[1:]) != self.context_shape:
            raise ValueError(
                f"StableDiffusion3MMDiT's 'y' has shape {tuple(y.shape)}; expected (batch, "
                f"{self.context_shape[0]}, {self.context_shape[1]}) as `pack_context` makes."
            )
        context, pooled = unpack_context(y, self.context_dim, self.pooled_dim)
        timestep = flow_timestep(inputs["t"], self.num_train_timesteps, self.shift)
        out = self.mmdit(
            {
                "latent": inputs["x"],
                "context": context,
                "pooled_projection": pooled,
                "timestep": ops.reshape(timestep, (-1, 1)),
            },
            training=training,
        )
        return ops.cast(out, "float32")

    def compute_output_shape(self, input_shape):
        return tuple(input_shape["x"])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                # The weights travel with the saved model; the preset is not reloaded.
                "preset": None,
                "mmdit": keras.saving.serialize_keras_object(self.mmdit),
                "latent_shape": None,
                "context_length": self.context_length,
                "num_train_timesteps": self.num_train_timesteps,
                "shift": self.shift,
                "allow_download": False,
            }
        )
        return config


def _copy_mmdit(mmdit, latent_shape=None, dtype=None):
    """A copy of the MMDiT with the same weights, for another latent size or dtype.

    Without a new ``latent_shape`` or ``dtype`` a given MMDiT (not from a preset) is
    returned as it is; the MMDiT's weights do not depend on the latent size.
    """
    if latent_shape is None:
        latent_shape = mmdit.latent_shape
    latent_shape = tuple(int(d) for d in latent_shape)
    channels = int(mmdit.latent_shape[-1])
    if len(latent_shape) == 2:
        latent_shape += (channels,)
    if len(latent_shape) != 3 or latent_shape[-1] != channels:
        raise ValueError(
            f"latent_shape must be (h, w) or (h, w, {channels}), got {latent_shape}."
        )
    patch = int(mmdit.patch_size)
    if latent_shape[0] % patch or latent_shape[1] % patch:
        raise ValueError(
            f"latent_shape {latent_shape[:2]} must be divisible by the patch size {patch}."
        )
    if max(latent_shape[:2]) // patch > int(mmdit.position_size):
        raise ValueError(
            f"latent_shape {latent_shape[:2]} needs more than the {mmdit.position_size} "
            f"positions per side the MMDiT has (patch size {patch})."
        )
    if latent_shape == tuple(mmdit.latent_shape) and dtype is None:
        return mmdit
    config = mmdit.get_config()
    config["latent_shape"] = latent_shape
    if dtype is not None:
        config["dtype"] = keras.dtype_policies.serialize(keras.dtype_policies.get(dtype))
    copy = type(mmdit).from_config(config)
    for target, source in zip(copy.weights, mmdit.weights):
        # Through the host: a cast to the same dtype may hand back the very same JAX
        # buffer, which fit() then donates out from under the shared preset.
        target.assign(ops.cast(ops.convert_to_numpy(source), target.dtype))
    return copy


# -- a tiny random preset (tests, guides, offline demos) ------------------------------


def _tiny_vocabulary():
    """A character-level CLIP BPE vocabulary and merges (enough to tokenise any ASCII)."""
    vocabulary = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for code in range(33, 127):
        for token in (chr(code), chr(code) + "</w>"):
            vocabulary[token] = len(vocabulary)
    vocabulary["th"] = len(vocabulary)
    vocabulary["the</w>"] = len(vocabulary)
    return vocabulary, ["t h", "th e</w>"]


def save_tiny_preset(path, image_size=32, sequence_length=8, seed=0):
    """Writes a tiny randomly initialised SD3 preset (backbone and preprocessor) to ``path``.

    The real architecture at toy size (2-layer MMDiT of width 32, 4-level VAE of 32
    filters, 2-layer CLIP-L/G of width 16, a character-level tokenizer, no T5), saved with
    KerasHub's `save_to_preset` (see `save_preset`) so it loads through the same
    `from_preset` path as the released presets. For tests, guides and trying the pipeline offline.

    Returns:
        ``path``.
    """
    import keras_hub
    from keras_hub.src.models.vae.vae_backbone import VAEBackbone

    keras.utils.set_random_seed(seed)
    vocabulary, merges = _tiny_vocabulary()
    clip = keras_hub.models.CLIPPreprocessor
    tokenizer = keras_hub.models.CLIPTokenizer
    preprocessor = keras_hub.models.StableDiffusion3TextToImagePreprocessor(
        clip(tokenizer(vocabulary=vocabulary, merges=merges),
             sequence_length=sequence_length),
        clip(tokenizer(vocabulary=vocabulary, merges=merges, pad_with_end_token=True),
             sequence_length=sequence_length),
    )
    encoders = [
        keras_hub.models.CLIPTextEncoder(
            len(vocabulary), 16, 16, 2, 2, 32, activation, -2,
            max_sequence_length=sequence_length, name=name,
        )
        for name, activation in (("clip_l", "quick_gelu"), ("clip_g", "gelu"))
    ]
    vae = VAEBackbone([32] * 4, [1] * 4, [32] * 4, [1] * 4, sampler_method="mode")
    backbone = keras_hub.models.StableDiffusion3Backbone(
        mmdit_patch_size=2, mmdit_hidden_dim=32, mmdit_num_layers=2, mmdit_num_heads=2,
        mmdit_position_size=16, mmdit_qk_norm=None, mmdit_dual_attention_indices=None,
        vae=vae, clip_l=encoders[0], clip_g=encoders[1], latent_channels=16,
        image_shape=(image_size, image_size, 3), shift=3.0,
    )
    return save_preset(backbone, preprocessor, path)


PRESETS = {
    "sd3_mmdit": {
        "class": StableDiffusion3MMDiT,
        "config": {
            "preset": "stable_diffusion_3_medium",
            "latent_shape": None,  # the data's latents in a run
            "num_train_timesteps": 1000,
            "shift": None,  # the preset's; a run passes its flow_shift
        },
        "description": (
            "KerasHub Stable Diffusion 3 medium MMDiT (2B; 16-channel latents, CLIP-L/G + "
            "T5 context packed with the pooled projection). Rectified flow, shift 3.0, "
            "velocity target. Weights: from_preset (a local preset directory via "
            "preset=PATH, or a cached KerasHub preset name)."
        ),
        "paper_params": 2_000_000_000,
        "schedule": "flow",
        "prediction_type": "flow",
    },
}
