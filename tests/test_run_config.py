"""The typed run config: layering, types, ranges and choices, and the docs made from it."""

import json
import os
import re

import pytest

from keras_minsnr import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resolve_config_layers_defaults_recipe_and_overrides():
    recipe = {"gamma": 3.0, "backbone_args": {"depth": 2}}
    overrides = run_config.parse_overrides(
        ["gamma=1", "backbone_args.hidden_size=64", "weighting=soft_min_snr", "clipnorm=1.5"]
    )
    config = run_config.resolve_config(recipe, overrides)
    assert config["gamma"] == 1.0 and isinstance(config["gamma"], float)
    assert config["backbone_args"] == {"depth": 2, "hidden_size": 64}
    assert config["weighting"] == "soft_min_snr" and config["clipnorm"] == 1.5
    # the paper's defaults where nothing overrides them (Hang et al. 2023, Sec. 4)
    assert (config["learning_rate"], config["beta_1"], config["beta_2"]) == (1e-4, 0.99, 0.99)
    assert (config["weight_decay"], config["ema_decay"], config["label_dropout"]) == (
        0.03, 0.9999, 0.15)
    assert (config["schedule"], config["num_timesteps"], config["weighting"]) == (
        "cosine", 1000, "soft_min_snr")
    # the keys agreed with the run and loss code
    assert (config["checkpoint_every"], config["keep_checkpoints"],
            config["terminal_weight"]) == (None, 2, 1.0)


