"""`compare` mode: several losses x several seeds of one config, aggregated into mean +- std.

    aggregated = run_compare(cfg, ["ce", "aepg"], [0, 1, 2], run_one=train_and_write)
    print(format_compare_table(aggregated))
    write_compare_outputs(cfg.run.output_dir, aggregated)

Each run gets its own copy of the config with `loss.name`, `run.seed` and
`run.output_dir = <base output_dir>/<loss>/seed<seed>` replaced (the class order follows run.seed
unless scenario.order_seed pins it). The spread is the sample standard deviation over seeds
(ddof=1, as papers report it); with a single seed it is undefined: NaN in the aggregate (null in
JSON) and left out of the table.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Sequence

import numpy as np

from .config import LOSS_NAMES, ConfigError, TrainConfig, config_to_dict
from .metrics import accuracy_after_each_task
from .report import (ACCURACY_METRICS, FINAL_EPOCH_ENTROPY, METRIC_DEFINITIONS, METRIC_LABELS, UNITS, dump_json,
                     new_figure, run_metrics, save_figure)

COMPARE_JSON, COMPARE_TABLE, COMPARE_PLOT = "compare.json", "compare_table.md", "compare_accuracy.png"
TABLE_METRICS = (*ACCURACY_METRICS, FINAL_EPOCH_ENTROPY)  # the table's columns, in order
STD_DEFINITION = "sample standard deviation over seeds (ddof=1); NaN (null) for a single seed"


def check_compare_args(losses: Sequence[str], seeds: Sequence[int]) -> None:
    if not losses:
        raise ConfigError(f"compare.losses: give at least one loss of {', '.join(LOSS_NAMES)}")
    unknown = [name for name in losses if name not in LOSS_NAMES]
    if unknown:
        raise ConfigError(f"compare.losses: unknown loss {', '.join(map(repr, unknown))}; valid losses: "
                          f"{', '.join(LOSS_NAMES)}")
    if len(set(losses)) != len(losses):
        raise ConfigError(f"compare.losses: each loss once, got {list(losses)}")
    if not seeds:
        raise ConfigError("compare.seeds: give at least one seed")
    not_int = [s for s in seeds if type(s) is not int]
    if not_int:
        raise ConfigError(f"compare.seeds: seeds must be integers, got {not_int}")
    if len(set(seeds)) != len(seeds):
        duplicates = sorted({s for s in seeds if list(seeds).count(s) > 1})
        raise ConfigError(f"compare.seeds: seeds must be distinct, {duplicates} repeated in {list(seeds)}")


def run_config(base_cfg: TrainConfig, loss: str, seed: int) -> TrainConfig:
    """`base_cfg` with this loss, seed and output directory; a deep copy, so runs share no state.
    `dataclasses.replace` re-runs each section's checks."""
    cfg = copy.deepcopy(base_cfg)
    output_dir = Path(base_cfg.run.output_dir) / loss / f"seed{seed}"
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, name=loss),
                               run=dataclasses.replace(cfg.run, seed=seed, output_dir=str(output_dir)))


def run_compare(base_cfg: TrainConfig, losses: Sequence[str], seeds: Sequence[int],
                run_one: Callable[[TrainConfig], dict], log: Callable[[str], None] = print) -> dict:
    """Calls `run_one(cfg)` (which trains and returns `ContinualTrainer.fit`'s summary) for every loss
    and seed, in that order, and returns `aggregate` of the summaries plus each run's output dir."""
    check_compare_args(losses, seeds)
    configs = {(loss, seed): run_config(base_cfg, loss, seed) for loss in losses for seed in seeds}
    results: Dict[str, Dict[int, dict]] = {loss: {} for loss in losses}
    for n, ((loss, seed), cfg) in enumerate(configs.items(), start=1):
        log(f"compare: run {n}/{len(configs)}: loss={loss} seed={seed} -> {cfg.run.output_dir}")
        results[loss][seed] = run_one(cfg)
        values = run_metrics(results[loss][seed])
        log(f"compare: loss={loss} seed={seed}: " + ", ".join(
            f"{METRIC_LABELS[name]} {100 * values[name]:.2f}%" for name in ACCURACY_METRICS))
    aggregated = aggregate(results)
    aggregated["output_dirs"] = {loss: {str(seed): configs[loss, seed].run.output_dir for seed in seeds}
                                 for loss in losses}
    aggregated["base_config"] = config_to_dict(base_cfg)
    return aggregated


def mean_and_std(values: Sequence[float]) -> Dict[str, object]:
    """Mean and sample std (ddof=1; NaN for one value) over seeds, with the values themselves."""
    array = np.asarray(values, dtype=float)
    std = float(np.std(array, ddof=1)) if len(array) > 1 else math.nan
    return {"mean": float(np.mean(array)), "std": std, "values": array.tolist()}


