"""What a run leaves behind: the terminal table, the JSON document with every number and the
machine, the markdown tables, and the PNG plot (GB/s vs C per implementation, the copy bandwidth as
a line). Files go where --out says, else into the working directory."""

from __future__ import annotations

import datetime
import math
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from aepg_kernels import utils

SCHEMA = "aepg-bench/1"
INTERRUPTED = 130  # the exit status of a run stopped by SIGINT (128 + 2), its numbers written

# (header, record key, format, width); None values print as "-". Times and bandwidths get
# 3-4 significant digits without exponents (`format_number`).
COLUMNS = (
    ("loss", "loss", "{}", 5),
    ("mode", "mode", "{}", 12),
    ("dtype", "dtype", "{}", 5),
    ("N x C", None, "{}", 14),
    ("implementation", "label", "{}", 25),  # the record's label, else its implementation
    ("ms", "ms", None, 9),
    ("GB/s", "gbps", None, 8),
    ("%copy", "percent_of_copy", "{:.1f}", 6),
    ("x lean-eager", "speedup_vs_lean_eager", "{:.2f}", 12),  # vs the lean composite a user writes,
    ("x lean-compile", "speedup_vs_lean_compile", "{:.2f}", 14),  # its torch.compile,
    ("x F.ce", "speedup_vs_torch_ce", "{:.2f}", 6),  # and F.cross_entropy (CE)
    ("peak/logits", "peak_extra_over_logits", "{:.2f}", 11),
    ("kernels", "kernels_per_call", "{:.3g}", 7),
    ("b2b us", "back_to_back_us", None, 8),  # launch-bound shapes: per call back to back, without
    ("graph us", "graph_us", None, 8),  # and with a CUDA graph
)
NOT_APPLICABLE = "n/a"  # the status of an implementation that does not compute this loss (hidden in the table)


def format_number(value: float) -> str:
    """3-4 significant digits, fixed point: 11490, 614.3, 6.78, 0.0986."""
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:.0f}"
    if magnitude >= 1:
        return f"{value:.{3 - len(str(int(magnitude)))}f}" if magnitude < 100 else f"{value:.1f}"
    return f"{value:.3g}"


def _cell(record: Dict, key: Optional[str], fmt: Optional[str]) -> str:
    if key is None:
        return f"{record['n']}x{record['c']}"
    if key == "label":
        return record.get("label") or record["implementation"]
    value = record.get(key)
    if value is None:
        return "-"
    return format_number(value) if fmt is None else fmt.format(value)


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


def device_tag(info: Dict) -> str:
    """A file-name tag for the machine: the card ('nvidia-h100-80gb-hbm3') or 'cpu<cores>c<threads>t'
    (runs at different thread counts on one day do not overwrite each other)."""
    if info.get("card"):
        return re.sub(r"[^a-z0-9]+", "-", str(info["card"]).lower()).strip("-")
    return f"cpu{info['cores']}c{info['torch_threads']}t"


def output_path(out: Optional[Path], stem: str) -> Path:
    """`out` (--out) when given, else `<stem>-<date>.json` in the working directory."""
    if out is not None:
        return out
    return Path.cwd() / f"{stem}-{datetime.date.today().isoformat()}.json"


def write_json(path: Path, document: Dict) -> Path:
    """The document with the harness's schema tag, as strict JSON written atomically
    (aepg_kernels.utils.write_json: a run killed while writing leaves the previous complete file;
    a non-finite number, e.g. an infinite gate error, is null)."""
    return utils.write_json(path, {"schema": SCHEMA, **document}, "document")


def write_json_and_markdown(document: Dict, json_path: Path, text: str) -> None:
    """FILE.json and FILE.md (the markdown tables `text`) beside it."""
    print(f"wrote {write_json(json_path, document)}")
    md = utils.write_text(json_path.with_suffix(".md"), text + "\n")
    print(f"wrote {md}")


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
    return {
        key: {impl: {c: v[1] for c, v in per_c.items()} for impl, per_c in impls.items()} for key, impls in best.items()
    }


def write_plot(path: Path, records: Sequence[Dict], copy_gbps: Optional[float], title: str) -> Optional[Path]:
    """One panel per (loss, mode, dtype): GB/s over the bytes floor vs C (log axis) per
    implementation at the largest N measured, the copy bandwidth as a dashed line. None (and no
    file) when nothing was timed or matplotlib is missing."""
    groups = _plot_groups(records)
    if not groups:
        return None
    try:
        from matplotlib import colormaps
    except ImportError:
        return None
    keys = sorted(groups)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = utils.new_figure(5.5 * cols, 4 * rows, rows, cols)
    names = sorted({impl for impls in groups.values() for impl in impls})
    colors = {name: colormaps["tab10"](i % 10) for i, name in enumerate(names)}
    for ax, key in zip(axes, keys, strict=False):  # the grid may have spare panels
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
    for ax in axes[len(keys) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return utils.save_figure(fig, path, dpi=110)


def summary_lines(records: Sequence[Dict]) -> List[str]:
    """Counts of what did not get a number, so a reader sees it without scanning the table."""
    lines = []
    for status in ("failed check", "error", "skipped"):
        hits = [r for r in records if r["status"] == status]
        if hits:
            reasons = sorted({r["reason"].split(":")[0] for r in hits})
            lines.append(f"{len(hits)} {status}: {'; '.join(reasons)}")
    return lines
