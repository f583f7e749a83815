"""The typed run configuration: every key of a training run with its type, range and doc.

The fields of `RunConfig` are the one source for checking a config (`resolve_config`),
for `keras-minsnr train --help` and `keras-minsnr show RECIPE`, for the `config.json` of
a run and for the key table in docs/recipes.md. This module imports neither Keras nor
TensorFlow, so the command line can print its help at once.
"""

import ast
import copy
import dataclasses
import json
import math
import re
import sys
import typing

# Names the library accepts. They are written out here so that `--help` needs no Keras
# import; tests/test_run_config.py keeps them equal to the library's own tuples.
SCHEDULES = ("linear", "scaled_linear", "cosine", "flow")  # flow: FlowMatchingSchedule
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")  # flow: velocity ε − x₀
WEIGHTINGS = (
    "constant", "snr", "trunc_snr", "max_snr", "min_snr", "soft_min_snr", "inv_snr", "p2",
    "debiased",
)
SAMPLERS = ("ddpm", "ddim", "edm_heun", "euler", "heun")  # euler, heun: flow only
FLOW_SAMPLERS = ("euler", "heun")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode", "laplace")
TIMESTEP_SAMPLING_PARAMS = ("logit_mean", "logit_std", "mode_scale", "laplace_mu", "laplace_b")
MIXED_PRECISION_POLICIES = ("float32", "float16", "bfloat16", "mixed_float16", "mixed_bfloat16")
ENCODE_KEYS = (
    "source", "source_args", "version", "image_encoder_weights", "text_encoder_weights",
    "vocabulary", "batch_size", "sample_posterior", "decoder_weights",
    # version "sd3": the KerasHub preset holding the VAE and text encoders (default:
    # backbone_args.preset) and whether KerasHub may download it.
    "preset", "allow_download",
)
GROUPS = {
    "data": "Data",
    "model": "Model and loss",
    "optimizer": "Optimizer",
    "run": "Length of the run and checkpoints",
    "samples": "Sample grids and validation",
    "logging": "Monitoring (TensorBoard, Weights & Biases)",
    "scale": "Devices (keras.distribution on JAX, tf.distribute on TensorFlow)",
    "about": "Documentation only",
}
DISTRIBUTIONS = ("none", "data_parallel", "model_parallel", "fsdp")
CHECKPOINT_FORMATS = ("keras", "orbax")  # keras_minsnr.checkpointing; sharded_checkpoint
# keras_minsnr.lr_schedules.LR_SCHEDULES (a test keeps them equal).
LR_SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")
REPORT_TO = ("tensorboard", "wandb", "all", "none")
LORA_TARGET_GROUPS = ("attention", "mlp", "modulation", "conv", "embedding", "all")


# keras_minsnr.backbones.PRESETS, written out so that checking a config imports no Keras
# (tests/test_run_config.py keeps them equal).
BACKBONE_PRESETS = (
    "dit_b_2", "dit_l_2", "dit_s_2", "dit_xl_2", "mlp_digits", "sd15_unet", "sd2_unet",
    "sd3_mmdit", "unet_64", "unet_cifar10", "vit_b_2_in256", "vit_l_4_in64", "vit_xl_2_in256",
)


def _backbone_presets():
    """The preset names: `keras_minsnr.backbones.PRESETS` once that package is loaded (so a
    preset registered by user code counts), else the written-out list (no Keras import)."""
    loaded = sys.modules.get("keras_minsnr.backbones")
    presets = getattr(loaded, "PRESETS", None)
    return tuple(sorted(presets)) if presets is not None else BACKBONE_PRESETS


@dataclasses.dataclass(frozen=True)
class KeyRules:
    """What one config key may hold besides its type (the field's annotation).

    Args:
        doc: one line for `--help`, `show` and the docs.
        group: a key of `GROUPS`.
        low, high: the allowed range of a number (None: unbounded).
        low_open, high_open: whether `low` / `high` themselves are excluded.
        choices: allowed strings, or a function returning them (imported lazily).
        subkeys: allowed keys of a dict value.
        resumable: the key may change when a run is resumed.
    """

    doc: str
    group: str
    low: float = None
    high: float = None
    low_open: bool = False
    high_open: bool = False
    choices: typing.Any = None
    subkeys: tuple = None
    resumable: bool = False


