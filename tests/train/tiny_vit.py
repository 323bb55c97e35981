"""Test helpers: a tiny timm ViT (no download): 32x32 inputs, 8x8 patches (16 tokens), 5 blocks so the default
PEFT blocks 0-4 exist, width 64."""
import torch

from aepg_kernels.train import ContinualViT, ModelConfig, PeftConfig

TINY_VIT = ModelConfig(name="vit_tiny_patch16_224", pretrained=False,
                       kwargs=dict(img_size=32, patch_size=8, depth=5, embed_dim=64, num_heads=4))
WIDTH, RANK = 64, 4


def make_model(kind: str = "lora", num_classes=(3,), **peft) -> ContinualViT:
    torch.manual_seed(0)
    model = ContinualViT.from_config(TINY_VIT, PeftConfig(kind=kind, **peft))
    for n in num_classes:
        model.add_task(n)
    return model.eval()


def images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
