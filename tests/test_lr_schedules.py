"""Learning-rate schedules (issue 24, item 2): `lr_schedule` with `warmup_steps`, counted
in optimizer updates, checked against diffusers' definitions written out in float64."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_minsnr import lr_schedules
from keras_minsnr import optimizers
from keras_minsnr import run_config

PEAK, TOTAL, WARMUP = 0.2, 20, 4


def reference_rate(kind, step, cycles=1, power=1.0, end=1e-7):
    """diffusers' get_scheduler lambdas times the peak rate, in float64."""
    if step < WARMUP:
        return PEAK * step / WARMUP
    progress = min((step - WARMUP) / (TOTAL - WARMUP), 1.0)
    if kind == "constant":
        return PEAK
    if kind == "linear":
        return PEAK * max(0.0, (TOTAL - step) / (TOTAL - WARMUP))
    if kind == "cosine":
        return PEAK * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return PEAK * 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))
    return (PEAK - end) * (1.0 - progress) ** power + end


CASES = [("constant", {}), ("linear", {}), ("cosine", {}),
         ("cosine_with_restarts", {"lr_num_cycles": 3}), ("polynomial", {"lr_power": 2.0})]


def _config(**overrides):
    return run_config.resolve_config({}, {"learning_rate": PEAK, "steps": TOTAL,
                                        "warmup_steps": WARMUP, **overrides})


def _rate_at(optimizer, micro_batch):
    optimizer._iterations.assign(micro_batch)
    return float(ops.convert_to_numpy(optimizer.learning_rate))


@pytest.mark.parametrize("kind, extra", CASES)
def test_rates_match_the_closed_forms(kind, extra):
    optimizer = optimizers.make_optimizer(_config(lr_schedule=kind, **extra))
    optimizer.build([keras.Variable(np.zeros(2, "float32"))])
    cycles, power = extra.get("lr_num_cycles", 1), extra.get("lr_power", 1.0)
    steps = range(0, TOTAL + 3)  # past the end: the last value holds
    actual = [_rate_at(optimizer, s) for s in steps]
    expected = [reference_rate(kind, s, cycles, power) for s in steps]
    np.testing.assert_allclose(actual, expected, rtol=2e-6, atol=1e-8)


@pytest.mark.parametrize("kind, extra", CASES[1:3])
def test_with_grad_accum_the_schedule_counts_updates(kind, extra):
    """Update k (0-based) of N micro-batches each reads the rate of step k."""
    optimizer = optimizers.make_optimizer(_config(lr_schedule=kind, grad_accum=3, **extra))
    optimizer.build([keras.Variable(np.zeros(2, "float32"))])
    # Keras reads update k's rate at its last micro-batch, k·N + N − 1.
    actual = [_rate_at(optimizer, k * 3 + 2) for k in range(TOTAL)]
    np.testing.assert_allclose(actual, [reference_rate(kind, k) for k in range(TOTAL)],
                               rtol=2e-6, atol=1e-8)


def test_schedule_survives_serialisation():
    schedule = lr_schedules.WarmupDecaySchedule(PEAK, TOTAL, "cosine_with_restarts",
                                                WARMUP, num_cycles=2, power=3.0)
    again = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(schedule))
    assert again.get_config() == schedule.get_config()
    assert float(ops.convert_to_numpy(again(9))) == pytest.approx(
        reference_rate("cosine_with_restarts", 9, cycles=2), rel=1e-6)


def test_constant_without_warmup_is_a_plain_rate():
    optimizer = optimizers.make_optimizer(_config(warmup_steps=0))
    assert optimizer.get_config()["learning_rate"] == pytest.approx(PEAK)


def test_names_agree_with_the_run_config():
    assert run_config.LR_SCHEDULES == lr_schedules.LR_SCHEDULES


@pytest.mark.parametrize("override, words", [
    ({"lr_schedule": "cosine_annealing"}, ["lr_schedule", "'cosine_annealing'", "polynomial"]),
    ({"lr_num_cycles": 0}, ["lr_num_cycles", "0", ">= 1"]),
    ({"lr_power": 0}, ["lr_power", "0", "> 0"]),
])
def test_bad_schedule_keys_are_named(override, words):
    with pytest.raises(ValueError) as info:
        _config(**override)
    for word in words:
        assert word in str(info.value)
