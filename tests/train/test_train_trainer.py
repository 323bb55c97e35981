"""Smoke tests of the training loop on random, class-separable data (tiny ViT, a few steps)."""

import io
import math
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

from aepg_kernels.train import ClassIncrementalScenario, ContinualTrainer, config_from_dict, task_subsets
from aepg_kernels.train.cli import main as cli_main
from tests.train.tiny_vit import make_model

NUM_CLASSES, PER_CLASS = 6, 8


def dataset(seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS)
    centers = torch.randn(NUM_CLASSES, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = centers[y] + 0.5 * torch.randn(len(y), 3, 32, 32, generator=g)
    return TensorDataset(x, y), y


def trainer(output_dir, epochs=3, peft_frozen_epochs=2, loss="aepg"):
    cfg = config_from_dict(
        {
            "optim": {"lr": 1e-2, "epochs": epochs, "peft_frozen_epochs": peft_frozen_epochs},
            "data": {"batch_size": 16, "eval_batch_size": 64, "num_workers": 0},
            "loss": {"name": loss, "backend": "eager"},
            "scenario": {"num_tasks": 3, "class_order": "permuted"},
            "run": {"output_dir": str(output_dir), "progress": False},
        }
    )
    scenario = ClassIncrementalScenario.create(range(NUM_CLASSES), num_tasks=3, order="permuted", seed=0)
    model = make_model("lora", num_classes=())
    return ContinualTrainer(model, scenario, cfg, device="cpu", log=lambda message: None)


def test_fit_fills_the_accuracy_matrix_and_logs_per_epoch(tmp_path):
    t = trainer(tmp_path)
    (train, train_y), (test, test_y) = dataset(1), dataset(2)
    summary = t.fit(train, train_y, test, test_y)
    R = summary["accuracy_matrix"]
    assert all(0 <= R[task][i] <= 1 for task in range(3) for i in range(task + 1))
    for key in ("final_accuracy", "average_incremental_accuracy", "forgetting_max_based", "backward_transfer"):
        assert math.isfinite(summary[key])
    assert summary["scenario"]["class_order"] == list(t.scenario.class_order)
    history = summary["history"]
    assert [(h["task"], h["epoch"], h["peft_trainable"]) for h in history] == [(0, e, True) for e in range(3)] + [
        (task, e, e >= 2) for task in (1, 2) for e in range(3)
    ]
    for h in history:
        assert 0 < h["sample_weight"] <= 1 and 0 <= h["entropy"] <= math.log(2) + 1e-6
    # alpha restarts near 1 (CE) at each task and decreases within it.
    for task in range(3):
        alphas = [h["alpha"] for h in history if h["task"] == task]
        assert alphas[0] > 0.9 and alphas == sorted(alphas, reverse=True)
    assert history[2]["loss"] < history[0]["loss"]  # it learns task 0
    lora, head = 5 * 2 * 2 * 4 * 64, 64 * 2 + 2
    assert summary["trainable_parameters_per_task"] == [lora + head] * 3
    assert len(summary["timing"]) == 3 and all(s > 0 for s in summary["timing"])
    assert (tmp_path / "checkpoint.pt").is_file()


def test_peft_and_old_heads_stay_frozen(tmp_path):
    """With every epoch of task 1 head-only, task 1 moves its own head and nothing else."""
    t = trainer(tmp_path, epochs=2, peft_frozen_epochs=2, loss="ce")
    subsets = task_subsets(t.scenario, *dataset(1))
    t.train_task(0, subsets[0])
    frozen = t.model.peft_parameters() + list(t.model.heads.heads[0].parameters())
    before = [p.detach().clone() for p in frozen]
    t.train_task(1, subsets[1])
    assert all(torch.equal(p, b) for p, b in zip(frozen, before, strict=True))
    # Adam moves every weight by about lr per step: far beyond the N(0, 0.001^2) init.
    assert t.model.heads.heads[1].weight.std() > 0.003


def test_cli_prints_the_resolved_config(capsys):
    assert cli_main(["--config", "imagenet_r_10task_adapter", "--print-config", "optim.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "kind: adapter" in out and "lr: 0.001" in out
    assert cli_main(["--config", "demo_digits", "--print-config", "optim.lrr=1"]) == 2
    assert "valid keys of optim" in capsys.readouterr().err


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("progress, terminal", [(True, True), (False, True), (True, False)])
def test_progress_bars_only_on_a_terminal_when_asked(tmp_path, monkeypatch, progress, terminal):
    t = trainer(tmp_path, epochs=1, peft_frozen_epochs=0)
    t.cfg.run.progress = progress
    err = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    t.fit(*dataset(1), *dataset(2))
    assert ("task 3/3" in err.getvalue()) == (progress and terminal)
