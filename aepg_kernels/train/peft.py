"""Parameter-efficient fine-tuning by wrapping modules of a stock timm 1.x VisionTransformer
(no forked timm file). Each wrapper keeps the wrapped module as `.base` (frozen with the backbone)
and owns only its new parameters:

- LoRA: `blocks[i].attn.qkv` -> `LoRAQKV`, a low-rank update of the K and V slices (LAE, the paper)
  or of all of q, k, v. B starts at zero, so the model starts exactly as the backbone.
- Adapter: `blocks[i].mlp` -> `ParallelAdapter`, mlp(x) + s * up(relu(down(x))), up zero-initialised.
- Prefix: `blocks[i].attn` -> `PrefixAttention`, the attention forward with L learned keys and
  values prepended to the sequence's keys and values (the queries stay the tokens').
- Prompt: `model.pos_drop` -> `PromptTokens`, L learned tokens inserted after the class token,
  after the position embedding (input-level, so `blocks` does not apply).
"""

from __future__ import annotations

import math
from typing import Iterator, List

import torch
import torch.nn.functional as F
from torch import nn

from .config import PeftConfig


class PeftModule(nn.Module):
    """Marker base: every parameter not under `.base` is a PEFT parameter."""

    base: nn.Module

    def peft_parameters(self) -> Iterator[nn.Parameter]:
        return (p for name, p in self.named_parameters() if not name.startswith("base."))


