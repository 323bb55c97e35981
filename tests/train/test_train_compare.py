"""`compare` mode (compare.py): configs per loss x seed, aggregation, table, outputs; no training."""

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from aepg_kernels.train import AccuracyMatrix, ConfigError, load_config, metrics
from aepg_kernels.train.compare import aggregate, format_compare_table, mean_and_std, run_compare, write_compare_outputs
from aepg_kernels.train.losses import LOSS_NAMES
from aepg_kernels.utils import new_figure, save_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def two_task_summary(r00, r10, r11, last_entropies=(0.5, 0.5)):
    """A 2-task run: R = [[r00, -], [r10, r11]], one epoch per task with the given entropies."""
    matrix = AccuracyMatrix(2)
    for (t, i), acc in {(0, 0): r00, (1, 0): r10, (1, 1): r11}.items():
        matrix.record(t, i, acc)
    history = [
        {
            "task": t,
            "epoch": 0,
            "peft_trainable": True,
            "loss": 1.0,
            "entropy": h,
            "sample_weight": 0.5,
            "alpha": math.nan,
        }
        for t, h in enumerate(last_entropies)
    ]
    return {**matrix.summary(), "history": history}


# Known per-seed values: final accuracy (r10 + r11) / 2 is 0.70, 0.80, 0.90 for CE.
RESULTS = {
    "ce": {
        0: two_task_summary(0.9, 0.6, 0.8, (0.4, 0.2)),
        1: two_task_summary(0.8, 0.7, 0.9, (0.4, 0.4)),
        2: two_task_summary(1.0, 0.8, 1.0, (0.4, 0.6)),
    },
    "aepg": {0: two_task_summary(0.9, 0.9, 0.9), 1: two_task_summary(0.9, 0.85, 0.95)},
}


@pytest.fixture
def base_cfg(tmp_path):
    return load_config(
        None, ["optim.lr=1e-3", "optim.epochs=2", "optim.peft_frozen_epochs=1", f"run.output_dir={tmp_path / 'cmp'}"]
    )


def test_mean_and_std_match_numpy_and_statistics():
    values = [0.7, 0.8, 0.9]
    stat = mean_and_std(values)
    assert stat["mean"] == pytest.approx(np.mean(values)) == pytest.approx(0.8)
    assert stat["std"] == pytest.approx(np.std(values, ddof=1)) == pytest.approx(statistics.stdev(values))
    assert stat["std"] == pytest.approx(0.1)  # sample std (ddof=1); the population std would be 0.0816
    assert stat["values"] == values
    single = mean_and_std([0.42])
    assert single["mean"] == 0.42 and math.isnan(single["std"])  # undefined for one seed


def test_aggregate_per_metric_per_loss():
    aggregated = aggregate(RESULTS)
    assert list(aggregated["losses"]) == ["ce", "aepg"]
    ce = aggregated["losses"]["ce"]
    assert ce["seeds"] == [0, 1, 2]
    for name, function in [
        ("final_accuracy", metrics.final_accuracy),
        ("average_incremental_accuracy", metrics.average_incremental_accuracy),
        ("forgetting_max_based", metrics.forgetting),
        ("backward_transfer", metrics.backward_transfer),
    ]:
        values = [function(s["accuracy_matrix"]) for s in RESULTS["ce"].values()]
        assert ce["metrics"][name]["values"] == pytest.approx(values), name
        assert ce["metrics"][name]["mean"] == pytest.approx(np.mean(values)), name
        assert ce["metrics"][name]["std"] == pytest.approx(np.std(values, ddof=1)), name
    assert ce["metrics"]["final_accuracy"]["mean"] == pytest.approx(0.8)
    assert ce["metrics"]["final_accuracy"]["std"] == pytest.approx(0.1)
    # final-epoch entropy: per seed the mean of the tasks' last epochs (0.3, 0.4, 0.5)
    assert ce["metrics"]["final_epoch_entropy"]["values"] == pytest.approx([0.3, 0.4, 0.5])
    assert ce["metrics"]["final_epoch_entropy"]["std"] == pytest.approx(0.1)
    # accuracy after each task, per task across seeds: A_0 = r00, A_1 = (r10 + r11) / 2
    curve = ce["accuracy_after_each_task"]
    assert curve["mean"] == pytest.approx([0.9, 0.8])
    assert curve["std"] == pytest.approx([np.std([0.9, 0.8, 1.0], ddof=1), 0.1])
    assert "ddof=1" in aggregated["std_definition"]


def test_aggregate_rejects_runs_with_different_task_counts():
    one_task = AccuracyMatrix(1)
    one_task.record(0, 0, 0.5)
    with pytest.raises(ValueError, match="loss ce: .*different numbers of tasks"):
        aggregate({"ce": {0: RESULTS["ce"][0], 1: {**one_task.summary(), "history": []}}})


