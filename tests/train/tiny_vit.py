"""Test helpers: a tiny timm ViT (no download): 32x32 inputs, 8x8 patches (16 tokens), 5 blocks so the default
PEFT blocks 0-4 exist, width 64."""

import torch

from aepg_kernels.train import ContinualViT, ModelConfig, PeftConfig
from aepg_kernels.utils import intra_op_threads

TINY_VIT = ModelConfig(
    name="vit_tiny_patch16_224",
    pretrained=False,
    kwargs=dict(img_size=32, patch_size=8, depth=5, embed_dim=64, num_heads=4),
)
WIDTH, RANK = 64, 4


def make_model(kind: str = "lora", num_classes=(3,), **peft) -> ContinualViT:
    torch.manual_seed(0)
    model = ContinualViT.from_config(TINY_VIT, PeftConfig(kind=kind, **peft))
    for n in num_classes:
        model.add_task(n)
    return model.eval()


def images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


class AugmentedImages(torch.utils.data.Dataset):
    """Images with a random augmentation drawn from torch's global RNG, as torchvision's transforms
    draw theirs (noise and a horizontal flip), so seeding and resumption are tested for real."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i] + 0.2 * torch.randn_like(self.x[i])
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.y[i]


def class_images(per_class, seed: int):
    """`per_class[c]` noisy 32x32 images around a fixed random centre per class c; (dataset, targets)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    centers = torch.randn(len(per_class), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = centers[y] + 0.5 * torch.randn(len(y), 3, 32, 32, generator=g)
    return AugmentedImages(x, y), y


def one_intra_op_thread():
    """As the one_intra_op_thread fixture, for module-scoped fixtures (set up before it)."""
    return intra_op_threads(1)
