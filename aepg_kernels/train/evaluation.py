"""Class-incremental evaluation: argmax over every class seen so far, per sample."""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
from torch import nn

from .heads import predict


@torch.no_grad()
def predict_loader(
    model: nn.Module, loader: Iterable, device: Optional[torch.device] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(predictions, targets) over `loader` in its order, the model in eval mode (restored after)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    preds, targets = [], []
    try:
        for x, y in loader:
            preds.append(predict(model(x.to(device))).cpu())
            targets.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(preds), torch.cat(targets)


def accuracy(model: nn.Module, loader: Iterable, device: Optional[torch.device] = None) -> float:
    """Fraction of samples whose argmax over all seen classes is the (remapped) target."""
    preds, targets = predict_loader(model, loader, device)
    return (preds == targets).float().mean().item() if len(targets) else float("nan")
