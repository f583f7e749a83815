"""Watching a run (issue 24, items 3-5): per-step TensorBoard scalars at the global step
across a resume, validation grids, W&B offline, a fresh samples.png, `--resume-from` and
`sample --num-samples N`. The runs are the digits recipe with a one-block MLP of width 16
(tests/test_reliability.py), so a run's time is its start-up."""

import glob
import importlib.util
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from keras_minsnr import cli
from keras_minsnr import monitoring
from keras_minsnr import training
from keras_minsnr import run_config
from tests.test_reliability import _config
from tests.test_reliability import _rows
from tests.test_cli import run_dir  # noqa: F401  (the fixture: an untrained tiny digits run)

HAS_WANDB = importlib.util.find_spec("wandb") is not None
# Epochs of 3 steps with a checkpoint at each; points every 3 steps; grids at 3, 6, ...
MONITORED = dict(steps=6, steps_per_epoch=3, checkpoint_every=3, log_every=3,
                 validation_every=3, validation_labels=[1, 2, 3], keep_checkpoints=3,
                 report_to="all" if HAS_WANDB else "tensorboard")


def read_events(run_dir):
    """``{tag: {step: value}}`` of every TensorBoard event file under ``logs/``, read back
    with TensorFlow's own event reader (images as their encoded PNG bytes)."""
    import tensorflow as tf

    found = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "logs", "**", "events.out.tfevents.*"),
                                 recursive=True)):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                found.setdefault(value.tag, {})
                found[value.tag].setdefault(event.step, []).append(array)
    return found


