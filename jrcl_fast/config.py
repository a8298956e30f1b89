"""Typed run configuration, read from YAML and validated field by field.

Every section is a dataclass; the YAML must use exactly their field names. An unknown
key, a value of the wrong type, a missing required field or a value outside its
allowed set is a UserError that names the file and the dotted key.

The names of plug-ins (data sets, backbones, optimizers, record sinks) are not listed
here: they are checked against the registries of jrcl_fast/registry.py, which import
their plug-ins only when a name is validated (that module's docstring says why).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jrcl_fast.config_checks import check_combinations
from jrcl_fast.errors import UserError
from jrcl_fast.registry import BACKBONES, DATASETS, LOGGERS, OPTIMIZERS, Registry

# BDC's divergence: a closed choice, not a registry, because the CE+BDC kernel computes
# exactly these two (its SYM_KL switch); a third needs kernel code, not one new entry.
DIVERGENCES = ("js", "sym_kl")
BDC_STOP_GRADS = ("none", "classifier", "binary")
LOSS_BACKENDS = ("auto", "torch", "triton")


@dataclass
class DecoderConfig:
    """DALI mixed-decoder settings (fn.decoders.image); None: the data set's default
    (image_formats.MIXED_DECODER_DEFAULTS, which says why), else DALI's own."""

    hw_decoder_load: float | None = None  # share of baseline JPEGs sent to the hardware decoder, 0..1
    device_memory_padding: int | None = None  # bytes, nvJPEG device buffer per thread
    host_memory_padding: int | None = None  # bytes, nvJPEG pinned host buffers per thread
    device_memory_padding_jpeg2k: int | None = None  # bytes, nvJPEG2000
    host_memory_padding_jpeg2k: int | None = None  # bytes, nvJPEG2000
    preallocate_width_hint: int | None = None  # px, hardware decoder's preallocation
    preallocate_height_hint: int | None = None


@dataclass
class DataConfig:
    name: str
    # Folder of the data set as published. For the embedded sets (digits_lt, mnist_lt,
    # animal_lt), the cache folder they are written to.
    root: str
    image_size: int = 224
    num_views: int = 2
    loader: str = "torch"  # torch | dali
    sampler: str = "instance"  # instance | class_balanced | sqrt
    # Loader worker processes (torch) or threads (DALI) per rank. None (the default): the
    # cores available to this process divided among the node's local ranks (cores.py).
    num_workers: int | None = None
    # The embedded sets: exponential long-tail profile, head/tail ratio of training counts.
    imbalance_ratio: float = 50.0
    test_fraction: float = 0.3  # digits_lt only; mnist_lt and animal_lt hold out fixed counts per class
    split_seed: int = 0  # the embedded sets: which images go to which split
    # Normal group G of the BDC loss, by class name. None: the data set's own normal
    # class (No Finding for CXR-LT) or else the many-shot classes.
    normal_classes: list[str] | None = None
    # Shot groups by training count: many > many_shot_min, few < few_shot_max.
    many_shot_min: int = 100
    few_shot_max: int = 20
    decoder: DecoderConfig = field(default_factory=DecoderConfig)  # loader=dali on a GPU


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # a name in the BACKBONES registry: resnet18, resnet50, ..., resnet32
    # 3x3 stride-1 stem, no max-pool: for inputs of ~32 px (resnet32 always has it).
    small_input_stem: bool = False
    # Start from torchvision's ImageNet weights, read from the local torch cache (never
    # downloaded at run time; a missing file is an error naming where to put it).
    pretrained: bool = False
    projection_dim: int = 128
    projection_hidden_dim: int = 512
    # Normalisation layers. batch: per-rank statistics, so N ranks x b is not exactly
    # 1 rank x N*b; sync_batch: statistics over all ranks (GPU); group: per-sample, so
    # the result does not depend on how the batch is split across ranks.
    norm: str = "batch"  # batch | sync_batch | group
    # linear: logits W h + b. cosine: logits s cos(h, w_c), whose scale cannot grow with a
    # class's training count as a linear classifier's weight norms do (docs/METHOD.md).
    classifier: str = "linear"  # linear | cosine
    cosine_scale: float = 16.0  # s of the cosine classifier
    # free: prototypes are parameters of their own. classifier: derived from the
    # classifier's weights through a head like the projection's (as BCL does), so the
    # contrastive loss pulls on the classifier too.
    prototypes: str = "free"  # free | classifier


