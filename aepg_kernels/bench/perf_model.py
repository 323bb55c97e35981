"""A static performance model of the GPU sweep: per case, the bytes the fused kernels move, the
exponentials and logarithms they compute, and the least time that allows on an H100 SXM and an
H200; beside it, where a GPU sweep was measured, measured time / predicted time.

    aepg-bench perf-model [--measured GPU-SWEEP.json] [--out FILE.json]

The lower bound of a case on a card is

    max(path bytes / HBM bandwidth, transcendentals / SFU rate) + passes x LAUNCH_FLOOR_S

The path is what the CUDA and Triton backends run for the case (both pick it by the same on-chip
rule, C <= 16384): the bytes floor of the harness (`bandwidth.minimal_bytes`, 1 read + 1 write) is
what the fused path moves; the recompute path reads the logits a second time. The transcendentals
are counted from the kernels' per-row math (csrc/policy_loss_math.h,
aepg_kernels/backends/triton/_row_math.py; docs/math.md section 2): one exponential per element
and pass, none per element for the entropy term, a few per row. No GPU is needed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .. import utils
from . import bandwidth, output
from .sweeps import MODES, Case, gpu_suite, logits_bytes

NOT_MEASURED = "not measured on GPU"
MEASURED_BACKENDS = ("cuda", "triton")  # the harness's implementation names of our GPU kernels
# The bound of a kernel that sweeps the logits includes at least this much per pass: an assumed
# order of the device time of one small kernel in a stream (launch latency, ramp-up, tail), not a
# measurement. The GPU sweep measures the real per-call time of launch-bound shapes
# (back_to_back_us, graph_us); compare those before trusting this constant.
LAUNCH_FLOOR_S = 2e-6


@dataclass(frozen=True)
class GpuSpec:
    """A card's peak rates. Bandwidth: the vendor datasheets ("NVIDIA H100 Tensor Core GPU"
    datasheet: H100 SXM 3.35 TB/s; "NVIDIA H200 Tensor Core GPU" datasheet: 4.8 TB/s). SFU: the
    CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table, compute capability 9.0:
    16 results per clock per SM for 32-bit exp2, log2, reciprocal and reciprocal square root; 132 SMs
    and a 1.98 GHz boost clock for the H100 SXM5 ("NVIDIA H100 Tensor Core GPU Architecture"
    whitepaper and datasheet), the same GH100 chip and SM count in the H200."""

    key: str
    card: str
    card_names: tuple  # substrings of torch's device name that identify the card
    hbm_bytes_per_second: float
    sm_count: int
    sfu_per_clock_per_sm: int
    boost_clock_hz: float

    @property
    def sfu_per_second(self) -> float:
        return self.sm_count * self.sfu_per_clock_per_sm * self.boost_clock_hz

    @property
    def sfu_per_byte(self) -> float:
        """Transcendentals per byte moved above which the SFU, not the memory, bounds a kernel."""
        return self.sfu_per_second / self.hbm_bytes_per_second


GPUS: Dict[str, GpuSpec] = {
    spec.key: spec
    for spec in (
        GpuSpec("h100-sxm", "H100 SXM", ("H100",), 3.35e12, 132, 16, 1.98e9),
        GpuSpec("h200", "H200", ("H200",), 4.8e12, 132, 16, 1.98e9),
    )
}


@dataclass(frozen=True)
class KernelPath:
    """How the GPU backends run a case: passes over the logits, gradient writes, and the
    transcendentals per element (all passes) and per row."""

    name: str
    description: str
    logit_reads: int
    gradient_writes: int
    exp_per_element: int
    log_per_element: int
    # log S, log p_y and p_y in the forward; log p_y again in a recomputing backward. The online
    # rescale of the streamed forward (one exponential per row and chunk) is left out: a bound.
    transcendentals_per_row: int

    @property
    def passes(self) -> int:
        return self.logit_reads

    @property
    def bytes_per_logit_byte(self) -> int:
        return self.logit_reads + self.gradient_writes


FORWARD = KernelPath("forward", "forward only: one read, exp once per element", 1, 0, 1, 0, 3)
FUSED = KernelPath("fused", "row on chip: the forward writes the gradient from its stored exponentials", 1, 1, 1, 0, 3)
RECOMPUTE = KernelPath(
    "recompute", "forward (row statistics), then a backward that reads the logits again and recomputes p", 2, 1, 2, 0, 4
)
PATHS = {path.name: path for path in (FORWARD, FUSED, RECOMPUTE)}


def on_chip(n_cols: int) -> bool:
    """The CUDA backend's rule (csrc/kernel_args.h kMaxOnChipCols, read from the extension)."""
    from aepg_kernels.backends.native import CUDA

    return CUDA.fits_on_chip(n_cols)


