"""Tests for keras_minsnr.data on data the tests make (PIL files, TFDS mocks, digits).

Every expected value is computed here with numpy from the raw inputs.
"""

import json
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn.datasets import load_digits as sk_load_digits

from keras_minsnr import data as kd


def _epoch(ds):
    """All elements of a finite dataset, concatenated along the batch axis."""
    batches = list(ds.as_numpy_iterator())
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _take(ds, n):
    return [b for b in ds.take(n).as_numpy_iterator()]


def _save(path, array, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path, format=fmt)


def _unscale(images):
    """[-1, 1] float back to 0..255 (exact for pipeline outputs without resizing)."""
    return (images + 1.0) * 127.5


# ----------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def sk_digits():
    bunch = sk_load_digits()
    return bunch.images.astype(np.float64), bunch.target.astype(np.int32)


def test_digits_all_split_is_sklearn_scaled_exactly(sk_digits):
    images, labels = sk_digits
    ds, info = kd.load_digits(split="all", shuffle=False, batch_size=100,
                              drop_remainder=False)
    got = _epoch(ds)
    assert got["images"].dtype == np.float32 and got["labels"].dtype == np.int32
    assert got["images"].shape == (1797, 8, 8, 1)
    np.testing.assert_array_equal(got["images"][..., 0], images / 8.0 - 1.0)
    np.testing.assert_array_equal(got["labels"], labels)
    # 0 -> -1 and 16 -> +1 exactly, and both occur.
    assert got["images"].min() == -1.0 and got["images"].max() == 1.0
    np.testing.assert_array_equal(got["images"][images[..., None] == 0], -1.0)
    np.testing.assert_array_equal(got["images"][images[..., None] == 16], 1.0)
    assert info.num_classes == 10 and info.size == 1797
    assert info.image_shape == (8, 8, 1)


def test_digits_train_test_split_partitions_the_data(sk_digits):
    images, labels = sk_digits

    def keys(split):
        ds, info = kd.load_digits(split=split, shuffle=False, batch_size=None)
        got = _epoch(ds.batch(2000))
        assert info.size == len(got["labels"])
        return {(e.tobytes(), int(l)) for e, l in zip(
            (got["images"][..., 0] + 1.0) * 8.0, got["labels"])}, len(got["labels"])

    train, n_train = keys("train")
    test, n_test = keys("test")
    assert (n_train, n_test) == (1617, 180)
    everything = [(e.astype(np.float32).tobytes(), int(l)) for e, l in zip(images, labels)]
    # Split membership by (image, label); duplicates in the data may be on both sides.
    assert train | test == set(everything)
    assert n_train + n_test == len(everything)
    # The same split every time.
    assert keys("test")[0] == test


def test_digits_nearest_upsampling_repeats_pixels(sk_digits):
    images, _ = sk_digits
    ds, info = kd.load_digits(16, split="all", shuffle=False, batch_size=1797,
                              resize_method="nearest")
    got = _epoch(ds)["images"][..., 0]
    expected = np.repeat(np.repeat(images / 8.0 - 1.0, 2, axis=1), 2, axis=2)
    np.testing.assert_array_equal(got, expected)
    assert info.image_shape == (16, 16, 1)


def test_digits_bilinear_resize_stays_in_range():
    ds, _ = kd.load_digits(16, batch_size=64)
    images = _take(ds, 1)[0]["images"]
    assert images.shape == (64, 16, 16, 1)
    assert images.min() >= -1.0 and images.max() <= 1.0


# ----------------------------------------------------------- determinism


def _hashes(images):
    return [img.tobytes() for img in images]