class LoRAQKV(PeftModule):
    """qkv(x) + scale * B A x on the chosen slices of the fused qkv projection."""

    def __init__(self, base: nn.Linear, rank: int, targets: str, scale: float):
        super().__init__()
        if targets not in ("kv", "qkv"):
            raise ValueError(f"LoRA targets must be 'kv' or 'qkv', got {targets!r}")
        if base.out_features % 3:
            raise ValueError(f"expected a fused qkv projection, got out_features={base.out_features}")
        self.base, self.targets, self.scale = base, targets, scale
        dim, n = base.out_features // 3, len(targets)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        # One (A, B) pair per adapted slice, stored stacked: A (n, r, in), B (n, dim, r).
        self.lora_a = nn.Parameter(torch.empty(n, rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(n, dim, rank, **factory))
        for a in self.lora_a:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's init, as in LoRA / HF peft

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.einsum("...i,nri->...nr", x, self.lora_a)
        delta = torch.einsum("...nr,ndr->...nd", hidden, self.lora_b).flatten(-2)
        # The fused output is laid out [q | k | v]: K/V-only updates pad the q slice with zeros.
        delta = F.pad(delta, (self.base.out_features - delta.shape[-1], 0))
        return self.base(x) + self.scale * delta

    def extra_repr(self) -> str:
        return f"rank={self.lora_a.shape[1]}, targets={self.targets!r}, scale={self.scale}"


class ParallelAdapter(PeftModule):
    """base(x) + scale * up(relu(down(x))), in parallel with the block's MLP (same input)."""

    def __init__(self, base: nn.Module, dim: int, bottleneck: int, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        weight = next(base.parameters())
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.down = nn.Linear(dim, bottleneck, **factory)
        self.up = nn.Linear(bottleneck, dim, **factory)
        nn.init.zeros_(self.up.weight)  # start as the bare MLP
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.up(F.relu(self.down(x)))

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class PrefixAttention(PeftModule):
    """timm's Attention forward with `length` learned key/value vectors prepended per head."""

    def __init__(self, base: nn.Module, length: int):
        super().__init__()
        if not all(hasattr(base, a) for a in ("qkv", "num_heads", "head_dim", "proj")):
            raise TypeError(
                f"Prefix needs timm's Attention (qkv, num_heads, head_dim, proj), got {type(base).__name__}"
            )
        self.base = base
        attn_dim = base.num_heads * base.head_dim
        factory = dict(device=base.qkv.weight.device, dtype=base.qkv.weight.dtype)
        self.prefix_key = nn.Parameter(torch.empty(length, attn_dim, **factory))
        self.prefix_value = nn.Parameter(torch.empty(length, attn_dim, **factory))
        nn.init.trunc_normal_(self.prefix_key, std=0.02)  # timm's init for learned tokens
        nn.init.trunc_normal_(self.prefix_value, std=0.02)

    def _heads(self, prefix: torch.Tensor, batch: int) -> torch.Tensor:
        a = self.base
        return prefix.view(1, -1, a.num_heads, a.head_dim).transpose(1, 2).expand(batch, -1, -1, -1)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("PrefixAttention does not support attention masks")
        a, (B, N, _) = self.base, x.shape
        gate = a.gate(x).sigmoid() if getattr(a, "gate", None) is not None else None
        q, k, v = a.qkv(x).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        k = torch.cat([self._heads(self.prefix_key, B), k], dim=2)
        v = torch.cat([self._heads(self.prefix_value, B), v], dim=2)
        q, k = a.q_norm(q), a.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, -1)
        x = getattr(a, "norm", nn.Identity())(x)
        if gate is not None:
            x = x * gate
        return a.proj_drop(a.proj(x))

    def extra_repr(self) -> str:
        return f"length={self.prefix_key.shape[0]}"


class PromptTokens(PeftModule):
    """Inserts `length` learned tokens after the model's prefix (class/register) tokens."""

    def __init__(self, base: nn.Module, length: int, dim: int, num_prefix_tokens: int, device=None, dtype=None):
        super().__init__()
        self.base, self.num_prefix_tokens = base, num_prefix_tokens
        self.prompts = nn.Parameter(torch.empty(1, length, dim, device=device, dtype=dtype))
        nn.init.trunc_normal_(self.prompts, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, n = self.base(x), self.num_prefix_tokens
        return torch.cat([x[:, :n], self.prompts.expand(x.shape[0], -1, -1).to(x.dtype), x[:, n:]], dim=1)

    def extra_repr(self) -> str:
        return f"length={self.prompts.shape[1]}"


def apply_peft(model: nn.Module, cfg: PeftConfig) -> List[PeftModule]:
    """Wraps modules of a timm VisionTransformer in place as `cfg` says (kind, blocks and the
    kind's sizes); returns the new PEFT modules."""
    if cfg.kind == "none":
        return []
    if cfg.kind == "prompt":
        return [_insert_prompt_tokens(model, cfg.prompt_length)]
    depth = len(model.blocks)
    bad = [b for b in cfg.blocks if not 0 <= b < depth]
    if bad:
        raise ValueError(f"peft blocks {bad} out of range for a model with {depth} blocks")
    wrapped = []
    for i in cfg.blocks:
        block = model.blocks[i]
        if cfg.kind == "lora":
            block.attn.qkv = LoRAQKV(block.attn.qkv, cfg.lora_rank, cfg.lora_targets, cfg.lora_scale)
            wrapped.append(block.attn.qkv)
        elif cfg.kind == "adapter":
            block.mlp = ParallelAdapter(block.mlp, model.embed_dim, cfg.adapter_bottleneck, cfg.adapter_scale)
            wrapped.append(block.mlp)
        elif cfg.kind == "prefix":
            block.attn = PrefixAttention(block.attn, cfg.prefix_length)
            wrapped.append(block.attn)
        else:
            raise ValueError(f"unknown PEFT kind {cfg.kind!r}; expected lora, adapter, prefix, prompt or none")
    return wrapped


def _insert_prompt_tokens(model: nn.Module, length: int) -> PromptTokens:
    if getattr(model, "dynamic_img_size", False):
        raise ValueError("prompt tokens need a fixed image size (dynamic_img_size resamples by prefix count)")
    weight = model.patch_embed.proj.weight
    model.pos_drop = PromptTokens(
        model.pos_drop, length, model.embed_dim, model.num_prefix_tokens, device=weight.device, dtype=weight.dtype
    )
    # Prompts count as prefix tokens, so average pooling and patch dropout skip them, as the class token.
    model.num_prefix_tokens += length
    return model.pos_drop


def peft_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters of every PEFT wrapper inside `model` (not those of the modules they wrap)."""
    seen, params = set(), []
    for module in model.modules():
        if isinstance(module, PeftModule):
            for p in module.peft_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
