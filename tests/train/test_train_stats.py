"""stats.py: paired differences over seeds (known values -> known intervals, p-values and wins),
baseline pairing, the difference table and the plots; synthetic run records, no training."""

import math

import numpy as np
import pytest

from aepg_kernels.train import ConfigError
from aepg_kernels.train.compare import aggregate
from aepg_kernels.train.stats import (
    compare_to_baseline,
    format_difference_table,
    numeric_grid_keys,
    pair_baselines,
    paired_difference,
    t_quantile,
    write_stats_outputs,
)
from tests.train.test_train_compare import PNG_SIGNATURE, two_task_summary

BASE = [0.70, 0.80, 0.90, 0.60, 0.75]
GAIN = [0.02, 0.04, 0.06, 0.02, 0.06]  # mean 0.04, sample std 0.02


def test_t_quantiles_match_the_table():
    assert t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
    assert t_quantile(0.975, 9) == pytest.approx(2.262157, abs=1e-6)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.959964, abs=1e-3)


def test_paired_difference_of_known_values():
    stat = paired_difference([b + g for b, g in zip(BASE, GAIN)], BASE)
    assert stat["n"] == 5 and stat["mean"] == pytest.approx(0.04) and stat["std"] == pytest.approx(0.02)
    half = 2.776445 * 0.02 / math.sqrt(5)
    assert stat["t_interval"] == pytest.approx([0.04 - half, 0.04 + half], abs=1e-6)
    assert stat["t_p_value"] == pytest.approx(0.01106, abs=1e-5)  # t = 0.04 / (0.02 / sqrt 5) = 4.47, dof 4
    lo, hi = stat["bootstrap_interval"]
    assert min(GAIN) <= lo < 0.04 < hi <= max(GAIN)
    assert (stat["wins"], stat["ties"], stat["losses"]) == (5, 0, 0)
    assert stat["differences"] == pytest.approx(GAIN)


def test_bootstrap_is_seeded_and_wins_follow_the_better_side():
    d = np.random.default_rng(5).normal(0.02, 0.03, size=12).tolist()
    first, again, other = (paired_difference(d, [0.0] * 12, seed=seed) for seed in (0, 0, 1))
    assert first["bootstrap_interval"] == again["bootstrap_interval"] != other["bootstrap_interval"]
    a, b = [0.5, 0.7, 0.6, 0.9], [0.6, 0.6, 0.6, 0.6]
    first = paired_difference(a, b)
    assert (first["wins"], first["ties"], first["losses"]) == (2, 1, 1)
    lower = paired_difference(a, b, higher_is_better=False)  # forgetting: lower is better
    assert (lower["wins"], lower["ties"], lower["losses"]) == (1, 1, 2)
    assert paired_difference(a, b, higher_is_better=None)["wins"] is None  # entropy: no better side


def test_identical_runs_tie_and_one_seed_has_no_interval():
    same = paired_difference(BASE, BASE)
    assert same["t_interval"] == [0.0, 0.0] and same["t_p_value"] == 1.0 and same["ties"] == 5
    one = paired_difference([0.8], [0.7])
    assert one["mean"] == pytest.approx(0.1) and math.isnan(one["std"]) and math.isnan(one["t_interval"][0])
    assert one["wins"] == 1
    with pytest.raises(ValueError, match="same non-zero length"):
        paired_difference([0.1, 0.2], [0.1])


def swept(final):
    """A sweep aggregate: {name: (grid values, {seed: final accuracy})}, 2-task runs (R[1] = final)."""
    results = {
        name: {seed: two_task_summary(0.9, acc, acc) for seed, acc in by_seed.items()}
        for name, (_, by_seed) in final.items()
    }
    aggregated = aggregate(results, key="configurations")
    for name, (values, _) in final.items():
        aggregated["configurations"][name]["grid_values"] = values
    return aggregated


NOISE = swept(
    {
        "loss.name=ce,data.label_noise=0": ({"loss.name": "ce", "data.label_noise": 0}, dict(enumerate(BASE))),
        "loss.name=ce,data.label_noise=0.2": (
            {"loss.name": "ce", "data.label_noise": 0.2},
            {s: a - 0.1 for s, a in enumerate(BASE)},
        ),
        "loss.name=aepg,data.label_noise=0": (
            {"loss.name": "aepg", "data.label_noise": 0},
            {s: a + g for s, (a, g) in enumerate(zip(BASE, GAIN))},
        ),
        "loss.name=aepg,data.label_noise=0.2": (
            {"loss.name": "aepg", "data.label_noise": 0.2},
            {s: a - 0.1 + 2 * g for s, (a, g) in enumerate(zip(BASE, GAIN))},
        ),
    }
)