def test_same_seed_same_order_and_flips_different_seed_differs():
    def stream(seed):
        ds, _ = kd.load_digits(batch_size=256, repeat=True, seed=seed,
                               random_flip=True)
        return np.concatenate([b["images"] for b in _take(ds, 8)])

    a, b, c = stream(3), stream(3), stream(4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_shuffle_is_a_fresh_permutation_each_epoch():
    plain = _epoch(kd.load_digits(shuffle=False, batch_size=None)[0].batch(2000))
    ds, _ = kd.load_digits(batch_size=None, shuffle=True, repeat=True, seed=7)
    stream = _epoch(ds.take(2 * 1617).batch(4000))
    first, second = stream["images"][:1617], stream["images"][1617:]
    for epoch in (first, second):
        assert sorted(_hashes(epoch)) == sorted(_hashes(plain["images"]))
    assert _hashes(first) != _hashes(second)
    assert _hashes(first) != _hashes(plain["images"])


@pytest.mark.parametrize("batch_size", [None, 100])
def test_random_flip_flips_about_half_and_only_horizontally(batch_size):
    plain = _epoch(kd.load_digits(shuffle=False, batch_size=None)[0].batch(2000))
    ds, _ = kd.load_digits(shuffle=False, batch_size=batch_size, random_flip=True,
                           seed=1, drop_remainder=False)
    flipped = _epoch(ds if batch_size else ds.batch(2000))
    same = np.all(flipped["images"] == plain["images"], axis=(1, 2, 3))
    mirrored = np.all(flipped["images"] == plain["images"][:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    # Images that differ from their mirror image, and were flipped:
    changed = mirrored & ~same
    assert 0.35 < changed.mean() < 0.65


# ------------------------------------------------------------ transforms


def test_center_crop_picks_the_centre():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, size=(6, 10, 3)).astype(np.float32)
    tall = rng.integers(0, 256, size=(9, 5, 3)).astype(np.float32)
    got_wide = kd.center_crop_and_resize(tf.constant(wide), 6).numpy()
    got_tall = kd.center_crop_and_resize(tf.constant(tall), 5).numpy()
    np.testing.assert_array_equal(got_wide, wide[:, 2:8])
    np.testing.assert_array_equal(got_tall, tall[2:7, :])


def test_area_resize_is_block_mean():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(12, 16, 3)).astype(np.float32)
    got = kd.center_crop_and_resize(tf.constant(image), 6, method="area").numpy()
    centre = image[:, 2:14].astype(np.float64)
    expected = centre.reshape(6, 2, 6, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_uint8_scaling_end_points_are_exact():
    values = tf.constant([0, 1, 127, 128, 255], tf.uint8)
    got = kd.scale_to_unit_range(values).numpy()
    np.testing.assert_allclose(got, np.array([0, 1, 127, 128, 255]) / 127.5 - 1.0,
                               rtol=0, atol=1e-7)
    assert got[0] == -1.0 and got[-1] == 1.0


@pytest.mark.parametrize("bad", [0, -3, 2.5, "16", True])
def test_bad_image_size_is_rejected(bad):
    with pytest.raises(ValueError, match="image_size"):
        kd.load_digits(bad)


# ---------------------------------------------------------- image folders

COLOURS = {"zebra": 10, "ant": 120, "moth": 250}


@pytest.fixture
def class_folder(tmp_path):
    root = tmp_path / "classes"
    for k, (name, value) in enumerate(COLOURS.items()):
        for i in range(3):
            image = np.full((8, 12, 3), value, np.uint8)
            image[:, :2] = 0  # outside the centre crop
            fmt = ("png", "jpeg", "bmp")[i]
            ext = (".png", ".JPG", ".bmp")[i]
            _save(str(root / name / f"{i}{ext}"), image, fmt)
    (root / "moth" / "broken.png").write_bytes(b"this is not a png")
    (root / "ant" / "empty.jpg").write_bytes(b"")
    (root / "ant" / "notes.txt").write_text("ignored")
    (root / ".hidden").mkdir()
    _save(str(root / ".hidden" / "x.png"), np.zeros((4, 4, 3)))
    return root


def test_image_folder_labels_classes_and_skips_corrupt_files(class_folder):
    with pytest.warns(UserWarning, match="Skipped 2 image file"):
        ds, info = kd.image_folder_dataset(class_folder, 8, batch_size=4, seed=0,
                                           drop_remainder=False)
    assert info.class_names == ("ant", "moth", "zebra")
    assert info.num_classes == 3 and info.size == 9 and info.num_skipped == 2
    got = _epoch(ds)
    assert got["images"].shape == (9, 8, 8, 3) and got["images"].dtype == np.float32
    assert got["labels"].dtype == np.int32
    assert sorted(got["labels"].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for image, label in zip(got["images"], got["labels"]):
        value = COLOURS[info.class_names[label]]
        # JPEG is lossy; png and bmp are exact.
        np.testing.assert_allclose(_unscale(image), value, atol=3)


def test_flat_folder_is_unlabelled_and_exactly_scaled(tmp_path):
    root = tmp_path / "flat"
    checker = np.zeros((6, 10, 3), np.uint8)
    checker[::2, 1::2] = 255
    checker[1::2, ::2] = 255
    checker[:, :2] = 7
    _save(str(root / "a.png"), checker)
    _save(str(root / "b.gif"), np.full((6, 6), 255, np.uint8), "gif")
    ds, info = kd.image_folder_dataset(root, 6, shuffle=False, batch_size=None)
    assert info.num_classes is None and info.class_names is None and info.size == 2
    elements = list(ds.as_numpy_iterator())
    assert set(elements[0]) == {"images"}
    expected = checker[:, 2:8].astype(np.float64) / 127.5 - 1.0
    np.testing.assert_array_equal(elements[0]["images"], expected)
    assert set(np.unique(elements[0]["images"])) == {-1.0, 1.0}
    np.testing.assert_array_equal(elements[1]["images"], 1.0)


def test_folder_flip_and_crop_on_files(tmp_path):
    root = tmp_path / "one"
    ramp = np.tile(np.arange(0, 200, 20, dtype=np.uint8)[None, :, None], (4, 1, 3))
    _save(str(root / "r.png"), ramp)  # 4 x 10: centre crop keeps columns 3..6
    ds, _ = kd.image_folder_dataset(root, 4, batch_size=None, shuffle=False,
                                    repeat=True, random_flip=True, seed=0)
    # float32 arithmetic, as in the pipeline, so the comparison can be exact.
    crop = ramp[:, 3:7].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    seen = {"plain": 0, "flipped": 0}
    for element in ds.take(40).as_numpy_iterator():
        if np.array_equal(element["images"], crop):
            seen["plain"] += 1
        else:
            np.testing.assert_array_equal(element["images"], crop[:, ::-1])
            seen["flipped"] += 1
    assert seen["plain"] > 5 and seen["flipped"] > 5


def test_folder_order_and_flips_follow_the_seed(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "many"
    for k in range(12):
        _save(str(root / f"{k:02d}.png"), rng.integers(0, 256, (5, 5, 3)))

    def stream(seed):
        ds, _ = kd.image_folder_dataset(root, 5, batch_size=5, repeat=True,
                                        random_flip=True, seed=seed)
        return np.concatenate([b["images"] for b in _take(ds, 7)])

    a = stream(11)
    np.testing.assert_array_equal(a, stream(11))
    assert not np.array_equal(a, stream(12))


def test_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        kd.image_folder_dataset(missing, 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match="no images"):
        kd.image_folder_dataset(empty, 8)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no readable images"):
            kd.image_folder_dataset(only_bad, 8)
    with pytest.raises(ValueError, match="channels"):
        kd.image_folder_dataset(empty, 8, channels=2)


def _png_header_only(path, width, height):
    """A PNG whose header declares ``width`` x ``height`` RGB pixels (no pixel data)."""
    import struct
    import zlib

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def test_folder_tensorflow_cannot_decode_fails_at_once(tmp_path):
    # TIFF files named .png: PIL reads them, TensorFlow does not. The old check (PIL)
    # passed them, and the repeated pipeline then span forever skipping every file.
    root = tmp_path / "tiffs"
    for name in ("a", "b"):
        for i in range(2):
            _save(str(root / name / f"{i}.png"), np.full((6, 6, 3), 40, np.uint8), "TIFF")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError) as error:
            kd.image_folder_dataset(root, 4, repeat=True)
    message = str(error.value)
    assert "no readable images" in message and str(root) in message
    assert "4 TIFF data that TensorFlow cannot decode" in message


def test_folder_reports_found_and_why_files_were_skipped(tmp_path, capsys):
    root = tmp_path / "mixed"
    for i in range(3):
        _save(str(root / "cats" / f"{i}.png"), np.full((6, 6, 3), 200, np.uint8))
    _save(str(root / "dogs" / "0.jpg"), np.full((6, 6, 3), 90, np.uint8), "JPEG")
    _save(str(root / "dogs" / "tiff.png"), np.full((6, 6, 3), 90, np.uint8), "TIFF")
    _png_header_only(str(root / "dogs" / "huge.png"), 20000, 20000)
    (root / "dogs" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.warns(UserWarning, match="Skipped 3 image file"):
        ds, info = kd.image_folder_dataset(root, 4, batch_size=None, shuffle=False)
    assert info.size == 4 and info.num_skipped == 3 and info.num_classes == 2
    out = capsys.readouterr().out
    assert f"Found 4 images in 2 classes in {str(root)!r} (skipped 3: " in out
    assert "1 TIFF data that TensorFlow cannot decode (tiff.png)" in out
    # A huge image is too large, not "corrupt".
    assert "1 too large: 400000000 pixels" in out and "(huge.png)" in out
    assert "1 corrupt or not an image (cut.png)" in out
    got = [e["images"] for e in ds.as_numpy_iterator()]
    assert len(got) == 4  # every kept file decodes in the training pipeline


# -------------------------------------------------------- caption folders


def _caption_folder(root, lines):
    root.mkdir(parents=True, exist_ok=True)
    for k in range(3):
        _save(str(root / "imgs" / f"{k}.png"), np.full((10, 10, 3), 50 * k, np.uint8))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_caption_folder_yields_matching_images_and_text(tmp_path):
    lines = [json.dumps({"file_name": f"imgs/{k}.png", "text": f"grey level {50 * k}"})
             for k in range(3)]
    root = _caption_folder(tmp_path / "caps", lines[:2] + [""] + lines[2:])
    ds, info = kd.caption_folder_dataset(root, 5, batch_size=2, seed=0,
                                         drop_remainder=False)
    assert info.has_text and info.size == 3 and info.image_shape == (5, 5, 3)
    got = _epoch(ds)
    assert got["text"].dtype == object
    assert sorted(t.decode() for t in got["text"]) == [
        "grey level 0", "grey level 100", "grey level 50"]
    for image, text in zip(got["images"], got["text"]):
        level = int(text.decode().split()[-1])
        np.testing.assert_allclose(image, level / 127.5 - 1.0, atol=1e-6)


def test_caption_folder_skips_and_counts_corrupt_images(tmp_path):
    lines = [json.dumps({"file_name": f"imgs/{k}.png", "text": f"t{k}"})
             for k in range(3)]
    lines.append(json.dumps({"file_name": "imgs/bad.jpg", "text": "broken"}))
    root = _caption_folder(tmp_path / "caps", lines)
    (root / "imgs" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.warns(UserWarning, match="Skipped 1 image file"):
        ds, info = kd.caption_folder_dataset(root, 4, batch_size=None, shuffle=False)
    assert info.num_skipped == 1 and info.size == 3
    assert [e["text"].decode() for e in ds.as_numpy_iterator()] == ["t0", "t1", "t2"]


def test_caption_folder_errors_name_the_line(tmp_path):
    good = json.dumps({"file_name": "imgs/0.png", "text": "ok"})
    root = _caption_folder(tmp_path / "a", [good, "{not json"])
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        kd.caption_folder_dataset(root, 8)
    root = _caption_folder(tmp_path / "b", [good, good,
                                            json.dumps({"file_name": "imgs/9.png",
                                                        "text": "gone"})])
    with pytest.raises(FileNotFoundError, match=r"line 3: image 'imgs/9.png'"):
        kd.caption_folder_dataset(root, 8)
    root = _caption_folder(tmp_path / "c", [json.dumps({"file_name": "imgs/0.png"})])
    with pytest.raises(ValueError, match="line 1: missing key 'text'"):
        kd.caption_folder_dataset(root, 8)
    bare = tmp_path / "d"
    bare.mkdir()
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        kd.caption_folder_dataset(bare, 8)


# ------------------------------------------------------------------ TFDS


def test_tfds_cifar10_on_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        raw = list(tfds.builder("cifar10").as_dataset(split="train")
                   .as_numpy_iterator())
        ds, info = kd.tfds_dataset("cifar10", "train", batch_size=4, shuffle=False)
        got = _epoch(ds)
        ds16, info16 = kd.make_dataset("tfds:cifar10", image_size=16, batch_size=None,
                                       shuffle=False, resize_method="area")
        got16 = _epoch(ds16.batch(12))
    raw_images = np.stack([r["image"] for r in raw]).astype(np.float64)
    raw_labels = np.array([r["label"] for r in raw])
    assert got["images"].shape == (12, 32, 32, 3) and got["images"].dtype == np.float32
    np.testing.assert_allclose(got["images"], raw_images / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(got["labels"], raw_labels)
    assert got["labels"].dtype == np.int32
    assert info.num_classes == 10 and len(info.class_names) == 10
    assert info.image_shape == (32, 32, 3)
    pooled = raw_images.reshape(12, 16, 2, 16, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(got16["images"], pooled / 127.5 - 1.0, atol=1e-5)
    assert info16.image_shape == (16, 16, 3)


def test_tfds_variable_size_and_unlabelled_datasets_on_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=4):
        flowers, finfo = kd.tfds_dataset("oxford_flowers102", image_size=24,
                                         batch_size=2, seed=0)
        batch = _take(flowers, 1)[0]
        celeb, cinfo = kd.make_dataset("celeb_a", image_size=24, batch_size=2)
        celeb_batch = _take(celeb, 1)[0]
        with pytest.raises(ValueError, match="pass image_size"):
            kd.tfds_dataset("oxford_flowers102")
    assert batch["images"].shape == (2, 24, 24, 3) and finfo.num_classes == 102
    assert np.all((batch["labels"] >= 0) & (batch["labels"] < 102))
    assert batch["images"].min() >= -1.0 and batch["images"].max() <= 1.0
    assert set(celeb_batch) == {"images"} and cinfo.num_classes is None


def test_tfds_shuffle_and_flip_are_seeded():
    import tensorflow_datasets as tfds

    def stream(seed):
        ds, _ = kd.tfds_dataset("cifar10", batch_size=5, seed=seed, repeat=True,
                                random_flip=True, shuffle_buffer=20)
        return np.concatenate([b["images"] for b in _take(ds, 6)])

    with tfds.testing.mock_data(num_examples=20):
        np.testing.assert_array_equal(stream(5), stream(5))
        assert not np.array_equal(stream(5), stream(6))


def test_tfds_not_prepared_says_where_to_put_files(tmp_path):
    with pytest.raises(kd.DatasetNotPreparedError) as err:
        kd.tfds_dataset("cifar10", data_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "download=True" in message
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(kd.DatasetNotPreparedError) as err:
        kd.tfds_dataset("imagenet2012", image_size=64, data_dir=tmp_path,
                        download=True, manual_dir=tmp_path / "no_such_dir")
    assert "manual_dir" in str(err.value)
    assert "ILSVRC2012_img_train.tar" in str(err.value)


def test_tfds_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match="Unknown TFDS dataset 'cifar_10'.*cifar10"):
        kd.tfds_dataset("cifar_10")


# --------------------------------------------------------- latent cache


def _pool_encoder(weights):
    """A Keras encoder: 8x8 average pooling, then a fixed 1 -> 4 channel projection."""
    model = keras.Sequential([
        keras.Input((16, 16, 1)),
        keras.layers.AveragePooling2D(8),
        keras.layers.Dense(4, use_bias=False),
    ])
    model.layers[-1].set_weights([weights])
    return model


def _pool_reference(images, weights):
    pooled = images.reshape(-1, 2, 8, 2, 8, 1).mean(axis=(2, 4))
    return pooled @ weights


def test_latent_cache_round_trip_and_reuse(tmp_path, sk_digits):
    images, labels = sk_digits
    upsampled = np.repeat(np.repeat(images / 8.0 - 1.0, 2, axis=1), 2, axis=2)
    weights = np.array([[1.0, -2.0, 0.5, 3.0]])
    expected = _pool_reference(upsampled[..., None], weights) * 0.5
    ds, info = kd.load_digits(16, split="all", shuffle=False, batch_size=500,
                              drop_remainder=False, resize_method="nearest")
    cache = tmp_path / "cache"
    manifest = kd.cache_latents(ds, _pool_encoder(weights), cache, scale=0.5,
                                info=info, shard_size=700, verbose=0)
    assert manifest["count"] == 1797 and manifest["latent_shape"] == [2, 2, 4]
    assert manifest["scale"] == 0.5
    # Shards hold whole batches: flushed once they reach shard_size examples.
    assert [s["count"] for s in manifest["shards"]] == [1000, 797]
    on_disk = json.loads((cache / "manifest.json").read_text())
    assert on_disk == manifest
    assert not list(cache.glob("*.tmp"))

    for in_memory in (True, False):
        loaded, linfo = kd.load_latent_cache(cache, batch_size=256, shuffle=False,
                                             drop_remainder=False, in_memory=in_memory)
        assert int(loaded.cardinality()) == 8
        got = _epoch(loaded)
        np.testing.assert_allclose(got["images"], expected, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(got["labels"], labels)
        assert got["labels"].dtype == np.int32 and got["images"].dtype == np.float32
        assert linfo.image_shape == (2, 2, 4) and linfo.latent_scale == 0.5
        assert linfo.num_classes == 10 and linfo.size == 1797

        # Shuffled: a permutation of the same rows, identical for the same seed.
        def shuffled(seed):
            ds, _ = kd.load_latent_cache(cache, batch_size=100, seed=seed,
                                         in_memory=in_memory)
            return _epoch(ds)

        a, b = shuffled(1), shuffled(1)
        np.testing.assert_array_equal(a["images"], b["images"])
        assert a["images"].shape[0] == 1700  # drop_remainder by default
        keyed = {r.tobytes(): l for r, l in zip(got["images"], got["labels"])}
        assert all(keyed[r.tobytes()] == l for r, l in zip(a["images"], a["labels"]))
        assert not np.array_equal(a["images"], got["images"][:1700])

    # A complete cache is reused: the encoder is not called again.
    def must_not_run(x):
        raise AssertionError("encoder called although the cache is complete")

    again = kd.cache_latents(ds, must_not_run, cache, scale=0.5, verbose=0)
    assert again == manifest
    with pytest.raises(ValueError, match="scale 0.5"):
        kd.cache_latents(ds, must_not_run, cache, scale=0.18215, verbose=0)

    # Without a manifest (killed run) the cache is rebuilt.
    (cache / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no complete latent cache"):
        kd.load_latent_cache(cache)
    calls = []

    def counting(x):
        calls.append(len(x))
        return _pool_reference(np.asarray(x), weights)

    rebuilt = kd.cache_latents(ds, counting, cache, scale=0.5, verbose=0)
    assert sum(calls) == 1797 and rebuilt["count"] == 1797
    # make_dataset recognises a cache folder.
    ds2, info2 = kd.make_dataset(str(cache), batch_size=1797, shuffle=False)
    np.testing.assert_allclose(_epoch(ds2)["images"], expected, atol=1e-5)
    assert info2.latent_scale == 0.5


def test_latent_cache_with_text_embeddings(tmp_path):
    lines = [json.dumps({"file_name": f"imgs/{k}.png", "text": "x" * (k + 1)})
             for k in range(3)]
    root = _caption_folder(tmp_path / "caps", lines)
    ds, _ = kd.caption_folder_dataset(root, 16, batch_size=2, shuffle=False,
                                      drop_remainder=False, channels=1)

    def encode_text(captions):
        lengths = np.array([len(c) + 0.5 for c in captions], np.float32)
        return np.broadcast_to(lengths[:, None, None], (len(captions), 3, 2))

    def encode_image(x):
        return np.asarray(x)[:, ::8, ::8, :].repeat(4, axis=-1)

    cache = tmp_path / "cache"
    manifest = kd.cache_latents(ds, encode_image, cache, scale=1.0,
                                text_encode_fn=encode_text, verbose=1)
    assert manifest["context_shape"] == [3, 2]
    # By default the captions stay out of batches that carry their embeddings.
    default, dinfo = kd.load_latent_cache(cache, batch_size=3)
    assert set(default.element_spec) == {"images", "context"} and not dinfo.has_text
    # The empty caption's embedding is cached as the null condition.
    np.testing.assert_array_equal(np.load(dinfo.null_context_file), np.full((3, 2), 0.5))
    for in_memory in (True, False):
        got = _epoch(kd.load_latent_cache(cache, batch_size=3, shuffle=False,
                                          in_memory=in_memory, include_text=True)[0])
        assert [t.decode() for t in got["text"]] == ["x", "xx", "xxx"]
        np.testing.assert_array_equal(got["context"][:, 0, 0], [1.5, 2.5, 3.5])
        assert got["context"].shape == (3, 3, 2)
        # Grey levels 0, 50, 100 -> [-1, 1].
        levels = np.array([0, 50, 100]) / 127.5 - 1.0
        np.testing.assert_allclose(got["images"][:, 0, 0, 0], levels, atol=1e-6)
    with pytest.raises(ValueError, match="text embeddings"):
        kd.cache_latents(ds, encode_image, cache, scale=1.0, verbose=0)


def test_cache_latents_rejects_infinite_data(tmp_path):
    ds, _ = kd.load_digits(repeat=True)
    with pytest.raises(ValueError, match="finite"):
        kd.cache_latents(ds, lambda x: x, tmp_path / "c", verbose=0)


# ---------------------------------------------------------- front door


def test_make_dataset_dispatch_and_errors(tmp_path, class_folder):
    ds, info = kd.make_dataset("digits", batch_size=8)
    assert info.name == "digits" and _take(ds, 1)[0]["images"].shape == (8, 8, 8, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, finfo = kd.make_dataset(str(class_folder), image_size=8)
    assert finfo.class_names == ("ant", "moth", "zebra")
    with pytest.raises(ValueError, match="Unknown dataset 'digitz'.*digits"):
        kd.make_dataset("digitz")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        kd.make_dataset(str(tmp_path / "missing_dir"), image_size=8)
    with pytest.raises(ValueError, match="needs image_size"):
        kd.make_dataset(str(class_folder))
    with pytest.raises(ValueError, match="split"):
        kd.make_dataset("digits", split="validation")
