"""aepg-bench --suite llm: its cases and shapes, the targets, the gate, and a tiny end-to-end run
(N=64, H=16, V=256) that writes the JSON (every implementation, ratios, gate) and the markdown."""

import json

import pytest
import torch

from aepg_kernels.bench import commands, llm
from aepg_kernels.bench.sweeps import SUITES, parse_head_shapes

pytestmark = pytest.mark.usefixtures("restore_intra_op_threads")  # the commands set the thread count


def test_shapes_parse_as_n_h_v():
    assert parse_head_shapes("2048x256x128256, 64x16x256") == [(2048, 256, 128256), (64, 16, 256)]
    for bad in ("64x16", "64x16x0", "axbxc"):
        with pytest.raises(ValueError, match="NxHxV"):
            parse_head_shapes(bad)


def test_suite_is_llm_and_ce_dft_come_first():
    assert SUITES["llm"]().kind == "llm"
    labels = [case.label for case in llm.cases()]
    assert len(labels) == 12 and labels[0] == "ce fp32 2048x256x128256" and labels[1] == "dft fp32 2048x256x128256"
    assert [case.loss for case in llm.cases()][-4:] == ["aepg"] * 4


def test_list(capsys):
    assert commands.main(["--suite", "llm", "--list", "--shapes", "64x16x256", "--dtypes", "fp32"]) == 0
    assert capsys.readouterr().out.split("\n")[:3] == ["ce fp32 64x16x256", "dft fp32 64x16x256", "aepg fp32 64x16x256"]


def test_ratio_verdicts_use_the_ce_baseline_of_the_same_shape():
    def record(loss, **impls):
        return {
            "loss": loss,
            "dtype": "fp32",
            "shape": "8x4x16",
            "label": loss,
            "impls": {name: {"status": "ok", "min_s": s, "peak_extra_bytes": b} for name, (s, b) in impls.items()},
        }

    ce = record("ce", eager=(2.0, 800), aepg=(1.0, 50), **{"F.linear_cross_entropy": (4.0, 100)})
    dft = record("dft", eager=(1.0, 800), aepg=(1.5, 200))
    llm.add_ratios([ce, dft])
    assert ce["ratios"] == {"time_vs_eager": 0.5, "time_vs_lce": 0.25, "memory_vs_eager": 0.0625, "memory_vs_lce": 0.5}
    assert set(ce["verdicts"].values()) == {"met"}
    assert dft["ratios"]["time_vs_lce"] == 1.5 / 4.0 and dft["verdicts"]["time_vs_eager"] == "failed"
    assert dft["verdicts"]["memory_vs_eager"] == "failed" and dft["verdicts"]["memory_vs_lce"] == "failed"
    summary = llm.target_summary([ce, dft])
    assert summary["time_vs_eager"]["overall"] == "failed" and summary["time_vs_eager"]["failed_at"] == ["dft"]


def test_a_wrong_implementation_fails_the_gate_and_gets_no_time(monkeypatch):
    wrong = llm.Impl("aepg", lambda loss, alpha: lambda x, w, y: 2 * llm.ours_fn(loss, alpha)(x, w, y))
    case = llm.HeadCase("ce", "fp32", 16, 8, 32)
    record = llm.run_case(case, [llm.IMPLS[0], wrong], torch.device("cpu"), repeats=1)
    assert record["impls"]["aepg"]["status"] == "failed check" and "seconds" not in record["impls"]["aepg"]
    assert record["impls"]["eager"]["status"] == "ok" and record["impls"]["eager"]["gate"]["passed"]


def test_tiny_llm_run_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "llm.json"
    rc = commands.main(
        ["--suite", "llm", "--shapes", "64x16x256", "--threads", "2", "--repeats", "2", "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    document = json.loads(out.read_text())
    assert document["suite"] == "llm" and document["complete"] and document["command"].startswith("aepg-bench")
    for key in ("cpu", "cores", "torch", "date", "torch_threads"):
        assert key in document["machine"]
    assert {"liger", "cce"} <= set(document["not_run"])  # CUDA only
    records = document["records"]
    assert [(r["loss"], r["dtype"]) for r in records] == [
        ("ce", "fp32"),
        ("dft", "fp32"),
        ("ce", "bf16"),
        ("dft", "bf16"),
        ("aepg", "fp32"),
        ("aepg", "bf16"),
    ]
    for r in records:
        expected = {"eager", "compile", "aepg"} | ({"F.linear_cross_entropy"} if r["loss"] == "ce" else set())
        timed = {name for name, row in r["impls"].items() if row["status"] == "ok"}
        assert expected - {"compile"} <= timed, r["impls"]
        assert r["impls"]["compile"]["status"] in ("ok", "compile failed")
        for name in timed:
            row = r["impls"][name]
            assert row["gate"]["passed"] and row["gate"]["max_error"] <= row["gate"]["tolerance"]
            assert len(row["seconds"]) == 2 and row["min_s"] > 0 and row["peak_extra_bytes"] is not None
        assert r["reference_check"]["max_error"] < 1e-5
        assert set(r["ratios"]) == {"time_vs_eager", "time_vs_lce", "memory_vs_eager", "memory_vs_lce"}
        assert r["ratios"]["time_vs_eager"] > 0 and r["ratios"]["time_vs_lce"] > 0
        assert set(r["verdicts"].values()) <= {"met", "failed"}
    assert set(document["targets"]) == {"time_vs_eager", "time_vs_lce", "memory_vs_eager", "memory_vs_lce"}
    md = out.with_suffix(".md").read_text()
    assert "| CE | fp32 | 64x16x256 |" in md and "aepg / F.lce" in md and "gate max error" in md
    assert "target time <= eager" in printed


def test_bad_names_are_usage_errors():
    for argv in (["--losses", "epg"], ["--implementations", "liger-kernel"], ["--shapes", "64x16"], ["--modes", "fwd"]):
        with pytest.raises(SystemExit) as error:
            commands.main(["--suite", "llm", *argv])
        assert error.value.code == 2


def test_low_precision_gate_follows_pytorchs_own_error():
    """bf16: an implementation passes when no worse than twice the eager composite's error (at
    least the fixed tolerance); fp32 keeps the fixed tolerance; the eager row is the yardstick."""
    from aepg_kernels.bench import llm
    from aepg_kernels.bench.correctness import TOLERANCE

    assert llm.gate_tolerance("fp32", {"max_error": 0.5}) == TOLERANCE["fp32"]
    assert llm.gate_tolerance("bf16", None) is None
    assert llm.gate_tolerance("bf16", {"max_error": 0.03}) == pytest.approx(0.06)
    assert llm.gate_tolerance("bf16", {"max_error": 1e-4}) == TOLERANCE["bf16"]