def _key(default, doc, group, **rules):
    metadata = {"rules": KeyRules(doc, group, **rules)}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class RunConfig:
    """The settings of one training run, checked when it is made.

    Defaults are the Min-SNR paper's settings (cosine schedule, T=1000, Min-SNR γ=5,
    AdamW 1e-4 with β=(0.99, 0.99), weight decay 0.03, EMA 0.9999, label drop 0.15).
    A recipe lists only what differs; `--set key=value` overrides any key.

    Args:
        **fields: the keys below; each is checked for type, range and choices, and a bad
            value raises `ValueError` naming the key, the value and what is allowed.

    Example:
        >>> config = RunConfig(gamma=1.0, weighting="soft_min_snr")
        >>> config.to_dict()["gamma"]
        1.0

    Reference:
        Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy",
        ICCV 2023 (arXiv 2303.09556), Sec. 4 for the defaults.
    """

    # === Data ===
    data: str = _key(
        "digits", "`digits`, a TFDS name, an image or caption folder, or a latent cache",
        "data")
    data_args: dict = _key({}, "keyword arguments of make_dataset (split, data_dir, ...)", "data")
    image_size: int | None = _key(
        None, "side of the square training images (null: the data's own)", "data", low=1)
    encode: dict = _key(
        {}, "encode raw data once into the latent cache `data` (keys: see docs/recipes.md)",
        "data", subkeys=ENCODE_KEYS)
    batch_size: int = _key(
        256, "examples per micro-batch, over all devices (per optimizer step when "
        "grad_accum is 1)", "data", low=1)
    # === Model ===
    backbone: str = _key(
        "dit_s_2", "backbone preset (keras_minsnr.backbones.PRESETS)", "model",
        choices=_backbone_presets)
    backbone_args: dict = _key({}, "overrides of the preset's arguments (depth, ...)", "model")
    schedule: str = _key("cosine", "noise schedule (`flow`: rectified flow)", "model",
                         choices=SCHEDULES)
    flow_shift: float = _key(1.0, "SD3's time shift of the flow schedule and its samplers",
                             "model", low=0, low_open=True)
    num_timesteps: int = _key(1000, "diffusion steps T", "model", low=2)
    zero_terminal_snr: bool = _key(
        False, "rescale the schedule so SNR(T-1) = 0 (Lin et al. 2023)", "model")
    prediction_type: str = _key("epsilon", "what the network predicts", "model",
                                choices=PREDICTION_TYPES)
    weighting: str = _key("min_snr", "loss weighting strategy", "model", choices=WEIGHTINGS)
    gamma: float = _key(5.0, "γ of min_snr, max_snr and soft_min_snr", "model",
                        low=0, low_open=True)
    timestep_sampling: str = _key("uniform", "training density of the timesteps", "model",
                                  choices=TIMESTEP_SAMPLINGS)
    timestep_sampling_args: dict = _key(
        {}, "the density's parameters (docs/flow_matching.md §3)", "model",
        subkeys=TIMESTEP_SAMPLING_PARAMS)
    terminal_weight: float | str = _key(
        1.0, "weight at SNR = 0 where the limit is 0 (x0/v targets); `limit`: the limit",
        "model", low=0, choices=("limit",))
    noise_offset: float = _key(
        0.0, "add c·N(0,1) per image and channel to the noise (Guttenberg 2023; 0: off)",
        "model", low=0)
    input_perturbation: float = _key(
        0.0, "the model input uses ε + λ·ξ, the target keeps ε (Ning et al. 2023; 0: off)",
        "model", low=0)
    label_dropout: float = _key(0.15, "chance of dropping the condition (classifier-free "
                                "guidance)", "model", low=0, high=1)
    ema_decay: float = _key(0.9999, "decay of the weights' moving average (0: none)", "model",
                            low=0, high=1, high_open=True)
    init_from: str | None = _key(
        None, "start from this run directory's or `.keras` file's backbone weights (EMA "
        "ones where kept)", "model")
    lora_rank: int | None = _key(
        None, "train LoRA adapters of this rank only, the rest frozen (docs/lora.md)", "model",
        low=1)
    lora_alpha: float | None = _key(
        None, "LoRA scale numerator: updates are (alpha / rank)·A·B (null: alpha = rank)",
        "model", low=0, low_open=True)
    lora_targets: str | None = _key(
        None, "comma-separated LoRA groups (" + ", ".join(LORA_TARGET_GROUPS) + ") or "
        "regexes over layer paths (null: attention,mlp)", "model")
    # === Optimizer ===
    learning_rate: float = _key(1e-4, "AdamW learning rate", "optimizer", low=0, low_open=True)
    beta_1: float = _key(0.99, "AdamW β1", "optimizer", low=0, high=1, high_open=True)
    beta_2: float = _key(0.99, "AdamW β2", "optimizer", low=0, high=1, high_open=True)
    weight_decay: float = _key(0.03, "AdamW weight decay", "optimizer", low=0)
    clipnorm: float | None = _key(None, "clip gradients to this norm (null: no clipping)",
                                  "optimizer", low=0, low_open=True)
    warmup_steps: int = _key(0, "linear learning-rate warm-up steps", "optimizer", low=0)
    lr_schedule: str = _key(
        "constant", "learning-rate decay after the warm-up, over `steps`", "optimizer",
        choices=LR_SCHEDULES)
    lr_num_cycles: int = _key(1, "hard restarts of lr_schedule cosine_with_restarts",
                              "optimizer", low=1)
    lr_power: float = _key(1.0, "exponent of lr_schedule polynomial", "optimizer", low=0,
                           low_open=True)
    mixed_precision: str | None = _key(
        None, "Keras dtype policy (null: float32)", "optimizer",
        choices=MIXED_PRECISION_POLICIES)
    grad_accum: int = _key(
        1, "micro-batches per optimizer step (gradient accumulation): the effective batch "
        "is grad_accum x batch_size; steps count optimizer steps", "optimizer", low=1)
    # === Length of the run ===
    steps: int = _key(400_000, "total optimizer steps", "run", low=1, resumable=True)
    steps_per_epoch: int = _key(1000, "steps between metrics rows and sample grids", "run",
                                low=1)
    checkpoint_every: int | None = _key(
        None, "steps between checkpoints (null: steps_per_epoch)", "run", low=1,
        resumable=True)
    keep_checkpoints: int = _key(2, "how many of the newest checkpoints to keep", "run",
                                 low=1, resumable=True)
    checkpoint_format: str | None = _key(
        None, "keras: step-N.keras files of whole arrays; orbax: step-N.orbax/ folders, "
        "each host writing its shards (JAX; needs one run directory shared by the hosts); "
        "null: orbax when the model's arrays are split over several hosts and they share "
        "the run directory, else keras", "run", choices=CHECKPOINT_FORMATS,
        resumable=True)
    seed: int = _key(0, "seed of initialisation, data order and noise", "run", low=0)
    # === Samples ===
    sample_every_epochs: int = _key(1, "epochs between sample grids", "samples", low=1,
                                    resumable=True)
    num_samples: int = _key(64, "images in samples.png", "samples", low=1, resumable=True)
    sampler: str = _key("ddim", "sampler of the grids", "samples", choices=SAMPLERS)
    sample_steps: int = _key(50, "sampling steps", "samples", low=1, resumable=True)
    guidance_scale: float = _key(1.5, "classifier-free guidance scale (1: none)", "samples",
                                 low=0)
    clip_denoised: bool | None = _key(
        True, "clip predicted images to [-1, 1] (null: the model's default)", "samples")
    validation_every: int | None = _key(
        None, "steps between validation grids samples/step-NNNNNNNN.png (null: none)",
        "samples", low=1, resumable=True)
    validation_prompts: list | None = _key(
        None, "captions of the validation grid (text models; null: the data's first)",
        "samples", resumable=True)
    validation_labels: list | None = _key(
        None, "class ids of the validation grid (class models; null: every class)",
        "samples", resumable=True)
    validation_seed: int = _key(0, "noise seed of every validation grid", "samples", low=0,
                                resumable=True)
    # === Monitoring ===
    log_every: int = _key(10, "steps between TensorBoard / W&B points", "logging", low=1,
                          resumable=True)
    report_to: str = _key(
        "tensorboard", "where per-step scalars go (wandb needs the wandb extra)", "logging",
        choices=REPORT_TO, resumable=True)
    gradient_checkpointing: bool = _key(
        False, "recompute the backbone's blocks in the backward pass: less activation "
        "memory for ~1/3 more compute, the same loss and gradients", "scale",
        resumable=True)
    # === Devices === (a run may resume on another device count: all resumable)
    distribution: str = _key(
        "none", "none: one device; data_parallel: the batch split over every device (JAX: "
        "keras.distribution, TensorFlow: MirroredStrategy); model_parallel: JAX only, "
        "transformer blocks split over the mesh's model axis; fsdp: JAX only, like "
        "data_parallel but weights, EMA and optimizer slots split over the data axis",
        "scale", choices=DISTRIBUTIONS,
        resumable=True)
    mesh: str | None = _key(
        None, "DATAxMODEL devices, e.g. 2x4 (null: every device on the data axis)", "scale",
        resumable=True)
    multihost: bool = _key(
        False, "join a multi-host JAX cluster first (jax.distributed.initialize from the "
        "environment; TensorFlow: MultiWorkerMirroredStrategy from TF_CONFIG)", "scale",
        resumable=True)
    # === Documentation only ===
    description: str = _key("", "one line about the recipe", "about")
    paper_source: str = _key("", "where the recipe's numbers come from", "about")

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        # Keys whose choices need an import (backbone presets load Keras) come last, so
        # that a bad cheap value is reported at once.
        fields = sorted(dataclasses.fields(self),
                        key=lambda f: callable(f.metadata["rules"].choices))
        for field in fields:
            value = getattr(self, field.name)
            setattr(self, field.name, check_value(field.name, value, hints[field.name],
                                                  field.metadata["rules"]))
        self._check_flow_keys()
        self._check_lora_keys()
        self._check_validation_keys()
        self._check_device_keys()

    def _check_validation_keys(self):
        """Prompts are strings, labels integers >= 0; only one of the two."""
        if self.validation_prompts is not None and self.validation_labels is not None:
            raise ValueError(
                "validation_prompts and validation_labels were both given; a model has "
                "either text (prompts) or class (labels) conditioning."
            )
        for name, ok, allowed in (
            ("validation_prompts", lambda v: isinstance(v, str) and v.strip(),
             "non-empty strings"),
            ("validation_labels", lambda v: _number(v, int) is not None and v >= 0,
             "integers >= 0"),
        ):
            values = getattr(self, name)
            if values is None:
                continue
            bad = [v for v in values if not ok(v)]
            if not values or bad:
                raise ValueError(
                    f"Invalid value for {name}: {(bad or [values])[0]!r}. Allowed: a "
                    f"non-empty list of {allowed}."
                )

    def _check_device_keys(self):
        """A mesh shapes a distribution: without one it would be ignored."""
        if self.mesh not in (None, "") and self.distribution == "none":
            raise ValueError(
                f"mesh={self.mesh!r} needs distribution data_parallel, model_parallel or fsdp "
                "(--distribution); with distribution 'none' the run uses one device."
            )

    def _check_lora_keys(self):
        """`lora_alpha` / `lora_targets` need `lora_rank`; targets are groups or regexes."""
        if self.lora_rank is None:
            for name in ("lora_alpha", "lora_targets"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} needs lora_rank (the adapters' "
                        "rank, e.g. --set lora_rank=8)."
                    )
            return
        targets = [t.strip() for t in (self.lora_targets or "attention,mlp").split(",")]
        for target in targets:
            if not target:
                raise ValueError(f"Invalid value for lora_targets: {self.lora_targets!r} "
                                 "has an empty entry.")
            if target in LORA_TARGET_GROUPS:
                continue
            try:
                re.compile(target)
            except re.error as error:
                raise ValueError(
                    f"Invalid value for lora_targets: {target!r} is neither a group "
                    f"({', '.join(LORA_TARGET_GROUPS)}) nor a regular expression ({error})."
                ) from None

    def _check_flow_keys(self):
        """Flow targets and samplers go with the flow schedule only, and vice versa."""
        flow = self.schedule == "flow"
        if self.prediction_type == "flow" and not flow:
            raise ValueError(
                f"prediction_type 'flow' needs schedule 'flow', got schedule "
                f"{self.schedule!r}."
            )
        if flow and self.sampler not in FLOW_SAMPLERS:
            raise ValueError(
                f"sampler {self.sampler!r} is for discrete schedules; schedule 'flow' "
                f"samples with {' or '.join(FLOW_SAMPLERS)}."
            )
        if not flow and self.sampler in FLOW_SAMPLERS:
            discrete = [s for s in SAMPLERS if s not in FLOW_SAMPLERS]
            raise ValueError(
                f"sampler {self.sampler!r} needs schedule 'flow'; schedule "
                f"{self.schedule!r} allows {', '.join(discrete)}."
            )

    @classmethod
    def from_dict(cls, mapping):
        """A checked `RunConfig` from a dict of (top-level) keys; unknown keys raise."""
        unknown = sorted(set(mapping) - set(key_names()))
        if unknown:
            raise ValueError(
                f"Unknown config key {unknown[0]!r}. Valid keys: {', '.join(sorted(key_names()))}."
            )
        return cls(**copy.deepcopy(dict(mapping)))

    def to_dict(self):
        """The plain dict that training reads and `config.json` holds."""
        return dataclasses.asdict(self)


