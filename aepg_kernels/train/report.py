"""A run's outputs: `summary.json`, `config.yaml` and three PNG plots, plus a few terminal lines.

The metrics are recomputed from the accuracy matrix with `metrics.py` (the one place their formulas
live) and stored under their full names with a definition taken from each function's docstring,
so a reader of the JSON never has to guess which "average" a number is. Files are written with
`aepg_kernels.utils` (atomically; strict JSON, where NaN, an unmeasured or undefined value, is
null; figures on their own Agg canvas).
"""

from __future__ import annotations

import datetime
import inspect
import math
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import aepg_kernels

from . import metrics
from .config import config_to_dict, config_to_yaml

SUMMARY_FILE, CONFIG_FILE, NOISE_FILE = "summary.json", "config.yaml", "noise.json"
MATRIX_PLOT, PER_TASK_PLOT, ENTROPY_PLOT = "accuracy_matrix.png", "accuracy_per_task.png", "entropy.png"

# The accuracy metrics under their JSON names (those of metrics.summarize), with their functions.
ACCURACY_METRICS: Dict[str, Callable] = {
    "final_accuracy": metrics.final_accuracy,
    "average_incremental_accuracy": metrics.average_incremental_accuracy,
    "forgetting_max_based": metrics.forgetting,
    "backward_transfer": metrics.backward_transfer,
}
FINAL_EPOCH_ENTROPY = "final_epoch_entropy"
METRIC_LABELS = {  # short column / legend labels
    "final_accuracy": "final accuracy A_T",
    "average_incremental_accuracy": "avg. incremental acc.",
    "forgetting_max_based": "forgetting (max)",
    "backward_transfer": "BWT",
    FINAL_EPOCH_ENTROPY: "final-epoch entropy",
}

ACCURACY_MATRIX_DEFINITION = (
    "R[t][i]: accuracy on task i's test set after training tasks 0..t, argmax over "
    "every class seen so far; null where i > t (not measured)"
)
HISTORY_FIELDS = {
    "task": "task index (0-based)",
    "epoch": "epoch within the task (0-based)",
    "peft_trainable": "false in the head-only epochs (PEFT frozen)",
    "loss": "mean training loss over the epoch's samples",
    "entropy": "mean over the epoch's training samples of the prediction entropy over the current task's "
    "classes, in nats (natural log)",
    "sample_weight": "mean over the epoch's training samples of the factor of (p - e_y) in the loss gradient",
    "alpha": "mean aEPG alpha over the epoch's samples (null for other losses)",
}
UNITS = "accuracies and accuracy metrics are fractions in [0, 1] (x100 for %); entropy in nats"


def _definition(function: Callable) -> str:
    """The first paragraph of a docstring, on one line."""
    return " ".join(inspect.getdoc(function).split("\n\n")[0].split())


def final_epoch_entropy(history: Sequence[Mapping]) -> float:
    """Mean over tasks of the mean training-prediction entropy (nats) in each task's last epoch:
    how confident the model is on its current task when it stops training it. NaN without history."""
    last_epoch: Dict[int, float] = {}
    for record in history:  # in training order, so each task's last record wins
        last_epoch[record["task"]] = record["entropy"]
    return sum(last_epoch.values()) / len(last_epoch) if last_epoch else math.nan


METRIC_DEFINITIONS = {
    "accuracy_after_each_task": _definition(metrics.accuracy_after_each_task),
    **{name: _definition(f) for name, f in ACCURACY_METRICS.items()},
    FINAL_EPOCH_ENTROPY: _definition(final_epoch_entropy),
}


def run_metrics(summary: Mapping) -> Dict[str, float]:
    """The named metrics of a `ContinualTrainer.fit` summary: the accuracy metrics recomputed from its
    accuracy matrix, and the final-epoch entropy from its history."""
    R = summary["accuracy_matrix"]
    values = {name: float(f(R)) for name, f in ACCURACY_METRICS.items()}
    values[FINAL_EPOCH_ENTROPY] = final_epoch_entropy(summary.get("history", []))
    return values


