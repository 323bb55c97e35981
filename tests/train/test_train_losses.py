"""The loss registry: every registered name builds a criterion, and the config accepts exactly those."""

import pytest
from torch import nn

from aepg_kernels.train import ConfigError, LossConfig, build_criterion
from aepg_kernels.train.losses import LOSS_NAMES, LOSSES


def test_every_registered_loss_builds():
    assert LOSS_NAMES == ("ce", "epg", "aepg", "cp", "ep", "ls", "focal") == tuple(LOSSES)
    for name, entry in LOSSES.items():
        assert entry.description
        assert isinstance(build_criterion(LossConfig(name=name, backend="eager"), total_steps=4), nn.Module)
    assert hasattr(build_criterion(LossConfig(name="aepg"), total_steps=4), "schedule")


def test_the_config_names_the_valid_losses():
    with pytest.raises(
        ConfigError,
        match=r"loss\.name: must be one of \['ce', 'epg', 'aepg', 'cp', 'ep', 'ls', "
        r"'focal'\], got 'entropy'",
    ):
        LossConfig(name="entropy")


def test_every_registered_schedule_builds():
    from aepg_kernels.train.losses import SCHEDULES, build_schedule

    assert tuple(SCHEDULES) == ("sigmoid", "linear", "cosine", "constant", "feedback")
    for name in SCHEDULES:
        schedule = build_schedule(LossConfig(schedule=name, alpha=0.5), total_steps=4)
        assert 0 <= float(schedule.alpha) <= 1
    with pytest.raises(
        ConfigError,
        match=r"loss\.schedule: must be one of \['sigmoid', 'linear', 'cosine', "
        r"'constant', 'feedback'\], got 'step'",
    ):
        LossConfig(schedule="step")
