"""aepg-bench --suite llm-step: shapes, usage errors, the gate (a wrong loss gets no time), and a
tiny end-to-end run (B=2, S=16, H=16, V=1000) that writes the JSON (every row, its gate, memory,
times and ratios) and the markdown table."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("trl")

from aepg_kernels.bench import commands, llm_step

TINY = "2x16x16x1000"


pytestmark = pytest.mark.usefixtures("restore_intra_op_threads")  # the commands set the thread count


def test_shapes_parse_as_b_s_h_v():
    assert llm_step.parse_shapes("4x512x256x128256, 2x16x16x1000") == [(4, 512, 256, 128256), (2, 16, 16, 1000)]
    for bad in ("2048x256x128256", "2x16x0x1000", "axbxcxd"):
        with pytest.raises(ValueError, match="BxSxHxV"):
            llm_step.parse_shapes(bad)
    with pytest.raises(ValueError, match="multiple of 8"):
        llm_step.parse_shapes("2x16x12x1000")


def test_list_and_bad_options(capsys):
    assert commands.main(["--suite", "llm-step", "--list"]) == 0
    assert capsys.readouterr().out.strip() == "fp32 4x512x256x128256 (2 layers)"
    for argv in (
        ["--losses", "ce"],
        ["--dtypes", "bf16"],
        ["--modes", "fwd"],
        ["--implementations", "liger"],
        ["--shapes", "64x16x256"],
        ["--repeats", "0"],
    ):
        with pytest.raises(SystemExit) as error:
            commands.main(["--suite", "llm-step", *argv])
        assert error.value.code == 2


def test_labels_mask_the_prompt():
    input_ids, labels = llm_step.make_batch(2, 16, 1000, torch.device("cpu"))
    assert (labels[:, :4] == -100).all() and torch.equal(labels[:, 4:], input_ids[:, 4:])


def test_a_wrong_loss_fails_the_gate_and_gets_no_time():
    """aEPG with alpha 0.3 gated against the eager aEPG formula with alpha 0.5: its gradients differ."""
    by_name = {impl.name: impl for impl in llm_step.IMPLS}
    wrong = llm_step.StepImpl(
        "aepg-aepg", "aepg", llm_step.model_loss, llm_step.EAGER_AEPG, patch={"loss": "aepg", "alpha": 0.3}
    )
    case = llm_step.StepCase(1, 8, 16, 64)
    record = llm_step.run_case(
        case, [by_name["transformers"], by_name["aepg-ce"], wrong], torch.device("cpu"), repeats=1
    )
    row = record["impls"]["aepg-aepg"]
    assert row["status"] == "failed check" and "seconds" not in row and not row["gate"]["gradients_passed"]
    assert record["impls"]["aepg-ce"]["status"] == "ok" and record["impls"]["aepg-ce"]["gate"]["passed"]
    assert llm_step.ours_failed([record])


def test_tiny_run_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "llm-step.json"
    rc = commands.main(["--suite", "llm-step", "--shapes", TINY, "--threads", "2", "--repeats", "2", "--out", str(out)])
    capsys.readouterr()
    assert rc == 0
    document = json.loads(out.read_text())
    assert document["suite"] == "llm-step" and document["complete"] and document["command"].startswith("aepg-bench")
    for key in ("cpu", "cores", "torch", "torch_threads", "transformers", "trl", "date"):
        assert document["machine"][key] is not None
    assert document["not_run"] == {} and document["implementations"] == list(llm_step.IMPL_NAMES)
    (record,) = document["records"]
    assert record["shape"] == TINY and record["tokens"] == 32 and record["counted_tokens"] == 2 * (16 - 4)
    assert record["reference_check"]["max_error"] < 1e-5
    assert list(record["impls"]) == list(llm_step.IMPL_NAMES)
    references = {
        "transformers": None,
        "trl-nll": "transformers",
        "trl-dft": llm_step.EAGER_DFT,
        "aepg-ce": "transformers",
        "aepg-dft": "trl-dft",
        "aepg-aepg": llm_step.EAGER_AEPG,
    }
    for name, row in record["impls"].items():
        assert row["status"] == "ok", (name, row)
        assert row["gate"]["passed"] and row["gate"]["max_error"] <= row["gate"]["tolerance"] == 1e-4
        if references[name] is not None:
            assert row["gate"]["reference"] == references[name]
            assert set(row["gate"]["errors"]) == {"loss", "dW_head", "dW_base"}
        assert len(row["seconds"]) == 2 and row["median_s"] > 0 and row["peak_extra_bytes"] is not None
        assert row["ratios"]["time_vs_transformers"] > 0
        assert set(row["ratios"]) == {"time_vs_transformers", "min_time_vs_transformers", "memory_vs_transformers"}
    assert record["impls"]["transformers"]["ratios"]["time_vs_transformers"] == 1.0
    md = out.with_suffix(".md").read_text()
    assert md.count(f"| {TINY} |") == len(llm_step.IMPL_NAMES)
    for column in ("median s", "time / transformers", "min / transformers", "memory / transformers", "vs trl-dft"):
        assert column in md
    assert "FAILED" not in md