def kernel_path(case: Case) -> KernelPath:
    """forward for `fwd`; fused for a reduced loss whose row fits on chip (upstream gradient 1: the
    scale kernel returns on the device without touching the gradient); recompute otherwise."""
    mode = MODES[case.mode]
    if not mode.backward:
        return FORWARD
    if mode.reduction != "none" and on_chip(case.c):
        return FUSED
    return RECOMPUTE


def transcendentals(case: Case, path: KernelPath) -> int:
    return case.elements * (path.exp_per_element + path.log_per_element) + case.n * path.transcendentals_per_row


def bound(case: Case, path: KernelPath, gpu: GpuSpec, launch_floor_s: float = LAUNCH_FLOOR_S) -> Dict[str, Any]:
    """The lower bound of one case on one card, in microseconds, and what sets it."""
    memory_s = logits_bytes(case) * path.bytes_per_logit_byte / gpu.hbm_bytes_per_second
    sfu_s = transcendentals(case, path) / gpu.sfu_per_second
    launch_s = path.passes * launch_floor_s
    limit = "sfu" if sfu_s > memory_s else "memory"
    if launch_s > max(memory_s, sfu_s):
        limit = "launch"
    return {
        "floor_us": bandwidth.minimal_bytes(case) / gpu.hbm_bytes_per_second * 1e6,
        "memory_us": memory_s * 1e6,
        "sfu_us": sfu_s * 1e6,
        "launch_us": launch_s * 1e6,
        "bound_us": (max(memory_s, sfu_s) + launch_s) * 1e6,
        "bound_by": limit,
        "sfu_over_memory": sfu_s / memory_s if memory_s else None,
    }


def gpu_for_card(card: Optional[str]) -> Optional[GpuSpec]:
    """The spec whose name occurs in torch's device name ('NVIDIA H100 80GB HBM3' -> H100 SXM)."""
    for gpu in GPUS.values():
        if card and any(name.lower() in card.lower() for name in gpu.card_names):
            return gpu
    return None


def measured_times(document: Optional[Dict]) -> Dict[tuple, Dict]:
    """(loss, mode, dtype, n, c, implementation) -> the sweep's record, for our GPU backends."""
    if not document:
        return {}
    return {
        (r["loss"], r["mode"], r["dtype"], r["n"], r["c"], r["implementation"]): r
        for r in document.get("records", [])
        if r.get("implementation") in MEASURED_BACKENDS
    }


def measured_entry(record: Optional[Dict], predicted_us: Optional[float], card: Optional[str]) -> Dict[str, object]:
    if record is None:
        return {"status": NOT_MEASURED}
    if record.get("status") != "ok" or not record.get("seconds"):
        return {"status": record.get("status"), "reason": record.get("reason", "")}
    measured_us = record["seconds"] * 1e6
    entry: Dict[str, object] = {"status": "ok", "card": card, "measured_us": measured_us}
    if predicted_us is None:
        entry["reason"] = f"no spec in the model for the card {card!r}"
    else:
        entry["measured_over_predicted"] = measured_us / predicted_us
    return entry


def model_record(
    case: Case, measured: Dict[tuple, Dict], measured_gpu: Optional[GpuSpec], measured_card: Optional[str]
) -> Dict[str, object]:
    path = kernel_path(case)
    bounds = {key: bound(case, path, gpu) for key, gpu in GPUS.items()}
    predicted = bounds[measured_gpu.key]["bound_us"] if measured_gpu else None
    return {
        **asdict(case),
        "path": path.name,
        "floor_bytes": bandwidth.minimal_bytes(case),
        "path_bytes": logits_bytes(case) * path.bytes_per_logit_byte,
        "exp_per_element": path.exp_per_element,
        "log_per_element": path.log_per_element,
        "transcendentals": transcendentals(case, path),
        "bounds": bounds,
        "measured": {
            impl: measured_entry(
                measured.get((case.loss, case.mode, case.dtype, case.n, case.c, impl)), predicted, measured_card
            )
            for impl in MEASURED_BACKENDS
        },
    }


