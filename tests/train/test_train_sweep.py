"""`sweep` mode (compare.py): the grid's configurations x seeds, names and output dirs, checks before
any run, reading finished runs back; no training (a fake run_one)."""

import json
from pathlib import Path

import pytest

from aepg_kernels.train import ConfigError, load_config
from aepg_kernels.train.compare import (
    format_compare_table,
    grid_configurations,
    parse_grid,
    run_sweep,
    write_sweep_outputs,
)
from aepg_kernels.train.report import write_run_outputs
from tests.train.test_train_compare import two_task_summary


@pytest.fixture
def base_cfg(tmp_path):
    return load_config(None, ["optim.epochs=2", "optim.peft_frozen_epochs=1", f"run.output_dir={tmp_path / 'sw'}"])


def fake_runs(calls, write=False):
    """A run_one whose final accuracy is known: 0.5 + loss.alpha / 10 + seed / 100."""

    def run_one(cfg):
        calls.append(cfg)
        r = 0.5 + (cfg.loss.alpha or 0) / 10 + cfg.run.seed / 100
        summary = two_task_summary(0.9, r, r)
        if write:
            write_run_outputs(cfg.run.output_dir, cfg, summary)
        return summary

    return run_one


def test_parse_grid_reads_keys_and_comma_values():
    assert parse_grid(["loss.name=ce,aepg", "loss.alpha=0,0.5"]) == {
        "loss.name": ["ce", "aepg"],
        "loss.alpha": ["0", "0.5"],
    }
    for bad, message in [
        ("loss.alpha", "not of the form"),
        ("loss.alpha=", "not of the form"),
        ("loss.alpha=1,1", "each value once"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_grid([bad])
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["loss.alpha=0", "loss.alpha=1"])


def test_grid_configurations_are_the_cartesian_product_last_key_fastest():
    configurations = grid_configurations({"loss.name": ["ce", "aepg"], "data.label_noise": [0, 0.2]})
    assert list(configurations) == [
        "loss.name=ce,data.label_noise=0",
        "loss.name=ce,data.label_noise=0.2",
        "loss.name=aepg,data.label_noise=0",
        "loss.name=aepg,data.label_noise=0.2",
    ]
    assert configurations["loss.name=aepg,data.label_noise=0.2"] == {"loss.name": "aepg", "data.label_noise": "0.2"}
    assert list(grid_configurations({"run.bf16": [True, False]})) == ["run.bf16=true", "run.bf16=false"]
    with pytest.raises(ConfigError, match="'/'"):
        grid_configurations({"data.root": ["/data"]})


def test_run_sweep_runs_every_configuration_and_seed_paired_by_seed(base_cfg):
    calls, logged = [], []
    grid = {"loss.schedule": ["constant"], "loss.alpha": [0.0, 0.5]}
    swept = run_sweep(base_cfg, grid, [0, 3], fake_runs(calls), log=logged.append)
    assert [(c.loss.alpha, c.run.seed) for c in calls] == [(0.0, 0), (0.0, 3), (0.5, 0), (0.5, 3)]
    base = Path(base_cfg.run.output_dir)
    name = "loss.schedule=constant,loss.alpha=0.5"
    assert Path(calls[3].run.output_dir) == base / name / "seed3"
    for c in calls:  # only what the grid and the seed set differs from the base config
        assert (c.optim, c.model, c.peft, c.data, c.scenario) == (
            base_cfg.optim,
            base_cfg.model,
            base_cfg.peft,
            base_cfg.data,
            base_cfg.scenario,
        )
        assert c.loss.schedule == "constant" and c.loss.name == base_cfg.loss.name
    entry = swept["configurations"][name]
    assert entry["seeds"] == [0, 3] and entry["grid_values"] == {"loss.schedule": "constant", "loss.alpha": 0.5}
    assert entry["metrics"]["final_accuracy"]["values"] == pytest.approx([0.55, 0.58])
    run = swept["runs"][name]["3"]
    assert run["metrics"]["final_accuracy"] == pytest.approx(0.58) and run["reused"] is False
    assert run["output_dir"] == str(base / name / "seed3") and run["accuracy_after_each_task"][-1] == pytest.approx(
        0.58
    )
    assert swept["grid"] == {"loss.schedule": ["constant"], "loss.alpha": ["0.0", "0.5"]} and swept["seeds"] == [0, 3]
    assert "run 4/4: loss.schedule=constant,loss.alpha=0.5 seed=3" in logged[6]


def test_run_sweep_checks_every_config_before_the_first_run(base_cfg):
    def never(cfg):
        raise AssertionError("run_one must not be called")

    # loss.alpha=null is fine for the sigmoid schedule but not for the constant one
    with pytest.raises(ConfigError, match="the constant schedule needs loss.alpha"):
        run_sweep(base_cfg, {"loss.schedule": ["sigmoid", "constant"]}, [0], never, log=lambda _: None)
    with pytest.raises(ConfigError, match="unknown key loss.alhpa"):
        run_sweep(base_cfg, {"loss.alhpa": [0.5]}, [0], never, log=lambda _: None)
    with pytest.raises(ConfigError, match="sweep.seeds: seeds must be distinct"):
        run_sweep(base_cfg, {"loss.name": ["ce"]}, [1, 1], never, log=lambda _: None)


def test_finished_runs_are_read_back_not_run_again(base_cfg):
    calls = []
    grid = {"loss.schedule": ["constant"], "loss.alpha": [0.2, 0.7]}
    first = run_sweep(base_cfg, grid, [0, 1], fake_runs(calls, write=True), log=lambda _: None)
    assert len(calls) == 4
    again_calls = []
    again = run_sweep(
        base_cfg,
        {**grid, "loss.alpha": [0.2, 0.7, 1.0]},
        [0, 1],
        fake_runs(again_calls, write=True),
        log=lambda _: None,
    )
    assert [(c.loss.alpha, c.run.seed) for c in again_calls] == [(1.0, 0), (1.0, 1)]  # only the new ones
    name = "loss.schedule=constant,loss.alpha=0.7"
    assert again["configurations"][name]["metrics"] == first["configurations"][name]["metrics"]
    assert (
        again["runs"][name]["1"]["reused"] is True
        and again["runs"]["loss.schedule=constant,loss.alpha=1.0"]["1"]["reused"] is False
    )


def test_a_finished_run_of_another_config_is_an_error(base_cfg):
    run_sweep(base_cfg, {"loss.name": ["ce"]}, [0], fake_runs([], write=True), log=lambda _: None)
    changed = load_config(
        None, ["optim.epochs=3", "optim.peft_frozen_epochs=1", f"run.output_dir={base_cfg.run.output_dir}"]
    )
    with pytest.raises(ConfigError, match=r"summary of another config \(optim.epochs: 2 -> 3\)"):
        run_sweep(changed, {"loss.name": ["ce"]}, [0], fake_runs([]), log=lambda _: None)


def test_write_sweep_outputs(tmp_path, base_cfg):
    swept = run_sweep(base_cfg, {"loss.name": ["ce", "aepg"]}, [0, 1], fake_runs([]), log=lambda _: None)
    paths = write_sweep_outputs(tmp_path, swept)
    record = json.loads(paths["json"].read_text())
    assert set(record["runs"]) == set(record["configurations"]) == {"loss.name=ce", "loss.name=aepg"}
    assert format_compare_table(record) == format_compare_table(swept) == paths["table"].read_text().rstrip("\n")
    assert "| configuration " in paths["table"].read_text() and paths["plot"].is_file()
