"""aepg_kernels.utils: atomic writes, the strict JSON rule, figures without a global backend
switch, the environment, progress bars, devices, autocast, threads, comma lists and tables."""

import argparse
import io
import json
import math
import sys

import pytest
import torch

from aepg_kernels import utils

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _reject_constant(name):
    pytest.fail(f"non-strict JSON: {name}")


def test_atomic_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    path = utils.write_text(tmp_path / "sub" / "file.txt", "old")

    def half_then_fail(file):
        file.write(b"ne")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        utils.write_atomically(path, half_then_fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.txt"]


def test_atomic_write_killed_before_the_rename_leaves_the_old_file(tmp_path, monkeypatch):
    path = utils.write_json(tmp_path / "r.json", {"records": [1]})

    def killed(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(utils.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        utils.write_json(path, {"records": []})
    assert json.loads(path.read_text()) == {"records": [1]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_non_finite_floats_are_written_as_null_and_read_back_as_none(tmp_path):
    value = {
        "nan": math.nan,
        "inf": math.inf,
        "-inf": -math.inf,
        "finite": 1.5,
        "tensor": torch.tensor([1.0, float("nan")]),
        "nested": [(2, float("inf"))],
    }
    text = utils.write_json(tmp_path / "v.json", value).read_text()
    assert json.loads(text, parse_constant=_reject_constant) == {
        "nan": None,
        "inf": None,
        "-inf": None,
        "finite": 1.5,
        "tensor": [1.0, None],
        "nested": [[2, None]],
    }
    assert "NaN" not in text and "Infinity" not in text


def test_json_keeps_values_while_compacting_layout():
    value = {
        "row": [1.0, None, 2],
        "text": "a [ b ] { c }",
        "nested": [[1, 2], {"k": "v"}],
        "record": {"x": 1, "y": "z"},
        "empty": [],
        "matrix": [[0.5, math.nan]],
        "path": utils.Path("a/b"),
    }
    text = utils.json_text(value)
    assert json.loads(text) == utils.to_jsonable(value)
    assert '"row": [1.0, null, 2]' in text and '"record": {"x": 1, "y": "z"}' in text
    assert utils.to_jsonable(value)["path"] == "a/b" and text.endswith("}\n")


def test_to_jsonable_names_the_key_it_cannot_write():
    with pytest.raises(TypeError, match=r"summary\.timing\.device: cannot be written to JSON \(object\)"):
        utils.to_jsonable({"timing": {"device": object()}}, "summary")


def test_figure_leaves_matplotlib_backend_unchanged(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    previous = matplotlib.get_backend()
    matplotlib.use("svg")  # not Agg: a helper that switched to Agg would show
    try:
        figure, axes = utils.new_figure(6, 4, rows=2, cols=3, sharex=True)
        assert len(axes) == 6 and axes[0].get_shared_x_axes().joined(axes[0], axes[3])
        axes[0].plot([0, 1], [1, 0])
        path = utils.save_figure(figure, tmp_path / "f.png")
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(previous)


def test_environment_names_the_versions():
    info = utils.environment("liger-kernel", "surely-not-installed-package")
    assert info["torch"] == torch.__version__ and info["aepg_kernels"] and info["python"]
    assert "liger_kernel" in info and info["surely_not_installed_package"] is None
    assert utils.package_version("torch") is not None


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("enabled, terminal", [(True, True), (False, True), (True, False)])
def test_progress_bar_only_on_a_terminal_when_enabled(monkeypatch, capsys, enabled, terminal):
    pytest.importorskip("tqdm")
    err = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with utils.progress_bar(3, enabled, desc="cases") as bar:
        bar.update(1)
        bar.set_postfix(loss=1.0)
        bar.write("a row")
    assert ("cases" in err.getvalue()) == (enabled and terminal)
    assert isinstance(bar, utils.NoProgressBar) != (enabled and terminal)
    if not (enabled and terminal):
        assert capsys.readouterr().out == "a row\n"  # plain lines into a log or a pipe


def test_auto_device_and_cuda_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert utils.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert utils.resolve_device("auto") == torch.device("cuda")
    assert utils.resolve_device("auto", index=3) == torch.device("cuda", 3)
    assert utils.resolve_device("cuda:1", index=3) == torch.device("cuda", 1)
    assert utils.resolve_device("cpu", index=3) == torch.device("cpu")


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_bf16_autocast_only_on_cuda_when_enabled():
    cpu = torch.device("cpu")
    with utils.bf16_autocast(cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    context = utils.bf16_autocast(torch.device("cuda"))
    assert isinstance(context, torch.autocast) and context.fast_dtype == torch.bfloat16
    assert not isinstance(utils.bf16_autocast(torch.device("cuda"), enabled=False), torch.autocast)


def test_intra_op_threads_restores_the_count():
    before = torch.get_num_threads()
    with utils.intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), utils.intra_op_threads(None):
        torch.set_num_threads(1)  # the block changes it, then fails
        raise RuntimeError
    assert torch.get_num_threads() == before


def test_comma_lists():
    assert utils.comma_list(" ce, aepg,,") == ["ce", "aepg"]
    assert utils.comma_list("0,1, 2", int) == [0, 1, 2]
    with pytest.raises(ValueError):
        utils.comma_list("0,x", int)
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=utils.comma_list_argument(int))
    assert parser.parse_args(["--seeds", "3,4"]).seeds == [3, 4]
    with pytest.raises(SystemExit):
        parser.parse_args(["--seeds", "3,x"])


def test_markdown_table_plain_and_aligned():
    rows = [["ce", 1.5], ["aepg", None]]
    assert utils.markdown_table(["loss", "x"], rows) == "| loss | x |\n|---|---|\n| ce | 1.5 |\n| aepg | - |"
    aligned = utils.markdown_table(["loss", "x"], rows, align=True).splitlines()
    assert aligned == ["| loss | x   |", "|------|-----|", "| ce   | 1.5 |", "| aepg | -   |"]
