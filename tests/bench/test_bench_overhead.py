"""aepg-bench --suite overhead: its cases, the target verdicts, the interleaved timing, the gate,
the JSON and markdown it writes (a tiny end-to-end run), and the host-time loop."""

import json

import pytest
import torch

from aepg_kernels.bench import commands, overhead
from aepg_kernels.bench.sweeps import OVERHEAD_SHAPES, SUITES, Case

POLICY, AEPG = overhead.TARGETS


pytestmark = pytest.mark.usefixtures("restore_intra_op_threads")  # the commands set the thread count


def test_overhead_suite_is_every_shape_in_both_modes_fp32():
    suite = SUITES["overhead"]()
    assert suite.kind == "overhead" and all(SUITES[name]().kind == "kernels" for name in ("quick", "cpu", "gpu"))
    assert OVERHEAD_SHAPES == ((8, 10), (32, 10), (32, 100), (256, 100), (256, 1000), (1024, 1000), (4096, 1000))
    assert [(c.mode, c.n, c.c) for c in suite.cases] == (
        [("fwd+bwd", n, c) for n, c in OVERHEAD_SHAPES] + [("fwd", n, c) for n, c in OVERHEAD_SHAPES]
    )
    assert {c.dtype for c in suite.cases} == {"fp32"} and {c.loss for c in suite.cases} == {"ce"}


