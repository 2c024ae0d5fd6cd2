"""Training curves of the Bop experiments: per-epoch and per-step metrics read back from the
run dirs, averaged over seeds, smoothed as the paper smoothed them, and drawn per variant.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lightnets.engine.logging import read_rows
from lightnets.experiments.report import new_figure, save_figure
from lightnets.experiments.results import ExperimentResults, VariantResult

__all__ = ["gaussian_smooth", "mean_curves", "mean_steps", "ok_dirs", "plot_curves_by_variant"]


def gaussian_smooth(values: list[float], sigma: float) -> list[float]:
    """1-D Gaussian filter (std `sigma` samples, edges extended with the end values), as the
    paper smoothed its per-step curves (scipy's gaussian_filter1d, mode 'nearest')."""
    x = np.asarray(values, dtype=np.float64)
    if sigma <= 0 or x.size < 2:
        return x.tolist()
    radius = int(4.0 * sigma + 0.5)
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (k / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(x, radius, mode="edge")
    return np.convolve(padded, kernel, mode="valid").tolist()


def mean_curves(run_dirs: list[str], column: str) -> tuple[list[float], list[float]]:
    """Per-epoch values of `column`, averaged over runs (epochs all runs have)."""
    curves = []
    for run_dir in run_dirs:
        rows = read_rows(run_dir)
        curves.append(
            {int(r["epoch"]): float(r[column]) for r in rows if isinstance(r.get(column), float)}
        )
    if not curves:
        return [], []
    epochs = sorted(set.intersection(*(set(c) for c in curves)))
    return [float(e) for e in epochs], [sum(c[e] for c in curves) / len(curves) for e in epochs]


def mean_steps(run_dirs: list[str], column: str = "log_flip_ratio_steps") -> list[float]:
    """A per-step list column concatenated over epochs, averaged over runs (common length)."""
    runs = []
    for run_dir in run_dirs:
        values: list[float] = []
        for row in read_rows(run_dir):
            values += [float(v) for v in row.get(column) or []]
        runs.append(values)
    if not runs:
        return []
    n = min(len(v) for v in runs)
    return [sum(v[i] for v in runs) / len(runs) for i in range(n)]


def ok_dirs(vr: VariantResult) -> list[str]:
    """The run dirs of a variant's finished runs."""
    return [r.run_dir for r in vr.runs if r.ok]


def plot_curves_by_variant(
    results: ExperimentResults, path: Path, columns: list[tuple[str, str]], title: str
) -> None:
    """One panel per column, one line per variant: the per-epoch mean over seeds."""
    fig = new_figure((5.2 * len(columns), 4.2))
    for i, (column, label) in enumerate(columns, start=1):
        ax = fig.add_subplot(1, len(columns), i)
        for vr in results.variants:
            xs, ys = mean_curves(ok_dirs(vr), column)
            if xs:
                ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", markersize=3, label=vr.variant.label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