@dataclass
class LossConfig:
    # 0 gives plain CE; tau > 0 adds tau * log(class prior) to the logits (Menon et al. 2021).
    logit_adjust_tau: float = 0.0
    lambda_con: float = 0.35
    lambda_bdc: float = 1.0
    lambda_bin: float = 1.0
    temperature: float = 0.1
    use_prototypes: bool = True
    class_average: bool = True
    divergence: str = "js"  # js | sym_kl
    # Which head BDC's gradient does not reach (docs/METHOD.md section 2): none trains
    # both to agree, as the paper does; classifier makes the binary head follow the
    # classifier; binary makes the classifier follow the binary head.
    bdc_stop_grad: str = "none"  # none | classifier | binary
    backend: str = "auto"  # auto | torch | triton


@dataclass
class OptimConfig:
    name: str = "sgd"  # a name in the OPTIMIZERS registry: sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9  # SGD only (Nesterov when > 0); AdamW keeps its default betas
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 128
    seed: int = 0
    output_dir: str = "runs/default"
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    # train.batch_size is the micro batch of one rank; one optimizer step sees
    # batch_size x gradient_accumulation_steps x world size images.
    gradient_accumulation_steps: int = 1
    # auto: DeepSpeed when launched distributed or on a GPU, else the plain local engine
    # (no DeepSpeed start-up cost; fp32). deepspeed forces DeepSpeed even for 1 CPU process.
    engine: str = "auto"  # auto | local | deepspeed
    # auto: this rank's GPU when there is one (and DS_ACCELERATOR is not cpu), else the
    # CPU; cpu: CPU ranks (gloo) even on a GPU machine; cuda: fail without a GPU per rank.
    device: str = "auto"  # auto | cpu | cuda
    # DeepSpeed JSON (precision, ZeRO stage, clipping). None: the built-in default, the
    # same as configs/ds_config.json (bf16, ZeRO stage 0, no clipping).
    deepspeed_config: str | None = None
    # A collective that waits longer than this (a rank died or hangs) fails the job; so does a
    # multi-rank start-up (rendezvous, connections, first collective) that takes longer.
    collective_timeout_s: float = 600.0
    # Which epoch's weights the run keeps and tests: the last, or the best balanced accuracy
    # on the data set's validation split (evaluated after every epoch; never the test split).
    select_on: str = "last"  # last | val_balanced_accuracy
    # With select_on=val_balanced_accuracy: stop after this many epochs without a better
    # validation score; 0 trains every epoch.
    early_stop_patience: int = 0
    # Record sinks besides metrics.jsonl and steps.jsonl, written by rank 0: tensorboard
    # (events in output_dir/tensorboard/, pip install "jrcl_fast[tensorboard]"), csv
    # (output_dir/metrics.csv); names in the LOGGERS registry (engine/records/).
    loggers: list[str] = field(default_factory=list)
    # Start from the weights another run selected: its checkpoints/ folder (the epoch
    # that run's train.select_on chose). The model section must equal that run's.
    init_from: str | None = None
    # all: train every weight. classifier: classifier re-training (cRT, Kang et al. 2020):
    # needs train.init_from; the classifier restarts from a fresh initialisation and is
    # the only part trained; everything else (backbone, projection, binary head,
    # prototypes) keeps the loaded weights and BatchNorm statistics. Pair it with
    # data.sampler=class_balanced and loss.lambda_con/lambda_bdc/lambda_bin = 0.
    trainable: str = "all"  # all | classifier


@dataclass
class EvalConfig:
    batch_size: int = 256


@dataclass
class Config:
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# The allowed values of a key: a fixed tuple, or a registry asked at validation time.
CHOICES: dict[str, tuple[str, ...] | Registry] = {
    "data.name": DATASETS,
    "data.loader": ("torch", "dali"),
    "data.sampler": ("instance", "class_balanced", "sqrt"),
    "model.backbone": BACKBONES,
    "model.norm": ("batch", "sync_batch", "group"),
    "model.classifier": ("linear", "cosine"),
    "model.prototypes": ("free", "classifier"),
    "train.engine": ("auto", "local", "deepspeed"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.select_on": ("last", "val_balanced_accuracy"),
    "train.loggers": LOGGERS,
    "train.trainable": ("all", "classifier"),
    "loss.divergence": DIVERGENCES,
    "loss.bdc_stop_grad": BDC_STOP_GRADS,
    "loss.backend": LOSS_BACKENDS,
    "optim.name": OPTIMIZERS,
}
POSITIVE = {"data.image_size", "data.num_views", "train.epochs", "train.batch_size", "eval.batch_size",
            "model.projection_dim", "model.projection_hidden_dim", "model.cosine_scale", "loss.temperature",
            "optim.lr",
            "data.imbalance_ratio", "train.gradient_accumulation_steps", "train.collective_timeout_s"}
NON_NEGATIVE = {"data.num_workers", "loss.logit_adjust_tau", "loss.lambda_con", "loss.lambda_bdc",
                "loss.lambda_bin", "optim.weight_decay", "optim.warmup_epochs", "optim.min_lr",
                "train.threads", "train.early_stop_patience", "optim.momentum", "data.many_shot_min",
                "data.few_shot_max"}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, source: str, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], source, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{source}: key '{key}' must be a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise UserError(f"{source}: key '{key}' must be {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        what = f"section '{prefix[:-1]}'" if prefix else "the file"
        raise UserError(f"{source}: {what} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise UserError(
                f"{source}: unknown key '{prefix}{key}'; valid keys here are {', '.join(fields)}"
            )
    values = {}
    for name, f in fields.items():
        dotted = f"{prefix}{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{source}: missing required key '{dotted}'")
        elif dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], raw[name], source, f"{dotted}.")
        else:
            values[name] = _check_value(_coerce(raw[name], hints[name], source, dotted), source, dotted)
    return cls(**values)


