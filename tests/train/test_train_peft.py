import pytest
import torch

from aepg_kernels.train import (
    LoRAQKV,
    PeftConfig,
    PeftModule,
    PrefixAttention,
    apply_peft,
    count_parameters,
    create_backbone,
)
from tests.train.tiny_vit import RANK, TINY_VIT, WIDTH, images, make_model

KINDS = ["lora", "adapter", "prefix", "prompt"]


@pytest.mark.parametrize("kind, targets", [("lora", "kv"), ("lora", "qkv"), ("adapter", None)])
def test_starts_as_the_backbone(kind, targets):
    """LoRA (B = 0) and the adapter (up = 0) leave the backbone's output unchanged at init."""
    backbone = create_backbone(TINY_VIT).eval()
    before = backbone(images())
    apply_peft(backbone, PeftConfig(kind=kind, lora_targets=targets or "kv"))
    torch.testing.assert_close(backbone(images()), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_perturbed_peft_changes_the_output(kind):
    model = make_model(kind)
    before = model(images())
    with torch.no_grad():
        for p in model.peft_parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert (model(images()) - before).abs().max() > 1e-3


def test_lora_kv_leaves_the_query_alone():
    qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
    lora = LoRAQKV(qkv, RANK, "kv", scale=1.0)
    with torch.no_grad():
        lora.lora_b.normal_()
    x = torch.randn(2, 5, WIDTH)
    delta = lora(x) - qkv(x)
    assert delta[..., :WIDTH].abs().max() == 0
    assert delta[..., WIDTH:].abs().min() > 0


@pytest.mark.parametrize("kind", KINDS + ["none"])
def test_only_peft_and_head_get_gradients(kind):
    model = make_model(kind).train()
    model(images()).logsumexp(-1).sum().backward()
    peft = {id(p) for p in model.peft_parameters()} | {id(p) for p in model.heads.parameters()}
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in peft), name
        assert (p.grad is not None) == (id(p) in peft), name
    assert all(p.grad.abs().sum() > 0 for p in model.heads.parameters())
    if kind != "none":
        assert any(p.grad.abs().sum() > 0 for p in model.peft_parameters())


def test_trainable_counts():
    head = WIDTH * 3 + 3
    per_block = {
        "lora": 2 * (RANK * WIDTH + WIDTH * RANK),  # K and V: A (r x in) + B (dim x r)
        "adapter": (WIDTH * 5 + 5) + (5 * WIDTH + WIDTH),  # down + up, bottleneck 5
        "prefix": 2 * 10 * WIDTH,  # keys and values, length 10
    }
    for kind, n in per_block.items():
        assert make_model(kind).num_trainable_parameters() == 5 * n + head, kind
    assert make_model("lora", lora_targets="qkv").num_trainable_parameters() == 5 * 3 * 2 * RANK * WIDTH + head
    assert make_model("prompt").num_trainable_parameters() == 10 * WIDTH + head
    assert make_model("lora", blocks=[1]).num_trainable_parameters() == per_block["lora"] + head
    model = make_model("lora", freeze_backbone=False)
    assert model.num_trainable_parameters() == count_parameters(model, trainable_only=False)


def test_frozen_peft_and_older_heads():
    model = make_model("lora", num_classes=(3, 2))
    assert not any(p.requires_grad for p in model.heads.heads[0].parameters())
    model.set_peft_trainable(False)
    assert model.num_trainable_parameters() == WIDTH * 2 + 2
    model.set_peft_trainable(True)
    assert all(p.requires_grad for p in model.peft_parameters())


def test_wrappers_sit_in_the_chosen_blocks():
    model = make_model("prefix", blocks=[0, 3])
    wrapped = [i for i, block in enumerate(model.backbone.blocks) if isinstance(block.attn, PeftModule)]
    assert wrapped == [0, 3]


def test_prompt_tokens_are_prefix_tokens():
    model = make_model("prompt", prompt_length=7)
    assert model.backbone.num_prefix_tokens == 1 + 7
    assert model.backbone.forward_features(images()).shape[1] == 1 + 7 + 16


def test_bad_blocks():
    with pytest.raises(ValueError, match=r"blocks \[5\] out of range"):
        apply_peft(create_backbone(TINY_VIT), PeftConfig(kind="lora", blocks=[0, 5]))


def test_backbone_weights_from_a_local_checkpoint(tmp_path):
    """A classifier checkpoint (head included, as timm's released weights) loads into the headless
    backbone, without any download."""
    import dataclasses

    import timm

    source = timm.create_model(TINY_VIT.name, pretrained=False, num_classes=10, **TINY_VIT.kwargs)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    backbone = create_backbone(dataclasses.replace(TINY_VIT, pretrained=True, checkpoint=str(path)))
    assert torch.equal(backbone.pos_embed, source.pos_embed) and backbone.num_classes == 0
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_backbone(dataclasses.replace(TINY_VIT, pretrained=True, checkpoint=str(tmp_path / "missing.pth")))
    with pytest.raises(FileNotFoundError, match=r"needs a local weight file for 'vit_tiny_patch16_224'"):
        create_backbone(dataclasses.replace(TINY_VIT, pretrained=True))


def test_prefix_is_attention_over_extra_keys_and_values():
    """Prefix keys/values set to those of L extra tokens z give timm's own attention over [z, x],
    read at the rows of x."""
    attn = create_backbone(TINY_VIT).blocks[0].attn.eval()
    z, x = torch.randn(1, 3, WIDTH), torch.randn(1, 5, WIDTH)
    prefix = PrefixAttention(attn, length=3)
    with torch.no_grad():
        _, k, v = attn.qkv(z)[0].chunk(3, dim=-1)
        prefix.prefix_key.copy_(k)
        prefix.prefix_value.copy_(v)
    torch.testing.assert_close(prefix(x), attn(torch.cat([z, x], dim=1))[:, 3:])