class _ReadKeys(dict):
    """A config that records which top-level keys were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


def test_resumable_keys_are_never_read_when_the_model_is_built():
    """A key may change between sessions of a run only if the checkpointed model does not
    depend on it: building the model (backbone, schedule, weighting, optimizer) reads none
    of `RESUMABLE_KEYS`, and reads the keys that do shape it."""
    from keras_minsnr import builders
    from keras_minsnr.data.info import DatasetInfo

    config = _ReadKeys(run_config.resolve_config(
        {"backbone": "mlp_digits", "backbone_args": {"depth": 1, "hidden_size": 8}}))
    builders.build_model(config, DatasetInfo("digits", (8, 8, 1), num_classes=10))
    assert not config.read & set(run_config.RESUMABLE_KEYS)
    assert {"backbone", "weighting", "gamma", "learning_rate", "schedule"} <= config.read


@pytest.mark.parametrize("overrides, match", [
    ({"gama": 5}, r"Unknown config key 'gama'.*gamma"),
    ({"gamma.x": 5}, "not a dict"),
    ({"steps": 0}, r"steps: 0\. Allowed: an integer >= 1"),
    ({"steps": 2.5}, r"steps: 2\.5\. Allowed: an integer"),
    ({"steps": True}, r"steps: True"),
    ({"steps_per_epoch": "abc"}, r"steps_per_epoch: 'abc'"),
    ({"gamma": 0}, r"gamma: 0\. Allowed: a number > 0"),
    ({"gamma": float("nan")}, r"gamma: nan"),
    ({"ema_decay": 1.0}, r"ema_decay: 1\.0\. Allowed: a number in \[0, 1\)"),
    ({"beta_2": -0.1}, r"beta_2: -0\.1"),
    ({"clipnorm": 0}, r"clipnorm: 0\. Allowed: a number > 0 or null"),
    ({"warmup_steps": -1}, r"warmup_steps: -1\. Allowed: an integer >= 0"),
    ({"zero_terminal_snr": "yes"}, r"zero_terminal_snr: 'yes'\. Allowed: true or false"),
    ({"schedule": "cosin"}, r"schedule: 'cosin'\. Allowed: one of linear, scaled_linear, cosine"),
    ({"prediction_type": "x0"}, r"prediction_type: 'x0'.*v_prediction"),
    ({"weighting": "minsnr"}, r"weighting: 'minsnr'.*min_snr"),
    ({"sampler": "dim"}, r"sampler: 'dim'.*edm_heun"),
    ({"terminal_weight": "lim"}, r"terminal_weight: 'lim'\. Allowed: a number >= 0 or one of "
                                 r"limit"),
    ({"data_args": "x"}, r"data_args: 'x'\. Allowed: a dict"),
    ({"encode.vae": "x"}, r"encode key.*'vae'.*image_encoder_weights"),
    ({"backbone": "dit_s2"}, r"backbone: 'dit_s2'.*dit_s_2"),
    ({"num_samples": None}, r"num_samples: None"),
])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(overrides, match):
    with pytest.raises(ValueError, match=match):
        run_config.resolve_config({}, overrides)


def test_values_are_converted_to_the_key_type():
    config = run_config.resolve_config({}, run_config.parse_overrides(
        ["steps=1e3", "gamma=2", "terminal_weight=limit", "clipnorm=null",
         "mixed_precision=mixed_bfloat16", "label_dropout=1", "clip_denoised=null"]))
    assert config["steps"] == 1000 and isinstance(config["steps"], int)
    assert config["gamma"] == 2.0 and isinstance(config["gamma"], float)
    assert config["terminal_weight"] == "limit" and config["clipnorm"] is None
    assert config["mixed_precision"] == "mixed_bfloat16" and config["label_dropout"] == 1.0
    assert config["clip_denoised"] is None


def test_parse_overrides_rejects_missing_equals():
    with pytest.raises(ValueError, match="key=value"):
        run_config.parse_overrides(["gamma"])
    assert run_config.parse_overrides(["a=[1, 2]", "b=true", "c=x y", "d={'k': 1}"]) == {
        "a": [1, 2], "b": True, "c": "x y", "d": {"k": 1}}


def test_choices_match_the_library():
    from keras_minsnr import backbones
    from keras_minsnr import samplers
    from keras_minsnr import schedules
    from keras_minsnr import weighting

    from keras_minsnr import flow
    from keras_minsnr import timestep_sampling

    assert set(run_config.SCHEDULES) == set(schedules.SCHEDULES) | {"flow"}
    assert set(run_config.PREDICTION_TYPES) == set(flow.FLOW_PREDICTION_TYPES)
    assert set(run_config.WEIGHTINGS) == set(weighting.STRATEGIES)
    assert set(run_config.SAMPLERS) == set(samplers.SAMPLERS) | set(flow.FLOW_SAMPLERS)
    assert set(run_config.TIMESTEP_SAMPLINGS) == set(timestep_sampling.KINDS)
    params = {name for p in timestep_sampling.DEFAULT_PARAMS.values() for name in p}
    assert set(run_config.TIMESTEP_SAMPLING_PARAMS) == params
    for name in backbones.PRESETS:
        assert run_config.resolve_config({"backbone": name})["backbone"] == name
    # Written out so that checking a config imports no Keras (`show` answers at once).
    assert run_config.BACKBONE_PRESETS == tuple(sorted(backbones.PRESETS))


def test_config_json_round_trips_through_the_schema():
    config = run_config.resolve_config({"gamma": 2, "encode": {"source": "x"}})
    again = run_config.RunConfig.from_dict(json.loads(json.dumps(config))).to_dict()
    assert again == config and list(again) == list(run_config.DEFAULTS)


def test_every_key_has_a_doc_and_a_group():
    for name, _, _, rules in run_config.key_specs():
        assert rules.doc and rules.group in run_config.GROUPS, name


def test_docs_key_table_matches_the_schema():
    with open(os.path.join(ROOT, "docs", "recipes.md"), encoding="utf-8") as f:
        text = f.read()
    found = re.search(r"<!-- config-keys:start -->\n(.*?)\n<!-- config-keys:end -->", text,
                      re.S)
    assert found, "docs/recipes.md lacks the config-keys block"
    assert found.group(1) == run_config.markdown_table(), (
        "docs/recipes.md is out of date; regenerate its key table with: python -c "
        "'from keras_minsnr import run_config; print(run_config.markdown_table())'")
