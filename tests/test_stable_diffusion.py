"""KerasCV Stable Diffusion backbone and its frozen encoders, on tiny models and local files."""

import gzip
import math
import os
import pathlib
import resource
import time

import keras
import numpy as np
import pytest

from keras_minsnr.backbones import stable_diffusion as sd
from keras_minsnr.backbones import kerascv_sd
from keras_minsnr.backbones import autoencoders
from keras_minsnr.backbones.autoencoders import StableDiffusionAutoencoder
from keras_minsnr.backbones.stable_diffusion import StableDiffusionUNet
from tests import backbone_contract as contract

_predict = contract.predict

def _kcv_source(name):
    import keras_cv

    root = pathlib.Path(keras_cv.__file__).parent / "src/models/stable_diffusion"
    return (root / name).read_text()


def _inputs(model, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(batch,) + model.image_shape).astype("float32"),
        "t": np.array([5, 950][:batch], "int32"),
        "y": rng.normal(size=(batch,) + model.context_shape).astype("float32"),
    }


def test_timestep_features_match_kerascv():
    from keras_cv.src.models.stable_diffusion.stable_diffusion import StableDiffusionBase

    t = np.array([0, 1, 250, 999], "int32")
    ours = keras.ops.convert_to_numpy(
        sd.sinusoidal_embedding(keras.ops.convert_to_tensor(t), kerascv_sd.TIMESTEP_FEATURES)
    )
    for i, step in enumerate(t):
        ref = StableDiffusionBase._get_timestep_embedding(None, int(step), 1)
        np.testing.assert_allclose(ours[i], keras.ops.convert_to_numpy(ref)[0], atol=1e-5)


@pytest.fixture(scope="module")
def tiny_models():
    # Built once per module: each build is a few seconds of eager KerasCV layers.
    keras.utils.set_random_seed(0)
    return {
        v: StableDiffusionUNet(v, img_height=64, img_width=64, tiny=True)
        for v in ("v1", "v2")
    }


@pytest.mark.parametrize("version, context_dim", [("v1", 768), ("v2", 1024)])
def test_tiny_unet_shapes_and_contract(tiny_models, version, context_dim):
    model = tiny_models[version]
    assert model.image_shape == (8, 8, 4)
    assert model.conditioning == "context"
    assert model.context_shape == (77, context_dim)
    inputs = _inputs(model)
    out = _predict(model, inputs)
    assert out.shape == (2, 8, 8, 4) and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and np.abs(out).max() > 0
    inputs["t"] = np.array([500, 20], "int32")
    assert np.abs(_predict(model, inputs) - out).max() > 1e-4  # depends on t


def test_keras_round_trip(tiny_models, tmp_path):
    model = tiny_models["v1"]
    contract.run_round_trip_test(model, _inputs(model), tmp_path)


@pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="about a minute of XLA compilation on a 2-core CPU; the same KerasCV blocks "
    "run in bfloat16 on TensorFlow here, and tests/test_unet.py covers bf16 on JAX",
)
def test_mixed_bfloat16(tiny_models):
    model = tiny_models["v2"]  # KerasCV's random init: no zero-initialised layer
    contract.run_mixed_bfloat16_test(
        lambda: StableDiffusionUNet("v2", img_height=64, img_width=64, tiny=True),
        _inputs(model),
        reference=model,
    )


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_missing_weights_name_file_and_kerascv_url(tmp_path, version):
    missing = str(tmp_path / "nowhere" / "kcv_diffusion_model.h5")
    with pytest.raises(FileNotFoundError) as err:
        StableDiffusionUNet(version, img_height=64, img_width=64, tiny=True, weights=missing)
    url = kerascv_sd.WEIGHT_URLS[version]["diffusion_model"][0]
    assert missing in str(err.value) and url in str(err.value)
    with pytest.raises(FileNotFoundError, match="vae_encoder.h5"):
        sd.resolve_weights(missing, version, "image_encoder")


