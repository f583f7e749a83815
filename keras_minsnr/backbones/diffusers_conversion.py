"""Diffusers-format Stable Diffusion 1.x / 2.x folders → KerasCV weight files.

A diffusers folder (what `StableDiffusionPipeline.save_pretrained` writes and the Hugging
Face hub serves) holds ``unet/``, ``vae/`` and ``text_encoder/``, each a ``config.json``
and ``*.safetensors`` in PyTorch layout. KerasCV (and so `StableDiffusionUNet`,
`autoencoders.StableDiffusionAutoencoder`, `latent_decoder`) loads TF-Keras ``.h5`` files by layer order.
This module reads the safetensors with numpy (no torch), maps every tensor onto KerasCV's
blocks, checks names and shapes for all components before writing anything, and writes
the four files under the names KerasCV uses.

KerasCV's blocks and diffusers' compute the same functions with two small exceptions that
no weight conversion can remove: KerasCV's UNet GEGLU and SD 2's `TextEncoderV2` use the
tanh approximation of GELU (diffusers/OpenCLIP use the exact one), and KerasCV's group
norms use epsilon 1e-5 where diffusers' VAE uses 1e-6.
"""

import glob
import hashlib
import json
import os

import numpy as np

from keras_minsnr.backbones import kerascv_sd

SUBFOLDERS = {
    "diffusion_model": "unet",
    "text_encoder": "text_encoder",
    "image_encoder": "vae",
    "decoder": "vae",
}
COMPONENTS = tuple(SUBFOLDERS)
# KerasCV's ImageEncoder ends with x0.18215 and its Decoder starts with /0.18215.
KERASCV_LATENT_SCALE = 0.18215


class DiffusersFolderError(ValueError):
    """A diffusers folder that cannot be converted; the message lists every problem."""


def output_filename(version, component):
    """The file name KerasCV uses for ``component`` (e.g. ``kcv_diffusion_model.h5``)."""
    return kerascv_sd.WEIGHT_URLS[version][component][0].rsplit("/", 1)[-1]


def is_diffusers_folder(path):
    """True for a directory with a diffusers ``unet/``, ``vae/`` or ``text_encoder/``."""
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, sub, "config.json"))
        for sub in set(SUBFOLDERS.values())
    )


# ----------------------------------------------------------------------------- reading


def _safetensors_files(directory):
    """The safetensors files of one component: the full-precision ones when a folder also
    holds a variant (``*.fp16.safetensors``), else the variant."""
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    by_variant = {}
    for path in files:
        stem = os.path.basename(path)[: -len(".safetensors")]
        parts = stem.split(".")
        by_variant.setdefault(parts[1] if len(parts) > 1 else None, []).append(path)
    if None in by_variant:
        return by_variant[None]
    if len(by_variant) == 1:
        return next(iter(by_variant.values()))
    return []


class _Component:
    """One subfolder: its config and a lazy view of its tensors (name → shape, array)."""

    def __init__(self, folder, subfolder):
        from safetensors import safe_open

        self.name = subfolder
        self.directory = os.path.join(folder, subfolder)
        self.files = []
        self.config = None
        self._where = {}
        self.problems = []
        config_path = os.path.join(self.directory, "config.json")
        if not os.path.exists(config_path):
            self.problems.append(f"{subfolder}/config.json is missing")
            return
        with open(config_path) as f:
            self.config = json.load(f)
        self.files = _safetensors_files(self.directory)
        if not self.files:
            self.problems.append(
                f"{subfolder}/ has no single set of *.safetensors files (a .bin checkpoint "
                f"needs torch: re-save it with safe_serialization=True)"
            )
        for path in self.files:
            handle = safe_open(path, framework="np")
            for key in handle.keys():
                # transformers < 5 prefixes the CLIP text model's tensors with text_model.
                name = key[len("text_model."):] if key.startswith("text_model.") else key
                self._where[name] = (handle, key)

    def shape(self, key):
        handle, name = self._where[key]
        return tuple(handle.get_slice(name).get_shape())

    def __contains__(self, key):
        return key in self._where

    def get(self, key):
        handle, name = self._where[key]
        return handle.get_tensor(name).astype("float32")