def key_names():
    return tuple(f.name for f in dataclasses.fields(RunConfig))


def key_specs():
    """`(name, annotation, default, rules)` for every key, in the order of `RunConfig`."""
    hints = typing.get_type_hints(RunConfig)
    specs = []
    for field in dataclasses.fields(RunConfig):
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        specs.append((field.name, hints[field.name], default, field.metadata["rules"]))
    return specs


def _defaults():
    return {name: copy.deepcopy(default) for name, _, default, _ in key_specs()}


DEFAULTS = _defaults()
# Keys that may change between a run and its resumption.
RESUMABLE_KEYS = tuple(name for name, _, _, rules in key_specs() if rules.resumable)


# === Checking one value ===

def _types(annotation):
    args = typing.get_args(annotation) or (annotation,)
    return tuple(a for a in args if a is not type(None)), type(None) in args


def _number(value, kind):
    """`value` as an int / float, or None when it is not one (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if kind is int:
        if isinstance(value, float):
            return int(value) if value.is_integer() else None
        return value
    return float(value)


def _range_text(rules):
    if rules.low is not None and rules.high is not None:
        left, right = "(" if rules.low_open else "[", ")" if rules.high_open else "]"
        return f" in {left}{rules.low:g}, {rules.high:g}{right}"
    if rules.low is not None:
        return f" {'>' if rules.low_open else '>='} {rules.low:g}"
    if rules.high is not None:
        return f" {'<' if rules.high_open else '<='} {rules.high:g}"
    return ""


def _choices(rules):
    return rules.choices() if callable(rules.choices) else rules.choices


def allowed_text(annotation, rules, resolve_choices=True):
    """What a key may hold, in words: ``an integer >= 1 or null``."""
    kinds, nullable = _types(annotation)
    parts = []
    for kind in kinds:
        if kind is int:
            parts.append("an integer" + _range_text(rules))
        elif kind is float:
            parts.append("a number" + _range_text(rules))
        elif kind is bool:
            parts.append("true or false")
        elif kind is list:
            parts.append("a list")
        elif kind is dict:
            parts.append("a dict" + (f" with keys {', '.join(rules.subkeys)}"
                                     if rules.subkeys else ""))
        elif rules.choices is not None:
            if callable(rules.choices) and not resolve_choices:
                parts.append("a preset name")
            else:
                parts.append("one of " + ", ".join(_choices(rules)))
        else:
            parts.append("a string")
    if nullable:
        parts.append("null")
    return " or ".join(parts)


def check_value(name, value, annotation, rules):
    """`value` converted to the key's type (1 -> 1.0 for numbers), or `ValueError`."""
    kinds, nullable = _types(annotation)
    if value is None and nullable:
        return None
    for kind in kinds:
        if kind in (int, float):
            number = _number(value, kind)
            if number is None:
                continue
            low_ok = rules.low is None or (number > rules.low if rules.low_open
                                           else number >= rules.low)
            high_ok = rules.high is None or (number < rules.high if rules.high_open
                                             else number <= rules.high)
            if low_ok and high_ok:
                return number
        elif kind is bool and isinstance(value, bool):
            return value
        elif kind is list and isinstance(value, (list, tuple)):
            return list(value)
        elif kind is dict and isinstance(value, dict):
            unknown = sorted(set(value) - set(rules.subkeys or value))
            if not unknown:
                return value
            raise ValueError(
                f"Unknown {name} key(s) {unknown}. Valid keys: {', '.join(rules.subkeys)}."
            )
        elif kind is str and isinstance(value, str):
            choices = _choices(rules)
            if choices is None or value in choices:
                return value
    raise ValueError(
        f"Invalid value for {name}: {value!r}. Allowed: {allowed_text(annotation, rules)}."
    )


