"""keras.distribution on JAX: data- and model-parallel DiffusionModel on virtual devices.

The heavy checks run once, in a subprocess (tests/distribution_checks.py) started with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``, since the device count is fixed
when JAX starts. Everything is compared with a one-device run of the same tiny DiT on the
same global batch with fixed timesteps and noise, trained with SGD (momentum 0.9, so
there is an optimizer slot per weight).

Tolerance: 1e-6 absolute on weights, EMA and slots (values ~0.1; the sharded run only
reorders float32 sums in the gradient all-reduce), 1e-6 on the loss.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_minsnr import distribution as kd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_ONLY = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution is the JAX path; TensorFlow uses tf.distribute",
)
TOL = 1e-6
# The checks the `report` child runs (always on JAX) are read once, from the JAX pass of
# `make test`, which is the shorter of the two without it since TensorFlow runs its
# oneDNN kernels in the tests too (docs/architecture.md).
CHECKED_IN_A_CHILD = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="its JAX child process runs once, from the JAX pass",
)

# The layout the Megatron-style split must give each DiT block weight (path suffix ->
# axes); every other weight is replicated.
EXPECTED_SHARDED = {
    "attn/qkv/kernel": [None, "model"],
    "attn/qkv/bias": ["model"],
    "attn/proj/kernel": ["model", None],
    "fc1/kernel": [None, "model"],
    "fc1/bias": ["model"],
    "fc2/kernel": ["model", None],
    "block_0/modulation/kernel": [None, "model"],
    "block_0/modulation/bias": ["model"],
}


@pytest.fixture(scope="module")
def report():
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
        "XLA_FLAGS": (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
        ).strip(),
    }
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "distribution_checks.py")],
        env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@CHECKED_IN_A_CHILD
@pytest.mark.parametrize("n", [2, 4])
def test_data_parallel_step_equals_one_device(report, n):
    assert report["num_devices"] == 4
    got = report[f"dp{n}"]
    assert got["batch_sharding"] == "('batch', None)"
    assert got["loss_diff"] <= TOL
    for key in ("weights", "ema", "slots"):
        assert got[key] <= TOL, (key, got[key])
    # generate() under the distribution: same images (clipped to [-1, 1]).
    assert got["sample_diff"] <= 1e-5


@CHECKED_IN_A_CHILD
def test_resume_data_parallel_save_on_one_device(report):
    # Saved after one step on 4 devices, loaded and stepped once on 1 device: equals two
    # steps on one device, with the step counter carried over.
    got = report["resume1"]
    assert got["iterations"] == 2
    assert len(got["devices"]) == 1
    assert got["loss_diff"] <= TOL
    for key in ("weights", "ema", "slots"):
        assert got[key] <= TOL, (key, got[key])


@CHECKED_IN_A_CHILD
def test_model_parallel_layouts_and_step(report):
    got = report["mp"]
    layouts = got["layouts"]
    sharded = 0
    for path in got["weight_paths"]:
        suffix = [s for s in EXPECTED_SHARDED if path.endswith(s)]
        expected = EXPECTED_SHARDED[suffix[0]] if suffix else [None] * len(layouts[path])
        assert layouts[path] == expected, path
        sharded += bool(suffix)
    assert sharded == len(EXPECTED_SHARDED)
    # The EMA copy and the optimizer slot of every weight live exactly like the weight.
    assert len(got["ema_paths"]) == len(got["slot_paths"]) == len(got["weight_paths"])
    for weight, ema, slot in zip(got["weight_paths"], got["ema_paths"], got["slot_paths"]):
        assert layouts[ema] == layouts[weight], (ema, weight)
        assert layouts[slot] == layouts[weight], (slot, weight)
    # One sharded step is the unsharded step.
    assert got["loss_diff"] <= TOL
    for key in ("weights", "ema", "slots"):
        assert got[key] <= TOL, (key, got[key])
    assert got["sample_diff"] <= 1e-5


@CHECKED_IN_A_CHILD
def test_orbax_checkpoint_of_sharded_model_restores_on_other_layout(report):
    got = report["orbax"]
    if got is None:
        pytest.skip("orbax-checkpoint is not installed (keras.callbacks.OrbaxCheckpoint)")
    # Written by 2 steps of the 2x2 model-parallel run, restored on 2 data-parallel devices.
    assert got["iterations"] == 2
    assert got["devices"] == 2
    for key in ("weights", "ema", "slots"):
        assert got[key] == 0.0, (key, got[key])
    assert all(axis is None for axes in got["layouts"].values() for axis in axes)


FSDP_RUNS = {"dit_4x1": (4, 1), "dit_2x2": (2, 2), "unet_2x1": (2, 1)}  # (data, model)


def _fsdp_expected_axes(shape, data_shards, model_axes):
    """Closed form of the FSDP split: the data axis on the largest dimension (the last on
    a tie) that the data-axis size divides, among those the model axis left; only for
    matrices and larger."""
    axes = list(model_axes)
    candidates = [i for i, d in enumerate(shape) if axes[i] is None and d % data_shards == 0]
    if len(shape) >= 2 and candidates:
        axes[max(candidates, key=lambda i: (shape[i], i))] = "data"
    return axes


@CHECKED_IN_A_CHILD
@pytest.mark.parametrize("run", sorted(FSDP_RUNS))
def test_fsdp_steps_equal_one_device(report, run):
    # Two AdamW steps (weights, EMA, both Adam moments) from the same initial values.
    got = report["fsdp"][run]
    assert got["batch_axes"] == ["data", None]
    assert got["loss_diff"] <= TOL
    for key in ("weights", "ema", "slots"):
        assert got[key] <= TOL, (key, got[key])


@CHECKED_IN_A_CHILD
@pytest.mark.parametrize("run", sorted(FSDP_RUNS))
def test_fsdp_splits_weights_ema_and_adamw_slots(report, run):
    got = report["fsdp"][run]
    data_shards, model_shards = FSDP_RUNS[run]
    layouts, shapes, paths = got["layouts"], got["shapes"], got["paths"]
    assert len(paths["ema"]) == len(paths["weights"])
    assert len(paths["slots"]) == 2 * len(paths["weights"])  # AdamW: two moments
    split = 0
    for i, weight in enumerate(paths["weights"]):
        shape = shapes[weight]
        model_axes = [None] * len(shape)
        if model_shards > 1:  # the transformer's Megatron split stays on the model axis
            suffix = [k for k in EXPECTED_SHARDED if weight.endswith(k)]
            model_axes = EXPECTED_SHARDED[suffix[0]] if suffix else model_axes
        expected = _fsdp_expected_axes(shape, data_shards, model_axes)
        assert layouts[weight] == expected, weight
        split += "data" in expected
        # Its EMA copy and its two AdamW moments live exactly like it.
        for other in (paths["ema"][i], paths["slots"][2 * i], paths["slots"][2 * i + 1]):
            assert layouts[other] == expected, (other, weight)
    assert split >= len(paths["weights"]) // 3
    # What the first device really holds: the split arrays' share plus the small
    # replicated ones (biases, norms), far below the replicated state.
    shards = {"data": data_shards, "model": model_shards, None: 1}
    for group, (local, total) in got["device0_bytes"].items():
        expected_local = sum(
            4 * int(np.prod(shapes[p])) // int(np.prod([shards[a] for a in layouts[p]]))
            for p in paths[group])
        assert local == expected_local, group
        assert local < total / data_shards * 1.5, (group, local, total)


@CHECKED_IN_A_CHILD
@pytest.mark.parametrize("run", sorted(FSDP_RUNS))
def test_fsdp_model_round_trips_through_a_keras_file(report, run):
    got = report["fsdp"][run]
    # Loaded under the same distribution: the same values, split as before.
    sharded = got["loaded_sharded"]
    assert sharded["device0_bytes"] == got["device0_bytes"]
    # Loaded on one device: the full arrays.
    single = got["loaded_one_device"]
    assert single["devices"] == 1
    for key in ("weights", "ema", "slots"):
        assert sharded[key] == 0.0 and single[key] == 0.0, key


@CHECKED_IN_A_CHILD
def test_fit_reads_a_per_host_shard(report):
    # Global batches of 8 from range(32) on 2 hosts: host 1 gets the second half of each.
    assert report["host_shard"] == [[4 * i + j for j in range(4)] for i in (1, 3, 5, 7)]


@JAX_ONLY
def test_layout_rules_match_weight_ema_and_slot_paths():
    for path in (
        "di_t/block_3/attn/qkv/kernel",
        "diffusion_model/ema_di_t_block_3_attn_qkv_kernel",
        "diffusion_model/ema/di_t/block_3/attn/qkv/kernel",
        "adam_w/di_t_block_3_attn_qkv_kernel_momentum",
    ):
        assert kd.match_rules("dit_s_2", path) == (None, "model"), path
    for path in ("di_t/final_layer/modulation/kernel", "di_t/patch_embed/kernel",
                 "di_t/block_0/attn/proj/bias"):
        assert kd.match_rules("dit_s_2", path) is None, path


@JAX_ONLY
def test_in_context_vit_blocks_get_the_same_split():
    from keras_minsnr import backbones

    with keras.StatelessScope():  # shapes only, nothing allocated
        vit = backbones.get("vit_b_2_in256", depth=2, hidden_size=32, num_heads=2,
                            image_shape=(8, 8, 4), num_classes=10)
        vit.build({"x": (None, 8, 8, 4), "t": (None,), "y": (None,)})
    split = {v.path.split("/", 1)[1]: kd.match_rules(vit, v.path) for v in vit.variables}
    for i in range(2):
        assert split[f"block_{i}/attn/qkv/kernel"] == (None, "model")
        assert split[f"block_{i}/attn/proj/kernel"] == ("model", None)
        assert split[f"block_{i}/fc1/kernel"] == (None, "model")
        assert split[f"block_{i}/fc2/kernel"] == ("model", None)
        assert split[f"block_{i}/norm1/gamma"] is None
    assert sum(axes is not None for axes in split.values()) == 2 * 6


@JAX_ONLY
def test_non_transformer_backbones_are_replicated():
    mesh = kd.device_mesh((1, 1))
    for name in ("unet_cifar10", "sd15_unet", "mlp_digits"):
        assert len(kd.layout_map(name, mesh)) == 0, name
    for name in ("dit_xl_2", "vit_l_4_in64"):
        assert len(kd.layout_map(name, mesh)) == 8, name  # 8 rules per transformer block


@JAX_ONLY
def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="'pipeline'"):
        kd.configure("pipeline")
    with pytest.raises(ValueError, match=r"needs 8 devices"):
        kd.configure("data_parallel", mesh_shape=(8, 1))
    with pytest.raises(ValueError, match="backbone_name"):
        kd.configure("model_parallel", mesh_shape=(1, 1))
    with pytest.raises(ValueError, match="'fsdp' with a model axis has nothing to split"):
        kd.check_splits_something("unet_cifar10", "fsdp")
    with pytest.raises(ValueError, match="'no_such'"):
        kd.layout_map("no_such", kd.device_mesh((1, 1)))
    # DiT-XL/2 has width 1152 = 2^7 * 9: a model axis of 5 cannot split it.
    with pytest.raises(ValueError, match="1152 is not divisible by 5"):
        kd.backbone_rules("dit_xl_2", 5)
    assert keras.distribution.distribution() is None


def test_parse_mesh():
    assert kd.parse_mesh("2x4") == (2, 4)
    assert kd.parse_mesh("8X1") == (8, 1)
    assert kd.parse_mesh(None) is None
    for bad in ("8", "2x0", "ax2", "2x2x2"):
        with pytest.raises(ValueError, match=repr(bad)):
            kd.parse_mesh(bad)


@pytest.mark.skipif(keras.backend.backend() == "jax", reason="checks the non-JAX error")
def test_other_backends_get_a_clear_error():
    with pytest.raises(RuntimeError, match="KERAS_BACKEND=jax"):
        kd.configure("data_parallel")


@JAX_ONLY
def test_memory_plan_splits_exactly_the_block_matrices():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import memory_plan

    h, f, depth, m = 32, 128, 2, 4
    backbone = memory_plan.abstract_backbone(
        "dit_s_2", depth=depth, hidden_size=h, num_heads=2, image_shape=(8, 8, 4),
        num_classes=10,
    )
    # Closed form: per block, qkv (h*3h + 3h), proj kernel h*h, fc1 (h*f + f), fc2 kernel
    # f*h and adaLN modulation (h*6h + 6h) are split m ways.
    split = depth * (h * 3 * h + 3 * h + h * h + h * f + f + f * h + h * 6 * h + 6 * h)
    total = sum(int(np.prod(v.shape)) for v in backbone.variables)
    weights, _ = memory_plan.state_bytes(backbone, 1)
    assert weights == 4 * total
    weights, _ = memory_plan.state_bytes(backbone, m)
    assert weights == 4 * (total - split + split // m)
    rows = memory_plan.plan(backbone, devices=4, batch=8, precision="fp32", optimizer="adamw")
    assert [r["mesh"] for r in rows if r["layout"] != "fsdp"] == [[4, 1], [2, 2], [1, 4]]
    assert rows[0]["optimizer_slots"] == 2 * rows[0]["ema"]


@JAX_ONLY
def test_memory_plan_of_fsdp_divides_the_matrices_by_the_data_axis():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import memory_plan

    h, f, depth, n = 32, 128, 2, 4
    backbone = memory_plan.abstract_backbone(
        "dit_s_2", depth=depth, hidden_size=h, num_heads=2, image_shape=(8, 8, 4),
        num_classes=10,
    )
    # Closed form: every float matrix (rank >= 2) has a dimension divisible by 4 here
    # (widths 32..192, patch kernel 2x2x4x32, class table 11x32, position table
    # 1x16x32) and is split 4 ways; vectors stay whole.
    matrices = sum(int(np.prod(v.shape)) for v in backbone.variables if len(v.shape) >= 2)
    vectors = sum(int(np.prod(v.shape)) for v in backbone.variables if len(v.shape) < 2)
    weights, _ = memory_plan.state_bytes(backbone, 1, n)
    assert weights == 4 * (matrices // n + vectors)
    rows = memory_plan.plan(backbone, devices=4, batch=16, precision="fp32",
                            optimizer="adamw", grad_accum=2)
    by_layout = {(r["layout"], tuple(r["mesh"])): r for r in rows}
    fsdp, replicated = by_layout[("fsdp", (4, 1))], by_layout[("data_parallel", (4, 1))]
    assert fsdp["local_batch"] == replicated["local_batch"] == 2  # 16 / 2 / 4
    assert fsdp["activations"] == replicated["activations"]
    assert fsdp["optimizer_slots"] == 2 * fsdp["ema"] < replicated["ema"]
    assert fsdp["gradients"] == 2 * fsdp["ema"]  # gradient + accumulator
    assert fsdp["gathered_weights"] == replicated["ema"]  # the whole weights, transient
    assert ("fsdp", (1, 4)) not in by_layout  # no data axis to split over