# ------------------------------------------------------------- KerasCV-layout builders


def kerascv_image_encoder(widths=(128, 256, 512, 512)):
    """KerasCV's `ImageEncoder` (VAE encoder, output ×0.18215) with configurable widths.

    With the default widths it has KerasCV's layers, in its order, so files written for it
    load into `keras_cv.models.stable_diffusion.ImageEncoder` and back.
    """
    import keras
    from keras_cv.src.models.stable_diffusion.attention_block import AttentionBlock
    from keras_cv.src.models.stable_diffusion.padded_conv2d import PaddedConv2D
    from keras_cv.src.models.stable_diffusion.resnet_block import ResnetBlock

    layers = [keras.layers.Input((None, None, 3)), PaddedConv2D(widths[0], 3, padding=1)]
    for level, width in enumerate(widths):
        layers += [ResnetBlock(width), ResnetBlock(width)]
        if level < len(widths) - 1:
            layers.append(PaddedConv2D(width, 3, padding=((0, 1), (0, 1)), strides=2))
    top = widths[-1]
    layers += [
        ResnetBlock(top), AttentionBlock(top), ResnetBlock(top),
        keras.layers.GroupNormalization(epsilon=1e-5),
        keras.layers.Activation("swish"),
        PaddedConv2D(8, 3, padding=1),
        PaddedConv2D(8, 1),
        keras.layers.Lambda(lambda x: x[..., :4] * KERASCV_LATENT_SCALE),
    ]
    return keras.Sequential(layers)