# === Layering a recipe and overrides ===

def parse_overrides(pairs):
    """``["a=1", "b.c=x"]`` → ``{"a": 1, "b.c": "x"}``; values are JSON/Python literals,
    anything else stays a string (the schema then says whether a string is allowed)."""
    overrides = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"Override {pair!r} is not of the form key=value.")
        key, raw = pair.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                value = raw
        overrides[key.strip()] = value
    return overrides


def _set_nested(mapping, path, value, key):
    """A copy of ``mapping`` with ``value`` at ``path`` (``a.b.c`` reaches nested dicts)."""
    head, rest = path[0], path[1:]
    if not rest:
        return {**mapping, head: copy.deepcopy(value)}
    inner = mapping.get(head)
    if inner is None:
        inner = {}
    if not isinstance(inner, dict):
        raise ValueError(f"{head!r} in {key!r} is not a dict; cannot set {key!r}.")
    return {**mapping, head: _set_nested(inner, rest, value, key)}


def resolve_config(recipe, overrides=None):
    """Defaults ← recipe ← overrides, checked against `RunConfig`; returns a plain dict.

    Dotted keys reach into dict-valued entries: ``backbone_args.depth=4``, also nested
    ones: ``encode.source_args.data_dir=/data``. Unknown keys and bad values raise
    `ValueError` naming the key, the value and what is allowed.
    """
    config = copy.deepcopy(DEFAULTS)
    for source in (recipe, overrides or {}):
        for key, value in source.items():
            top, _, sub = key.partition(".")
            if top not in DEFAULTS:
                raise ValueError(
                    f"Unknown config key {top!r}. Valid keys: {', '.join(sorted(DEFAULTS))}."
                )
            if sub:
                if not isinstance(config[top], dict):
                    raise ValueError(f"{top!r} is not a dict; cannot set {key!r}.")
                config[top] = _set_nested(config[top], sub.split("."), value, key)
            else:
                config[top] = copy.deepcopy(value)
    return RunConfig.from_dict(config).to_dict()


