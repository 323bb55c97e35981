"""aepg-bench --suite vocab-parallel: one tiny end-to-end run over 2 gloo ranks (N=64, C=50 and
C=500, the logits op; N=64, H=16, V=50 the linear op) through the command line: the gate passes,
the JSON record has its fields, the bytes per call do not change with C at equal N (the O(N)
collectives), and shard_sizes passed saves the one collective that gathers them."""

import json

import pytest
import torch.distributed as dist

from aepg_kernels.bench import commands, vocab_parallel

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


pytestmark = pytest.mark.usefixtures("restore_intra_op_threads")  # the commands set the thread count


def test_list_and_bad_options(capsys):
    assert commands.main(["--suite", "vocab-parallel", "--list", "--shapes", "64x50,64x16x50", "--losses", "ce"]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == [
        "policy_loss CE fp32 64x50",
        "linear_policy_loss CE fp32 64x16x50",
    ]
    for argv in (
        ["--dtypes", "bf16"],
        ["--implementations", "eager"],
        ["--shapes", "64x1"],
        ["--shapes", "64"],
        ["--losses", "dft"],
        ["--repeats", "0"],
        ["--threads", "2"],
    ):
        with pytest.raises(SystemExit) as error:
            commands.main(["--suite", "vocab-parallel", *argv])
        assert error.value.code == 2


def test_tiny_run_gates_and_bytes_are_independent_of_c(tmp_path):
    out = tmp_path / "vp.json"
    assert (
        commands.main(
            [
                "--suite",
                "vocab-parallel",
                "--shapes",
                "64x50,64x500,64x16x50",
                "--losses",
                "aepg",
                "--repeats",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    document = json.loads(out.read_text())
    assert document["complete"] and document["machine"]["cpu"] and document["settings"]["world_size"] == 2
    assert "| sharded / auto |" in out.with_suffix(".md").read_text()
    records = {r["shape"]: r for r in document["records"]}
    assert set(records) == {"64x50", "64x500", "64x16x50"}
    for r in records.values():
        assert r["gate"]["passed"] and r["gate"]["max_error"] <= vocab_parallel.GATE_TOLERANCE
        assert r["shard_sizes"] == [r["c"] // 2, r["c"] - r["c"] // 2] and r["bytes_equal_on_ranks"]
        assert set(r["rows"]) == set(vocab_parallel.ROWS)
        for row in r["rows"].values():
            assert row["status"] == "ok" and len(row["seconds"]) == 2 and row["median_s"] > 0
            assert row["vs_auto"] > 0 and row["vs_eager"] > 0
        passed, gathered = r["bytes"]["sizes_passed"], r["bytes"]["sizes_gathered"]
        assert gathered["collectives"] == passed["collectives"] + 1
        assert gathered["bytes_per_rank"] == passed["bytes_per_rank"] + 8  # one int64 per rank
    small, large = records["64x50"]["bytes"], records["64x500"]["bytes"]
    assert small == large  # O(N): the same collectives, shapes and bytes at 10x the classes
    assert small["sizes_passed"]["collectives"] == 1 and small["sizes_passed"]["calls"][0]["op"] == "all_gather"
    assert small["sizes_passed"]["bytes_per_rank"] == small["sizes_passed"]["bytes_per_row"] * 64
    linear = records["64x16x50"]["bytes"]["sizes_passed"]
    assert [call["op"] for call in linear["calls"]] == ["all_gather", "all_reduce"]  # dX summed in backward
    assert linear["calls"][1]["bytes"] == 64 * 16 * 4  # (N, H) fp32 x (world_size - 1)
