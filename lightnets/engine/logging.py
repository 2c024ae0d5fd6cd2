"""What a run writes besides checkpoints: metrics.jsonl / metrics.csv, curves, a progress bar.

metrics.jsonl is the source of truth (one JSON object per line, appended); metrics.csv mirrors
it for spreadsheets and is rewritten from it whenever a row brings a new column.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lightnets.files import atomic_write_bytes, storage_errors
from lightnets.optional import available

__all__ = ["MetricsLogger", "ProgressBar", "plot_curves", "read_rows"]

JSONL = "metrics.jsonl"
CSV = "metrics.csv"


def _plain(value: Any) -> Any:
    """JSON-friendly Python value: tensors / numpy scalars become int, float, bool or lists."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # torch tensors, numpy arrays and scalars
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (or of the one in a run dir); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / JSONL
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                warnings.warn(f"{path}: skipping unreadable line {i + 1}", stacklevel=2)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def _csv_cell(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return value  # csv writes floats with repr(): plain, round-tripping, no numpy noise


def _csv_text(columns: list[str], rows: Iterable[dict[str, Any]], header: bool = True) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row.get(k, "")) for k in columns})
    return buf.getvalue()


class MetricsLogger:
    """Appends one row per epoch to `run_dir/metrics.jsonl` and `run_dir/metrics.csv`."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / JSONL
        self.csv = self.run_dir / CSV
        self._repair()
        self._columns = _columns(read_rows(self.jsonl))
        if self._columns and self._csv_header() != self._columns:
            self._rewrite(read_rows(self.jsonl))  # a missing or stale CSV: rebuild it

    def _repair(self) -> None:
        """Drop a torn last line (a run killed mid-append) so the next row starts cleanly."""
        if not self.jsonl.is_file() or self.jsonl.stat().st_size == 0:
            return
        with self.jsonl.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
        rows = read_rows(self.jsonl)
        atomic_write_bytes(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows))

    def _csv_header(self) -> list[str] | None:
        if not self.csv.is_file():
            return None
        with self.csv.open(newline="", encoding="utf-8") as f:
            return next(csv.reader(f), None)

    def rows(self) -> list[dict[str, Any]]:
        """Every logged row, oldest first."""
        return read_rows(self.jsonl)

    def log(self, row: dict[str, Any]) -> None:
        """Append `row` to both files (rewriting the CSV when it brings new columns)."""
        row = {str(k): _plain(v) for k, v in row.items()}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._repair()
        # a failed append (a full disk) leaves at worst a torn last line, which _repair drops
        with storage_errors(self.jsonl), self.jsonl.open("ab") as f:
            f.write((json.dumps(row) + "\n").encode("utf-8"))
        new = [k for k in row if k not in self._columns]
        if new or not self.csv.is_file():
            self._columns += new
            self._rewrite(self.rows())
        else:
            with storage_errors(self.csv), self.csv.open("a", newline="", encoding="utf-8") as f:
                f.write(_csv_text(self._columns, [row], header=False))

    def truncate(self, after_epoch: int) -> None:
        """Drop rows with epoch >= after_epoch (resuming from an earlier checkpoint)."""
        if not self.jsonl.is_file():
            return
        rows = self.rows()
        kept = [r for r in rows if not _is_number(r.get("epoch")) or r["epoch"] < after_epoch]
        self._columns = _columns(kept)
        self._rewrite(kept, jsonl=True)

    def _rewrite(self, rows: list[dict[str, Any]], jsonl: bool = False) -> None:
        if jsonl:
            atomic_write_bytes(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_bytes(self.csv, _csv_text(self._columns, rows))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _family(column: str) -> str:
    """Which subplot a column goes to: losses, accuracies, IoU, lr, or its own name."""
    name = column.lower()
    if name.endswith("loss"):
        return "loss"
    if "acc" in name:
        return "accuracy (%)"
    if "iou" in name:
        return "IoU (%)"
    if name == "lr" or name.endswith("_lr") or name.startswith("lr_"):
        return "learning rate"
    for prefix in ("train_", "val_", "test_"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _spans_decades(values: list[float], ratio: float = 30.0) -> bool:
    """Positive values whose largest is `ratio` times the median or more: a log scale shows
    them all (a linear one flattens everything after the first epoch)."""
    positive = sorted(v for v in values if v > 0 and math.isfinite(v))
    if len(positive) < 3 or len(positive) != len(values):
        return False
    return positive[-1] >= ratio * positive[len(positive) // 2]


def plot_curves(run_dir: str | Path, out_name: str = "curves.png") -> Path | None:
    """Draw every numeric column of metrics.jsonl against epoch into `out_name` (atomically);
    None if nothing to plot. See `curves_figure`."""
    run_dir = Path(run_dir)
    if not available("matplotlib"):  # an optional output: the run itself is fine without it
        warnings.warn(
            f'{out_name} was not drawn: it needs matplotlib (pip install "lightnets[plots]"); '
            "set output.plot = false to skip it",
            UserWarning,
            stacklevel=2,
        )
        return None
    fig = curves_figure(read_rows(run_dir / JSONL))
    if fig is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    out = run_dir / out_name
    atomic_write_bytes(out, buf.getvalue())
    return out


def curves_figure(rows: list[dict[str, Any]]):
    """The matplotlib Figure of the curves of metrics rows (one panel per family), or None.

    Whole epochs on the x axis; a family of curves whose values span decades (a first epoch's
    val_loss of 160, then 0.1) is drawn on a log scale, said in its title.

    Uses an Agg canvas directly, so it works headless and leaves matplotlib's global backend
    alone.
    """
    # matplotlib is the optional "plots" extra: imported when a plot is drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    if not rows:
        return None
    xs = [r["epoch"] if _is_number(r.get("epoch")) else i + 1 for i, r in enumerate(rows)]
    families: dict[str, list[str]] = {}
    for column in _columns(rows):
        if column in ("epoch", "step"):
            continue
        if any(_is_number(r.get(column)) for r in rows):
            families.setdefault(_family(column), []).append(column)
    if not families:
        return None

    ncols = min(3, len(families))
    nrows = math.ceil(len(families) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (family, columns) in zip(axes, families.items()):
        values = []
        for column in columns:
            points = [(x, r[column]) for x, r in zip(xs, rows) if _is_number(r.get(column))]
            style = "o-" if len(points) < 30 else "-"
            ax.plot(*zip(*points), style, markersize=3, label=column)
            values += [float(v) for _, v in points]
        if _spans_decades(values):  # e.g. a first epoch's loss of 160 beside 0.1 later
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        ax.set_title(family + (" (log scale)" if ax.get_yscale() == "log" else ""))
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(families) :]:
        ax.set_visible(False)
    return fig


class ProgressBar:
    """A tqdm bar for one epoch: steps, loss & metric, images/s, and tqdm's ETA, on stderr.

    When stderr is not a terminal (CI, log files) it refreshes only every few seconds so the
    log stays readable.
    """

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        disable: bool = False,
        initial: int = 0,
        mininterval: float | None = None,
    ) -> None:
        self.disable = disable
        self.images = 0
        self.start = time.perf_counter()
        self._bar = None
        if disable:
            return
        stream = sys.stderr
        tty = hasattr(stream, "isatty") and stream.isatty()
        self.mininterval = mininterval if mininterval is not None else (0.5 if tty else 5.0)
        self._bar = tqdm(
            total=total,
            desc=desc,
            initial=initial,
            file=stream,
            mininterval=self.mininterval,
            dynamic_ncols=tty,
            ncols=None if tty else 100,
            leave=True,
            unit="step",
        )
        self._last_postfix = -math.inf

    @property
    def images_per_s(self) -> float:
        """Images per second of wall time since the bar was created."""
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def due(self) -> bool:
        """The next `update` shows new values: it is a refresh (`mininterval` seconds since
        the last, or the bar's last step), where reading device values is expected."""
        if self._bar is None:
            return False
        last = self._bar.total is not None and self._bar.n + 1 >= self._bar.total
        return time.perf_counter() - self._last_postfix >= self.mininterval or last

    def update(self, n_images: int = 0, **postfix: Any) -> None:
        """One step of `n_images` images; `postfix` values (loss=..., acc=...) are shown.

        Values are read only when the bar refreshes (every `mininterval` seconds): a device
        tensor or a callable (called then) waits for the device only at that rate."""
        self.images += int(n_images)
        if self._bar is None:
            return
        if self.due():
            self._last_postfix = time.perf_counter()
            shown = {k: _short(v) for k, v in postfix.items()}
            shown["img/s"] = f"{self.images_per_s:.0f}"
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _short(value: Any) -> str:
    if callable(value):  # computed only when shown (it may wait for the device)
        value = value()
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
