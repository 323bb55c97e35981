"""Checkpoints of a continual run: the trainer's state as one dataclass (`TrainerState`, the one
definition of the format), written atomically, and the checks that refuse to resume another run.

A checkpoint holds the trained parameters (PEFT modules and every head; the frozen backbone only
as its weight file's path, in the config, and a fingerprint of its values), the optimizer and
alpha-schedule states, the position (task, epoch, next batch, global step), the per-epoch history,
the accuracy matrix, the scenario and the resolved config. Random streams are not stored: the
trainer derives every seed from (run.seed, task, epoch, position), see `sampling.derive_seed`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

import aepg_kernels as ak

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1
# Keys that may change between a run and its resumption: where and how a run reports and saves,
# and data.num_workers (every sample's augmentation is seeded by its position, so the results do
# not depend on it; tested).
RESUME_NEUTRAL_KEYS = (
    "run.output_dir",
    "run.resume",
    "run.progress",
    "run.checkpoint_every",
    "run.cache_dir",
    "data.num_workers",
)


class ResumeError(ValueError):
    """A checkpoint that belongs to another run (config, scenario or backbone)."""


def checkpoint_path(output_dir: str) -> Path:
    return Path(output_dir) / CHECKPOINT_FILE


def _flatten(values: dict, prefix: str = "") -> Dict[str, object]:
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_differences(saved: dict, current: dict) -> List[str]:
    """`section.key: saved -> current` for every key that differs, except RESUME_NEUTRAL_KEYS. A key
    the saved config lacks (written before the key existed) counts as its default value."""
    from .config import TrainConfig, config_to_dict

    a, b = _flatten(saved), _flatten(current)
    a.update({k: v for k, v in _flatten(config_to_dict(TrainConfig())).items() if k in b and k not in a})
    keys = sorted((a.keys() | b.keys()) - set(RESUME_NEUTRAL_KEYS))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys if a.get(k) != b.get(k)]


def _frozen_backbone_names(model: nn.Module, frozen_backbone: bool) -> List[str]:
    if not frozen_backbone:
        return []
    peft = {id(p) for p in model.peft_parameters()}
    return [f"backbone.{name}" for name, t in model.backbone.state_dict(keep_vars=True).items() if id(t) not in peft]


def trained_state(model: nn.Module, frozen_backbone: bool) -> Dict[str, torch.Tensor]:
    """Every state_dict entry training can change: all but the frozen backbone (CPU copies)."""
    skip = set(_frozen_backbone_names(model, frozen_backbone))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in skip}


def load_trained_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Copies `state` into the model; every key must exist there with the same shape."""
    current = model.state_dict()
    unknown = sorted(set(state) - set(current))
    if unknown:
        raise ResumeError(f"checkpoint entries {unknown[:5]} do not exist in the model (another PEFT or model config?)")
    with torch.no_grad():
        for name, value in state.items():
            if current[name].shape != value.shape:
                raise ResumeError(
                    f"checkpoint entry {name} has shape {tuple(value.shape)}, the model's {tuple(current[name].shape)}"
                )
            current[name].copy_(value)


def backbone_fingerprint(model: nn.Module, frozen_backbone: bool) -> str:
    """A hash of the frozen backbone's values (not stored in the checkpoint): resuming on other
    weights (another file, another random init) is refused rather than silently mixed."""
    digest = hashlib.blake2b(digest_size=16)
    state = model.state_dict()
    for name in _frozen_backbone_names(model, frozen_backbone):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Position:
    """The next thing to do: batch `batch` of epoch `epoch` of task `task`."""

    task: int = 0
    epoch: int = 0
    batch: int = 0

    @property
    def task_started(self) -> bool:
        return (self.epoch, self.batch) != (0, 0)


@dataclass
class TrainerState:
    """What a checkpoint holds, filled by the trainer and read back by it on resumption.

    The optimizer and schedule states, the epoch's partial sums and the task's elapsed time are
    those of an unfinished task; at a task boundary they are None (0.0 seconds): the next task
    starts them afresh."""

    config: Dict[str, Any]  # config_to_dict of the run's config
    scenario: Dict[str, Any]  # ClassIncrementalScenario.state_dict
    backbone_fingerprint: str
    world_size: int  # of the run that wrote it
    position: Position
    global_step: int  # optimizer steps so far, all tasks
    num_heads: int
    model: Dict[str, torch.Tensor]  # trained_state
    accuracy_matrix: Dict[str, Any]  # AccuracyMatrix.state_dict
    history: List[Dict[str, Any]]  # one entry per epoch
    trainable_per_task: List[int]
    timing: List[float]  # seconds per finished task
    optimizer: Optional[Dict[str, Any]] = None
    schedule: Optional[Dict[str, Any]] = None
    epoch_totals: Optional[torch.Tensor] = None  # (world_size, stats): each rank's partial epoch sums
    task_seconds: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        """Plain values, which torch.load(weights_only=True) reads back, and the format version."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["position"] = [self.position.task, self.position.epoch, self.position.batch]
        return {**values, "format_version": FORMAT_VERSION}

    @classmethod
    def from_dict(cls, values: Dict[str, Any], path: Path) -> "TrainerState":
        """The state of a dict written by `to_dict`; ResumeError for another format version or
        missing or unknown keys."""
        version = values.get("format_version")
        if version != FORMAT_VERSION:
            raise ResumeError(
                f"{path}: checkpoint format {version}, this trainer reads "
                f"{FORMAT_VERSION}; set run.resume=false or another run.output_dir"
            )
        names = {f.name for f in fields(cls)}
        present = set(values) - {"format_version"}
        if present != names:
            raise ResumeError(
                f"{path}: not a checkpoint of format {FORMAT_VERSION}: missing keys "
                f"{sorted(names - present)}, unknown keys {sorted(present - names)}"
            )
        state = {name: values[name] for name in names}
        state["position"] = Position(*values["position"])
        return cls(**state)

    def check_resumable(self, config: dict, scenario: dict, fingerprint: str, path: Path) -> None:
        """Raises ResumeError naming what differs between the checkpoint's run and this one."""
        hint = f"resume refused ({path}): set run.resume=false or another run.output_dir to start afresh"
        differences = config_differences(self.config, config)
        if differences:
            raise ResumeError(f"{hint}; the config differs: " + "; ".join(differences))
        if self.scenario != scenario:
            raise ResumeError(
                f"{hint}; the scenario differs (class order / task sizes): checkpoint "
                f"{self.scenario}, this run {scenario}"
            )
        if self.backbone_fingerprint != fingerprint:
            raise ResumeError(
                f"{hint}; the frozen backbone's weights differ from the checkpoint's "
                f"(model.checkpoint={config['model']['checkpoint']!r})"
            )

    def epoch_totals_of(self, rank: int, world_size: int) -> Optional[torch.Tensor]:
        """Rank `rank`'s share of the unfinished epoch's partial sums. The same world size: its own
        sums (a bitwise replay); another: rank 0 takes them all, the others start from zero."""
        if self.epoch_totals is None:
            return None
        if self.world_size == world_size:
            return self.epoch_totals[rank]
        return self.epoch_totals.sum(0) if rank == 0 else torch.zeros_like(self.epoch_totals[0])


def save_checkpoint(path: Path, state: TrainerState) -> None:
    """A run killed while writing leaves the previous checkpoint intact."""
    ak.utils.write_atomically(path, lambda f: torch.save(state.to_dict(), f))


def load_checkpoint(path: Path) -> Optional[TrainerState]:
    """The checkpoint at `path`, or None when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    return TrainerState.from_dict(torch.load(path, map_location="cpu", weights_only=True), path)
