"""A run's outputs (report.py) on hand-made, self-consistent summaries (no training)."""

import json
import math

import pytest

from aepg_kernels.train import AccuracyMatrix, config_to_dict, load_config, metrics
from aepg_kernels.train.report import (
    METRIC_DEFINITIONS,
    final_epoch_entropy,
    format_run_summary,
    run_metrics,
    write_run_outputs,
)
from aepg_kernels.utils import new_figure, save_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ACCURACIES = {  # (t, i): R[t][i], fractions
    (0, 0): 0.90,
    (1, 0): 0.70,
    (1, 1): 0.80,
    (2, 0): 0.60,
    (2, 1): 0.75,
    (2, 2): 0.85,
}
ENTROPY = {(0, 0): 0.9, (0, 1): 0.5, (1, 0): 0.8, (1, 1): 0.4, (2, 0): 0.7, (2, 1): 0.3}  # (task, epoch)


def make_summary(accuracies=ACCURACIES, num_tasks=3, epochs=2, loss="ce"):
    matrix = AccuracyMatrix(num_tasks)
    for (t, i), acc in accuracies.items():
        matrix.record(t, i, acc)
    history = [
        {
            "task": t,
            "epoch": e,
            "peft_trainable": not (t > 0 and e == 0),
            "loss": 1.0 / (e + 1),
            "entropy": ENTROPY.get((t, e), 0.5),
            "sample_weight": 0.2 + 0.1 * e,
            "alpha": math.nan if loss != "aepg" else 0.5,
        }
        for t in range(num_tasks)
        for e in range(epochs)
    ]
    return {
        **matrix.summary(),
        "scenario": {"class_order": [3, 1, 0, 2, 5, 4], "task_sizes": [2] * num_tasks},
        "trainable_parameters_per_task": [100] * num_tasks,
        "history": history,
    }


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, ["loss.name=ce", "optim.lr=1e-3", f"run.output_dir={tmp_path}"])


def test_final_epoch_entropy_is_the_mean_over_tasks_of_each_last_epoch():
    assert final_epoch_entropy(make_summary()["history"]) == pytest.approx((0.5 + 0.4 + 0.3) / 3)
    assert math.isnan(final_epoch_entropy([]))


def test_run_metrics_are_metrics_functions_of_the_matrix():
    summary = make_summary()
    R = summary["accuracy_matrix"]
    values = run_metrics(summary)
    assert values["final_accuracy"] == metrics.final_accuracy(R) == pytest.approx((0.60 + 0.75 + 0.85) / 3)
    assert values["average_incremental_accuracy"] == metrics.average_incremental_accuracy(R)
    assert values["forgetting_max_based"] == metrics.forgetting(R) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.75)) / 2)
    assert values["backward_transfer"] == metrics.backward_transfer(R)
    assert set(values) <= set(METRIC_DEFINITIONS)
    assert set(values) - {"final_epoch_entropy"} <= set(metrics.summarize(R))  # the same names as metrics.py


def test_write_run_outputs_writes_every_file(tmp_path, cfg):
    paths = write_run_outputs(tmp_path / "run", cfg, make_summary(), {"normalization": {"mean": [0.5]}})
    assert set(paths) == {"summary", "config", "accuracy_matrix", "accuracy_per_task", "entropy"}
    assert all(path.parent == tmp_path / "run" and path.is_file() for path in paths.values())


def test_summary_json_round_trips_with_named_metrics(tmp_path, cfg):
    summary = make_summary(loss="ce")
    extra = {
        "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "train_transform": "RandomResizedCrop(scale=(0.05, 1.0)) + flip",
    }
    path = write_run_outputs(tmp_path, cfg, summary, extra)["summary"]
    text = path.read_text()

    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    record = json.loads(text, parse_constant=reject)  # strict JSON: NaN written as null
    R = summary["accuracy_matrix"]
    assert record["metrics"]["final_accuracy"] == metrics.final_accuracy(R)
    assert record["metrics"]["average_incremental_accuracy"] == metrics.average_incremental_accuracy(R)
    assert record["metrics"]["forgetting_max_based"] == metrics.forgetting(R)
    assert record["metrics"]["backward_transfer"] == metrics.backward_transfer(R)
    assert record["metrics"]["final_epoch_entropy"] == final_epoch_entropy(summary["history"])
    assert set(record["metric_definitions"]) >= set(record["metrics"])
    assert "Max-based" in record["metric_definitions"]["forgetting_max_based"]
    # the unmeasured upper triangle is null; every measured entry is as recorded
    assert record["accuracy_matrix"] == [[None if i > t else ACCURACIES[t, i] for i in range(3)] for t in range(3)]
    assert record["accuracy_after_each_task"] == metrics.accuracy_after_each_task(R)
    assert record["scenario"]["class_order"] == [3, 1, 0, 2, 5, 4]
    assert record["history"] == [{**h, "alpha": None} for h in summary["history"]]  # alpha NaN (not aepg)
    assert set(record["history_fields"]) == set(summary["history"][0])
    assert record["run_info"] == extra
    assert record["config"] == config_to_dict(cfg)
    assert set(record["versions"]) >= {"aepg_kernels", "torch", "timm"} and record["versions"]["torch"]
    assert record["created_utc"].startswith("20")


def test_config_yaml_loads_back_to_the_same_config(tmp_path, cfg):
    path = write_run_outputs(tmp_path, cfg, make_summary(), {})["config"]
    assert load_config(str(path)) == cfg


def test_plots_are_png_files_with_content(tmp_path, cfg):
    paths = write_run_outputs(tmp_path, cfg, make_summary(), {})
    # "Non-trivial": larger than an empty figure saved the same way (axes, no data).
    figure, _ = new_figure()
    save_figure(figure, tmp_path / "empty.png")
    empty_size = (tmp_path / "empty.png").stat().st_size
    for name in ("accuracy_matrix", "accuracy_per_task", "entropy"):
        data = paths[name].read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > empty_size, (name, len(data), empty_size)


def test_single_task_run_writes_null_forgetting(tmp_path, cfg):
    summary = make_summary({(0, 0): 0.5}, num_tasks=1)
    record = json.loads(write_run_outputs(tmp_path, cfg, summary, {})["summary"].read_text())
    assert record["metrics"]["forgetting_max_based"] is None and record["metrics"]["backward_transfer"] is None
    assert "forgetting (max) n/a%" in format_run_summary(summary)


def test_format_run_summary_shows_matrix_and_metrics_in_percent():
    summary = make_summary()
    text = format_run_summary(summary)
    R = summary["accuracy_matrix"]
    for t in range(3):
        for i in range(t + 1):
            assert f"{100 * ACCURACIES[t, i]:.2f}" in text
    assert f"final accuracy A_T {100 * metrics.final_accuracy(R):.2f}%" in text
    assert f"avg. incremental acc. {100 * metrics.average_incremental_accuracy(R):.2f}%" in text
    assert f"forgetting (max) {100 * metrics.forgetting(R):.2f}%" in text
    assert f"BWT {100 * metrics.backward_transfer(R):.2f}%" in text
    assert "nan" not in text.lower()  # the unmeasured triangle is left blank