def kerascv_decoder(img_height, img_width, widths=(128, 256, 512, 512)):
    """KerasCV's `Decoder` (latents ×0.18215 → images in [-1, 1]) with configurable widths."""
    import keras
    from keras_cv.src.models.stable_diffusion.attention_block import AttentionBlock
    from keras_cv.src.models.stable_diffusion.padded_conv2d import PaddedConv2D
    from keras_cv.src.models.stable_diffusion.resnet_block import ResnetBlock

    top = widths[-1]
    layers = [
        keras.layers.Input((img_height // 8, img_width // 8, 4)),
        keras.layers.Rescaling(1.0 / KERASCV_LATENT_SCALE),
        PaddedConv2D(4, 1),
        PaddedConv2D(top, 3, padding=1),
        ResnetBlock(top), AttentionBlock(top), ResnetBlock(top),
    ]
    for level, width in enumerate(reversed(widths)):
        layers += [ResnetBlock(width) for _ in range(3)]
        if level < len(widths) - 1:
            layers += [keras.layers.UpSampling2D(2), PaddedConv2D(width, 3, padding=1)]
    layers += [
        keras.layers.GroupNormalization(epsilon=1e-5),
        keras.layers.Activation("swish"),
        PaddedConv2D(3, 3, padding=1),
    ]
    return keras.Sequential(layers)


def kerascv_text_encoder(vocab_size=49408, width=768, num_layers=12, num_heads=12,
                         activation="quick_gelu", max_length=kerascv_sd.MAX_TEXT_LENGTH):
    """KerasCV's CLIP `TextEncoder` (v1 defaults) / `TextEncoderV2` (``width=1024,
    num_layers=23, num_heads=16, activation="gelu"``) with configurable sizes; called
    with ``{"tokens", "positions"}``, returns the final-layer-normed hidden states."""
    import keras
    from keras import ops
    from keras_cv.src.models.stable_diffusion.text_encoder import CLIPEmbedding
    from keras_cv.src.models.stable_diffusion.text_encoder import CLIPEncoderLayer
    from keras_cv.src.models.stable_diffusion.text_encoder import quick_gelu

    act = {"quick_gelu": quick_gelu, "gelu": ops.gelu}[activation]
    tokens = keras.layers.Input((max_length,), dtype="int32", name="tokens")
    positions = keras.layers.Input((max_length,), dtype="int32", name="positions")
    x = CLIPEmbedding(vocab_size, width, max_length)([tokens, positions])
    for _ in range(num_layers):
        x = CLIPEncoderLayer(width, num_heads, activation=act)(x)
    x = keras.layers.LayerNormalization(epsilon=1e-5)(x)
    return keras.Model([tokens, positions], x)


# --------------------------------------------------------------- configs → layouts


def _check(config, expected, where, problems):
    for key, (want, default) in expected.items():
        got = config.get(key, default)
        if isinstance(got, list):
            got = tuple(got)
        if got != want:
            problems.append(f"{where}/config.json: {key}={got!r}, the SD layout needs {want!r}")


def unet_layout(config):
    """(version, widths, num_heads, context_dim) of a diffusers SD 1.x/2.x UNet config, for
    `_SDUNetCore`; raises `DiffusersFolderError` listing what does not fit."""
    problems = []
    _check(config, {
        "down_block_types": (("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), None),
        "up_block_types": (("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, None),
        "mid_block_type": ("UNetMidBlock2DCrossAttn", "UNetMidBlock2DCrossAttn"),
        "layers_per_block": (2, 2),
        "in_channels": (4, 4),
        "out_channels": (4, 4),
        "norm_num_groups": (32, 32),
        "flip_sin_to_cos": (True, True),
        "freq_shift": (0, 0),
        "class_embed_type": (None, None),
        "addition_embed_type": (None, None),
        "conv_in_kernel": (3, 3),
        "conv_out_kernel": (3, 3),
    }, "unet", problems)
    tlpb = config.get("transformer_layers_per_block", 1)
    if tlpb not in (1, [1] * 4):
        problems.append(f"unet/config.json: transformer_layers_per_block={tlpb!r}, needs 1")
    widths = tuple(config.get("block_out_channels", ()))
    if len(widths) != 4 or widths[3] != widths[2] or any(w % 32 for w in widths):
        problems.append(
            f"unet/config.json: block_out_channels={list(widths)}, the SD layout needs "
            f"four multiples of 32 with the last two equal"
        )
    if problems:
        raise DiffusersFolderError("; ".join(problems))
    version = "v2" if config.get("use_linear_projection", False) else "v1"
    # diffusers reads attention_head_dim as the number of heads when num_attention_heads
    # is unset (SD 1.x: 8; SD 2.x: [5, 10, 20, 20], i.e. 64-channel heads).
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = [heads] * 4 if isinstance(heads, int) else list(heads)
    kerascv = [8] * 4 if version == "v1" else [w // 64 for w in widths]
    if heads == kerascv:
        num_heads = None
    elif len(set(heads)) == 1 and all(w % heads[0] == 0 for w in widths):
        num_heads = heads[0]
    else:
        raise DiffusersFolderError(
            f"unet/config.json: attention heads {heads} per level; KerasCV's blocks take "
            f"one head count for all levels or its own ({kerascv})"
        )
    if (kerascv_sd.TIMESTEP_FEATURES // 2) % (widths[0] // 2):
        raise DiffusersFolderError(
            f"unet/config.json: block_out_channels[0]={widths[0]}: its {widths[0]} timestep "
            f"features are a subset of KerasCV's {kerascv_sd.TIMESTEP_FEATURES} only when "
            f"{widths[0] // 2} divides {kerascv_sd.TIMESTEP_FEATURES // 2} (e.g. 32, 64, 160, 320)"
        )
    return version, widths[:3], num_heads, int(config.get("cross_attention_dim", 768))


def vae_widths(config):
    problems = []
    _check(config, {
        "down_block_types": (("DownEncoderBlock2D",) * 4, None),
        "up_block_types": (("UpDecoderBlock2D",) * 4, None),
        "layers_per_block": (2, 2),
        "in_channels": (3, 3),
        "out_channels": (3, 3),
        "latent_channels": (4, 4),
        "norm_num_groups": (32, 32),
        "use_quant_conv": (True, True),
        "use_post_quant_conv": (True, True),
        "mid_block_add_attention": (True, True),
        "shift_factor": (None, None),
    }, "vae", problems)
    scale = config.get("scaling_factor", 0.18215)
    if abs(scale - KERASCV_LATENT_SCALE) > 1e-9:
        problems.append(
            f"vae/config.json: scaling_factor={scale}, KerasCV's ImageEncoder/Decoder "
            f"hard-code {KERASCV_LATENT_SCALE} (the SD 1.x/2.x VAE)"
        )
    widths = tuple(config.get("block_out_channels", ()))
    if len(widths) != 4 or any(w % 32 for w in widths):
        problems.append(f"vae/config.json: block_out_channels={list(widths)}, needs four "
                        f"multiples of 32")
    if problems:
        raise DiffusersFolderError("; ".join(problems))
    return widths


def text_encoder_args(config):
    problems = []
    width = config.get("hidden_size")
    act = config.get("hidden_act")
    if act not in ("quick_gelu", "gelu"):
        problems.append(f"text_encoder/config.json: hidden_act={act!r}, KerasCV has "
                        f"quick_gelu (SD 1.x) and gelu (SD 2.x)")
    if config.get("intermediate_size") != 4 * (width or 0):
        problems.append(f"text_encoder/config.json: intermediate_size="
                        f"{config.get('intermediate_size')}, KerasCV uses 4 x hidden_size")
    if config.get("max_position_embeddings") != kerascv_sd.MAX_TEXT_LENGTH:
        problems.append(f"text_encoder/config.json: max_position_embeddings="
                        f"{config.get('max_position_embeddings')}, needs "
                        f"{kerascv_sd.MAX_TEXT_LENGTH}")
    if problems:
        raise DiffusersFolderError("; ".join(problems))
    return dict(vocab_size=config["vocab_size"], width=width,
                num_layers=config["num_hidden_layers"],
                num_heads=config["num_attention_heads"], activation=act)


def _layout(component, config):
    if component == "diffusion_model":
        return unet_layout(config)
    if component in ("image_encoder", "decoder"):
        return vae_widths(config)
    return text_encoder_args(config)


def build_target(component, config):
    """The KerasCV-layout model one component's weights go into, sized from its config."""
    layout = _layout(component, config)
    if component == "diffusion_model":
        version, widths, num_heads, context_dim = layout
        return kerascv_sd._SDUNetCore(widths, num_heads, version, context_dim)
    if component == "image_encoder":
        return kerascv_image_encoder(layout)
    if component == "decoder":
        return kerascv_decoder(64, 64, layout)
    return kerascv_text_encoder(**layout)


# --------------------------------------------------------------------- tensor mapping
# Each entry: (keras variable, diffusers key or tuple of alternative keys, kind).


def _conv(layer, key):  # KerasCV PaddedConv2D ← nn.Conv2d (or a 1x1 nn.Linear)
    return [(layer.conv2d.kernel, key + ".weight", "conv"),
            (layer.conv2d.bias, key + ".bias", "vector")]


def _dense(layer, key):
    pairs = [(layer.kernel, key + ".weight", "dense")]
    if layer.use_bias:
        pairs.append((layer.bias, key + ".bias", "vector"))
    return pairs


def _norm(layer, key):
    return [(layer.gamma, key + ".weight", "vector"), (layer.beta, key + ".bias", "vector")]


def _linear_or_conv(layer, key):
    import keras

    return _dense(layer, key) if isinstance(layer, keras.layers.Dense) else _conv(layer, key)


def _unet_resblock(block, key):
    pairs = (_norm(block.entry_flow[0], key + ".norm1") + _conv(block.entry_flow[2], key + ".conv1")
             + _dense(block.embedding_flow[1], key + ".time_emb_proj")
             + _norm(block.exit_flow[0], key + ".norm2") + _conv(block.exit_flow[2], key + ".conv2"))
    if hasattr(block.residual_projection, "conv2d"):  # a 1x1 PaddedConv2D, else identity
        pairs += _conv(block.residual_projection, key + ".conv_shortcut")
    return pairs


def _unet_transformer(layer, key):
    block, tb = layer.transformer_block, key + ".transformer_blocks.0"
    pairs = _norm(layer.norm, key + ".norm") + _linear_or_conv(layer.proj1, key + ".proj_in")
    for i, attn in ((1, block.attn1), (2, block.attn2)):
        pairs += _norm(getattr(block, f"norm{i}"), f"{tb}.norm{i}")
        for ours, theirs in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"),
                             ("out_proj", "to_out.0")):
            pairs += _dense(getattr(attn, ours), f"{tb}.attn{i}.{theirs}")
    pairs += _norm(block.norm3, f"{tb}.norm3") + _dense(block.geglu.dense, f"{tb}.ff.net.0.proj")
    pairs += _dense(block.dense, f"{tb}.ff.net.2")
    return pairs + _linear_or_conv(layer.proj2, key + ".proj_out")


def _unet_block_keys():
    """diffusers prefixes of KerasCV's UNet blocks, in KerasCV's layer order."""
    keys = []
    for level in range(3):
        for j in range(2):
            keys += [f"down_blocks.{level}.resnets.{j}", f"down_blocks.{level}.attentions.{j}"]
        keys.append(f"down_blocks.{level}.downsamplers.0.conv")
    keys += ["down_blocks.3.resnets.0", "down_blocks.3.resnets.1", "mid_block.resnets.0",
             "mid_block.attentions.0", "mid_block.resnets.1"]
    keys += [f"up_blocks.0.resnets.{j}" for j in range(3)] + ["up_blocks.0.upsamplers.0.conv"]
    for level in (1, 2, 3):
        for j in range(3):
            keys += [f"up_blocks.{level}.resnets.{j}", f"up_blocks.{level}.attentions.{j}"]
        if level < 3:
            keys.append(f"up_blocks.{level}.upsamplers.0.conv")
    return keys + ["conv_norm_out", "conv_out"]


def _unet_pairs(core):
    import keras
    from keras_cv.src.models.stable_diffusion.diffusion_model import ResBlock
    from keras_cv.src.models.stable_diffusion.diffusion_model import SpatialTransformer
    from keras_cv.src.models.stable_diffusion.diffusion_model import Upsample

    dense_1, conv_in, dense_2 = core.seq[:3]
    pairs = [(dense_1.kernel, "time_embedding.linear_1.weight", "time_features"),
             (dense_1.bias, "time_embedding.linear_1.bias", "vector")]
    pairs += (_conv(conv_in, "conv_in")
             + _dense(dense_2, "time_embedding.linear_2"))
    for layer, key in zip(core.seq[3:], _unet_block_keys(), strict=True):
        if isinstance(layer, ResBlock):
            pairs += _unet_resblock(layer, key)
        elif isinstance(layer, SpatialTransformer):
            pairs += _unet_transformer(layer, key)
        elif isinstance(layer, Upsample):
            pairs += _conv(layer.conv, key)
        elif isinstance(layer, keras.layers.GroupNormalization):
            pairs += _norm(layer, key)
        else:
            pairs += _conv(layer, key)
    return pairs


def _vae_resnet(block, key):
    pairs = (_norm(block.norm1, key + ".norm1") + _conv(block.conv1, key + ".conv1")
             + _norm(block.norm2, key + ".norm2") + _conv(block.conv2, key + ".conv2"))
    if hasattr(block.residual_projection, "conv2d"):
        pairs += _conv(block.residual_projection, key + ".conv_shortcut")
    return pairs


def _vae_attention(block, key):
    pairs = _norm(block.norm, key + ".group_norm")
    # diffusers >= 0.14 names them to_q/to_k/to_v/to_out.0; older files query/key/...
    for ours, new, old in (("q", "to_q", "query"), ("k", "to_k", "key"),
                           ("v", "to_v", "value"), ("proj_out", "to_out.0", "proj_attn")):
        layer = getattr(block, ours).conv2d
        pairs += [(layer.kernel, (f"{key}.{new}.weight", f"{key}.{old}.weight"), "conv"),
                  (layer.bias, (f"{key}.{new}.bias", f"{key}.{old}.bias"), "vector")]
    return pairs


def _sequential_pairs(model, keys):
    import keras
    from keras_cv.src.models.stable_diffusion.attention_block import AttentionBlock
    from keras_cv.src.models.stable_diffusion.resnet_block import ResnetBlock

    layers = [layer for layer in model.layers if layer.weights]
    pairs = []
    for layer, key in zip(layers, keys, strict=True):
        if isinstance(layer, ResnetBlock):
            pairs += _vae_resnet(layer, key)
        elif isinstance(layer, AttentionBlock):
            pairs += _vae_attention(layer, key)
        elif isinstance(layer, keras.layers.GroupNormalization):
            pairs += _norm(layer, key)
        else:
            pairs += _conv(layer, key)
    return pairs


def _encoder_keys():
    keys = ["encoder.conv_in"]
    for level in range(4):
        keys += [f"encoder.down_blocks.{level}.resnets.{j}" for j in range(2)]
        if level < 3:
            keys.append(f"encoder.down_blocks.{level}.downsamplers.0.conv")
    return keys + ["encoder.mid_block.resnets.0", "encoder.mid_block.attentions.0",
                   "encoder.mid_block.resnets.1", "encoder.conv_norm_out", "encoder.conv_out",
                   "quant_conv"]


def _decoder_keys():
    keys = ["post_quant_conv", "decoder.conv_in", "decoder.mid_block.resnets.0",
            "decoder.mid_block.attentions.0", "decoder.mid_block.resnets.1"]
    for level in range(4):
        keys += [f"decoder.up_blocks.{level}.resnets.{j}" for j in range(3)]
        if level < 3:
            keys.append(f"decoder.up_blocks.{level}.upsamplers.0.conv")
    return keys + ["decoder.conv_norm_out", "decoder.conv_out"]


def _text_pairs(model):
    from keras_cv.src.models.stable_diffusion.text_encoder import CLIPEmbedding
    from keras_cv.src.models.stable_diffusion.text_encoder import CLIPEncoderLayer

    layers = [layer for layer in model.layers if layer.weights]
    embedding, final_norm = layers[0], layers[-1]
    assert isinstance(embedding, CLIPEmbedding)
    pairs = [
        (embedding.token_embedding.embeddings, "embeddings.token_embedding.weight", "embedding"),
        (embedding.position_embedding.embeddings, "embeddings.position_embedding.weight",
         "embedding"),
    ]
    for i, layer in enumerate(layers[1:-1]):
        assert isinstance(layer, CLIPEncoderLayer)
        key = f"encoder.layers.{i}"
        pairs += _norm(layer.layer_norm1, key + ".layer_norm1")
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            pairs += _dense(getattr(layer.clip_attn, name), f"{key}.self_attn.{name}")
        pairs += _norm(layer.layer_norm2, key + ".layer_norm2")
        pairs += _dense(layer.fc1, key + ".mlp.fc1") + _dense(layer.fc2, key + ".mlp.fc2")
    return pairs + _norm(final_norm, "final_layer_norm")


def tensor_pairs(component, model):
    """[(keras variable, diffusers key(s), kind)] covering every weight of ``model``."""
    if component == "diffusion_model":
        return _unet_pairs(model)
    if component == "image_encoder":
        return _sequential_pairs(model, _encoder_keys())
    if component == "decoder":
        return _sequential_pairs(model, _decoder_keys())
    return _text_pairs(model)


def _torch_shape(keras_shape, kind):
    if kind == "time_features":  # diffusers feeds block_out_channels[0] features
        return (keras_shape[1], keras_shape[1] // 4)
    if kind == "conv":
        kh, kw, cin, cout = keras_shape
        return (cout, cin, kh, kw)
    if kind == "dense":
        return tuple(reversed(keras_shape))
    return tuple(keras_shape)


def _to_keras(array, keras_shape, kind):
    if kind == "time_features":
        return _spread_time_features(array, keras_shape[0])
    if kind == "conv":
        if array.ndim == 2:  # a 1x1 convolution stored as nn.Linear
            array = array[:, :, None, None]
        return np.transpose(array, (2, 3, 1, 0))
    if kind == "dense":
        if array.ndim == 4:  # an nn.Linear stored as a 1x1 convolution
            array = array[:, :, 0, 0]
        return array.T
    return array


def _spread_time_features(weight, features):
    """diffusers' first time-embedding layer, (out, w0) over w0 sinusoidal features, as a
    kernel over KerasCV's ``features`` (320) ones. Both are [cos | sin] of t·10000^(-i/half);
    with half = w0/2 dividing 160, diffusers' frequency i is KerasCV's frequency
    i·160/half, so its rows go there and the other rows are zero (exact; identity at
    w0 = 320, Stable Diffusion's width)."""
    out, width = weight.shape
    half, kerascv_half = width // 2, features // 2
    stride = kerascv_half // half
    kernel = np.zeros((features, out), dtype=weight.dtype)
    kernel[0:kerascv_half:stride] = weight[:, :half].T
    kernel[kerascv_half::stride] = weight[:, half:].T
    return kernel


def _fits(shape, keras_shape, kind):
    want = _torch_shape(keras_shape, kind)
    if shape == want:
        return True
    if kind == "conv" and want[2:] == (1, 1):
        return shape == want[:2]
    if kind == "dense":
        return shape == want + (1, 1)
    return False


# ----------------------------------------------------------------------- conversion


class _Plan:
    """One component's target model and the resolved (variable, key, kind) list."""

    def __init__(self, component, source):
        self.component = component
        self.source = source
        self.model = build_target(component, source.config)
        self.pairs = []
        self.problems = []
        for variable, keys, kind in tensor_pairs(component, self.model):
            keys = (keys,) if isinstance(keys, str) else keys
            key = next((k for k in keys if k in source), None)
            if key is None:
                self.problems.append(f"{source.name}: {keys[0]} is missing")
                continue
            shape = source.shape(key)
            if not _fits(shape, tuple(variable.shape), kind):
                self.problems.append(
                    f"{source.name}: {key} has shape {shape}, expected "
                    f"{_torch_shape(tuple(variable.shape), kind)}"
                )
                continue
            self.pairs.append((variable, key, kind))

    def write(self, path):
        """Writes the legacy (TF-Keras) weights file KerasCV's `load_weights` reads by
        layer order, to ``path`` (a temporary name; the caller renames it)."""
        import h5py
        import keras

        by_variable = {id(v): (k, kind) for v, k, kind in self.pairs}
        with h5py.File(path, "w") as f:
            layers = [layer for layer in self.model.layers if layer.weights]
            names = [f"{i:04d}_{layer.name}" for i, layer in enumerate(layers)]
            f.attrs["layer_names"] = [n.encode("utf8") for n in names]
            f.attrs["backend"] = keras.backend.backend().encode("utf8")
            f.attrs["keras_version"] = keras.__version__.encode("utf8")
            for name, layer in zip(names, layers):
                group = f.create_group(name)
                # TF-Keras order: trainable weights, then non-trainable ones.
                variables = layer.trainable_weights + layer.non_trainable_weights
                group.attrs["weight_names"] = [f"w{i}".encode("utf8")
                                               for i in range(len(variables))]
                for i, variable in enumerate(variables):
                    key, kind = by_variable[id(variable)]
                    value = _to_keras(self.source.get(key), tuple(variable.shape), kind)
                    group.create_dataset(f"w{i}", data=value.reshape(variable.shape))


def _raise_if(problems, folder):
    if problems:
        shown = list(dict.fromkeys(problems))
        more = f"; and {len(shown) - 20} more" if len(shown) > 20 else ""
        raise DiffusersFolderError(f"cannot convert {folder}: " + "; ".join(shown[:20]) + more)


def _read_sources(folder, components):
    """The components' subfolders, with every config value KerasCV's layout cannot take
    reported at once (cheap: no model is built)."""
    if not is_diffusers_folder(folder):
        raise DiffusersFolderError(
            f"{folder!r} is not a diffusers Stable Diffusion folder (no unet/, vae/ or "
            f"text_encoder/ with a config.json)"
        )
    sources, problems = {}, []
    for component in components:
        sub = SUBFOLDERS[component]
        if sub in sources:
            continue
        sources[sub] = _Component(folder, sub)
        problems += sources[sub].problems
    for component in components:
        source = sources[SUBFOLDERS[component]]
        if not source.problems:
            try:
                _layout(component, source.config)
            except DiffusersFolderError as error:
                problems.append(str(error))
    _raise_if(problems, folder)
    return sources


def _plans(folder, sources, components):
    """Builds each target model and matches every tensor; lists all that are missing or
    mis-shaped."""
    plans = [_Plan(c, sources[SUBFOLDERS[c]]) for c in components]
    _raise_if([problem for plan in plans for problem in plan.problems], folder)
    return plans


def folder_version(folder):
    """``"v1"`` or ``"v2"`` for a diffusers folder: from its UNet config (linear
    projections: v2), else from its text encoder (OpenCLIP's gelu: v2)."""
    unet = os.path.join(folder, "unet", "config.json")
    if os.path.exists(unet):
        with open(unet) as f:
            return unet_layout(json.load(f))[0]
    text = os.path.join(folder, "text_encoder", "config.json")
    if os.path.exists(text):
        with open(text) as f:
            return "v2" if json.load(f).get("hidden_act") == "gelu" else "v1"
    return "v1"


def convert_diffusers(folder, out_dir, components=COMPONENTS, overwrite=False):
    """Converts a diffusers SD 1.x/2.x folder into KerasCV weight files under ``out_dir``.

    Every tensor of every requested component is checked (present, right shape) before
    anything is written; then each file is written under a temporary name and all are
    renamed into place together.

    Args:
        folder: the diffusers folder (``unet/``, ``vae/``, ``text_encoder/``).
        out_dir: where the ``.h5`` files go (created if needed).
        components: any of ``"diffusion_model"``, ``"text_encoder"``, ``"image_encoder"``,
            ``"decoder"``.
        overwrite: replace existing files instead of refusing.

    Returns:
        ``{component: path}`` of the files written.

    Raises:
        DiffusersFolderError: one message listing every missing or mis-shaped tensor and
            every config value KerasCV's layout cannot take; or files that already exist.

    Example:
    ```python
    paths = convert_diffusers("stable-diffusion-v1-5", "weights/sd15")
    unet = StableDiffusionUNet("v1", weights=paths["diffusion_model"])
    ```
    """
    unknown = [c for c in components if c not in SUBFOLDERS]
    if unknown:
        raise DiffusersFolderError(f"unknown components {unknown}; use {list(COMPONENTS)}")
    folder = os.fspath(folder)
    sources = _read_sources(folder, components)
    version = folder_version(folder)
    targets = {c: os.path.join(out_dir, output_filename(version, c)) for c in components}
    existing = [t for t in targets.values() if os.path.exists(t)]
    if existing and not overwrite:
        raise DiffusersFolderError(
            f"{', '.join(existing)} already exist; pass overwrite=True (--overwrite)"
        )
    plans = _plans(folder, sources, components)
    os.makedirs(out_dir, exist_ok=True)
    temporary = {}
    try:
        for plan in plans:
            temporary[plan.component] = targets[plan.component] + ".tmp"
            plan.write(temporary[plan.component])
        for component, tmp in temporary.items():
            os.replace(tmp, targets[component])
    finally:
        for tmp in temporary.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    return targets


def _source_fingerprint(folder, component):
    sub = os.path.join(folder, SUBFOLDERS[component])
    entries = [os.path.abspath(folder), component]
    for path in sorted(glob.glob(os.path.join(sub, "*"))):
        stat = os.stat(path)
        entries.append([os.path.basename(path), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def converted_weights_file(folder, version, component, cache_dir=None):
    """A KerasCV weights file for ``component`` of a diffusers folder, converted on first
    use into ``cache_dir`` (default ``$KERAS_HOME/keras_minsnr/diffusers``, keyed by the
    source files' names, sizes and times) and reused after that."""
    if not is_diffusers_folder(folder):
        raise DiffusersFolderError(
            f"{folder!r} is a directory but not a diffusers Stable Diffusion folder (no "
            f"unet/, vae/ or text_encoder/ with a config.json); pass a weights file or "
            f"such a folder"
        )
    found = folder_version(folder)
    if found != version:
        raise DiffusersFolderError(
            f"{folder} holds Stable Diffusion {found} weights, but the run asks for "
            f"version {version!r}"
        )
    if cache_dir is None:
        home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
        cache_dir = os.path.join(home, "keras_minsnr", "diffusers")
    out_dir = os.path.join(cache_dir, _source_fingerprint(folder, component))
    path = os.path.join(out_dir, output_filename(version, component))
    if not os.path.exists(path):
        convert_diffusers(folder, out_dir, components=(component,), overwrite=True)
    return path