def _curve_mean_and_std(curves: List[List[float]], loss: str) -> Dict[str, object]:
    if len({len(c) for c in curves}) > 1:
        raise ValueError(f"loss {loss}: the seeds' runs have different numbers of tasks {[len(c) for c in curves]}")
    array = np.asarray(curves, dtype=float)  # seeds x tasks
    std = np.std(array, axis=0, ddof=1) if len(array) > 1 else np.full(array.shape[1], math.nan)
    return {"mean": np.mean(array, axis=0).tolist(), "std": std.tolist(), "values": array.tolist()}


def aggregate(results: Mapping[str, Mapping[int, Mapping]]) -> dict:
    """`{loss: {seed: fit summary}}` -> per loss: the seeds, and mean / std / per-seed values of each
    named metric and of the accuracy after each task."""
    losses = {}
    for loss, by_seed in results.items():
        if not by_seed:
            raise ValueError(f"loss {loss}: no runs to aggregate")
        per_seed = [run_metrics(summary) for summary in by_seed.values()]
        losses[loss] = {
            "seeds": list(by_seed),
            "metrics": {name: mean_and_std([v[name] for v in per_seed]) for name in TABLE_METRICS},
            "accuracy_after_each_task": _curve_mean_and_std(
                [accuracy_after_each_task(s["accuracy_matrix"]) for s in by_seed.values()], loss),
        }
    return {"losses": losses, "std_definition": STD_DEFINITION, "units": UNITS,
            "metric_definitions": {name: METRIC_DEFINITIONS[name] for name in TABLE_METRICS}}


def _mean_pm_std(stat: Mapping, scale: float, digits: int) -> str:
    mean, std = stat["mean"], stat["std"]
    if mean is None or math.isnan(mean):
        return "n/a"
    text = f"{scale * mean:.{digits}f}"
    return text if std is None or math.isnan(std) else f"{text} +- {scale * std:.{digits}f}"


def format_compare_table(aggregated: Mapping) -> str:
    """A Markdown table: one row per loss, columns final accuracy A_T, average incremental accuracy,
    forgetting (max-based), BWT (mean +- std in %) and the final-epoch entropy (nats)."""
    losses = aggregated["losses"]
    seeds = sorted({seed for entry in losses.values() for seed in entry["seeds"]})
    counts = sorted({len(entry["seeds"]) for entry in losses.values()})
    header = ["loss", *(f"{METRIC_LABELS[name]} (%)" for name in ACCURACY_METRICS),
              f"{METRIC_LABELS[FINAL_EPOCH_ENTROPY]} (nats)"]
    rows = [[loss, *(_mean_pm_std(entry["metrics"][name], 100, 2) for name in ACCURACY_METRICS),
             _mean_pm_std(entry["metrics"][FINAL_EPOCH_ENTROPY], 1, 3)] for loss, entry in losses.items()]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]

    def line(cells):
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    caption = (f"{'/'.join(map(str, counts))} seed(s) per loss (seeds {seeds}); mean +- {STD_DEFINITION}; "
               "metrics are means over tasks")
    return "\n".join([caption, "", line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *map(line, rows)])


def plot_compare(aggregated: Mapping, path) -> None:
    """The accuracy after each task per loss: mean line, mean +- std band (when there are several seeds)."""
    figure, (ax,) = new_figure()
    for loss, entry in aggregated["losses"].items():
        curve = entry["accuracy_after_each_task"]
        mean = 100 * np.asarray(curve["mean"], dtype=float)
        std = 100 * np.asarray([math.nan if s is None else s for s in curve["std"]], dtype=float)
        tasks = np.arange(len(mean))
        (line,) = ax.plot(tasks, mean, marker="o", label=f"{loss} (A_T {mean[-1]:.2f}%, n={len(entry['seeds'])})")
        if np.isfinite(std).all():
            ax.fill_between(tasks, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xticks(tasks)
    ax.set_xlabel("after training task t")
    ax.set_ylabel("accuracy A_t over seen tasks (%)")
    ax.set_title("accuracy after each task (mean +- sample std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(figure, path)


def write_compare_outputs(output_dir, aggregated: Mapping) -> Dict[str, Path]:
    """compare.json (everything, strict JSON), compare_table.md and compare_accuracy.png in `output_dir`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / COMPARE_JSON, "table": out / COMPARE_TABLE, "plot": out / COMPARE_PLOT}
    paths["json"].write_text(dump_json(aggregated, "aggregated"))
    paths["table"].write_text(format_compare_table(aggregated) + "\n")
    plot_compare(aggregated, paths["plot"])
    return paths