def wandb_history(run_dir):
    """``[(run id, {key: value})]`` of every history record W&B wrote offline under
    ``logs/wandb``. A ``.wandb`` file is a LevelDB-format log (a 7-byte header, then
    32 KiB blocks of records with a 7-byte header each: CRC, length, type) of
    `wandb_internal_pb2.Record` messages."""
    from wandb.proto import wandb_internal_pb2

    found = []
    pattern = os.path.join(run_dir, "logs", "wandb", "offline-run-*", "run-*.wandb")
    for path in sorted(glob.glob(pattern)):
        with open(path, "rb") as f:
            data = f.read()
        assert data[:4] == b":W&B", path
        position, pending = 7, b""
        while position + 7 <= len(data):
            left = 32768 - position % 32768
            if left < 7:  # a block's tail too short for a header is padding
                position += left
                continue
            _, length, kind = struct.unpack("<IHB", data[position:position + 7])
            pending += data[position + 7:position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    found.append((os.path.basename(path)[4:-6], {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item}))
    return found


def _grid_side(count, tile=8):
    """The side of `image_grid`'s square picture of ``count`` 8x8 tiles (closed form)."""
    columns = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    zoom = int(np.ceil(256 / (columns * tile)))
    return rows * (tile * zoom + 1) + 1, columns * (tile * zoom + 1) + 1


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """Six steps, then the same run resumed to twelve; when samples.png was first written."""
    run = str(tmp_path_factory.mktemp("monitored"))
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")  # never the network
    try:
        return _train_twice(run)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _train_twice(run):
    training.train(_config(**MONITORED), run, verbose=0)
    first_samples = os.stat(os.path.join(run, "samples.png")).st_mtime_ns
    model = training.train(_config(**{**MONITORED, "steps": 12}), run, verbose=0)
    return run, first_samples, model


def test_scalars_every_log_every_steps_continue_across_the_resume(resumed_run):
    run, _, _ = resumed_run
    events = read_events(run)
    for tag in ("loss", "mse_q1", "mse_q4", "learning_rate"):
        assert sorted(events[tag]) == [3, 6, 9, 12], tag
        assert all(len(values) == 1 for values in events[tag].values()), tag  # no repeats
    # Points fall on epoch ends here: each is the mean over its epoch, like metrics.csv.
    rows = {int(r["step"]): r for r in _rows(run)}
    for step, (value,) in events["loss"].items():
        assert float(value) == pytest.approx(float(rows[step]["loss"]), rel=1e-5)
        assert float(events["mse_q2"][step][0]) == pytest.approx(
            float(rows[step]["mse_q2"]), rel=1e-5)
    # The digits recipe: 1e-3 after a warm-up of 0 steps (TINY), constant.
    assert [float(events["learning_rate"][s][0]) for s in (3, 6, 9, 12)] == pytest.approx(
        [1e-3] * 4)
    # Throughput from the second point of a session on (the first includes compiling).
    assert sorted(events["images_per_second"]) == [6, 12]
    assert all(float(v[0]) > 0 for v in events["images_per_second"].values())


@pytest.mark.skipif(not HAS_WANDB, reason="the wandb extra is not installed")
def test_wandb_offline_gets_the_same_points_in_one_run(resumed_run):
    run, _, _ = resumed_run
    history = wandb_history(run)
    with open(os.path.join(run, "logs", "wandb_run_id.txt")) as f:
        run_id = f.read().strip()
    assert {rid for rid, _ in history} == {run_id}  # the resumed session continues it
    points = {item["_step"]: item for _, item in history if "loss" in item}
    assert sorted(points) == [3, 6, 9, 12]
    tensorboard = read_events(run)
    for step, item in points.items():
        assert item["loss"] == pytest.approx(float(tensorboard["loss"][step][0]), rel=1e-6)
        assert item["learning_rate"] == pytest.approx(1e-3)
    images = [item for _, item in history if "validation/_type" in item]
    assert [i["_step"] for i in images] == [3, 6, 9, 12]
    assert all(i["validation/_type"] == "image-file" for i in images)
    assert all((i["validation/height"], i["validation/width"]) == _grid_side(3) for i in images)


def test_validation_grids_are_files_and_tensorboard_images(resumed_run):
    run, _, _ = resumed_run
    names = sorted(os.listdir(os.path.join(run, "samples")))
    assert names == [f"step-{s:08d}.png" for s in (3, 6, 9, 12)]
    with Image.open(os.path.join(run, "samples", names[0])) as image:
        assert image.size[::-1] == _grid_side(3)  # the three validation labels
    images = read_events(run)["validation"]
    assert sorted(images) == [3, 6, 9, 12]
    # A TensorBoard image is [width, height, PNG bytes].
    width, height, png = images[3][0]
    assert (int(height), int(width)) == _grid_side(3) and png.startswith(b"\x89PNG")


def test_samples_png_shows_the_final_model_after_a_resume(resumed_run):
    run, first_samples, model = resumed_run
    # Drawn again at the end of the resumed session (today: the grid of step 6 stayed; the
    # tiny model's grids may look alike, so the file's time tells).
    assert os.stat(os.path.join(run, "samples.png")).st_mtime_ns > first_samples
    again = os.path.join(run, "again.png")
    monitoring.write_samples(model, again, _config(**MONITORED))
    with Image.open(again) as a, Image.open(os.path.join(run, "samples.png")) as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_from_an_older_checkpoint(resumed_run, tmp_path):
    import shutil

    run = str(tmp_path / "copy")
    shutil.copytree(resumed_run[0], run)
    before = open(os.path.join(run, "checkpoints", "state.json")).read()
    with pytest.raises(ValueError, match=r"step-00000004.keras.*Available: step-00000006"):
        training.train(_config(**{**MONITORED, "steps": 12}), run, verbose=0,
                       resume_from="step-00000004.keras")
    assert open(os.path.join(run, "checkpoints", "state.json")).read() == before
    training.train(_config(**{**MONITORED, "steps": 9}), run, verbose=0,
                   resume_from=os.path.join(run, "checkpoints", "step-00000006.keras"),
                   allow_config_change=["steps"])
    with open(os.path.join(run, "checkpoints", "state.json")) as f:
        assert json.load(f)["step"] == 9
    assert [int(r["step"]) for r in _rows(run)] == [3, 6, 9]
    with open(os.path.join(run, "history.jsonl")) as f:
        history = [json.loads(line) for line in f]
    rewinds = [(h["step"], h["old"], h["new"]) for h in history if h["key"] == "resume_from"]
    assert rewinds == [(6, "step-00000012.keras", "step-00000006.keras")]


@pytest.mark.parametrize("override, words", [
    ({"validation_prompts": ["a cat"], "validation_labels": None},
     ["validation_prompts", "not text-conditional",
                                         "validation_labels"]),
    ({"validation_labels": [3, 12]}, ["validation_labels", "12", "0 ... 9"]),
])
def test_validation_keys_that_do_not_fit_the_model(tmp_path, override, words):
    run = str(tmp_path / "run")
    with pytest.raises(ValueError) as info:
        training.train(_config(**{**MONITORED, **override}), run, verbose=0)
    for word in words:
        assert word in str(info.value)
    assert not os.path.exists(os.path.join(run, "config.json"))


def test_sample_writes_as_many_images_as_asked(run_dir, tmp_path, capsys):
    out = str(tmp_path / "s.png")
    assert cli.main(["sample", str(run_dir), "--num-samples", "16", "--steps", "2",
                     "--output", out]) == 0
    with Image.open(out) as image:
        assert image.size[::-1] == _grid_side(16)  # 4 x 4 tiles; today 10 tiles, 3 rows
    assert "Wrote 16 samples" in capsys.readouterr().out


def test_evaluate_names_its_features_and_uses_smaller_kid_subsets(run_dir, capsys):
    from keras_minsnr import evaluation

    # Subsets of all 1000 samples (the old size) are the same set each time: std 0.
    assert [evaluation.kid_subset_size(n) for n in (2, 20, 1000, 5000)] == [2, 10, 500, 1000]
    assert cli.main(["evaluate", str(run_dir), "--num-samples", "20",
                     "--steps", "2"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # no progress bars off a terminal: stdout is the JSON
    assert result["kid_subset_size"] == 10 and result["kid_std"] > 0
    assert result["extractor"] == "digits" and "not with published" in result["features"]
    assert "FID/KID with digits features" in captured.err


def _tiny_text_autoencoder(tmp_path):
    """`StableDiffusionAutoencoder` with its real BPE tokenizer on a tiny vocabulary and a
    small text model (768-wide, as SD 1.x's context)."""
    import gzip

    import keras

    from keras_minsnr.backbones.autoencoders import StableDiffusionAutoencoder

    vocabulary = str(tmp_path / "tiny_bpe.txt.gz")
    with gzip.open(vocabulary, "wt", encoding="utf-8") as f:
        f.write("#version: tiny\nh e\nl l\nhe ll\nhell o</w>")
    tokens = keras.Input((77,), dtype="int32", name="tokens")
    positions = keras.Input((77,), dtype="int32", name="positions")
    text = keras.layers.Add()([keras.layers.Embedding(600, 768)(tokens),
                               keras.layers.Embedding(77, 768)(positions)])
    return StableDiffusionAutoencoder("v1", vocabulary=vocabulary,
                                      text_encoder=keras.Model([tokens, positions], text))


def test_validation_prompts_go_through_the_runs_text_encoder(tmp_path, monkeypatch):
    """A text model's validation grid: the prompts encoded by the run's autoencoder (the
    real `StableDiffusionAutoencoder` with its BPE tokenizer, on a tiny text model)."""
    import keras_minsnr as kms
    from keras_minsnr.backbones import autoencoders
    from tests.tiny_backbones import TinyContextBackbone

    encoders = _tiny_text_autoencoder(tmp_path)
    asked = []
    monkeypatch.setattr(autoencoders, "from_encode_config",
                        lambda encode, text=False, check=True: asked.append(text) or encoders)
    model = kms.DiffusionModel(TinyContextBackbone(image_shape=(8, 8, 3),
                                                   context_shape=(77, 768)),
                               "cosine", ema_decay=0.0)
    model.compile(optimizer="adamw")
    prompts = ["hello", "hell", "o"]
    config = run_config.resolve_config({}, {"validation_every": 5, "validation_prompts": prompts,
                                          "log_every": 1000, "sample_steps": 2,
                                          "batch_size": 2})
    logger = monitoring.StepLogger(str(tmp_path), config, model)
    assert asked == [True]
    context = logger.validation["context"]
    np.testing.assert_array_equal(context, encoders.encode_text(prompts))
    assert context.shape == (3, 77, 768) and not np.allclose(context[0], context[2])
    logger.on_epoch_begin(0)
    assert not logger.due(4) and logger.due(5)
    logger.after_update(5, model)
    logger.close()
    with Image.open(monitoring.validation_path(str(tmp_path), 5)) as image:
        assert image.size[::-1] == _grid_side(3)
    assert sorted(read_events(str(tmp_path))["validation"]) == [5]
    with pytest.raises(ValueError, match="validation_labels=.*no classes.*validation_prompts"):
        monitoring.StepLogger(str(tmp_path), {**config, "validation_prompts": None,
                                              "validation_labels": [1]}, model)