def test_urls_are_the_ones_in_kerascv_source():
    sources = {
        "diffusion_model": _kcv_source("diffusion_model.py"),
        "text_encoder": _kcv_source("text_encoder.py"),
        "image_encoder": _kcv_source("image_encoder.py"),
        "decoder": _kcv_source("decoder.py"),
    }
    for version in ("v1", "v2"):
        for component, (url, file_hash) in kerascv_sd.WEIGHT_URLS[version].items():
            assert url in sources[component] and file_hash in sources[component]
    tokenizer_source = _kcv_source("clip_tokenizer.py")
    assert kerascv_sd.VOCABULARY_URL[0] in tokenizer_source
    assert kerascv_sd.VOCABULARY_URL[1] in tokenizer_source


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"version": "v3"}, ["'v3'", "v1"]),
        ({"widths": (32, 48, 64)}, ["(32, 48, 64)", "32"]),
        ({"img_height": 100}, ["img_height=100", "64"]),
        ({"num_heads": 3, "widths": (32, 64, 64)}, ["num_heads=3"]),
    ],
)
def test_bad_construction(kwargs, words):
    base = {"version": "v1", "img_height": 64, "img_width": 64}
    contract.run_bad_construction_test(StableDiffusionUNet, {**base, **kwargs}, words)


def test_bad_call_inputs(tiny_models):
    model = tiny_models["v1"]
    good = _inputs(model)
    for bad, match in [
        ({**good, "x": np.zeros((2, 16, 16, 4), "float32")},
         r"\(2, 16, 16, 4\).*\(batch, 8, 8, 4\)"),
        ({"x": good["x"], "t": good["t"]}, "needs the text context"),
        ({**good, "y": np.zeros((2, 77, 1024), "float32")}, r"\(2, 77, 1024\).*768"),
        (good["x"], "expects a dict"),
    ]:
        contract.run_bad_call_test(model, bad, match=match)


