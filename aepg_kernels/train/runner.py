"""One run of the paper's protocol from a config: backbone (pretrained once for the embedded demo),
PEFT, data with the backbone's normalisation, class-incremental scenario, training, outputs.

    summary = run(load_config("demo_digits", ["loss.name=ce"]))
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from . import distributed
from .config import ConfigError, TrainConfig
from .data import add_label_noise, backbone_normalization, build_data
from .model import ContinualViT
from .pretrain import ensure_pretrained_backbone
from .report import format_run_summary, write_run_outputs
from .scenario import ClassIncrementalScenario
from .trainer import ContinualTrainer


def resolve_backbone_weights(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainConfig:
    """The embedded demo has no downloadable weights: `model.pretrain_on` builds them once (cached)
    and the run then uses them as any other local checkpoint."""
    if cfg.model.pretrain_on is None or cfg.model.checkpoint:
        return cfg
    if distributed.is_main():
        path = ensure_pretrained_backbone(cfg, log)
    distributed.barrier()  # the other ranks read the cached file once rank 0 has written it
    if not distributed.is_main():
        path = ensure_pretrained_backbone(cfg, log)
    model = dataclasses.replace(cfg.model, pretrained=True, checkpoint=path)
    return dataclasses.replace(cfg, model=model)


def run(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Trains every task of the scenario and writes the outputs to `cfg.run.output_dir` (rank 0);
    returns the summary (metrics, accuracy matrix, history, class order)."""
    _rank, _world_size, device = distributed.init_from_env(cfg.run.device)
    if not distributed.is_main():
        log = lambda _msg: None  # one voice: rank 0
    cfg = resolve_backbone_weights(cfg, log)
    torch.manual_seed(cfg.run.seed)  # PEFT initialisation; heads are seeded by the trainer per task
    model = ContinualViT.from_config(cfg.model, cfg.peft)
    in_chans = model.backbone.patch_embed.proj.in_channels
    mean, std = backbone_normalization(model.backbone, in_chans)
    data = build_data(cfg.data, mean, std)
    scenario = ClassIncrementalScenario.from_config(cfg.scenario, data.train.targets, seed=cfg.run.seed)
    groups = None if cfg.data.label_noise_scope == "all" else scenario.tasks()
    if groups is not None and cfg.data.label_noise > 0 and min(scenario.task_sizes) < 2:
        raise ConfigError(
            f"data.label_noise_scope: 'task' needs >= 2 classes in every task, got task sizes "
            f"{list(scenario.task_sizes)}"
        )
    data, label_noise = add_label_noise(data, cfg.data.label_noise, cfg.run.seed, groups)
    log(
        f"{data.info.get('source', cfg.data.name)}: {len(data.train.targets)} train / {len(data.test.targets)} "
        f"test images, {scenario.num_classes} classes in {scenario.num_tasks} tasks"
    )
    trainer = ContinualTrainer(model, scenario, cfg, device=device, log=log)
    summary = trainer.fit(data.train.dataset, data.train.targets, data.test.dataset, data.test.targets)
    if distributed.is_main():
        paths = write_run_outputs(cfg.run.output_dir, cfg, summary, {"data": data.info}, label_noise)
        log(format_run_summary(summary))
        log(f"outputs: {', '.join(str(p) for p in paths.values())}")
    return summary