# === Text for --help, `show` and the docs ===

def _json(value):
    return json.dumps(value, ensure_ascii=False)


def _grouped_lines(title_line, key_line):
    """One ``title_line(title)`` per group, then ``key_line(name, allowed, rules)`` per key."""
    lines = []
    for group, title in GROUPS.items():
        lines.append(title_line(title))
        lines.extend(
            key_line(name, allowed_text(annotation, rules, resolve_choices=False), rules)
            for name, annotation, _, rules in key_specs() if rules.group == group
        )
    return lines


def keys_help(values=None):
    """The keys grouped, one line each, for `keras-minsnr train --help` (no Keras import):
    ``values`` (a resolved config, e.g. a recipe's) or the defaults."""
    values = values or DEFAULTS
    return "\n".join(_grouped_lines(
        lambda title: f"{title}:",
        lambda name, allowed, rules: f"  {name} = {_json(values[name])}  ({allowed}) "
                                     f"{rules.doc}",
    ))


def describe(config):
    """A resolved config as ``key = value  # doc (allowed)`` lines, grouped."""
    return "\n".join(_grouped_lines(
        lambda title: f"\n# {title}",
        lambda name, allowed, rules: f"{name} = {_json(config[name])}  # {rules.doc} "
                                     f"({allowed})",
    )).lstrip("\n") + "\n"


def markdown_table():
    """The key table of docs/recipes.md (a test checks that the doc holds exactly this)."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for name, annotation, default, rules in key_specs():
        allowed = allowed_text(annotation, rules, resolve_choices=False)
        lines.append(f"| `{name}` | `{_json(default)}` | {allowed} | {rules.doc} |")
    return "\n".join(lines)