def build_document(measured_document: Optional[Dict] = None, cases: Optional[Sequence[Case]] = None) -> Dict:
    """The model of every case of the GPU sweep (or `cases`), with measured / predicted where
    `measured_document` (a GPU sweep's JSON) has the case."""
    cases = list(gpu_suite().cases if cases is None else cases)
    card = (measured_document or {}).get("machine", {}).get("card")
    measured = measured_times(measured_document)
    records = [model_record(case, measured, gpu_for_card(card), card) for case in cases]
    return {
        "suite": "perf-model",
        "complete": True,
        "gpus": {
            key: {**asdict(gpu), "sfu_per_second": gpu.sfu_per_second, "sfu_per_byte": gpu.sfu_per_byte}
            for key, gpu in GPUS.items()
        },
        "paths": {name: {**asdict(path), "passes": path.passes} for name, path in PATHS.items()},
        "settings": {
            "launch_floor_s": LAUNCH_FLOOR_S,
            "launch_floor_note": "assumed per pass over the logits, not measured",
            "bound": "max(path_bytes / HBM bandwidth, transcendentals / SFU rate) + passes x launch floor",
            "floor": "bandwidth.minimal_bytes (1 read + 1 write of the logits) / HBM bandwidth",
        },
        "measured_from": None
        if measured_document is None
        else {
            "card": card,
            "date": measured_document.get("machine", {}).get("date"),
            "complete": measured_document.get("complete"),
        },
        "records": records,
        "summary": summary(records),
    }


def summary(records: Sequence[Dict]) -> Dict[str, object]:
    """Per card: what bounds the cases and the largest SFU / memory time ratio; per backend: the
    number measured and the median measured / predicted."""
    result: Dict[str, object] = {}
    for key in GPUS:
        bounds = [r["bounds"][key] for r in records]
        result[key] = {
            "bound_by": {limit: sum(b["bound_by"] == limit for b in bounds) for limit in ("memory", "sfu", "launch")},
            "max_sfu_over_memory": max((b["sfu_over_memory"] or 0.0 for b in bounds), default=None),
        }
    for impl in MEASURED_BACKENDS:
        ratios = [
            r["measured"][impl]["measured_over_predicted"]
            for r in records
            if "measured_over_predicted" in r["measured"][impl]
        ]
        result[impl] = {
            "measured": len(ratios),
            "median_measured_over_predicted": statistics.median(ratios) if ratios else None,
        }
    return result


def _ratio_cell(entry: Dict) -> str:
    if "measured_over_predicted" in entry:
        return f"{entry['measured_over_predicted']:.2f}"
    return entry["status"] if entry["status"] != "ok" else entry.get("reason", "-")


def markdown(document: Dict) -> str:
    headers = [
        "case",
        "path",
        "floor MB",
        "exp+log / elt",
        *[f"{GPUS[k].card} floor / bound us" for k in GPUS],
        *[f"{impl} measured / predicted" for impl in MEASURED_BACKENDS],
    ]
    rows = []
    for r in document["records"]:
        bounds = [
            f"{r['bounds'][k]['floor_us']:.4g} / {r['bounds'][k]['bound_us']:.4g} ({r['bounds'][k]['bound_by']})"
            for k in GPUS
        ]
        rows.append(
            [
                f"{r['loss']} {r['mode']} {r['dtype']} {r['n']}x{r['c']}",
                r["path"],
                f"{r['floor_bytes'] / 1e6:.4g}",
                r["exp_per_element"] + r["log_per_element"],
                *bounds,
                *[_ratio_cell(r["measured"][impl]) for impl in MEASURED_BACKENDS],
            ]
        )
    return utils.markdown_table(headers, rows)


def summary_lines(document: Dict) -> List[str]:
    lines = []
    for key, gpu in GPUS.items():
        card = document["summary"][key]
        counts = ", ".join(f"{count} {limit}" for limit, count in card["bound_by"].items() if count)
        lines.append(
            f"{gpu.card}: bound by {counts}; SFU time at most {100 * card['max_sfu_over_memory']:.0f}% "
            f"of the memory time (the SFU binds above {gpu.sfu_per_byte:.2f} transcendentals per byte)"
        )
    for impl in MEASURED_BACKENDS:
        entry = document["summary"][impl]
        lines.append(
            f"{impl}: "
            + (
                NOT_MEASURED
                if not entry["measured"]
                else f"{entry['measured']} cases measured, median measured / predicted "
                f"{entry['median_measured_over_predicted']:.2f}"
            )
        )
    return lines


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog="aepg-bench perf-model", description=__doc__.splitlines()[0])
    result.add_argument(
        "--measured",
        type=Path,
        default=None,
        help="a GPU sweep's JSON (aepg-bench --suite gpu --out FILE): adds measured / predicted",
    )
    result.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the JSON file (the markdown table goes beside it as .md); default: "
        "perf-model-<date>.json in the working directory",
    )
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    measured = json.loads(args.measured.read_text()) if args.measured else None
    document = {
        **build_document(measured),
        "argv": list(argv or []),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out = args.out or Path.cwd() / f"perf-model-{datetime.date.today().isoformat()}.json"
    text = markdown(document) + "\n\n" + "\n".join(f"- {line}" for line in summary_lines(document))
    print(text)
    print(f"wrote {output.write_json(out, document)}")
    markdown_path = out.with_suffix(".md")
    markdown_path.write_text(text + "\n")
    print(f"wrote {markdown_path}")
    return 0
