"""The terminal table, where the output goes, the JSON document and the PNG plot."""

import json

import pytest

from aepg_kernels import utils
from aepg_kernels.bench import output

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(impl, c, gbps, status="ok", n=4096, **extra):
    return {
        "loss": "aepg",
        "mode": "fwd+bwd",
        "dtype": "fp32",
        "n": n,
        "c": c,
        "implementation": impl,
        "status": status,
        "reason": "" if status == "ok" else "cross entropy only",
        "ms": 1.5,
        "gbps": gbps,
        "percent_of_copy": 50.0,
        "speedup_vs_lean_eager": 2.0,
        **extra,
    }


def test_rows_line_up_with_the_header_and_missing_values_print_as_dash():
    row = output.format_row(record("cpu", 1000, 12.3456))
    assert len(row) == len(output.header())
    cells = row.split()
    # 3 significant digits, fixed point
    assert cells[3] == "4096x1000" and cells[4] == "cpu" and cells[5] == "1.50" and cells[6] == "12.3"
    assert cells[-1] == "-"  # no CUDA-graph time


def test_a_row_without_a_time_says_why():
    row = output.format_row(record("liger", 1000, None, status="skipped"))
    assert row.endswith("skipped: cross entropy only") and "liger" in row


def test_summary_counts_what_got_no_number():
    records = [
        record("a", 10, 1.0),
        record("b", 10, None, status="skipped"),
        dict(record("c", 10, None, status="failed check"), reason="differs from eager: loss error 1"),
    ]
    assert output.summary_lines(records) == ["1 failed check: differs from eager", "1 skipped: cross entropy only"]


def test_output_goes_where_out_says_else_into_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench").mkdir()  # a checkout's layout changes nothing
    (tmp_path / "pyproject.toml").write_text("")
    assert output.output_path(tmp_path / "x" / "run.json", "cpu2c1t-quick") == tmp_path / "x" / "run.json"
    default = output.output_path(None, "cpu2c1t-quick")
    assert default.parent == tmp_path and default.name.startswith("cpu2c1t-quick-") and default.suffix == ".json"


def test_json_carries_the_schema_and_stays_strict(tmp_path):
    failed = dict(record("wrong", 10, None, status="failed check"), check={"loss_error": float("inf")})
    path = output.write_json(tmp_path / "sub" / "r.json", {"records": [record("cpu", 10, 1.0), failed]})
    document = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"non-strict JSON: {name}"))
    assert document["schema"] == output.SCHEMA and document["records"][0]["c"] == 10
    assert document["records"][1]["check"]["loss_error"] is None  # non-finite: null (aepg_kernels.utils.to_jsonable)


def test_plot_takes_the_largest_n_per_class_count(tmp_path):
    records = [
        record("cpu", 100, 5.0, n=256),
        record("cpu", 100, 9.0, n=65536),
        record("cpu", 1000, 7.0),
        record("eager", 100, 1.0),
        record("liger", 100, None, status="skipped"),
    ]
    groups = output._plot_groups(records)
    assert groups == {("aepg", "fwd+bwd", "fp32"): {"cpu": {100: 9.0, 1000: 7.0}, "eager": {100: 1.0}}}
    path = output.write_plot(tmp_path / "p.png", records, copy_gbps=20.0, title="test")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert output.write_plot(tmp_path / "none.png", records[-1:], 20.0, "t") is None
    assert not (tmp_path / "none.png").exists()


def test_json_is_written_atomically(tmp_path, monkeypatch):
    path = output.write_json(tmp_path / "r.json", {"records": [record("cpu", 10, 1.0)]})

    def killed(*_args):
        raise KeyboardInterrupt  # killed between writing the temporary file and renaming it

    monkeypatch.setattr(utils.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        output.write_json(path, {"records": []})
    assert len(json.loads(path.read_text())["records"]) == 1  # the previous complete file
