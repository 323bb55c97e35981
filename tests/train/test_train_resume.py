"""Checkpoint/resume: a run stopped mid-task (or at a task boundary) and restarted ends exactly as an
uninterrupted run: same accuracy matrix and history, bitwise-equal parameters (CPU)."""

import json

import pytest
import torch

from aepg_kernels.train import ClassIncrementalScenario, ContinualTrainer, config_from_dict
from aepg_kernels.train.checkpoint import ResumeError
from aepg_kernels.train.trainer import TrainingInterrupted
from tests.train.tiny_vit import class_images, make_model, one_intra_op_thread

# 3 tasks x 16 images, batches of 6 (6, 6, 4): 3 steps per epoch, 9 per task, 27 in all.
PER_CLASS, STEPS_PER_TASK = [8] * 6, 9


def config(output_dir, **run):
    return config_from_dict(
        {
            "optim": {"lr": 1e-2, "epochs": 3, "peft_frozen_epochs": 1},
            "data": {"batch_size": 6, "eval_batch_size": 64, "num_workers": run.pop("num_workers", 0)},
            "loss": {"name": "aepg", "backend": "eager"},
            "scenario": {"num_tasks": 3},
            "run": {"output_dir": str(output_dir), "progress": False, **run},
        }
    )


def scenario(seed=0):
    return ClassIncrementalScenario.create(range(6), num_tasks=3, order="permuted", seed=seed)


def fit(cfg, stop=None, scenario_seed=0, model=None, messages=None):
    """(summary or None if stopped, trainer)."""
    log = messages.append if messages is not None else (lambda _message: None)
    trainer = ContinualTrainer(
        model or make_model("lora", num_classes=()), scenario(scenario_seed), cfg, device="cpu", log=log
    )
    (train, train_y), (test, test_y) = class_images(PER_CLASS, 1), class_images(PER_CLASS, 2)
    try:
        return trainer.fit(train, train_y, test, test_y, stop_after_steps=stop), trainer
    except TrainingInterrupted:
        return None, trainer


def without_timing(summary):
    """The summary but its wall-clock times, as JSON text (NaN, the unmeasured entries of the
    accuracy matrix, compares equal as text)."""
    return json.dumps({k: v for k, v in summary.items() if k != "timing"})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    with one_intra_op_thread():
        summary, trainer = fit(config(tmp_path_factory.mktemp("uninterrupted"), checkpoint_every=0))
    return summary, trainer.model.state_dict()


@pytest.mark.parametrize(
    "checkpoint_every, stop, resumed_at, num_workers",
    [
        (5, 13, "task 1 epoch 0 batch 1 (step 10)", 0),  # mid-epoch
        (4, 14, "task 1 epoch 0 batch 3 (step 12)", 0),  # after an epoch's last batch, before its end
        (0, STEPS_PER_TASK + 2, "task 1 epoch 0 batch 0 (step 9)", 0),  # at the task boundary
        (10, 2 * STEPS_PER_TASK + 4, "task 2 epoch 0 batch 2 (step 20)", 2),  # and data read by 2 workers
    ],
)
def test_resume_replays_the_uninterrupted_run(tmp_path, uninterrupted, checkpoint_every, stop, resumed_at, num_workers):
    expected, expected_state = uninterrupted
    stopped, _ = fit(config(tmp_path, checkpoint_every=checkpoint_every), stop=stop)
    assert stopped is None and (tmp_path / "checkpoint.pt").is_file()
    messages = []
    summary, trainer = fit(
        config(tmp_path, checkpoint_every=checkpoint_every, num_workers=num_workers), messages=messages
    )
    assert any(resumed_at in m for m in messages), messages
    assert without_timing(summary) == without_timing(expected)
    assert len(summary["timing"]) == 3
    state = trainer.model.state_dict()
    assert state.keys() == expected_state.keys()
    for name, value in state.items():
        assert torch.equal(value, expected_state[name]), name


def test_resume_after_the_last_task_only_reports(tmp_path, uninterrupted):
    fit(config(tmp_path))
    messages = []
    summary, trainer = fit(config(tmp_path), messages=messages)
    assert any("task 3 epoch 0 batch 0 (step 27)" in m for m in messages)
    assert without_timing(summary) == without_timing(uninterrupted[0]) and trainer.global_step == 27


def test_resume_false_starts_afresh(tmp_path):
    fit(config(tmp_path), stop=4)
    messages = []
    fit(config(tmp_path, resume=False), stop=1, messages=messages)
    assert not any("resumed" in m for m in messages)


def test_a_different_run_is_refused(tmp_path):
    fit(config(tmp_path, checkpoint_every=2), stop=3)
    changed = config(tmp_path, seed=1)
    changed.optim.lr = 2e-2
    with pytest.raises(ResumeError, match=r"the config differs: optim\.lr: 0\.01 -> 0\.02; run\.seed: 0 -> 1"):
        fit(changed)
    with pytest.raises(ResumeError, match="the scenario differs"):
        fit(config(tmp_path), scenario_seed=1)
    model = make_model("lora", num_classes=())
    with torch.no_grad():
        model.backbone.blocks[3].mlp.fc1.weight[0, 0] += 1
    with pytest.raises(ResumeError, match="frozen backbone's weights differ"):
        fit(config(tmp_path), model=model)
    # Display options may change.
    summary, _ = fit(config(tmp_path, checkpoint_every=5, progress=True))
    assert summary is not None
