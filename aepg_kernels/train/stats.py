"""Statistics over seeds that a reviewer can check: per configuration the mean +- sample std
(compare.aggregate), and against a baseline configuration the paired difference over seeds with a
95% interval and the seeds it wins, ties and loses; Markdown tables and plots.

    comparisons = compare_to_baseline(swept, ["loss.name=ce"])   # swept: compare.run_sweep's record
    print(format_difference_table(comparisons))

Paired: configuration and baseline ran with the same seeds, and a seed fixes the class order, the
initialisations, the batches and the label noise (compare.py), so the difference per seed removes
what the seeds share. Two intervals of the mean difference d over n seeds:
- paired t: mean(d) +- t_{n-1, 0.975} std(d, ddof=1) / sqrt(n) (assumes the d are roughly normal);
- bootstrap: the 2.5% and 97.5% quantiles of the mean of n seeds drawn with replacement, 10,000
  resamples from a fixed generator (seed 0), so the numbers are reproducible.
With n seeds the bootstrap cannot be wider than the range of the d and is too narrow for small n;
the t interval is the one the tables show. Wins count the seeds where the configuration is better
by more than TIE_TOLERANCE (higher accuracy, lower forgetting); entropy has no better side.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

import aepg_kernels

from .compare import entries_of, grid_values
from .config import ConfigError
from .report import FINAL_EPOCH_ENTROPY, METRIC_LABELS

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
TIE_TOLERANCE = 1e-9  # accuracies are ratios of counts: equal runs give equal values
HIGHER_IS_BETTER: Dict[str, Optional[bool]] = {
    "final_accuracy": True,
    "average_incremental_accuracy": True,
    "forgetting_max_based": False,
    "backward_transfer": True,
    FINAL_EPOCH_ENTROPY: None,
}
STATS_METRICS = ("final_accuracy", "average_incremental_accuracy", "forgetting_max_based", FINAL_EPOCH_ENTROPY)
STATS_TABLE, ENTROPY_PLOT = "sweep_stats.md", "sweep_entropy.png"


def t_quantile(q: float, dof: int) -> float:
    """The q-quantile of Student's t with `dof` degrees of freedom (scipy, which scikit-learn needs)."""
    from scipy.stats import t

    return float(t.ppf(q, dof))


