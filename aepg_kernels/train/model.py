"""The continual model: a stock timm ViT (no downloads) with PEFT wrappers and per-task heads."""

from __future__ import annotations

import os
from typing import List

import torch
from torch import nn

from .config import ModelConfig, PeftConfig
from .heads import TaskHeads
from .peft import apply_peft, count_parameters, peft_parameters


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """timm.create_model without a classifier (num_classes=0) and without any download: the
    weights come from `cfg.checkpoint`, a local file, when `cfg.pretrained`. The file goes through
    timm's pretrained loader (pretrained_cfg_overlay), not checkpoint_path: that loader drops the
    checkpoint's classifier, reads .npz/.safetensors/.pth and applies the model's filter_fn
    (e.g. position-embedding resampling for another img_size); checkpoint_path would reject the
    head's keys."""
    try:
        import timm
    except ImportError as e:
        raise ImportError("the trainer needs timm: pip install 'aepg-kernels[train]'") from e
    kwargs = dict(cfg.kwargs)
    if cfg.pretrained:
        if not cfg.checkpoint:
            raise FileNotFoundError(
                f"model.pretrained=true needs a local weight file for {cfg.name!r}: download it (e.g. "
                f"model.safetensors of the hf-hub repo timm/{cfg.name}) and pass model.checkpoint=<path>, "
                f"or set model.pretrained=false for random weights"
            )
        if not os.path.isfile(cfg.checkpoint):
            raise FileNotFoundError(f"model.checkpoint={cfg.checkpoint!r} does not exist (weights for {cfg.name!r})")
        overlay = dict(file=cfg.checkpoint)
        if isinstance(kwargs.get("img_size"), int) and "in_chans" in kwargs:
            # A checkpoint made for this very shape (the demo's 1-channel backbone): say so, or timm
            # compares with the 3-channel input_size of the name's default config and warns.
            overlay["input_size"] = (kwargs["in_chans"], kwargs["img_size"], kwargs["img_size"])
        kwargs["pretrained_cfg_overlay"] = overlay
    return timm.create_model(cfg.name, pretrained=cfg.pretrained, num_classes=0, **kwargs)


class ContinualViT(nn.Module):
    """backbone (frozen, with PEFT wrappers) -> features -> TaskHeads (logits of all seen classes)."""

    def __init__(self, backbone: nn.Module, peft: PeftConfig, head_init_std: float):
        super().__init__()
        self.backbone = backbone
        apply_peft(backbone, peft)
        if peft.freeze_backbone:
            backbone.requires_grad_(False)
            self.set_peft_trainable(True)
        self.heads = TaskHeads(backbone.num_features, head_init_std)

    @classmethod
    def from_config(cls, model: ModelConfig, peft: PeftConfig) -> "ContinualViT":
        return cls(create_backbone(model), peft, model.head_init_std)

    def peft_parameters(self) -> List[nn.Parameter]:
        return peft_parameters(self.backbone)

    def set_peft_trainable(self, trainable: bool) -> None:
        """Freezes or unfreezes the PEFT modules (the paper trains the head alone for the first
        epochs of every task after the first)."""
        for p in self.peft_parameters():
            p.requires_grad_(trainable)

    def add_task(self, num_classes: int):
        weight = self.backbone.patch_embed.proj.weight
        return self.heads.add_task(num_classes, device=weight.device, dtype=weight.dtype)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return count_parameters(self, trainable_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.backbone(x))
