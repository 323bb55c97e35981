"""The checkpoint format: TrainerState to a dict and back, and the refusal of other formats."""

import pytest
import torch

from aepg_kernels.train.checkpoint import (
    FORMAT_VERSION,
    Position,
    ResumeError,
    TrainerState,
    load_checkpoint,
    save_checkpoint,
)


def state(**changes):
    values = dict(
        config={"run": {"seed": 0}},
        scenario={"class_order": [1, 0], "task_sizes": [1, 1]},
        backbone_fingerprint="abc",
        world_size=2,
        position=Position(1, 0, 3),
        global_step=7,
        num_heads=2,
        model={"heads.heads.0.weight": torch.ones(1, 4)},
        accuracy_matrix={"values": [[1.0]]},
        history=[{"task": 0, "epoch": 0, "loss": 0.5}],
        trainable_per_task=[10],
        timing=[1.5],
        epoch_totals=torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        task_seconds=0.25,
    )
    return TrainerState(**{**values, **changes})


def test_state_round_trips_through_a_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, state())
    values = torch.load(path, weights_only=True)
    assert values["format_version"] == FORMAT_VERSION and values["position"] == [1, 0, 3]
    loaded = load_checkpoint(path)
    assert loaded.position == Position(1, 0, 3) and loaded.history == state().history
    assert torch.equal(loaded.model["heads.heads.0.weight"], torch.ones(1, 4))
    assert load_checkpoint(tmp_path / "missing.pt") is None


def test_format_1_keys():
    """The keys of format 1, as every checkpoint written so far holds them: a change of the format
    must change FORMAT_VERSION (and this list) with it."""
    assert FORMAT_VERSION == 1
    assert sorted(state().to_dict()) == sorted(
        [
            "config",
            "scenario",
            "backbone_fingerprint",
            "world_size",
            "position",
            "global_step",
            "num_heads",
            "model",
            "optimizer",
            "schedule",
            "epoch_totals",
            "task_seconds",
            "accuracy_matrix",
            "history",
            "trainable_per_task",
            "timing",
            "format_version",
        ]
    )


def test_other_formats_are_refused(tmp_path):
    values = state().to_dict()
    with pytest.raises(ResumeError, match=f"checkpoint format 2, this trainer reads {FORMAT_VERSION}"):
        TrainerState.from_dict({**values, "format_version": 2}, tmp_path)
    del values["timing"]
    with pytest.raises(ResumeError, match=r"missing keys \['timing'\], unknown keys \['extra'\]"):
        TrainerState.from_dict({**values, "extra": 1}, tmp_path)


def test_epoch_totals_per_rank():
    s = state()
    assert s.epoch_totals_of(1, 2).tolist() == [3.0, 4.0]  # the same world size: each rank its own sums
    assert s.epoch_totals_of(0, 1).tolist() == [4.0, 6.0]  # another: rank 0 takes them all
    assert s.epoch_totals_of(1, 3).tolist() == [0.0, 0.0]
    assert state(epoch_totals=None).epoch_totals_of(0, 2) is None
