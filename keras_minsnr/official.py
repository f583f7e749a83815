"""Converter for the Min-SNR paper's released ViT checkpoints.

The official code (``TiankaiHang/Min-SNR-Diffusion-Training``,
``guided_diffusion/vision_transformer.py``) trains an in-context ViT: the timestep and the
class are two extra tokens in front of the patch tokens. Its PyTorch state dict maps onto
`keras_minsnr.backbones.vit.InContextViT` with ``timestep_embedding="table"`` and
``final_norm=False``; the converted model computes the same function (tests/test_official.py checks it against a float64 numpy forward
written in the official layer order).

The state dict of a depth-``L`` model with width ``D``, ``C`` input channels, patch
``p``, ``N`` patches, ``K`` class rows (1000 classes + the null class) and ``S`` timestep
rows (4000 in the released checkpoints)::

    pos_embed                     (1, 2 + N, D)   [time token, class token, patches]
    patch_embed.proj.weight       (D, C, p, p)    Conv2d, stride p
    patch_embed.proj.bias         (D,)
    time_embedding.weight         (S, D)          indexed by the integer timestep
    class_embedding.weight        (K, D)          absent for unconditional models
    blocks.{i}.norm1.weight/bias  (D,)            LayerNorm, eps 1e-6
    blocks.{i}.attn.qkv.weight    (3D, D)         no bias of its own ...
    blocks.{i}.attn.q_bias        (D,)            ... q and v biases, k has none
    blocks.{i}.attn.v_bias        (D,)
    blocks.{i}.attn.proj.weight   (D, D), .bias (D,)
    blocks.{i}.norm2.weight/bias  (D,)
    blocks.{i}.mlp.fc1.weight     (4D, D), .bias (4D,)   exact GELU between
    blocks.{i}.mlp.fc2.weight     (D, 4D), .bias (D,)
    linear_projection.weight      (p*p*C, D), .bias (p*p*C,)

There is no final LayerNorm (``use_mean_pooling=True`` makes it an identity); the head
reads the patch tokens only and unpatchifies each token in ``(row, column, channel)``
order. The k bias that Keras' fused ``qkv`` layer has is set to zero: a bias on the keys
adds the same number to every logit of a query, which softmax cancels.

Downloads (the official ``configs/*/inference.sh`` fetch them from the repository's
release ``v0.0.0``): ``ema_0.9999_xl.pt`` (``vit_xl_patch2_32``, 28 layers, ImageNet-256
SD-VAE latents, predicts x0; FID 2.06 with EDM Heun, 50 steps, guidance 1.5) and
``ema_0.9999_large.pt`` (``vit_large_patch4_64``, 21 layers, ImageNet-64 pixels,
predicts epsilon; FID 2.28 with 20 steps, guidance 1.5).
"""

import os
import re

import numpy as np

RELEASE_URL = (
    "https://github.com/TiankaiHang/Min-SNR-Diffusion-Training/releases/download/v0.0.0/"
)

# The official model names: the fixed architecture of each (`depth` is a command-line
# flag there; these are the depths of its released checkpoints and training scripts).
OFFICIAL_CONFIGS = {
    "vit_base_patch2_32": dict(
        image_shape=(32, 32, 4), patch_size=2, hidden_size=768, num_heads=12, depth=12
    ),
    "vit_large_patch2_32": dict(
        image_shape=(32, 32, 4), patch_size=2, hidden_size=1024, num_heads=16, depth=None
    ),
    "vit_large_patch4_64": dict(
        image_shape=(64, 64, 3), patch_size=4, hidden_size=1024, num_heads=16, depth=21
    ),
    "vit_xl_patch2_32": dict(
        image_shape=(32, 32, 4), patch_size=2, hidden_size=1152, num_heads=16, depth=28
    ),
}

# How the paper's checkpoints were trained and sampled (configs/*/inference.sh).
PAPER_SETTINGS = {
    "vit_xl_patch2_32": dict(
        checkpoint="ema_0.9999_xl.pt", prediction_type="sample", sampler="edm_heun",
        num_steps=50, guidance_scale=1.5, latent_scale=0.18215, fid=2.06,
    ),
    "vit_large_patch4_64": dict(
        checkpoint="ema_0.9999_large.pt", prediction_type="epsilon", sampler="edm_heun",
        num_steps=20, guidance_scale=1.5, latent_scale=None, fid=2.28,
    ),
}

