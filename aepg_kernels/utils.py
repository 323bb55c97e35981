"""Helpers shared by the trainer (`aepg_kernels.train`) and the benchmark harness
(`aepg_kernels.bench`): files written atomically, strict JSON, figures, the software environment,
progress bars, device and autocast choice, intra-op thread counts, and comma lists on a command line.

matplotlib and tqdm are imported inside the functions that use them, so importing this module
costs no more than importing torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    Callable,
    ContextManager,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch

if TYPE_CHECKING:  # matplotlib is optional and imported only by the figure helpers
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PathLike = Union[str, "os.PathLike[str]"]

# ---------------------------------------------------------------------------------------------
# files


def write_atomically(path: PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Calls `write(file)` on a temporary file in the target's folder, then renames it over `path`
    (os.replace): a reader, or a run killed midway, sees the previous file or the whole new one,
    never part of one. The temporary file is removed when `write` or the rename fails. Creates the
    folder if needed; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: concurrent writers do not collide
    try:
        with open(tmp, "wb") as file:
            write(file)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: PathLike, text: str) -> Path:
    """`text` (UTF-8) into `path`, atomically (see `write_atomically`)."""
    return write_atomically(path, lambda file: file.write(text.encode("utf-8")))


# ---------------------------------------------------------------------------------------------
# JSON

ONE_LINE_RECORD_CHARS = 200  # layout: a flat record up to this long goes on one line


def to_jsonable(value: Any, key: str = "value") -> Any:
    """`value` as plain JSON values: mappings (keys as str), lists (from lists and tuples), str,
    int, bool, None and finite floats. Tensors and numpy values become lists or numbers, paths
    strings. Non-finite floats (NaN, +-inf) become None, written as null: strict JSON has no NaN
    or Infinity, so a reader takes null in a numeric field as "no finite value". Anything else is
    a TypeError naming `key`, the place of the value (e.g. "summary.timing.device")."""
    if hasattr(value, "tolist"):  # tensors, numpy arrays and numpy scalars
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"{key}: cannot be written to JSON ({type(value).__name__})")


def _on_one_line(match: re.Match) -> str:
    # A JSON string holds no raw newline: every newline and its indentation is layout.
    text = re.sub(r"\s*\n\s*([\]}])", r"\1", re.sub(r"([\[{])\s*\n\s*", r"\1", match.group(0)))
    return re.sub(r"\s*\n\s*", " ", text)


def json_text(value: Any, key: str = "value") -> str:
    """Strict JSON of `to_jsonable(value)` (its rule for non-finite floats: null), indented, with
    each list of plain values (a matrix row, a curve) on one line and each flat record of at most
    ONE_LINE_RECORD_CHARS characters too; ends with a newline."""
    text = json.dumps(to_jsonable(value, key), indent=2, allow_nan=False)
    text = re.sub(r"\[[^\[\]{}]*\]", _on_one_line, text)
    text = re.sub(
        r"\{[^\[\]{}]*\}", lambda m: _on_one_line(m) if len(m.group(0)) <= ONE_LINE_RECORD_CHARS else m.group(0), text
    )
    return text + "\n"


def write_json(path: PathLike, value: Any, key: str = "value") -> Path:
    """`json_text(value)` into `path`, atomically; returns the path."""
    return write_text(path, json_text(value, key))


# ---------------------------------------------------------------------------------------------
# the environment


def package_version(name: str) -> Optional[str]:
    """The installed version of distribution `name` (e.g. "liger-kernel"), None when absent."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(*packages: str) -> Dict[str, Optional[str]]:
    """The versions a result depends on: aepg_kernels, torch, Python, and each of `packages`
    (looked up, not imported; keyed with "-" as "_", e.g. "liger_kernel")."""
    import aepg_kernels  # here, not at the top: the package imports this module

    versions: Dict[str, Optional[str]] = {
        "aepg_kernels": aepg_kernels.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    versions.update({name.replace("-", "_"): package_version(name) for name in packages})
    return versions


# ---------------------------------------------------------------------------------------------
# figures


def new_figure(
    width: float = 6.4, height: float = 4.8, rows: int = 1, cols: int = 1, sharex: bool = False
) -> Tuple["Figure", List["Axes"]]:
    """A matplotlib figure on its own Agg canvas and its axes, row by row in a list. No pyplot: no
    display is opened and matplotlib's global backend stays as it was. ImportError without
    matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, sharex=sharex, squeeze=False)
    return figure, list(axes.flat)


def save_figure(figure: "Figure", path: PathLike, dpi: int = 120) -> Path:
    """Writes `figure` atomically, in the format of the path's suffix (e.g. .png); returns the path."""
    suffix = Path(path).suffix.lstrip(".") or "png"
    return write_atomically(path, lambda file: figure.savefig(file, format=suffix, dpi=dpi))


# ---------------------------------------------------------------------------------------------
# progress


class NoProgressBar:
    """The part of tqdm's interface that callers use, with no bar: `write` prints the line."""

    def __enter__(self) -> "NoProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(line: str) -> None:
        print(line, flush=True)


def progress_bar(total: int, enabled: bool = True, **options: Any) -> Any:
    """A tqdm bar on standard error (`options` go to tqdm: desc, unit, initial, leave, ...) when
    `enabled`, standard error is a terminal and tqdm is installed; else a NoProgressBar, so that a
    log file or a pipe gets no control characters. Lines go through the bar's `write`."""
    if not (enabled and sys.stderr.isatty()):
        return NoProgressBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return NoProgressBar()
    options.setdefault("dynamic_ncols", True)
    return tqdm(total=total, file=sys.stderr, **options)


# ---------------------------------------------------------------------------------------------
# devices, autocast and threads


def resolve_device(name: str = "auto", index: Optional[int] = None) -> torch.device:
    """ "auto": the GPU when CUDA is available, else the CPU; any other name as torch.device reads
    it. A CUDA device without an index gets `index` when one is given (a process's local rank)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and index is not None:
        device = torch.device("cuda", index)
    return device


def bf16_autocast(device: torch.device, enabled: bool = True) -> ContextManager[Any]:
    """bf16 autocast on a CUDA device when `enabled`; a context that does nothing elsewhere (on a
    CPU, bf16 autocast would slow the step down rather than speed it up)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def intra_op_threads(count: Optional[int]) -> Iterator[None]:
    """Runs the block with `count` intra-op threads (torch.set_num_threads), None: as many as now;
    the previous count is restored on exit, also when the block changed it."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# command lines and tables


def comma_list(text: str, kind: Callable[[str], Any] = str) -> List[Any]:
    """'a, b,,c' -> ['a', 'b', 'c']: items stripped, empty ones dropped, each converted by `kind`
    (ValueError from it propagates)."""
    return [kind(item) for item in (part.strip() for part in text.split(",")) if item]


def comma_list_argument(kind: Callable[[str], Any] = str) -> Callable[[str], List[Any]]:
    """An argparse `type=` for `comma_list(text, kind)`; a bad item is a usage error naming the list."""

    def parse(text: str) -> List[Any]:
        try:
            return comma_list(text, kind)
        except ValueError:
            name = getattr(kind, "__name__", "values")
            raise argparse.ArgumentTypeError(f"expected a comma list of {name}, got {text!r}") from None

    return parse


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: bool = False) -> str:
    """A GitHub markdown table: cells as str(), None as "-". `align` pads every column to its widest
    cell, for a table read as plain text (a terminal)."""
    cells: List[Tuple[str, ...]] = [tuple(headers)]
    cells += [tuple("-" if cell is None else str(cell) for cell in row) for row in rows]
    widths = [max(len(row[c]) for row in cells) if align else 0 for c in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (width + 2) if align else "---" for width in widths) + "|"
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])