# ---------------------------------------------------------------- KerasCV's own .h5 layout
def _kerascv_diffusion_model_at_tenth_width(version):
    """KerasCV's own `DiffusionModel` / `DiffusionModelV2`, built by KerasCV's own
    constructor code with every width divided by 10 (320/640/1280 -> 32/64/128).

    The full-size model is ~860M parameters (14-17 GB to build and compare). Its
    constructor is run unchanged, layer for layer and connection for connection, in a
    namespace where KerasCV's block classes and `Dense` take a tenth of the width; the
    blocks themselves are KerasCV's, untouched. v1 keeps 8 heads (head size 40 -> 4, ...);
    v2's 64-channel heads become 2 heads per level.
    """
    import types

    from keras_cv.src.models.stable_diffusion import diffusion_model as kcv

    def scaled(width):
        return width if width == 4 else width // 10  # the 4 latent channels stay

    def transformer(num_heads, head_size, fully_connected=False):
        if version == "v1":
            return kcv.SpatialTransformer(num_heads, head_size // 10, fully_connected)
        return kcv.SpatialTransformer(2, num_heads * head_size // 20, fully_connected)

    class Layers:
        def __getattr__(self, name):
            return getattr(keras.layers, name)

        @staticmethod
        def Dense(units, **kwargs):  # noqa: N802 (KerasCV's timestep MLP, 1280 wide)
            return keras.layers.Dense(scaled(units), **kwargs)

    namespace = dict(
        vars(kcv),
        keras=types.SimpleNamespace(layers=Layers(), Model=keras.Model, utils=keras.utils),
        ResBlock=lambda width: kcv.ResBlock(scaled(width)),
        Upsample=lambda width: kcv.Upsample(scaled(width)),
        PaddedConv2D=lambda filters, *a, **k: kcv.PaddedConv2D(scaled(filters), *a, **k),
        SpatialTransformer=transformer,
    )
    cls = kcv.DiffusionModel if version == "v1" else kcv.DiffusionModelV2
    init = types.FunctionType(
        cls.__init__.__code__, namespace, "__init__", cls.__init__.__defaults__,
        cls.__init__.__closure__,
    )
    model = cls.__new__(cls)
    init(model, 64, 64, 77, download_weights=False)
    return model


@pytest.mark.large
@pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="KerasCV's symbolic functional build takes ~30-60 s per version on a 2-core "
    "CPU; the .h5 layout is backend-independent, so the TensorFlow suite checks it",
)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_loads_an_h5_written_from_kerascvs_own_diffusion_model(tmp_path, version):
    """KerasCV's weights are TF-Keras .h5 files read by layer order: write one from
    KerasCV's own model (random weights, no download), load it into ours, compare."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format
    from keras_cv.src.models.stable_diffusion.stable_diffusion import StableDiffusionBase

    kcv = _kerascv_diffusion_model_at_tenth_width(version)
    path = str(tmp_path / f"kcv_diffusion_model_{version}.h5")
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, kcv)

    keras.utils.set_random_seed(123)  # our own random init differs, then is overwritten
    ours = StableDiffusionUNet(
        version, img_height=64, img_width=64, widths=(32, 64, 128),
        num_heads=None if version == "v1" else 2, weights=path,
    )
    assert ours.count_params() == kcv.count_params()
    inputs = _inputs(ours, batch=1)
    t_features = StableDiffusionBase._get_timestep_embedding(None, int(inputs["t"][0]), 1)
    expected = keras.ops.convert_to_numpy(
        kcv([keras.ops.convert_to_tensor(a) for a in (inputs["x"], t_features, inputs["y"])])
    )
    got = _predict(ours, inputs)
    assert np.abs(expected).max() > 1e-2  # random KerasCV weights: a non-trivial output
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- tokenizer and encoders
MERGES = ["h e", "l l", "he ll", "hell o</w>"]


@pytest.fixture
def vocabulary(tmp_path):
    path = tmp_path / "tiny_bpe.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: tiny\n" + "\n".join(MERGES))
    return str(path)


def _tiny_text_encoder(dim=8):
    tokens = keras.Input((77,), dtype="int32", name="tokens")
    positions = keras.Input((77,), dtype="int32", name="positions")
    tok = keras.layers.Embedding(600, dim, name="token_embedding")(tokens)
    pos = keras.layers.Embedding(77, dim, name="position_embedding")(positions)
    return keras.Model([tokens, positions], keras.layers.Add()([tok, pos]))


class _Counting:
    """Wraps a text encoder and counts the captions it encodes."""

    def __init__(self, model):
        self.model, self.rows = model, 0

    def predict_on_batch(self, inputs):
        self.rows += len(inputs["tokens"])
        return self.model.predict_on_batch(inputs)


def test_tokenizer_pads_like_kerascv(vocabulary):
    enc = StableDiffusionAutoencoder("v1", vocabulary=vocabulary, text_encoder=object())
    # CLIP's byte alphabet starts at '!': 'a' is id 64, 'b</w>' is 256 + 65; merge i is
    # id 512 + i; then <|startoftext|>, <|endoftext|>.
    start, end = 512 + len(MERGES), 513 + len(MERGES)
    tokens = enc.tokenize(["Hello  hello", "ab", "a " * 100])
    assert tokens.shape == (3, 77) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens[0, :4], [start, 515, 515, end])
    np.testing.assert_array_equal(tokens[0, 4:], end)
    np.testing.assert_array_equal(tokens[1, :4], [start, 64, 321, end])
    # Too long: truncated to 77 with the end token last.
    assert tokens[2, 0] == start and tokens[2, -1] == end
    np.testing.assert_array_equal(tokens[2, 1:76], 320)  # 'a</w>'


def test_encode_text_values_and_cache(vocabulary):
    model = _tiny_text_encoder()
    counting = _Counting(model)
    enc = StableDiffusionAutoencoder("v1", vocabulary=vocabulary, text_encoder=counting)
    out = enc.encode_text(["hello", "ab", "hello"])
    assert out.shape == (3, 77, 8) and out.dtype == np.float32
    assert counting.rows == 2  # duplicates encoded once
    tok_table = keras.ops.convert_to_numpy(model.get_layer("token_embedding").embeddings)
    pos_table = keras.ops.convert_to_numpy(model.get_layer("position_embedding").embeddings)
    expected = tok_table[enc.tokenize(["hello"])[0]] + pos_table
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)
    np.testing.assert_array_equal(out[0], out[2])
    again = enc.encode_text(["ab", b"hello"])
    assert counting.rows == 2  # both cached
    np.testing.assert_array_equal(again[0], out[1])


def test_missing_vocabulary_names_url(tmp_path):
    missing = str(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    with pytest.raises(FileNotFoundError) as err:
        StableDiffusionAutoencoder("v1", vocabulary=missing)
    assert missing in str(err.value) and kerascv_sd.VOCABULARY_URL[0] in str(err.value)
    with pytest.raises(FileNotFoundError, match="kcv_encoder.h5"):
        sd.resolve_weights(missing, "v1", "text_encoder")


def test_encode_images_is_kerascv_posterior_mean_scaled(vocabulary):
    from keras_cv.src.models.stable_diffusion.image_encoder import ImageEncoder

    reference = ImageEncoder(download_weights=False)  # ends with x[..., :4] * 0.18215
    moments = keras.Model(reference.inputs, reference.layers[-2].output)
    enc = StableDiffusionAutoencoder(
        "v1", vocabulary=vocabulary, image_encoder=moments, text_encoder=object()
    )
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype("float32")
    latents = enc.encode_images(images)
    assert latents.shape == (2, 2, 2, 4)
    np.testing.assert_allclose(latents, np.asarray(reference.predict_on_batch(images)),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(2, 16, 16\)"):
        enc.encode_images(images[..., 0])


def test_posterior_sample_statistics(vocabulary):
    # A fixed "encoder" with mean 1 and log-variance log(0.25): samples ~ N(1, 0.5^2).
    images = keras.Input((None, None, 3))
    const = keras.layers.Lambda(
        lambda x: keras.ops.concatenate(
            [keras.ops.ones_like(x[..., :1]) * keras.ops.ones((4,)),
             keras.ops.ones_like(x[..., :1]) * keras.ops.full((4,), math.log(0.25))],
            axis=-1,
        )
    )(images)
    encoder = keras.Model(images, const)
    enc = StableDiffusionAutoencoder("v1", vocabulary=vocabulary, image_encoder=encoder,
                                  text_encoder=object(), sample_posterior=True, seed=3)
    z = enc.encode_images(np.zeros((4, 32, 32, 3), "float32")) / autoencoders.SD_LATENT_SCALE
    assert abs(z.mean() - 1.0) < 0.03 and abs(z.std() - 0.5) < 0.03


# ---------------------------------------------------------------- the real model, once
@pytest.mark.large
@pytest.mark.skipif(
    os.environ.get("KMS_RUN_SD_LARGE") != "1" or keras.backend.backend() == "jax",
    reason="~15 GB and minutes of CPU: run with KMS_RUN_SD_LARGE=1, on TensorFlow only "
    "(one backend is enough for this check and halves its CI time)",
)
def test_full_sd_unet_min_snr_training_step():
    import tensorflow as tf
    from keras_cv.src.models.stable_diffusion.diffusion_model import DiffusionModel

    start = time.time()
    # Our layer order and shapes must be KerasCV's, or its .h5 files would not load.
    kcv = DiffusionModel(64, 64, 77, download_weights=False)
    kcv_shapes = [tuple(w.shape) for w in kcv.weights]
    kcv_params = kcv.count_params()
    del kcv
    model = StableDiffusionUNet("v1", img_height=64, img_width=64)
    assert [tuple(w.shape) for w in model.diffusion_model.weights] == kcv_shapes
    assert model.count_params() == kcv_params
    assert abs(model.count_params() - 860e6) / 860e6 < 0.01

    # Min-SNR-5 with the epsilon target on SD's scaled_linear schedule (float64 numpy).
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    rng = np.random.default_rng(0)
    batch = 2
    t = np.array([10, 700], "int32")
    snr = alphas_cumprod[t] / (1.0 - alphas_cumprod[t])
    weight = np.minimum(snr, 5.0) / snr
    x0 = rng.normal(size=(batch, 8, 8, 4))
    eps = rng.normal(size=(batch, 8, 8, 4))
    a = np.sqrt(alphas_cumprod[t])[:, None, None, None]
    s = np.sqrt(1.0 - alphas_cumprod[t])[:, None, None, None]
    inputs = {
        "x": (a * x0 + s * eps).astype("float32"),
        "t": t,
        "y": rng.normal(size=(batch, 77, 768)).astype("float32"),
    }
    optimizer = keras.optimizers.SGD(1e-3)
    optimizer.build(model.trainable_variables)
    before = keras.ops.convert_to_numpy(model.trainable_variables[0]).copy()
    with tf.GradientTape() as tape:
        pred = model(inputs, training=True)
        per_sample = keras.ops.mean(keras.ops.square(pred - eps.astype("float32")),
                                    axis=(1, 2, 3))
        loss = keras.ops.mean(keras.ops.convert_to_tensor(weight, "float32") * per_sample)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply(grads, model.trainable_variables)
    assert np.isfinite(float(loss))
    assert all(g is not None for g in grads)
    after = keras.ops.convert_to_numpy(model.trainable_variables[0])
    assert np.abs(after - before).max() > 0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"\nSD v1 64x64 Min-SNR step: {time.time() - start:.1f} s, peak RSS {peak_gb:.1f} GB, "
          f"{model.count_params():,} parameters")


def test_latent_samples_are_decoded_with_the_named_vae_decoder(tmp_path):
    from keras_cv.src.models.stable_diffusion.decoder import Decoder

    from keras_minsnr.data import preparation

    # A decoder file as KerasCV's would be, with random weights saved by the test.
    path = str(tmp_path / "kcv_decoder.weights.h5")
    keras.utils.set_random_seed(0)
    reference = Decoder(64, 64, download_weights=False)
    reference.save_weights(path)
    latents = np.random.default_rng(0).normal(size=(5, 8, 8, 4)).astype("float32")
    config = {"encode": {"version": "v1", "decoder_weights": path}}
    # 5 latents: decoded in chunks of 4, all kept in order.
    decoded = preparation.decode_for_display(latents, config)
    expected = keras.ops.convert_to_numpy(reference(latents))
    assert decoded.shape == (5, 64, 64, 3)
    np.testing.assert_allclose(decoded, expected, rtol=1e-4, atol=1e-4)
    # Pixels, or latents without a decoder file, pass through for the grid.
    np.testing.assert_array_equal(preparation.decode_for_display(latents, {}), latents)
    pixels = latents[..., :3]
    np.testing.assert_array_equal(preparation.decode_for_display(pixels, config), pixels)
    # A missing decoder file fails before any encoding or training, naming KerasCV's URL.
    missing = str(tmp_path / "nowhere" / "kcv_decoder.h5")
    with pytest.raises(FileNotFoundError) as err:
        preparation.prepare_data({"encode": {"decoder_weights": missing}, "data": "x"})
    assert missing in str(err.value) and "kcv_decoder.h5" in kerascv_sd.WEIGHT_URLS["v1"]["decoder"][0]
    assert kerascv_sd.WEIGHT_URLS["v1"]["decoder"][0] in str(err.value)
    with pytest.raises(ValueError, match="multiple of 8, got 60"):
        sd.latent_decoder("v1", None, 60, 64)
