"""What a run leaves behind: the terminal table, the JSON file with every number and the machine,
and the PNG plot (GB/s vs C per implementation, the copy bandwidth as a line)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

SCHEMA = "aepg-bench/1"

# (header, record key, format, width); None values print as "-". Times and bandwidths get
# 3-4 significant digits without exponents (`_number`).
COLUMNS = (
    ("loss", "loss", "{}", 5),
    ("mode", "mode", "{}", 12),
    ("dtype", "dtype", "{}", 5),
    ("N x C", None, "{}", 14),
    ("implementation", "label", "{}", 25),  # the record's label, else its implementation
    ("ms", "ms", None, 9),
    ("GB/s", "gbps", None, 8),
    ("%copy", "percent_of_copy", "{:.1f}", 6),
    ("x lean-eager", "speedup_vs_lean_eager", "{:.2f}", 12),     # vs the lean composite a user writes,
    ("x lean-compile", "speedup_vs_lean_compile", "{:.2f}", 14),  # its torch.compile,
    ("x F.ce", "speedup_vs_torch_ce", "{:.2f}", 6),               # and F.cross_entropy (CE)
    ("peak/logits", "peak_extra_over_logits", "{:.2f}", 11),
    ("kernels", "kernels_per_call", "{:.3g}", 7),
    ("b2b us", "back_to_back_us", None, 8),  # launch-bound shapes: per call back to back, without
    ("graph us", "graph_us", None, 8),       # and with a CUDA graph
)
NOT_APPLICABLE = "n/a"  # the status of an implementation that does not compute this loss (hidden in the table)


def _number(value: float) -> str:
    """3-4 significant digits, fixed point: 11490, 614.3, 6.78, 0.0986."""
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:.0f}"
    if magnitude >= 1:
        return f"{value:.{3 - len(str(int(magnitude)))}f}" if magnitude < 100 else f"{value:.1f}"
    return f"{value:.3g}"


def _cell(record: Dict, key: Optional[str], fmt: str) -> str:
    if key is None:
        return f"{record['n']}x{record['c']}"
    if key == "label":
        return record.get("label") or record["implementation"]
    value = record.get(key)
    if value is None:
        return "-"
    return _number(value) if fmt is None else fmt.format(value)


def header() -> str:
    return " ".join(f"{title:>{width}}" for title, _, _, width in COLUMNS)


def format_row(record: Dict) -> str:
    """One table line; a record without a time shows its status and reason instead of numbers."""
    if record["status"] != "ok":
        lead = COLUMNS[:5]
        cells = " ".join(f"{_cell(record, key, fmt):>{width}}" for _, key, fmt, width in lead)
        return f"{cells}  {record['status']}: {record['reason']}"
    return " ".join(f"{_cell(record, key, fmt):>{width}}" for _, key, fmt, width in COLUMNS)


def format_table(records: Iterable[Dict]) -> str:
    return "\n".join([header()] + [format_row(r) for r in records if r["status"] != NOT_APPLICABLE])


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table; cells as str(), None as "-"."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join("-" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def default_output_dir(cwd: Path, package_dir: Path) -> Path:
    """bench/results of the checkout when the package runs from one (the package's parent holds
    bench/ and pyproject.toml), else the working directory."""
    checkout = package_dir.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "bench").is_dir():
        return checkout / "bench" / "results"
    return cwd


def _strict(value):
    """Non-finite floats (an infinite gate error) as strings: strict JSON has no Infinity or NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _strict(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json(path: Path, document: Dict) -> Path:
    """Atomically (a temporary file beside it, then os.replace): a run killed while writing leaves
    the previous complete file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_strict({"schema": SCHEMA, **document}), indent=1, default=str, allow_nan=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    return path


def _plot_groups(records: Sequence[Dict]) -> Dict[tuple, Dict[str, Dict[int, float]]]:
    """(loss, mode, dtype) -> implementation (its label) -> C -> GB/s, at the largest N measured for that C."""
    best: Dict[tuple, Dict[str, Dict[int, tuple]]] = {}
    for r in records:
        if r["status"] != "ok" or not r.get("gbps"):
            continue
        name = r.get("label") or r["implementation"]
        per_c = best.setdefault((r["loss"], r["mode"], r["dtype"]), {}).setdefault(name, {})
        if r["c"] not in per_c or r["n"] > per_c[r["c"]][0]:
            per_c[r["c"]] = (r["n"], r["gbps"])
    return {key: {impl: {c: v[1] for c, v in per_c.items()} for impl, per_c in impls.items()}
            for key, impls in best.items()}


def write_plot(path: Path, records: Sequence[Dict], copy_gbps: Optional[float], title: str) -> Optional[Path]:
    """One panel per (loss, mode, dtype): GB/s over the bytes floor vs C (log axis) per
    implementation at the largest N measured, the copy bandwidth as a dashed line. None (and no
    file) when nothing was timed or matplotlib is missing."""
    groups = _plot_groups(records)
    if not groups:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = sorted(groups)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    names = sorted({impl for impls in groups.values() for impl in impls})
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}  # one colour per implementation
    for ax, key in zip(axes.flat, keys, strict=False):  # the grid may have spare panels
        for impl, per_c in sorted(groups[key].items()):
            cs = sorted(per_c)
            ax.plot(cs, [per_c[c] for c in cs], marker="o", label=impl, color=colors[impl])
        if copy_gbps:
            ax.axhline(copy_gbps, color="black", linestyle="--", linewidth=1, label="device copy")
        ax.set_xscale("log")
        ax.set_xlabel("classes C")
        ax.set_ylabel("GB/s over the bytes floor")
        ax.set_title(" ".join(key), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_lines(records: Sequence[Dict]) -> List[str]:
    """Counts of what did not get a number, so a reader sees it without scanning the table."""
    lines = []
    for status in ("failed check", "error", "skipped"):
        hits = [r for r in records if r["status"] == status]
        if hits:
            reasons = sorted({r["reason"].split(":")[0] for r in hits})
            lines.append(f"{len(hits)} {status}: {'; '.join(reasons)}")
    return lines