def test_each_configuration_is_paired_with_the_baseline_of_its_other_grid_values():
    comparisons = compare_to_baseline(NOISE, ["loss.name=ce"])
    assert {name: c["baseline"] for name, c in comparisons.items()} == {
        "loss.name=aepg,data.label_noise=0": "loss.name=ce,data.label_noise=0",
        "loss.name=aepg,data.label_noise=0.2": "loss.name=ce,data.label_noise=0.2",
    }
    clean, noisy = (comparisons[f"loss.name=aepg,data.label_noise={x}"]["metrics"]["final_accuracy"] for x in (0, 0.2))
    assert clean["mean"] == pytest.approx(0.04) and noisy["mean"] == pytest.approx(0.08)
    assert noisy["std"] == pytest.approx(0.04) and noisy["wins"] == 5
    assert comparisons["loss.name=aepg,data.label_noise=0"]["seeds"] == [0, 1, 2, 3, 4]
    # with one matching configuration every other one is compared with it
    alphas = {f"a{x}": {"loss.alpha": x} for x in (0.1, 0.5)}
    assert pair_baselines({"sigmoid": {"loss.schedule": "sigmoid"}, **alphas}, ["loss.schedule=sigmoid"]) == {
        "a0.1": "sigmoid",
        "a0.5": "sigmoid",
    }
    with pytest.raises(ConfigError, match="no configuration has loss.name=focal"):
        compare_to_baseline(NOISE, ["loss.name=focal"])
    with pytest.raises(ConfigError, match="leaves no configuration"):
        pair_baselines({"ce": {"loss.name": "ce"}}, ["loss.name=ce"])


def test_pairing_uses_the_seeds_both_ran():
    two = swept(
        {"ce": ({"loss.name": "ce"}, {0: 0.5, 1: 0.6, 2: 0.7}), "aepg": ({"loss.name": "aepg"}, {1: 0.7, 2: 0.7})}
    )
    comparison = compare_to_baseline(two, ["loss.name=ce"])["aepg"]
    assert comparison["seeds"] == [1, 2]
    assert comparison["metrics"]["final_accuracy"]["differences"] == pytest.approx([0.1, 0.0])


def test_difference_table_and_plots(tmp_path):
    comparisons = compare_to_baseline(NOISE, ["loss.name=ce"])
    table = format_difference_table(comparisons)
    row = next(
        line
        for line in table.splitlines()
        if line.startswith("| loss.name=aepg,data.label_noise=0 ") and "final accuracy" in line
    )
    half = 100 * 2.776445 * 0.02 / math.sqrt(5)
    assert "+4.00" in row and f"[{4 - half:+.2f}, {4 + half:+.2f}]" in row and "5 / 0 / 0" in row
    assert numeric_grid_keys(NOISE) == ["data.label_noise"]
    paths = write_stats_outputs(tmp_path, {**NOISE, "comparisons": comparisons})
    assert set(paths) == {"entropy_plot", "final_accuracy_vs_data.label_noise", "stats_table"}
    assert paths["stats_table"].read_text() == table + "\n"
    for key in ("entropy_plot", "final_accuracy_vs_data.label_noise"):
        assert paths[key].read_bytes().startswith(PNG_SIGNATURE)
    assert "stats_table" not in write_stats_outputs(tmp_path / "none", NOISE)


def test_a_configuration_without_the_plotted_key_is_a_level(tmp_path):
    ablation = swept(
        {
            "loss.schedule=sigmoid": ({"loss.schedule": "sigmoid"}, {0: 0.8, 1: 0.7}),
            **{f"loss.alpha={x}": ({"loss.alpha": x}, {0: 0.6 + x / 10, 1: 0.5 + x / 10}) for x in (0.0, 0.5, 1.0)},
        }
    )
    assert numeric_grid_keys(ablation) == ["loss.alpha"]
    paths = write_stats_outputs(tmp_path, ablation)
    assert paths["final_accuracy_vs_loss.alpha"].stat().st_size > 0
    assert np.isfinite(ablation["configurations"]["loss.alpha=0.5"]["metrics"]["final_accuracy"]["std"])