def test_list_names_the_eval_mode(capsys):
    assert commands.main(["--suite", "overhead", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "fwd+bwd fp32 8x10" and lines[-1] == "eval forward fp32 4096x1000" and len(lines) == 14


@pytest.mark.parametrize(
    "target, ratio, expected",
    [
        (POLICY, 0.8, "met"),
        (POLICY, 1.0, "met"),
        (POLICY, 1.0001, "within noise"),
        (POLICY, 1.10, "within noise"),
        (POLICY, 1.1001, "failed"),
        (POLICY, 4.0, "failed"),
        (POLICY, None, "not measured"),
        (AEPG, 1.25, "met"),
        (AEPG, 1.2501, "failed"),
        (AEPG, None, "not measured"),
    ],
)
def test_verdict_thresholds(target, ratio, expected):
    assert (POLICY.row, POLICY.met, POLICY.noise) == ("ak.PolicyLoss", 1.0, 1.10)
    assert (AEPG.row, AEPG.met) == ("aEPG", 1.25)
    assert overhead.verdict(ratio, target) == expected


def test_one_failure_anywhere_fails_the_target():
    assert overhead.overall_verdict(["met", "met"]) == "met"
    assert overhead.overall_verdict(["met", "within noise", "not measured"]) == "within noise"
    assert overhead.overall_verdict(["met", "within noise", "failed"]) == "failed"
    assert overhead.overall_verdict(["not measured"]) == "not measured"
    records = [
        {"mode_title": "fwd+bwd", "n": 8, "c": 10, "verdicts": {"ak.PolicyLoss": "met", "aEPG": "failed"}},
        {"mode_title": "eval forward", "n": 8, "c": 10, "verdicts": {"ak.PolicyLoss": "within noise", "aEPG": "met"}},
    ]
    summary = overhead.target_summary(records)
    assert summary["ak.PolicyLoss"]["overall"] == "within noise" and summary["ak.PolicyLoss"]["failed_at"] == []
    assert summary["aEPG"]["overall"] == "failed" and summary["aEPG"]["failed_at"] == ["fwd+bwd 8x10"]
    assert summary["aEPG"]["counts"] == {"met": 1, "within noise": 0, "failed": 1, "not measured": 0}


def test_rows_are_timed_interleaved_in_rotating_order():
    seen = []
    steps = {name: (lambda name=name: seen.append(name)) for name in "abc"}
    times, calls = overhead.interleaved_samples(steps, samples=3)
    runs = [name for i, name in enumerate(seen) if i == 0 or seen[i - 1] != name]
    warmup = list("abc")  # each row's warm-up calls, back to back
    assert runs == warmup + list("abc") + list("bca") + list("cab")
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls == {name: overhead.MAX_CALLS_PER_SAMPLE for name in "abc"}  # far under SAMPLE_SECONDS a call
    assert len(seen) == 3 * (overhead.WARMUP_CALLS + overhead.TIMED_WARMUP_CALLS + 3 * overhead.MAX_CALLS_PER_SAMPLE)


def test_ratios_are_of_the_medians_and_paired_per_round():
    record = {"rows": {"nn.CrossEntropyLoss": {"us": 10.0}, "ak.PolicyLoss": {"us": 12.0}, "aEPG": {}}}
    times = {"nn.CrossEntropyLoss": [1.0, 2.0, 4.0], "ak.PolicyLoss": [1.0, 3.0, 4.0]}
    overhead.add_ratios(record, times)
    assert record["ratios"] == {"ak.PolicyLoss": pytest.approx(1.2), "aEPG": None}
    assert record["paired_ratios"]["ak.PolicyLoss"] == 1.0  # median of 1, 1.5, 1
    assert record["verdicts"] == {"ak.PolicyLoss": "failed", "aEPG": "not measured"}


def test_a_wrong_row_fails_the_gate_gets_no_time_and_fails_the_run(tmp_path, monkeypatch):
    def doubled(device):
        good = torch.nn.CrossEntropyLoss()
        return lambda x, y: 2 * good(x, y)

    rows = list(overhead.ROWS)
    rows[1] = overhead.Row("ak.PolicyLoss", doubled, "ce", checked_against="nn.CrossEntropyLoss")
    monkeypatch.setattr(overhead, "ROWS", tuple(rows))
    record = overhead.run_case(Case("ce", "fwd", "fp32", 8, 10), samples=2)
    wrong = record["rows"]["ak.PolicyLoss"]
    assert record["status"] == "failed check" and wrong["status"] == "failed check" and "us" not in wrong
    assert not wrong["check"]["passed"] and wrong["check"]["against"] == "nn.CrossEntropyLoss"
    assert record["verdicts"]["ak.PolicyLoss"] == "not measured" and record["rows"]["aEPG"]["us"] > 0
    rc = commands.main(
        [
            "--suite",
            "overhead",
            "--shapes",
            "8x10",
            "--modes",
            "fwd",
            "--repeats",
            "2",
            "--out",
            str(tmp_path / "o.json"),
        ]
    )
    assert rc == 1


def test_tiny_overhead_run_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    rc = commands.main(["--suite", "overhead", "--shapes", "8x10,32x10", "--repeats", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    document = json.loads(out.read_text())
    assert document["suite"] == "overhead" and document["complete"] is True
    for key in ("cpu", "cores", "torch", "aepg_kernels", "date", "torch_threads", "available_backends"):
        assert key in document["machine"]
    assert document["machine"]["torch_threads"] == 1 == document["settings"]["threads"]  # the default
    assert set(document["settings"]["rows"]) == {"nn.CrossEntropyLoss", "ak.PolicyLoss", "aEPG"}
    records = document["records"]
    assert [(r["mode_title"], r["n"], r["c"]) for r in records] == [
        ("fwd+bwd", 8, 10),
        ("fwd+bwd", 32, 10),
        ("eval forward", 8, 10),
        ("eval forward", 32, 10),
    ]
    for r in records:
        assert r["status"] == "ok"
        for name, row in r["rows"].items():
            assert row["check"]["passed"] and row["samples"] == 3 and 0 < row["min_us"] <= row["us"], name
            assert (row["check"]["grad_error"] is None) == (r["mode"] == "fwd")
        assert r["rows"]["aEPG"]["check"]["against"] == "float64 reference"
        for target in overhead.TARGETS:
            ratio = r["rows"][target.row]["us"] / r["rows"]["nn.CrossEntropyLoss"]["us"]
            assert r["ratios"][target.row] == pytest.approx(ratio)
            assert r["verdicts"][target.row] == overhead.verdict(ratio, target)
    assert set(document["targets"]) == {"ak.PolicyLoss", "aEPG"}
    if not torch.cuda.is_available():
        assert document["cuda_host"]["status"] == "not measured on GPU" and document["cuda_host"]["records"] == []
        assert "not measured on GPU" in printed
    table = out.with_suffix(".md").read_text()
    assert table.startswith("| mode | N x C | nn.CrossEntropyLoss us | ak.PolicyLoss us | aEPG us |")
    assert "| eval forward | 32x10 |" in table and table.splitlines()[0] in printed
    assert "target ak.PolicyLoss <= 1.00x nn.CrossEntropyLoss" in printed


def test_host_time_loop_measures_both_rows():
    """Meant for CUDA tensors; on CPU tensors (synchronize a no-op) it runs the same code."""
    records = overhead.host_times(torch.device("cpu"), shapes=[(8, 10)], calls=2, repeats=2)
    assert [(r["mode"], r["n"], r["c"]) for r in records] == [("fwd+bwd", 8, 10), ("fwd", 8, 10)]
    for r in records:
        for name in ("F.cross_entropy", "ak.PolicyLoss"):
            assert 0 < r[name]["host_us"] <= r[name]["with_sync_us"]
        assert r["host_ratio"] == pytest.approx(r["ak.PolicyLoss"]["host_us"] / r["F.cross_entropy"]["host_us"])
    assert "| fwd+bwd | 8x10 |" in overhead.host_markdown(records)