# What a config or the overrides may set (the rest of the layout is fixed by the format).
ARCHITECTURE_KEYS = (
    "image_shape", "patch_size", "hidden_size", "num_heads", "depth", "mlp_ratio",
    "num_classes", "timestep_table_size", "head_init_scale",
)

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


class StateDictMismatchError(ValueError):
    """A state dict that does not fit the model; lists every offending key.

    Attributes:
        missing: keys the model needs that the state dict lacks.
        unexpected: keys of the state dict the model has no place for.
        mismatched: ``{key: (shape in the state dict, shape expected)}``.
    """

    def __init__(self, missing, unexpected, mismatched, config_name):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = dict(sorted(mismatched.items()))
        parts = []
        if self.missing:
            parts.append(f"missing keys: {_listing(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys: {_listing(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{key} {got} (expected {want})"
                      for key, (got, want) in self.mismatched.items()]
            parts.append(f"mis-shaped keys: {_listing(shapes)}")
        super().__init__(
            f"The state dict does not fit the official ViT {config_name}: "
            + "; ".join(parts) + "."
        )


def _listing(items, limit=12):
    """``a, b, c`` with at most ``limit`` items, then how many more."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def _resolve_config(config, overrides, state_dict):
    """``(label, DiT arguments)`` for ``state_dict`` under ``config`` and ``overrides``."""
    if isinstance(config, str):
        if config not in OFFICIAL_CONFIGS:
            raise ValueError(
                f"Unknown official config {config!r}. Known: "
                f"{', '.join(sorted(OFFICIAL_CONFIGS))}, or pass a dict of DiT "
                "arguments (image_shape, patch_size, hidden_size, num_heads, ...)."
            )
        label, arch = config, {**OFFICIAL_CONFIGS[config], **overrides}
    elif isinstance(config, dict):
        label, arch = "(custom config)", {**config, **overrides}
    else:
        raise ValueError(
            f"config must be an official model name or a dict, got {config!r}."
        )
    unknown = sorted(set(arch) - set(ARCHITECTURE_KEYS))
    if unknown:
        raise ValueError(
            f"Unknown architecture argument(s) {', '.join(unknown)} for the official "
            f"ViT; allowed: {', '.join(ARCHITECTURE_KEYS)} (and name, dtype)."
        )
    absent = [key for key in ("image_shape", "patch_size", "hidden_size", "num_heads")
              if arch.get(key) is None]
    if absent:
        raise ValueError(f"config {label} lacks {', '.join(absent)}.")
    # What the official code takes from its command line is read from the state dict.
    if arch.get("depth") is None:
        indices = [int(m.group(1)) for m in map(_BLOCK_KEY.match, state_dict) if m]
        arch["depth"] = max(indices) + 1 if indices else 1
    if "num_classes" not in arch:
        table = state_dict.get("class_embedding.weight")
        # Its last row is the null class of classifier-free guidance.
        arch["num_classes"] = int(np.shape(table)[0]) - 1 if table is not None else None
    if "timestep_table_size" not in arch:
        table = state_dict.get("time_embedding.weight")
        arch["timestep_table_size"] = int(np.shape(table)[0]) if table is not None else 4000
    arch.setdefault("mlp_ratio", 4.0)
    return label, arch


def expected_shapes(image_shape, patch_size, hidden_size, depth, num_classes,
                    timestep_table_size, mlp_ratio=4.0, **unused):
    """``{official key: shape}`` of the official ViT with this architecture."""
    height, width, channels = image_shape
    d, p = hidden_size, patch_size
    hidden = int(d * mlp_ratio)
    extra = 2 if num_classes else 1
    shapes = {
        "pos_embed": (1, extra + (height // p) * (width // p), d),
        "patch_embed.proj.weight": (d, channels, p, p),
        "patch_embed.proj.bias": (d,),
        "time_embedding.weight": (timestep_table_size, d),
        "linear_projection.weight": (p * p * channels, d),
        "linear_projection.bias": (p * p * channels,),
    }
    if num_classes:
        shapes["class_embedding.weight"] = (num_classes + 1, d)
    for i in range(depth):
        block = {
            "norm1.weight": (d,), "norm1.bias": (d,),
            "attn.qkv.weight": (3 * d, d), "attn.q_bias": (d,), "attn.v_bias": (d,),
            "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
            "norm2.weight": (d,), "norm2.bias": (d,),
            "mlp.fc1.weight": (hidden, d), "mlp.fc1.bias": (hidden,),
            "mlp.fc2.weight": (d, hidden), "mlp.fc2.bias": (d,),
        }
        shapes.update({f"blocks.{i}.{key}": shape for key, shape in block.items()})
    return shapes


def _check_keys(state_dict, shapes, name):
    missing = [key for key in shapes if key not in state_dict]
    unexpected = [key for key in state_dict if key not in shapes]
    mismatched = {
        key: (tuple(np.shape(state_dict[key])), tuple(shape))
        for key, shape in shapes.items()
        if key in state_dict and tuple(np.shape(state_dict[key])) != tuple(shape)
    }
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(missing, unexpected, mismatched, name)


def convert_official_state_dict(state_dict, config="vit_xl_patch2_32", **overrides):
    """Builds a `DiT` holding the weights of an official Min-SNR ViT state dict.

    Args:
        state_dict: ``{name: array}`` with the official parameter names (numpy arrays,
            or anything `numpy.asarray` takes, such as CPU torch tensors).
        config: an official model name (`OFFICIAL_CONFIGS`: ``"vit_base_patch2_32"``,
            ``"vit_large_patch2_32"``, ``"vit_large_patch4_64"``,
            ``"vit_xl_patch2_32"``) or a dict of `DiT` arguments with at least
            ``image_shape``, ``patch_size``, ``hidden_size`` and ``num_heads``.
        **overrides: `DiT` arguments that replace the config's (``depth``,
            ``image_shape`` for the in-channel count, ``num_classes``, ``name``,
            ``dtype``). ``depth``, ``num_classes`` and ``timestep_table_size`` not
            given anywhere are read from the state dict, as the official code takes
            them from its command line.

    Returns:
        A `keras_minsnr.backbones.vit.InContextViT` in the official layout.

    Raises:
        StateDictMismatchError: (a `ValueError`) listing every missing, unexpected
            and mis-shaped key.

    Example:
    ```python
    state_dict = load_official_checkpoint("ema_0.9999_xl.pt")
    backbone = convert_official_state_dict(state_dict, "vit_xl_patch2_32")
    ```

    Reference:
        Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy",
        ICCV 2023; ``guided_diffusion/vision_transformer.py`` of the official code.
    """
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"state_dict must be a dict of arrays, got {type(state_dict).__name__}."
        )
    keras_args = {key: overrides.pop(key) for key in ("name", "dtype") if key in overrides}
    label, arch = _resolve_config(config, overrides, state_dict)
    shapes = expected_shapes(**arch)
    _check_keys(state_dict, shapes, label)

    from keras_minsnr.backbones import vit

    backbone = vit.InContextViT(
        **arch,
        timestep_embedding="table",
        final_norm=False,
        **keras_args,
    )
    _assign(backbone, state_dict, arch["depth"])
    return backbone


def _assign(backbone, state_dict, depth):
    def get(key):
        return np.asarray(state_dict[key], dtype="float32")

    def linear(layer, prefix):  # torch Linear (out, in) -> Dense (in, out)
        layer.kernel.assign(get(prefix + ".weight").T)
        layer.bias.assign(get(prefix + ".bias"))

    def norm(layer, prefix):
        layer.gamma.assign(get(prefix + ".weight"))
        layer.beta.assign(get(prefix + ".bias"))

    backbone.pos_embed.assign(get("pos_embed"))
    # Conv2d (out, in, kh, kw) -> Keras (kh, kw, in, out).
    backbone.patch_embed.kernel.assign(
        np.transpose(get("patch_embed.proj.weight"), (2, 3, 1, 0))
    )
    backbone.patch_embed.bias.assign(get("patch_embed.proj.bias"))
    backbone.t_embedder.embeddings.assign(get("time_embedding.weight"))
    if backbone.y_embedder is not None:
        backbone.y_embedder.embeddings.assign(get("class_embedding.weight"))
    for i, block in enumerate(backbone.blocks[:depth]):
        prefix = f"blocks.{i}."
        norm(block.norm1, prefix + "norm1")
        norm(block.norm2, prefix + "norm2")
        q_bias = get(prefix + "attn.q_bias")
        block.attn.qkv.kernel.assign(get(prefix + "attn.qkv.weight").T)
        block.attn.qkv.bias.assign(
            np.concatenate([q_bias, np.zeros_like(q_bias), get(prefix + "attn.v_bias")])
        )
        linear(block.attn.proj, prefix + "attn.proj")
        linear(block.fc1, prefix + "mlp.fc1")
        linear(block.fc2, prefix + "mlp.fc2")
    linear(backbone.head, "linear_projection")


def _unwrap(obj, path):
    """The flat state dict inside a loaded checkpoint (plain, ``{"model": ...}`` or
    ``{"state_dict": ...}``, with or without DistributedDataParallel's ``module.``)."""
    for key in ("model", "state_dict", "ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(obj).__name__}).")
    if obj and all(key.startswith("module.") for key in obj):
        obj = {key[len("module."):]: value for key, value in obj.items()}
    return obj


def load_official_checkpoint(path):
    """Reads an official checkpoint into ``{name: float32 numpy array}``.

    ``.pt`` / ``.pth`` files are PyTorch pickles and need torch (``pip install
    keras_minsnr[official]``); they are read with ``weights_only=True`` on the CPU.
    ``.npz`` files (for example written once with ``numpy.savez(path, **state_dict)``
    where torch is installed) need nothing else.

    Args:
        path: the checkpoint file.

    Example:
    ```python
    state_dict = load_official_checkpoint("ema_0.9999_xl.pt")
    ```
    """
    if not os.path.isfile(path):
        raise ValueError(f"Checkpoint {path!r} does not exist or is not a file.")
    extension = os.path.splitext(path)[1].lower()
    if extension == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {key: np.asarray(data[key], dtype="float32") for key in data.files}
    if extension in (".pt", ".pth", ".bin"):
        try:
            import torch
        except ImportError:
            raise ValueError(
                f"Reading {path!r} needs PyTorch, which is not installed. Install it "
                "with `pip install keras_minsnr[official]` (or `pip install torch`), "
                "or convert the file to .npz where torch is available: "
                "numpy.savez('ckpt.npz', **{k: v.float().numpy() for k, v in "
                "torch.load('ckpt.pt', map_location='cpu').items()})."
            ) from None
        obj = torch.load(path, map_location="cpu", weights_only=True)
        state_dict = _unwrap(obj, path)
        return {
            key: value.detach().float().numpy() if hasattr(value, "detach")
            else np.asarray(value, dtype="float32")
            for key, value in state_dict.items()
        }
    raise ValueError(
        f"Unsupported checkpoint format {extension or '(no extension)'!r} for "
        f"{path!r}; expected .pt, .pth or .bin (PyTorch) or .npz."
    )


def official_diffusion_model(backbone, config="vit_xl_patch2_32", **kwargs):
    """A `DiffusionModel` with the paper's settings for a converted checkpoint.

    Cosine schedule over 1000 steps, Min-SNR-5 weighting, label dropout 0.15, and the
    prediction target the checkpoint was trained with (x0 for ``vit_xl_patch2_32``,
    epsilon for ``vit_large_patch4_64``). The EMA weights of a converted checkpoint
    are the weights themselves.

    Args:
        backbone: the converted backbone.
        config: the official model name (a key of `PAPER_SETTINGS`).
        **kwargs: `DiffusionModel` arguments that replace these.

    Example:
    ```python
    model = official_diffusion_model(backbone, "vit_xl_patch2_32")
    latents = model.generate(8, **sampling_settings("vit_xl_patch2_32"))
    ```
    """
    if config not in PAPER_SETTINGS:
        raise ValueError(
            f"No paper settings for {config!r}; known: {', '.join(sorted(PAPER_SETTINGS))}."
        )
    from keras_minsnr.diffusion_model import DiffusionModel
    from keras_minsnr.schedules import NoiseSchedule

    settings = dict(
        schedule=NoiseSchedule("cosine", num_timesteps=1000),
        prediction_type=PAPER_SETTINGS[config]["prediction_type"],
        weighting="min_snr",
        gamma=5.0,
        label_dropout=0.15,
        clip_denoised=False,
    )
    settings.update(kwargs)
    return DiffusionModel(backbone, **settings)


def sampling_settings(config="vit_xl_patch2_32"):
    """``generate()`` arguments of the paper's evaluation for ``config``."""
    if config not in PAPER_SETTINGS:
        raise ValueError(
            f"No paper settings for {config!r}; known: {', '.join(sorted(PAPER_SETTINGS))}."
        )
    paper = PAPER_SETTINGS[config]
    return {key: paper[key] for key in ("sampler", "num_steps", "guidance_scale")}


__all__ = [
    "OFFICIAL_CONFIGS",
    "PAPER_SETTINGS",
    "StateDictMismatchError",
    "convert_official_state_dict",
    "expected_shapes",
    "load_official_checkpoint",
    "official_diffusion_model",
    "sampling_settings",
]
