import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

import aepg_kernels as ak
from aepg_kernels.train import LossConfig, TaskHeads, accuracy, build_criterion, local_loss, predict_loader
from tests.train.tiny_vit import make_model


def test_heads_grow_and_start_small():
    torch.manual_seed(0)
    heads = TaskHeads(256, init_std=0.001)
    assert heads.add_task(10) == (0, 10) and heads.add_task(5) == (10, 15)
    assert heads.num_classes == 15 and heads.class_range(1) == (10, 15)
    assert heads(torch.randn(4, 256)).shape == (4, 15)
    w = heads.heads[0].weight
    assert abs(w.std().item() - 0.001) < 1e-4 and heads.heads[0].bias.abs().max() == 0


def test_local_loss_is_within_the_task():
    """p_y is the softmax over the current task's logits only: older classes are sliced off."""
    logits = torch.randn(8, 15, dtype=torch.float64)
    logits[:, :10] += 5.0  # old classes dominate the full softmax; they must not matter
    targets = torch.randint(10, 15, (8,))
    loss, stats = local_loss(ak.PolicyLoss(reduction="none"), logits, targets, (10, 15), return_stats=True)
    p_task = logits[:, 10:].softmax(-1).gather(1, (targets - 10)[:, None]).squeeze(1)
    torch.testing.assert_close(stats.p_target.double(), p_task)
    torch.testing.assert_close(loss, -p_task.log())


@pytest.mark.parametrize("name", ["ce", "epg", "aepg", "cp", "ep", "ls", "focal"])
def test_losses_by_name(name):
    logits = torch.randn(8, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (8,))
    criterion = build_criterion(LossConfig(name=name), total_steps=10)
    assert hasattr(criterion, "schedule") == (name == "aepg")
    p = logits.softmax(-1)
    p_y = p.gather(1, y[:, None]).squeeze(1)
    ce, epg, entropy = -p_y.log(), 1 - p_y, -(p * p.log()).sum(-1)
    alpha = ak.SigmoidAnneal(10).alpha  # the aepg schedule at step 0
    expected = {
        "ce": ce,
        "epg": epg,
        "aepg": alpha * ce + (1 - alpha) * epg,
        "cp": ce - entropy,
        "ep": ce + entropy,
        "ls": torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1, reduction="none"),
        "focal": (1 - p_y) ** 2 * ce,
    }[name]
    torch.testing.assert_close(criterion(logits, y), expected.mean())


@pytest.mark.parametrize("kind", ["lora", "prefix", "prompt"])
def test_predictions_do_not_depend_on_batch_size_or_order(kind):
    model = make_model(kind, num_classes=(3, 3, 4))
    with torch.no_grad():  # a trained-looking model: PEFT away from its init, heads of a useful scale
        for p in model.peft_parameters():
            p.add_(0.1 * torch.randn_like(p))
        for p in model.heads.parameters():
            p.normal_()
    x = torch.randn(80, 3, 32, 32)
    y = torch.randint(0, 10, (80,))
    data = TensorDataset(x, y)
    preds64, _ = predict_loader(model, DataLoader(data, batch_size=64))
    preds1, targets = predict_loader(model, DataLoader(data, batch_size=1))
    perm = torch.randperm(80)
    preds_shuffled, _ = predict_loader(model, DataLoader(Subset(data, perm.tolist()), batch_size=64))
    assert torch.equal(preds1, preds64) and torch.equal(preds_shuffled, preds64[perm])
    assert len(set(preds64.tolist())) > 1  # a model predicting one class would prove nothing
    assert torch.equal(targets, y)
    assert accuracy(model, DataLoader(data, batch_size=64)) == (preds1 == y).float().mean().item()