def _check_value(value: Any, source: str, dotted: str) -> Any:
    """`value` of key `dotted`, once it is one of the key's choices (each item of a list)
    and has the key's sign."""
    for item in value if isinstance(value, list) else [value]:
        if dotted in CHOICES and item not in CHOICES[dotted]:
            raise UserError(f"{source}: key '{dotted}' must be one of {', '.join(CHOICES[dotted])}, got {item!r}")
    if dotted in POSITIVE and not value > 0:
        raise UserError(f"{source}: key '{dotted}' must be positive, got {value!r}")
    if dotted in NON_NEGATIVE and value is not None and value < 0:
        raise UserError(f"{source}: key '{dotted}' must not be negative, got {value!r}")
    return value


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as YAML."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected the form section.key=value, e.g. optim.lr=0.1")
    dotted, text = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {assignment!r}: '{part}' is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"--set {assignment!r}: the value is not valid YAML ({err.problem})") from None


# Keys that name a file or folder. A relative path in a YAML file is relative to that
# file, so a config works from any working directory; one given with --set is relative
# to the working directory, like any command-line path.
PATH_KEYS = (("data", "root"), ("train", "output_dir"), ("train", "deepspeed_config"), ("train", "init_from"))


def resolve_paths(raw: dict, base: Path) -> None:
    """Make the relative paths of `raw` absolute against `base`, in place."""
    for section, key in PATH_KEYS:
        node = raw.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str) and not Path(node[key]).is_absolute():
            node[key] = str((base / Path(node[key]).expanduser()).resolve())


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `--set` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass --config with a file from configs/")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if isinstance(raw, dict):
        resolve_paths(raw, path.resolve().parent)
    return parse_config(raw, str(path), overrides)


def parse_config(raw: Any, source: str, overrides: list[str] = ()) -> Config:
    """Validate a config mapping (from a YAML file or a checkpoint) into a Config."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: must be a mapping of sections (data, model, loss, optim, train, eval)")
    for assignment in overrides:
        apply_override(raw, assignment)
    if overrides:
        resolve_paths(raw, Path.cwd())
        source = f"{source} with --set overrides"
    config = _build(Config, raw, source, "")
    check_values(config, source)
    check_combinations(config, source)
    return config


def check_values(config: Config, source: str) -> None:
    """The bounds a key's type cannot say, alone or against another key."""
    if config.data.few_shot_max > config.data.many_shot_min:
        raise UserError(f"{source}: key 'data.few_shot_max' must not exceed 'data.many_shot_min'")
    if not 0 < config.data.test_fraction < 1:
        raise UserError(f"{source}: key 'data.test_fraction' must lie strictly between 0 and 1")
    if config.data.split_seed < 0:
        raise UserError(f"{source}: key 'data.split_seed' must be 0 or more")
    if config.data.imbalance_ratio < 1:
        raise UserError(f"{source}: key 'data.imbalance_ratio' is the head/tail count ratio and must be at least 1")
    if config.optim.min_lr > config.optim.lr:
        raise UserError(f"{source}: key 'optim.min_lr' must not exceed 'optim.lr'")
    if config.train.early_stop_patience and config.train.select_on == "last":
        raise UserError(f"{source}: key 'train.early_stop_patience' stops on the validation score; set "
                        "train.select_on=val_balanced_accuracy too, or the patience to 0")
    if config.loss.bdc_stop_grad == "binary" and config.loss.lambda_bin == 0:
        raise UserError(f"{source}: key 'loss.bdc_stop_grad' binary with 'loss.lambda_bin' 0 leaves the binary head "
                        "untrained; set loss.lambda_bin above 0 or choose another loss.bdc_stop_grad")


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