def paired_difference(
    values: Sequence[float],
    baseline: Sequence[float],
    higher_is_better: Optional[bool] = True,
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Dict[str, object]:
    """Statistics of d = values - baseline (paired: the same seed at the same position): mean, sample
    std, the paired-t and bootstrap intervals of the mean, the two-sided paired-t p-value, and the
    seeds won / tied / lost (None where the metric has no better side). NaN where n < 2."""
    a, b = np.asarray(values, dtype=float), np.asarray(baseline, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired values need the same non-zero length, got {a.shape} and {b.shape}")
    d = a - b
    n, mean = len(d), float(np.mean(d))
    t_interval, bootstrap, p_value, std = [math.nan] * 2, [math.nan] * 2, math.nan, math.nan
    if n > 1:
        from scipy.stats import t

        std = float(np.std(d, ddof=1))
        half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
        t_interval = [mean - half, mean + half]
        se = std / math.sqrt(n)
        p_value = float(2 * t.sf(abs(mean) / se, n - 1)) if se > 0 else (1.0 if mean == 0 else 0.0)
        draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
        bootstrap = np.quantile(d[draws].mean(axis=1), [(1 - confidence) / 2, (1 + confidence) / 2]).tolist()
    record = {
        "n": n,
        "mean": mean,
        "std": std,
        "t_interval": t_interval,
        "bootstrap_interval": bootstrap,
        "t_p_value": p_value,
        "differences": d.tolist(),
    }
    if higher_is_better is None:
        record.update(wins=None, ties=None, losses=None)
    else:
        better = d if higher_is_better else -d
        ties = int(np.sum(np.abs(d) <= TIE_TOLERANCE))
        wins = int(np.sum(better > TIE_TOLERANCE))
        record.update(wins=wins, ties=ties, losses=n - wins - ties)
    return record


# ---------------------------------------------------------------------------------------------
# baselines


def entry_grid_values(name: str, entry: Mapping) -> Dict[str, object]:
    """A sweep entry's grid values; a compare entry is named by its loss."""
    return dict(entry["grid_values"]) if "grid_values" in entry else {"loss.name": name}


def pair_baselines(values: Mapping[str, Mapping[str, object]], baseline: Sequence[str]) -> Dict[str, str]:
    """{configuration: its baseline} for every configuration (`values`: its grid values) that does
    not match `baseline` (`section.key=value` items). The baseline of a configuration is the one
    configuration matching `baseline`, or, when several do, the one that also has its other grid
    values (so `loss.name=ce` pairs aEPG at 20% noise with CE at 20% noise). An error when no
    configuration matches or none is left to compare."""
    wanted = grid_values({item.partition("=")[0]: item.partition("=")[2] for item in baseline})
    matching = [name for name, v in values.items() if all(k in v and v[k] == x for k, x in wanted.items())]
    if not matching:
        raise ConfigError(
            f"sweep.baseline: no configuration has {', '.join(baseline)}; configurations: {', '.join(values)}"
        )
    out = {}
    for name, v in values.items():
        if name in matching:
            continue
        candidates = (
            matching
            if len(matching) == 1
            else [m for m in matching if all(values[m].get(k) == x for k, x in v.items() if k not in wanted)]
        )
        if len(candidates) == 1:
            out[name] = candidates[0]
    if not out:
        raise ConfigError(f"sweep.baseline: {', '.join(baseline)} leaves no configuration to compare with it")
    return out


def baselines(aggregated: Mapping, baseline: Sequence[str]) -> Dict[str, str]:
    """`pair_baselines` of a compare or sweep aggregate's configurations."""
    _, entries = entries_of(aggregated)
    return pair_baselines({name: entry_grid_values(name, entry) for name, entry in entries.items()}, baseline)


def _by_seed(entry: Mapping, metric: str) -> Dict[int, float]:
    return dict(zip(entry["seeds"], entry["metrics"][metric]["values"], strict=True))


def compare_to_baseline(
    aggregated: Mapping, baseline: Sequence[str], metrics: Sequence[str] = STATS_METRICS, **options
) -> Dict[str, dict]:
    """Per configuration (not itself a baseline): its baseline, the seeds both ran, and
    `paired_difference` of each metric over those seeds. `options` go to paired_difference."""
    _, entries = entries_of(aggregated)
    out = {}
    for name, base in baselines(aggregated, baseline).items():
        per_metric, seeds = {}, None
        for metric in metrics:
            mine, theirs = _by_seed(entries[name], metric), _by_seed(entries[base], metric)
            seeds = sorted(mine.keys() & theirs.keys())
            if not seeds:
                break
            per_metric[metric] = paired_difference(
                [mine[s] for s in seeds], [theirs[s] for s in seeds], HIGHER_IS_BETTER.get(metric), **options
            )
        if seeds:
            out[name] = {"baseline": base, "seeds": seeds, "metrics": per_metric}
    return out


# ---------------------------------------------------------------------------------------------
# tables


def _scale(metric: str) -> Tuple[float, int, str]:
    return (1.0, 3, "nats") if metric == FINAL_EPOCH_ENTROPY else (100.0, 2, "points")


def _number(value, scale: float, digits: int, sign: bool = False) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{scale * value:{'+' if sign else ''}.{digits}f}"


def format_difference_table(comparisons: Mapping[str, Mapping], metrics: Sequence[str] = STATS_METRICS) -> str:
    """One row per (configuration, metric): the mean paired difference against its baseline with its
    95% paired-t and bootstrap intervals, the paired-t p-value and wins / ties / losses over seeds."""
    header = [
        "configuration",
        "baseline",
        "metric",
        "n",
        "mean difference",
        "95% CI (paired t)",
        "95% CI (bootstrap)",
        "p (paired t)",
        "wins / ties / losses",
    ]
    rows = []
    for name, comparison in comparisons.items():
        for metric in metrics:
            if metric not in comparison["metrics"]:
                continue
            stat = comparison["metrics"][metric]
            scale, digits, unit = _scale(metric)
            interval = lambda pair: (
                f"[{_number(pair[0], scale, digits, True)}, {_number(pair[1], scale, digits, True)}]"
            )
            record = "-" if stat["wins"] is None else f"{stat['wins']} / {stat['ties']} / {stat['losses']}"
            p = stat["t_p_value"]
            rows.append(
                [
                    name,
                    comparison["baseline"],
                    f"{METRIC_LABELS[metric]} ({unit})",
                    str(stat["n"]),
                    _number(stat["mean"], scale, digits, True),
                    interval(stat["t_interval"]),
                    interval(stat["bootstrap_interval"]),
                    "n/a" if p is None or math.isnan(p) else f"{p:.3f}",
                    record,
                ]
            )
    caption = (
        "paired over seeds: difference = configuration - baseline, per seed; accuracies in points (%), "
        f"entropy in nats; wins: better by more than {TIE_TOLERANCE:g} (higher accuracy, lower forgetting)"
    )
    return caption + "\n\n" + aepg_kernels.utils.markdown_table(header, rows, align=True)


# ---------------------------------------------------------------------------------------------
# plots


def numeric_grid_keys(aggregated: Mapping) -> List[str]:
    """The grid keys with at least two numeric values (loss.alpha, data.label_noise, ...)."""
    _, entries = entries_of(aggregated)
    seen: Dict[str, set] = {}
    for name, entry in entries.items():
        for key, value in entry_grid_values(name, entry).items():
            seen.setdefault(key, set()).add(value)
    return [
        k
        for k, v in seen.items()
        if len(v) > 1 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    ]


def plot_metric_versus(aggregated: Mapping, key: str, path, metric: str = "final_accuracy") -> None:
    """`metric` (mean +- sample std over seeds) against the numeric grid value `key`, one line per
    combination of the other grid values (e.g. final accuracy vs alpha; CE and aEPG vs label noise);
    a configuration without `key` (the sigmoid schedule beside fixed alphas) as a dashed level."""
    _, entries = entries_of(aggregated)
    lines: Dict[str, List[Tuple[float, float, float]]] = {}
    levels: Dict[str, float] = {}  # configurations without the key (a schedule among fixed alphas): a level
    for name, entry in entries.items():
        values = entry_grid_values(name, entry)
        if key not in values:
            levels[name] = entry["metrics"][metric]["mean"]
            continue
        rest = ", ".join(f"{k}={v}" for k, v in values.items() if k != key) or METRIC_LABELS[metric]
        stat = entry["metrics"][metric]
        std = stat["std"] if stat["std"] is not None and not math.isnan(stat["std"]) else 0.0
        lines.setdefault(rest, []).append((float(values[key]), stat["mean"], std))
    scale, _, unit = _scale(metric)
    figure, (ax,) = aepg_kernels.utils.new_figure()
    for label, points in lines.items():
        x, mean, std = (np.asarray(v, dtype=float) for v in zip(*sorted(points)))
        ax.errorbar(x, scale * mean, yerr=scale * std, marker="o", capsize=3, label=label)
    for n, (name, mean) in enumerate(levels.items(), start=len(lines)):
        if mean is not None and math.isfinite(mean):
            ax.axhline(scale * mean, linestyle="--", linewidth=1, color=f"C{n % 10}", label=name)
    ax.set_xlabel(key)
    ax.set_ylabel(f"{METRIC_LABELS[metric]} ({'%' if scale == 100 else unit})")
    ax.set_title(f"{METRIC_LABELS[metric]} vs {key} (mean +- sample std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    aepg_kernels.utils.save_figure(figure, path)


def plot_entropy_per_configuration(aggregated: Mapping, path) -> None:
    """The final-epoch entropy per configuration: mean bar, sample std whisker, each seed a dot."""
    _, entries = entries_of(aggregated)
    names = list(entries)
    figure, (ax,) = aepg_kernels.utils.new_figure(7.5, 1.2 + 0.4 * len(names))
    for row, name in enumerate(names):
        stat = entries[name]["metrics"][FINAL_EPOCH_ENTROPY]
        std = stat["std"] if stat["std"] is not None and not math.isnan(stat["std"]) else 0.0
        ax.barh(row, stat["mean"], xerr=std, color="tab:blue", alpha=0.5, capsize=3)
        ax.plot(stat["values"], [row] * len(stat["values"]), "k.", markersize=4)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("final-epoch training entropy (nats)")
    ax.set_title("final-epoch entropy per configuration (bar: mean, whisker: sample std, dots: seeds)", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    aepg_kernels.utils.save_figure(figure, path)


def write_stats_outputs(output_dir, aggregated: Mapping) -> Dict[str, Path]:
    """sweep_entropy.png, sweep_final_accuracy_vs_<key>.png for each numeric grid key, and when the
    record has "comparisons" (compare_to_baseline) sweep_stats.md, the difference table."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"entropy_plot": out / ENTROPY_PLOT}
    plot_entropy_per_configuration(aggregated, paths["entropy_plot"])
    for key in numeric_grid_keys(aggregated):
        paths[f"final_accuracy_vs_{key}"] = out / f"sweep_final_accuracy_vs_{key}.png"
        plot_metric_versus(aggregated, key, paths[f"final_accuracy_vs_{key}"])
    if aggregated.get("comparisons"):
        paths["stats_table"] = out / STATS_TABLE
        aepg_kernels.utils.write_text(paths["stats_table"], format_difference_table(aggregated["comparisons"]) + "\n")
    return paths