def test_table_has_every_loss_and_formatted_means():
    aggregated = aggregate(RESULTS)
    table = format_compare_table(aggregated)
    lines = table.splitlines()
    for loss, entry in aggregated["losses"].items():
        (row,) = [line for line in lines if line.startswith(f"| {loss} ")]
        for name in ("final_accuracy", "average_incremental_accuracy", "forgetting_max_based", "backward_transfer"):
            stat = entry["metrics"][name]
            assert f"{100 * stat['mean']:.2f} +- {100 * stat['std']:.2f}" in row, (loss, name)
        entropy = entry["metrics"]["final_epoch_entropy"]
        assert f"{entropy['mean']:.3f} +- {entropy['std']:.3f}" in row
    assert "80.00 +- 10.00" in table  # CE's final accuracy, from the known values
    header = next(line for line in lines if line.startswith("| loss"))
    assert all(label in header for label in ("final accuracy A_T", "avg. incremental acc.", "forgetting (max)", "BWT"))


def test_table_with_one_seed_shows_means_without_a_spread():
    table = format_compare_table(aggregate({"ce": {7: RESULTS["ce"][0]}}))
    row = next(line for line in table.splitlines() if line.startswith("| ce "))
    assert "70.00" in row and "+-" not in row and "nan" not in row.lower()


def test_run_compare_runs_every_loss_and_seed_with_its_own_config(base_cfg):
    calls = []

    def fake_run_one(cfg):
        calls.append(cfg)
        return RESULTS["ce"][cfg.run.seed % 3]

    logged = []
    aggregated = run_compare(base_cfg, ["ce", "aepg"], [0, 5], fake_run_one, log=logged.append)
    assert [(c.loss.name, c.run.seed) for c in calls] == [("ce", 0), ("ce", 5), ("aepg", 0), ("aepg", 5)]
    base = Path(base_cfg.run.output_dir)
    assert [Path(c.run.output_dir) for c in calls] == [
        base / "ce/seed0",
        base / "ce/seed5",
        base / "aepg/seed0",
        base / "aepg/seed5",
    ]
    for c in calls:  # everything else is the base config's
        assert (c.optim, c.model, c.peft, c.data, c.scenario) == (
            base_cfg.optim,
            base_cfg.model,
            base_cfg.peft,
            base_cfg.data,
            base_cfg.scenario,
        )
        assert c.loss.schedule == base_cfg.loss.schedule and c.run.device == base_cfg.run.device
    assert base_cfg.loss.name == "aepg" and base_cfg.run.seed == 0 and Path(base_cfg.run.output_dir) == base
    assert calls[0].model is not calls[1].model  # copies: one run cannot change another's config
    assert aggregated["losses"]["ce"]["seeds"] == [0, 5]
    assert aggregated["output_dirs"]["aepg"]["5"] == str(base / "aepg/seed5")
    assert len(logged) == 8 and "run 3/4: aepg seed=0" in logged[4]


@pytest.mark.parametrize(
    "losses, seeds, message",
    [
        (["ce", "entropy"], [0], "compare.losses: unknown loss 'entropy'; valid losses: " + ", ".join(LOSS_NAMES)),
        (["ce", "ce"], [0], r"compare.losses: each loss once"),
        ([], [0], "compare.losses: give at least one loss"),
        (["ce"], [0, 1, 0], r"compare.seeds: seeds must be distinct, \[0\] repeated"),
        (["ce"], [], "compare.seeds: give at least one seed"),
        (["ce"], [0, "1"], "compare.seeds: seeds must be integers"),
    ],
)
def test_run_compare_rejects_bad_arguments_before_any_run(base_cfg, losses, seeds, message):
    def never(cfg):
        raise AssertionError("run_one must not be called")

    with pytest.raises(ConfigError, match=message):
        run_compare(base_cfg, losses, seeds, never, log=lambda _: None)


def test_write_compare_outputs(tmp_path):
    aggregated = aggregate(RESULTS)
    paths = write_compare_outputs(tmp_path, aggregated)
    assert set(paths) == {"json", "table", "plot"}
    record = json.loads(paths["json"].read_text())
    assert record["losses"]["ce"]["metrics"]["final_accuracy"]["mean"] == pytest.approx(0.8)
    assert record["losses"]["aepg"]["seeds"] == [0, 1]
    assert paths["table"].read_text() == format_compare_table(aggregated) + "\n"
    assert format_compare_table(record) == format_compare_table(aggregated)  # the JSON is enough to redo the table
    data = paths["plot"].read_bytes()
    figure, _ = new_figure()  # "non-trivial": larger than an empty figure (axes, no data) saved the same way
    save_figure(figure, tmp_path / "empty.png")
    assert data.startswith(PNG_SIGNATURE) and len(data) > (tmp_path / "empty.png").stat().st_size
