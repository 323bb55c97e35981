"""loss.schedule=feedback: aepg_kernels.FeedbackAlpha built from the config, fed each step's stats by
the trainer, its alpha checkpointed: a tiny run completes, alpha moves, a resumed run replays it."""

import pytest
import torch

import aepg_kernels as ak
from aepg_kernels.train import ConfigError, build_criterion, config_from_dict, load_config
from aepg_kernels.train.checkpoint import config_differences
from aepg_kernels.train.config import config_to_dict
from tests.train.test_train_resume import fit, without_timing
from tests.train.tiny_vit import one_intra_op_thread

FEEDBACK = {"target_start": 0.6, "target_end": 0.9, "gain": 0.5, "alpha0": 0.5}


def config(output_dir, **run):
    return config_from_dict(
        {
            "optim": {"lr": 1e-2, "epochs": 3, "peft_frozen_epochs": 1},
            "data": {"batch_size": 6, "eval_batch_size": 64, "num_workers": 0},
            "loss": {"name": "aepg", "schedule": "feedback", "feedback": FEEDBACK, "backend": "eager"},
            "scenario": {"num_tasks": 3},
            "run": {"output_dir": str(output_dir), "progress": False, **run},
        }
    )


def test_the_config_builds_a_feedback_alpha():
    cfg = load_config(None, ["loss.schedule=feedback", "loss.feedback.gain=0.2", "loss.feedback.target_end=0.8"])
    schedule = build_criterion(cfg.loss, 10).schedule
    assert isinstance(schedule, ak.FeedbackAlpha) and schedule.total_steps == 10
    assert (schedule.gain, schedule.target_start, schedule.target_end, schedule.alpha0) == (0.2, 0.5, 0.8, 1.0)
    on_device = build_criterion(cfg.loss, 10, device=torch.device("cpu")).schedule
    assert isinstance(on_device.alpha, torch.Tensor) and on_device.alpha.dim() == 0  # no host read per step
    assert isinstance(build_criterion(load_config(None, []).loss, 10, device="cpu").schedule.alpha, float)
    with pytest.raises(ConfigError, match=r"loss.feedback.gain: must be a finite number >= 0"):
        load_config(None, ["loss.feedback.gain=-1"])
    with pytest.raises(ConfigError, match=r"loss.feedback.alpha0: must be in \[0, 1\]"):
        load_config(None, ["loss.feedback.alpha0=2"])
    with pytest.raises(ConfigError, match="unknown key loss.feedback.target"):
        load_config(None, ["loss.feedback.target=0.5"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    with one_intra_op_thread():
        summary, trainer = fit(config(tmp_path_factory.mktemp("feedback")))
    return summary, trainer


def test_a_run_with_the_feedback_schedule_moves_alpha(uninterrupted):
    summary, trainer = uninterrupted
    alphas = [record["alpha"] for record in summary["history"]]
    assert len(alphas) == 9 and all(0 <= a <= 1 for a in alphas)
    # Each task starts at alpha0 = 0.5 with p_y at chance (1/2, two classes) below the target 0.6:
    # alpha rises (more CE) in the task's first epoch, and moves on from epoch to epoch.
    assert all(alphas[3 * task] > 0.5 for task in range(3))
    assert len({round(a, 6) for a in alphas}) > 3
    assert len({round(a, 6) for a in alphas}) > 3  # it moves from epoch to epoch
    assert trainer.schedule.step_count == 9 and isinstance(trainer.schedule, ak.FeedbackAlpha)
    assert len(summary["accuracy_matrix"]) == 3


@pytest.mark.parametrize("checkpoint_every, stop", [(4, 14), (5, 22)])
def test_a_resumed_feedback_run_replays_the_uninterrupted_one(tmp_path, uninterrupted, checkpoint_every, stop):
    expected, expected_trainer = uninterrupted
    stopped, interrupted = fit(config(tmp_path, checkpoint_every=checkpoint_every), stop=stop)
    assert stopped is None
    alpha_at_stop = float(interrupted.schedule.alpha)
    messages = []
    summary, trainer = fit(config(tmp_path, checkpoint_every=checkpoint_every), messages=messages)
    assert any("resumed" in m for m in messages)
    assert without_timing(summary) == without_timing(expected)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, expected_trainer.model.state_dict()[name]), name
    assert float(trainer.schedule.alpha) == float(expected_trainer.schedule.alpha) != alpha_at_stop


def test_a_checkpoint_written_before_a_key_existed_reads_it_as_its_default():
    current = config_to_dict(load_config(None, []))
    saved = config_to_dict(load_config(None, []))
    del saved["data"]["label_noise"], saved["loss"]["feedback"]
    assert config_differences(saved, current) == []
    changed = config_to_dict(load_config(None, ["data.label_noise=0.2"]))
    assert config_differences(saved, changed) == ["data.label_noise: 0.0 -> 0.2"]
