"""`compare` and `sweep` modes: configurations x seeds of one base config, paired by seed, aggregated
into mean +- std.

    aggregated = run_compare(cfg, ["ce", "aepg"], [0, 1, 2], run_one=train_and_write)
    print(format_compare_table(aggregated))
    write_compare_outputs(cfg.run.output_dir, aggregated)
    swept = run_sweep(cfg, {"loss.name": ["ce", "aepg"], "data.label_noise": [0, 0.2]}, range(10), train_and_write)

A configuration is a list of `section.key=value` overrides of the base config: compare's are
`loss.name=<loss>`, named by the loss; sweep's are one point of the cartesian product of a grid,
named by its values (`loss.name=aepg,data.label_noise=0.2`). Each run gets its own copy of the config
with those overrides, `run.seed` and `run.output_dir = <base output_dir>/<name>/seed<seed>`.

Paired by seed: every seeded draw of a run (the class order unless scenario.order_seed pins it,
the PEFT initialisation, the heads, the batch order, each sample's augmentation, the label noise)
derives from run.seed alone, so the configurations of one seed differ only in what they override.
Resumable: a run whose output dir holds the summary.json of the same config is read back, not run
again; an unfinished one resumes from its checkpoint (run.resume).

The spread is the sample standard deviation over seeds (ddof=1, as papers report it); with a single
seed it is undefined: NaN in the aggregate (null in JSON) and left out of the table.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

import aepg_kernels

from .checkpoint import config_differences
from .config import ConfigError, TrainConfig, config_to_dict, parse_overrides, with_overrides
from .losses import LOSS_NAMES
from .metrics import accuracy_after_each_task
from .report import (
    ACCURACY_METRICS,
    FINAL_EPOCH_ENTROPY,
    METRIC_DEFINITIONS,
    METRIC_LABELS,
    SUMMARY_FILE,
    UNITS,
    run_metrics,
)

COMPARE_JSON, COMPARE_TABLE, COMPARE_PLOT = "compare.json", "compare_table.md", "compare_accuracy.png"
SWEEP_JSON, SWEEP_TABLE, SWEEP_PLOT = "sweep.json", "sweep_table.md", "sweep_accuracy.png"
TABLE_METRICS = (*ACCURACY_METRICS, FINAL_EPOCH_ENTROPY)  # the table's columns, in order
STD_DEFINITION = "sample standard deviation over seeds (ddof=1); NaN (null) for a single seed"
# Set by the runner once the demo's backbone is pretrained: a finished run's summary holds them resolved.
RESOLVED_WEIGHT_KEYS = ("model.pretrained", "model.checkpoint")

RunOne = Callable[[TrainConfig], dict]


def check_seeds(seeds: Sequence[int], mode: str = "compare") -> None:
    if not seeds:
        raise ConfigError(f"{mode}.seeds: give at least one seed")
    not_int = [s for s in seeds if type(s) is not int]
    if not_int:
        raise ConfigError(f"{mode}.seeds: seeds must be integers, got {not_int}")
    if len(set(seeds)) != len(seeds):
        duplicates = sorted({s for s in seeds if list(seeds).count(s) > 1})
        raise ConfigError(f"{mode}.seeds: seeds must be distinct, {duplicates} repeated in {list(seeds)}")


def check_compare_args(losses: Sequence[str], seeds: Sequence[int]) -> None:
    if not losses:
        raise ConfigError(f"compare.losses: give at least one loss of {', '.join(LOSS_NAMES)}")
    unknown = [name for name in losses if name not in LOSS_NAMES]
    if unknown:
        raise ConfigError(
            f"compare.losses: unknown loss {', '.join(map(repr, unknown))}; valid losses: {', '.join(LOSS_NAMES)}"
        )
    if len(set(losses)) != len(losses):
        raise ConfigError(f"compare.losses: each loss once, got {list(losses)}")
    check_seeds(seeds)


def run_config(base_cfg: TrainConfig, name: str, overrides: Sequence[str], seed: int) -> TrainConfig:
    """A new config: `base_cfg` with the configuration's overrides, this seed and the output directory
    `<base output_dir>/<name>/seed<seed>`; every section is checked again."""
    output_dir = Path(base_cfg.run.output_dir) / name / f"seed{seed}"
    return with_overrides(base_cfg, [*overrides, f"run.seed={seed}", f"run.output_dir={output_dir}"])


def finished_summary(cfg: TrainConfig) -> Optional[dict]:
    """The summary.json in `cfg.run.output_dir` when a run of this config finished there, else None.
    One of another config (beyond the keys a resumption may change) is an error, not reused."""
    path = Path(cfg.run.output_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    ignored = set(RESOLVED_WEIGHT_KEYS) if cfg.model.pretrain_on is not None and not cfg.model.checkpoint else set()
    differences = [
        d for d in config_differences(summary["config"], config_to_dict(cfg)) if d.split(":")[0] not in ignored
    ]
    if differences:
        raise ConfigError(
            f"{path} is the summary of another config ({'; '.join(differences)}): remove it or "
            f"choose another run.output_dir"
        )
    # Strict JSON wrote NaN as null.
    summary["accuracy_matrix"] = [[math.nan if v is None else v for v in row] for row in summary["accuracy_matrix"]]
    return summary


def run_configurations(
    base_cfg: TrainConfig,
    configurations: Mapping[str, Sequence[str]],
    seeds: Sequence[int],
    run_one: RunOne,
    log: Callable[[str], None] = print,
    mode: str = "compare",
) -> Tuple[Dict[str, Dict[int, dict]], Dict[str, Dict[str, str]], Dict[str, List[int]]]:
    """Runs (or reads back, see `finished_summary`) every configuration for every seed, in that order.
    Returns ({name: {seed: fit summary}}, {name: {seed: output dir}}, {name: the seeds read back}).
    Every config is built, and so checked, before the first run."""
    check_seeds(seeds, mode)
    configs = {
        (name, seed): run_config(base_cfg, name, overrides, seed)
        for name, overrides in configurations.items()
        for seed in seeds
    }
    results: Dict[str, Dict[int, dict]] = {name: {} for name in configurations}
    reused: Dict[str, List[int]] = {name: [] for name in configurations}
    for n, ((name, seed), cfg) in enumerate(configs.items(), start=1):
        summary = finished_summary(cfg)
        if summary is None:
            log(f"{mode}: run {n}/{len(configs)}: {name} seed={seed} -> {cfg.run.output_dir}")
            summary = run_one(cfg)
        else:
            log(f"{mode}: run {n}/{len(configs)}: {name} seed={seed}: finished, read back from {cfg.run.output_dir}")
            reused[name].append(seed)
        results[name][seed] = summary
        values = run_metrics(summary)
        log(
            f"{mode}: {name} seed={seed}: "
            + ", ".join(f"{METRIC_LABELS[metric]} {100 * values[metric]:.2f}%" for metric in ACCURACY_METRICS)
        )
    output_dirs = {name: {str(seed): configs[name, seed].run.output_dir for seed in seeds} for name in configurations}
    return results, output_dirs, reused


def run_compare(
    base_cfg: TrainConfig,
    losses: Sequence[str],
    seeds: Sequence[int],
    run_one: RunOne,
    log: Callable[[str], None] = print,
) -> dict:
    """Calls `run_one(cfg)` (which trains and returns `ContinualTrainer.fit`'s summary) for every loss
    and seed, in that order, and returns `aggregate` of the summaries plus each run's output dir."""
    check_compare_args(losses, seeds)
    results, output_dirs, _ = run_configurations(
        base_cfg, {loss: [f"loss.name={loss}"] for loss in losses}, seeds, run_one, log
    )
    aggregated = aggregate(results)
    aggregated["output_dirs"] = output_dirs
    aggregated["base_config"] = config_to_dict(base_cfg)
    return aggregated


# ---------------------------------------------------------------------------------------------
# grids


def _value_text(value) -> str:
    """A grid value as an override reads it (YAML): true / false / null, numbers and words as written."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return str(value)


def parse_grid(items: Sequence[str]) -> Dict[str, List[str]]:
    """`["loss.name=ce,aepg", "loss.alpha=0,0.5"]` -> {"loss.name": ["ce", "aepg"], "loss.alpha": ["0", "0.5"]}
    (values as text; the overrides read them as YAML)."""
    grid: Dict[str, List[str]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        values = aepg_kernels.utils.comma_list(text)
        if not sep or not key or not values:
            raise ConfigError(f"sweep.grid: {item!r} is not of the form section.key=v1,v2,...")
        if key in grid:
            raise ConfigError(f"sweep.grid: {key} given twice")
        if len(set(values)) != len(values):
            raise ConfigError(f"sweep.grid: {key}: each value once, got {values}")
        grid[key] = values
    return grid


def grid_configurations(grid: Mapping[str, Sequence]) -> Dict[str, Dict[str, str]]:
    """The cartesian product of the grid (the last key varies fastest): {name: {key: value text}},
    each named `key=value,key=value` in the grid's order."""
    if not grid:
        raise ConfigError("sweep.grid: give at least one key=v1,v2,...")
    for key, values in grid.items():
        parse_overrides([f"{key}=0"])  # the key's form
        if not values:
            raise ConfigError(f"sweep.grid: {key} has no values")
    points = itertools.product(*([_value_text(v) for v in values] for values in grid.values()))
    configurations = {}
    for point in points:
        assignment = dict(zip(grid, point, strict=True))
        name = ",".join(f"{key}={text}" for key, text in assignment.items())
        if "/" in name:
            raise ConfigError(f"sweep.grid: {name!r}: a value may not contain '/' (it names a folder)")
        configurations[name] = assignment
    return configurations


def parse_configuration(name: str) -> Dict[str, str]:
    """A configuration written as its name, `key=value,key=value` -> {key: value text}."""
    assignment = {}
    for item in name.split(","):
        key, sep, text = item.partition("=")
        if not sep or not key or not text.strip() or key in assignment:
            raise ConfigError(f"sweep.extra: {name!r} is not of the form section.key=value,section.key=value")
        assignment[key] = text.strip()
    return assignment


def sweep_configurations(grid: Mapping[str, Sequence], extra: Sequence[str] = ()) -> Dict[str, Dict[str, str]]:
    """{name: {key: value text}}: the grid's product (`grid_configurations`), then the extra ones."""
    configurations = grid_configurations(grid) if grid or not extra else {}
    for name in extra:
        assignment = parse_configuration(name)
        configurations[",".join(f"{k}={v}" for k, v in assignment.items())] = assignment
    return configurations


def grid_values(assignment: Mapping[str, str]) -> Dict[str, object]:
    """{key: value text} -> {key: the value it sets} (read as YAML, as an override)."""
    return {key: _leaf(key, text) for key, text in assignment.items()}


def run_sweep(
    base_cfg: TrainConfig,
    grid: Mapping[str, Sequence],
    seeds: Sequence[int],
    run_one: RunOne,
    extra: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> dict:
    """Every configuration of the grid, then each `extra` one (written as a name,
    `loss.schedule=sigmoid`: one outside the product), x every seed (`run_configurations`). Returns
    the aggregate per configuration ("configurations", each with its grid values) and each run's
    metrics ("runs": output dir, the named metrics, the accuracy after each task, read back or not)."""
    configurations = sweep_configurations(grid, extra)
    overrides = {name: [f"{k}={v}" for k, v in assignment.items()] for name, assignment in configurations.items()}
    results, output_dirs, reused = run_configurations(base_cfg, overrides, seeds, run_one, log, mode="sweep")
    swept = aggregate(results, key="configurations")
    for name, entry in swept["configurations"].items():
        entry["grid_values"] = grid_values(configurations[name])
    swept["runs"] = {
        name: {
            str(seed): {
                "output_dir": output_dirs[name][str(seed)],
                "reused": seed in reused[name],
                "metrics": run_metrics(summary),
                "accuracy_after_each_task": accuracy_after_each_task(summary["accuracy_matrix"]),
            }
            for seed, summary in by_seed.items()
        }
        for name, by_seed in results.items()
    }
    swept["grid"] = {k: [_value_text(v) for v in values] for k, values in grid.items()}
    swept["extra"] = list(extra)
    swept["seeds"] = list(seeds)
    swept["base_config"] = config_to_dict(base_cfg)
    return swept


def _leaf(key: str, text: str):
    """The value `key=text` sets (read as YAML, as an override)."""
    node = parse_overrides([f"{key}={text}"])
    for part in key.split("."):
        node = node[part]
    return node


def mean_and_std(values: Sequence[float]) -> Dict[str, object]:
    """Mean and sample std (ddof=1; NaN for one value) over seeds, with the values themselves."""
    array = np.asarray(values, dtype=float)
    std = float(np.std(array, ddof=1)) if len(array) > 1 else math.nan
    return {"mean": float(np.mean(array)), "std": std, "values": array.tolist()}


def _curve_mean_and_std(curves: List[List[float]], what: str) -> Dict[str, object]:
    if len({len(c) for c in curves}) > 1:
        raise ValueError(f"{what}: the seeds' runs have different numbers of tasks {[len(c) for c in curves]}")
    array = np.asarray(curves, dtype=float)  # seeds x tasks
    std = np.std(array, axis=0, ddof=1) if len(array) > 1 else np.full(array.shape[1], math.nan)
    return {"mean": np.mean(array, axis=0).tolist(), "std": std.tolist(), "values": array.tolist()}


ENTRY_KINDS = {"losses": "loss", "configurations": "configuration"}  # aggregate's key -> what an entry is


def aggregate(results: Mapping[str, Mapping[int, Mapping]], key: str = "losses") -> dict:
    """`{name: {seed: fit summary}}` -> under `key` ("losses": compare, "configurations": sweep), per
    name: the seeds, and mean / std / per-seed values of each named metric and of the accuracy after
    each task."""
    kind = ENTRY_KINDS[key]
    entries = {}
    for name, by_seed in results.items():
        if not by_seed:
            raise ValueError(f"{kind} {name}: no runs to aggregate")
        per_seed = [run_metrics(summary) for summary in by_seed.values()]
        entries[name] = {
            "seeds": list(by_seed),
            "metrics": {metric: mean_and_std([v[metric] for v in per_seed]) for metric in TABLE_METRICS},
            "accuracy_after_each_task": _curve_mean_and_std(
                [accuracy_after_each_task(s["accuracy_matrix"]) for s in by_seed.values()], f"{kind} {name}"
            ),
        }
    return {
        key: entries,
        "std_definition": STD_DEFINITION,
        "units": UNITS,
        "metric_definitions": {name: METRIC_DEFINITIONS[name] for name in TABLE_METRICS},
    }


def entries_of(aggregated: Mapping) -> Tuple[str, Mapping[str, Mapping]]:
    """(what an entry is, the entries) of a compare or sweep aggregate."""
    key = next(k for k in ENTRY_KINDS if k in aggregated)
    return ENTRY_KINDS[key], aggregated[key]


def _mean_pm_std(stat: Mapping, scale: float, digits: int) -> str:
    mean, std = stat["mean"], stat["std"]
    if mean is None or math.isnan(mean):
        return "n/a"
    text = f"{scale * mean:.{digits}f}"
    return text if std is None or math.isnan(std) else f"{text} +- {scale * std:.{digits}f}"


def format_compare_table(aggregated: Mapping) -> str:
    """A Markdown table: one row per loss (or configuration), columns final accuracy A_T, average
    incremental accuracy, forgetting (max-based), BWT (mean +- std in %) and the final-epoch entropy (nats)."""
    kind, entries = entries_of(aggregated)
    seeds = sorted({seed for entry in entries.values() for seed in entry["seeds"]})
    counts = sorted({len(entry["seeds"]) for entry in entries.values()})
    header = [
        kind,
        *(f"{METRIC_LABELS[name]} (%)" for name in ACCURACY_METRICS),
        f"{METRIC_LABELS[FINAL_EPOCH_ENTROPY]} (nats)",
    ]
    rows = [
        [
            name,
            *(_mean_pm_std(entry["metrics"][metric], 100, 2) for metric in ACCURACY_METRICS),
            _mean_pm_std(entry["metrics"][FINAL_EPOCH_ENTROPY], 1, 3),
        ]
        for name, entry in entries.items()
    ]
    caption = (
        f"{'/'.join(map(str, counts))} seed(s) per {kind} (seeds {seeds}); mean +- {STD_DEFINITION}; "
        "metrics are means over tasks"
    )
    return caption + "\n\n" + aepg_kernels.utils.markdown_table(header, rows, align=True)


def plot_compare(aggregated: Mapping, path) -> None:
    """The accuracy after each task per loss (or configuration): mean line, mean +- std band (when
    there are several seeds)."""
    figure, (ax,) = aepg_kernels.utils.new_figure()
    for loss, entry in entries_of(aggregated)[1].items():
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
    aepg_kernels.utils.save_figure(figure, path)


def _write_outputs(output_dir, aggregated: Mapping, names: Tuple[str, str, str]) -> Dict[str, Path]:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / names[0], "table": out / names[1], "plot": out / names[2]}
    aepg_kernels.utils.write_json(paths["json"], aggregated, "aggregated")
    aepg_kernels.utils.write_text(paths["table"], format_compare_table(aggregated) + "\n")
    plot_compare(aggregated, paths["plot"])
    return paths


def write_sweep_outputs(output_dir, swept: Mapping) -> Dict[str, Path]:
    """sweep.json (every run's metrics and the aggregate, strict JSON), sweep_table.md and
    sweep_accuracy.png in `output_dir`."""
    return _write_outputs(output_dir, swept, (SWEEP_JSON, SWEEP_TABLE, SWEEP_PLOT))


def write_compare_outputs(output_dir, aggregated: Mapping) -> Dict[str, Path]:
    """compare.json (everything, strict JSON), compare_table.md and compare_accuracy.png in `output_dir`."""
    return _write_outputs(output_dir, aggregated, (COMPARE_JSON, COMPARE_TABLE, COMPARE_PLOT))