def summary_record(cfg, summary: Mapping, extra_info: Mapping) -> dict:
    """Everything `summary.json` holds, as plain JSON values."""
    known = {"accuracy_matrix", "accuracy_after_each_task", *ACCURACY_METRICS}
    rest = {k: v for k, v in summary.items() if k not in known}  # scenario, history, timing, ...
    record = {
        "metrics": run_metrics(summary),
        "metric_definitions": METRIC_DEFINITIONS,
        "units": UNITS,
        "accuracy_matrix": summary["accuracy_matrix"],
        "accuracy_matrix_definition": ACCURACY_MATRIX_DEFINITION,
        "accuracy_after_each_task": metrics.accuracy_after_each_task(summary["accuracy_matrix"]),
        **rest,
        "history_fields": HISTORY_FIELDS,
        "run_info": dict(extra_info),
        "config": config_to_dict(cfg),
        "versions": aepg_kernels.utils.environment("timm"),  # timm looked up, not imported: it is slow to import
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return aepg_kernels.utils.to_jsonable(record, "summary")


def write_run_outputs(
    output_dir, cfg, summary: Mapping, extra_info: Optional[Mapping] = None, label_noise: Optional[Mapping] = None
) -> Dict[str, Path]:
    """Writes summary.json, config.yaml and the three plots into `output_dir` (created if needed),
    and noise.json (the flipped training labels) when `label_noise` is given; returns their paths by
    name ("summary", "config", "accuracy_matrix", "accuracy_per_task", "entropy", "label_noise")."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "summary": out / SUMMARY_FILE,
        "config": out / CONFIG_FILE,
        "accuracy_matrix": out / MATRIX_PLOT,
        "accuracy_per_task": out / PER_TASK_PLOT,
        "entropy": out / ENTROPY_PLOT,
    }
    record = summary_record(cfg, summary, extra_info or {})
    aepg_kernels.utils.write_json(paths["summary"], record, "summary")
    aepg_kernels.utils.write_text(paths["config"], config_to_yaml(cfg))
    if label_noise is not None:
        paths["label_noise"] = out / NOISE_FILE
        aepg_kernels.utils.write_json(paths["label_noise"], label_noise, "label_noise")
    R = summary["accuracy_matrix"]
    plot_accuracy_matrix(R, paths["accuracy_matrix"])
    plot_accuracy_per_task(R, paths["accuracy_per_task"])
    plot_entropy(summary.get("history", []), paths["entropy"])
    return paths


# ---------------------------------------------------------------------------------------------
# terminal


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def format_run_summary(summary: Mapping) -> str:
    """The accuracy matrix and the four accuracy metrics in %, a few lines for the terminal."""
    R = summary["accuracy_matrix"]
    T = len(R)
    lines = [
        "accuracy matrix R[t][i] (%): row t = after training task t, column i = task i",
        "        " + "".join(f"{f'task {i}':>9}" for i in range(T)),
    ]
    for t, row in enumerate(R):
        lines.append(f"after {t:<2}" + "".join(f"{_percent(row[i]) if i <= t else '':>9}" for i in range(T)))
    values = run_metrics(summary)
    lines.append("  ".join(f"{METRIC_LABELS[name]} {_percent(values[name])}%" for name in ACCURACY_METRICS))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# plots


def _as_percent_matrix(R: Sequence[Sequence[float]]) -> List[List[float]]:
    return [[100 * R[t][i] if i <= t else math.nan for i in range(len(R))] for t in range(len(R))]


def plot_accuracy_matrix(R: Sequence[Sequence[float]], path) -> None:
    """A heat map of R in %, values written in the cells; the unmeasured upper triangle left blank."""
    T = len(R)
    percent = _as_percent_matrix(R)
    size = 2.5 + 0.6 * T
    figure, (ax,) = aepg_kernels.utils.new_figure(size + 1, size)
    image = ax.imshow(percent, vmin=0, vmax=100, cmap="viridis")
    figure.colorbar(image, ax=ax, label="accuracy (%)")
    if T <= 20:  # beyond that the numbers no longer fit in the cells
        for t in range(T):
            for i in range(t + 1):
                if not math.isnan(percent[t][i]):
                    ax.text(
                        i,
                        t,
                        f"{percent[t][i]:.1f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if percent[t][i] < 50 else "black",
                    )
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    ax.set_xlabel("evaluated task i")
    ax.set_ylabel("after training task t")
    ax.set_title("accuracy matrix R[t][i]")
    aepg_kernels.utils.save_figure(figure, path)


def plot_accuracy_per_task(R: Sequence[Sequence[float]], path) -> None:
    """A_t (the mean over seen tasks) after each task, bold; each task's own accuracy R[t][i], thin."""
    T = len(R)
    percent = _as_percent_matrix(R)
    figure, (ax,) = aepg_kernels.utils.new_figure()
    tasks = list(range(T))
    for i in range(T):
        ax.plot(
            tasks[i:],
            [percent[t][i] for t in range(i, T)],
            marker=".",
            linewidth=0.8,
            alpha=0.6,
            label=f"task {i}" if T <= 10 else None,
        )
    A = [100 * a for a in metrics.accuracy_after_each_task(R)]
    ax.plot(tasks, A, marker="o", color="black", linewidth=2.2, label="A_t (mean over seen tasks)")
    ax.set_xticks(tasks)
    ax.set_xlabel("after training task t")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"accuracy after each task (final A_T = {A[-1]:.2f}%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    aepg_kernels.utils.save_figure(figure, path)


def plot_entropy(history: Sequence[Mapping], path) -> None:
    """Mean entropy and mean sample weight per epoch over the whole run; task boundaries dashed,
    head-only (PEFT frozen) epochs shaded."""
    figure, (ax_entropy, ax_weight) = aepg_kernels.utils.new_figure(7.5, 5.5, rows=2, sharex=True)
    from matplotlib.ticker import MaxNLocator

    epochs = list(range(len(history)))
    marker = "." if len(history) <= 100 else None  # dots would hide a long curve
    ax_entropy.plot(epochs, [r["entropy"] for r in history], marker=marker, color="tab:blue")
    ax_weight.plot(epochs, [r["sample_weight"] for r in history], marker=marker, color="tab:orange")
    ax_weight.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_entropy.set_ylabel("mean entropy (nats)")
    ax_weight.set_ylabel("mean sample weight")
    ax_weight.set_xlabel("epoch (all tasks in order)")
    for n, record in enumerate(history):
        if n > 0 and record["task"] != history[n - 1]["task"]:
            for ax in (ax_entropy, ax_weight):
                ax.axvline(n - 0.5, color="gray", linestyle="--", linewidth=0.8)
        if not record.get("peft_trainable", True):
            for ax in (ax_entropy, ax_weight):
                ax.axvspan(n - 0.5, n + 0.5, color="gray", alpha=0.12, linewidth=0)
    for ax in (ax_entropy, ax_weight):
        ax.grid(alpha=0.3)
    ax_entropy.set_title(
        "training entropy and sample weight per epoch (dashed: task boundary, shaded: PEFT frozen)", fontsize=9
    )
    if not history:
        ax_entropy.text(0.5, 0.5, "no training history", ha="center", va="center", transform=ax_entropy.transAxes)
    aepg_kernels.utils.save_figure(figure, path)
