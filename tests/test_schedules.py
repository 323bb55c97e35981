"""The annealing schedules (docs/math.md section 5) and the AEPGLoss module that reads them."""

import math

import pytest
import torch

import aepg_kernels as ak
from tests.helpers import DEVICE, index_targets, logits, loss_and_grad

FORMULAS = {
    ak.SigmoidAnneal: lambda u: 1 / (1 + math.exp(-6.0 * (1 - 2 * u))),
    ak.LinearAnneal: lambda u: 1 - u,
    ak.CosineAnneal: lambda u: 0.5 + 0.5 * math.cos(math.pi * u),
}


@pytest.mark.parametrize("kind", list(FORMULAS))
@pytest.mark.parametrize("device", [None, DEVICE])
def test_schedule_follows_its_formula_and_resets(kind, device):
    schedule = kind(10, device=device)
    values = []
    for _ in range(13):  # past the end, alpha stays at its final value
        values.append(float(schedule.alpha))
        schedule.step()
    expected = [FORMULAS[kind](min(t / 10, 1.0)) for t in range(13)]
    assert values == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert isinstance(schedule.alpha, torch.Tensor) == (device is not None)
    schedule.reset(4)
    assert schedule.step_count == 0 and schedule.total_steps == 4
    assert float(schedule.alpha) == pytest.approx(FORMULAS[kind](0.0), rel=1e-6)


def test_sigmoid_endpoints_match_the_paper():
    """tau = 6: alpha goes 0.9975 -> 0.5 -> 0.0025 over a task."""
    schedule = ak.SigmoidAnneal(100)
    assert schedule.alpha == pytest.approx(0.99753, abs=1e-5)
    for _ in range(50):
        schedule.step()
    assert schedule.alpha == pytest.approx(0.5)
    for _ in range(50):
        schedule.step()
    assert schedule.alpha == pytest.approx(0.00247, abs=1e-5)


@pytest.mark.parametrize("device", [None, DEVICE])
def test_state_dict_round_trip(device):
    schedule = ak.SigmoidAnneal(20, tau=4.0, device=device)
    for _ in range(7):
        schedule.step()
    restored = ak.SigmoidAnneal(1, device=device)
    restored.load_state_dict(schedule.state_dict())
    assert restored.state_dict() == {"step": 7, "total_steps": 20, "tau": 4.0}
    assert float(restored.alpha) == pytest.approx(float(schedule.alpha))
    constant = ak.ConstantAlpha(0.2)
    other = ak.ConstantAlpha(0.9)
    other.load_state_dict(constant.state_dict())
    assert other.alpha == pytest.approx(0.2)


def test_aepg_module_reads_the_schedule_each_call():
    schedule = ak.LinearAnneal(4)
    criterion = ak.AEPGLoss(schedule, entropy_weight=0.1, backend="eager")
    x = logits(6, 5)
    y = index_targets(6, 5)
    for step in range(5):
        alpha = 1 - min(step / 4, 1.0)
        expected = ak.policy_loss(x, y, ce_weight=alpha, epg_weight=1 - alpha, entropy_weight=0.1, backend="eager")
        torch.testing.assert_close(criterion(x, y), expected)
        schedule.step()


def test_aepg_loss_is_the_weighted_sum_of_ce_and_epg():
    x = logits(8, 6)
    y = index_targets(8, 6)
    for alpha in (0.0, 0.3, 1.0):
        combined = ak.aepg_loss(x, y, alpha, backend="eager")
        parts = alpha * ak.cross_entropy(x, y, backend="eager") + (1 - alpha) * ak.epg_loss(x, y, backend="eager")
        torch.testing.assert_close(combined, parts)
    (_, stats), grad = loss_and_grad(
        x, y, backend="eager", ce_weight=0.0, epg_weight=1.0, reduction="sum", return_stats=True
    )
    p = torch.softmax(x.detach(), -1)
    onehot = torch.nn.functional.one_hot(y, 6)
    torch.testing.assert_close(grad, stats.p_target[:, None] * (p - onehot))  # EPG = p_y (p - e_y)


def _stats(p_target):
    zeros = torch.zeros_like(p_target)
    return ak.LossStats(zeros, p_target, zeros, zeros, zeros)


@pytest.mark.parametrize("device", [None, "cpu"])
def test_feedback_alpha_follows_its_rule(device):
    """alpha <- clamp(alpha + gain (target(t) - mean p_y), 0, 1), target linear over the task,
    ignored rows (p_y = 0) not counted; a device schedule keeps one .alpha tensor."""
    schedule = ak.FeedbackAlpha(10, target_start=0.4, target_end=0.9, gain=0.5, alpha0=0.6, device=device)
    alpha_tensor = schedule.alpha
    expected = 0.6
    for step, p in enumerate([[0.1, 0.3, 0.0], [0.9, 0.95, 0.0], [0.99, 0.99, 0.99], [0.2, 0.2, 0.2]]):
        p = torch.tensor(p)
        target = 0.4 + 0.5 * step / 10
        expected = min(max(expected + 0.5 * (target - p[p > 0].mean().item()), 0.0), 1.0)
        schedule.observe(_stats(p))
        assert float(schedule.alpha) == pytest.approx(expected, abs=1e-6)
        schedule.step()
    if device is not None:
        assert schedule.alpha is alpha_tensor and isinstance(alpha_tensor, torch.Tensor)
    before = float(schedule.alpha)
    schedule.observe(_stats(torch.zeros(3)))  # no counted row: no change
    assert float(schedule.alpha) == before
    schedule.observe(_stats(torch.full((3,), 0.0)), counted=torch.tensor([True, True, False]))  # p_y 0, counted
    assert float(schedule.alpha) == pytest.approx(min(before + 0.5 * (0.4 + 0.5 * 0.4), 1.0), abs=1e-6)
    schedule.reset()
    assert float(schedule.alpha) == pytest.approx(0.6) and schedule.step_count == 0


def test_feedback_alpha_state_round_trip_and_bad_arguments():
    schedule = ak.FeedbackAlpha(8, gain=1.0)
    schedule.observe(_stats(torch.tensor([0.9, 0.8])))
    schedule.step()
    restored = ak.FeedbackAlpha(8, device="cpu")
    restored.load_state_dict(schedule.state_dict())
    assert float(restored.alpha) == pytest.approx(schedule.alpha) and restored.step_count == 1 and restored.gain == 1.0
    for kwargs, name in (
        (dict(gain=-1.0), "gain"),
        (dict(target_end=1.5), "target_end"),
        (dict(alpha0=True), "alpha0"),
    ):
        with pytest.raises(ValueError, match=name):
            ak.FeedbackAlpha(8, **kwargs)


def test_feedback_alpha_drives_the_aepg_module():
    """AEPGLoss reads the controller's alpha at each call: the loss is aEPG at the current alpha."""
    schedule = ak.FeedbackAlpha(5, device="cpu")
    criterion = ak.AEPGLoss(schedule)
    x, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    loss, stats = criterion(x, y, return_stats=True)
    torch.testing.assert_close(loss, ak.aepg_loss(x, y, 1.0, backend="eager"))
    schedule.observe(stats)
    schedule.step()
    torch.testing.assert_close(criterion(x, y), ak.aepg_loss(x, y, float(schedule.alpha), backend="eager"))
