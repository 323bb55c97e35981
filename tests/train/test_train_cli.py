"""`aepg-train` end to end: a run and a compare from the shipped demo preset, through the command
line, with the demo's MNIST pretraining shrunk (conftest.py's small_recipe) and few epochs; and the
real embedded demo (slow): CE vs aEPG, 3 seeds, every run far above chance."""

import json

import pytest

from aepg_kernels.train import ConfigError, load_config
from aepg_kernels.train.cli import main as cli_main

SHORT = ["optim.epochs=2", "optim.peft_frozen_epochs=1", "scenario.num_tasks=2", "run.progress=false"]
METRICS = ("final_accuracy", "average_incremental_accuracy", "forgetting_max_based", "backward_transfer")


def _args(tmp_path, *extra):
    return [
        "--config",
        "demo_digits",
        f"run.output_dir={tmp_path / 'out'}",
        f"run.cache_dir={tmp_path / 'cache'}",
        *SHORT,
        *extra,
    ]


def test_run_writes_every_output(tmp_path, small_recipe, capsys):
    assert cli_main(_args(tmp_path, "loss.name=ce")) == 0
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {
        "summary.json",
        "config.yaml",
        "checkpoint.pt",
        "accuracy_matrix.png",
        "accuracy_per_task.png",
        "entropy.png",
    }
    record = json.loads((out / "summary.json").read_text())
    assert set(METRICS) <= set(record["metrics"])
    R = record["accuracy_matrix"]
    assert len(R) == 2 and all(0 <= a <= 1 for a in R[1])
    assert record["run_info"]["data"]["source"].endswith("load_digits")
    # The resolved config names the cached pretrained weights: the run is reproducible from it alone.
    resolved = load_config(str(out / "config.yaml"))
    assert resolved.model.pretrained and resolved.model.checkpoint.startswith(str(tmp_path / "cache"))
    assert resolved.loss.name == "ce"
    printed = capsys.readouterr().out
    assert "final accuracy A_T" in printed


def test_run_resumes_instead_of_retraining(tmp_path, small_recipe, monkeypatch):
    assert cli_main(_args(tmp_path)) == 0
    first = json.loads((tmp_path / "out" / "summary.json").read_text())

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("aepg_kernels.train.trainer.ContinualTrainer.train_task", no_training)
    assert cli_main(_args(tmp_path)) == 0
    again = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert again["accuracy_matrix"] == first["accuracy_matrix"]


def test_compare_writes_a_table_of_every_loss(tmp_path, small_recipe, capsys):
    assert cli_main(["compare", *_args(tmp_path), "--losses", "ce,epg", "--seeds", "0"]) == 0
    aggregated = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert set(aggregated["losses"]) == {"ce", "epg"}
    assert (tmp_path / "out" / "ce" / "seed0" / "summary.json").is_file()
    assert (tmp_path / "out" / "compare_accuracy.png").is_file()
    table = capsys.readouterr().out
    assert "| ce " in table and "| epg " in table


def test_compare_overrides_may_follow_the_lists(tmp_path, capsys):
    argv = [
        "compare",
        "--config",
        "demo_digits",
        "--losses",
        "ce,aepg",
        "--seeds",
        "3,4",
        "--print-config",
        "optim.lr=1e-3",
    ]
    assert cli_main(argv) == 0
    assert "lr: 0.001" in capsys.readouterr().out


def test_compare_rejects_an_unknown_loss_before_running(tmp_path, capsys):
    assert cli_main(["compare", *_args(tmp_path), "--losses", "ce,hinge"]) == 2
    assert "hinge" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_embedded_demo_learns_far_above_chance(tmp_path, capsys):
    """The demo of docs/trainer.md as shipped (MNIST pretraining included, cached under tmp_path): CE vs aEPG
    over 3 seeds. Chance is 10%; a frozen MNIST backbone with LoRA keeps every run above 3x that.
    Nothing here compares the two losses: the demo is not tuned to make one win."""
    assert (
        cli_main(
            [
                "compare",
                "--config",
                "demo_digits",
                f"run.output_dir={tmp_path / 'demo'}",
                f"run.cache_dir={tmp_path / 'cache'}",
                "run.progress=false",
            ]
        )
        == 0
    )
    aggregated = json.loads((tmp_path / "demo" / "compare.json").read_text())
    for loss in ("ce", "aepg"):
        finals = aggregated["losses"][loss]["metrics"]["final_accuracy"]["values"]
        assert len(finals) == 3 and min(finals) > 0.3, (loss, finals)


def test_sweep_runs_the_grid_with_label_noise_and_reads_finished_runs_back(tmp_path, small_recipe, capsys, monkeypatch):
    argv = ["sweep", *_args(tmp_path, "loss.name=ce"), "--grid", "data.label_noise=0,0.2", "--seeds", "0"]
    assert cli_main(argv) == 0
    out = tmp_path / "out"
    swept = json.loads((out / "sweep.json").read_text())
    assert list(swept["configurations"]) == ["data.label_noise=0", "data.label_noise=0.2"]
    assert swept["configurations"]["data.label_noise=0.2"]["grid_values"] == {"data.label_noise": 0.2}
    noisy, clean = out / "data.label_noise=0.2" / "seed0", out / "data.label_noise=0" / "seed0"
    noise = json.loads((noisy / "noise.json").read_text())
    assert noise["num_flipped"] == round(0.2 * noise["num_samples"]) and not (clean / "noise.json").exists()
    assert json.loads((noisy / "summary.json").read_text())["config"]["data"]["label_noise"] == 0.2
    assert set(swept["runs"]["data.label_noise=0"]["0"]["metrics"]) >= set(METRICS)
    assert "| data.label_noise=0.2 " in capsys.readouterr().out

    def no_run(cfg):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr("aepg_kernels.train.runner.run", no_run)
    assert cli_main(argv) == 0
    again = json.loads((out / "sweep.json").read_text())
    assert again["runs"]["data.label_noise=0.2"]["0"]["reused"] is True
    assert again["configurations"] == swept["configurations"]


def test_sweep_rejects_a_bad_grid_before_running(tmp_path, capsys):
    assert cli_main(["sweep", *_args(tmp_path), "--grid", "loss.schedule=constant"]) == 2
    assert "loss.alpha" in capsys.readouterr().err  # the constant schedule needs an alpha
    assert cli_main(["sweep", *_args(tmp_path), "--grid", "loss.alpha"]) == 2
    assert not (tmp_path / "out").exists()


def test_task_scoped_noise_flips_within_the_runs_tasks(tmp_path, small_recipe):
    assert cli_main(_args(tmp_path, "loss.name=ce", "data.label_noise=0.2", "data.label_noise_scope=task")) == 0
    out = tmp_path / "out"
    noise = json.loads((out / "noise.json").read_text())
    order = json.loads((out / "summary.json").read_text())["scenario"]["class_order"]
    assert noise["groups"] == [order[:5], order[5:]]  # two tasks of the permuted order
    task_of = {c: order.index(c) // 5 for c in order}
    assert all(task_of[a] == task_of[b] for a, b in zip(noise["original_labels"], noise["noisy_labels"]))
    single = _args(
        tmp_path / "single",
        "data.label_noise=0.2",
        "data.label_noise_scope=task",
        "scenario.num_tasks=null",
        "scenario.classes_per_task=3",
    )  # the last task has one class
    with pytest.raises(ConfigError, match="data.label_noise_scope: 'task' needs >= 2 classes in every task"):
        cli_main(single)
