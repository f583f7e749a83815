"""Local Hugging Face datasets as `data=` (issue 24, item 7): a `save_to_disk` folder and
a parquet file written by the real `datasets` library, read back pixel for pixel."""

import numpy as np
import pytest

from keras_minsnr.data import make_dataset

datasets = pytest.importorskip("datasets")
PIL = pytest.importorskip("PIL.Image")


def _pictures(count=5, side=8):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(count, side, side, 3), dtype=np.uint8)


def _table(pictures):
    captions = [f"picture number {i}" for i in range(len(pictures))]
    table = datasets.Dataset.from_dict(
        {"image": [PIL.fromarray(p) for p in pictures], "caption": captions})
    return table.cast_column("image", datasets.Image()), captions


def _read_all(source, **kwargs):
    dataset, info = make_dataset(source, image_size=8, batch_size=5, shuffle=False,
                                 drop_remainder=False, **kwargs)
    batch = next(iter(dataset))
    return batch, info


def _check(batch, info, pictures, captions):
    # PNG is lossless and the side is already 8: only the scaling to [-1, 1] remains.
    expected = pictures.astype(np.float64) / 127.5 - 1.0
    np.testing.assert_allclose(np.asarray(batch["images"]), expected, atol=1e-6)
    assert [t.decode() for t in np.asarray(batch["text"])] == captions
    assert info.has_text and info.size == len(pictures) and info.image_shape == (8, 8, 3)


def test_a_save_to_disk_folder(tmp_path):
    pictures = _pictures()
    table, captions = _table(pictures)
    folder = str(tmp_path / "saved")
    table.save_to_disk(folder)
    _check(*_read_all(folder), pictures, captions)


def test_a_dataset_dict_folder_picks_the_split(tmp_path):
    pictures = _pictures()
    table, captions = _table(pictures)
    folder = str(tmp_path / "dict")
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(folder)
    _check(*_read_all(folder), pictures, captions)
    with pytest.raises(ValueError, match="splits train, test; split='validation'"):
        _read_all(folder, split="validation")


def test_a_parquet_file(tmp_path):
    pictures = _pictures()
    table, captions = _table(pictures)
    path = str(tmp_path / "train.parquet")
    table.to_parquet(path)
    _check(*_read_all(path), pictures, captions)


def test_a_missing_image_column_names_the_columns(tmp_path):
    table, _ = _table(_pictures())
    path = str(tmp_path / "t.parquet")
    table.rename_column("image", "picture").to_parquet(path)
    with pytest.raises(ValueError, match="no image column 'image'; its columns are picture"):
        _read_all(path)
    batch, _ = _read_all(path, image_column="picture")
    assert np.asarray(batch["images"]).shape == (5, 8, 8, 3)
