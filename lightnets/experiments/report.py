"""An experiment's report: the results table (ours beside the paper's), its JSON and CSV, and
the figures, written into the out dir; separate from running, so a paper module can add its own
tables and figures from the same `ExperimentResults`.

`write_results` writes `results.md` (also printed), `results.json`, `results.csv` and
`results.png`. The numbers are what the runs measured; the paper's are shown beside them, never
mixed in. Figures are drawn off-screen with matplotlib (the `plots` extra) and saved atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightnets.experiments.outdir import normalized, write_text
from lightnets.experiments.results import ExperimentResults, RunResult, Summary, VariantResult
from lightnets.files import atomic_write_bytes
from lightnets.optional import require

__all__ = [
    "format_table",
    "mean_std",
    "new_figure",
    "plot_results",
    "results_dict",
    "save_figure",
    "write_results",
]


def mean_std(s: Summary) -> str:
    """'12.34 ± 0.56', or '12.34' for one value (a single seed has no spread to show)."""
    return f"{s.mean:.2f}" if s.n == 1 else f"{s.mean:.2f} ± {s.std:.2f}"


# ----------------------------------------------------------------------------- figures
def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib Figure drawn off-screen (Agg canvas, no display needed), for save_figure."""
    figure = require("matplotlib.figure", "plots", "the experiments' figures")
    agg = require("matplotlib.backends.backend_agg", "plots", "the experiments' figures")
    fig = figure.Figure(figsize=figsize)
    agg.FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure to `path` atomically (temp file + rename), at 120 dpi."""
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------- the table
def _ours(s: Summary, reason: str | None, runs: list[RunResult]) -> str:
    if s.n == 0:
        if reason:
            return f"n/a ({reason})"
        why = next((r.reason for r in runs if r.reason), None)
        return f"failed ({why})" if why else "n/a"
    return f"{mean_std(s)} ({s.n})"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"


def _deltas(results: ExperimentResults, vr: VariantResult) -> tuple[float | None, float | None]:
    """(ours, paper) difference of this variant's final mean to its baseline variant's."""
    base_name = vr.variant.baseline
    if base_name is None or base_name == vr.variant.name:
        return None, None
    base = results.by_name(base_name)
    if base is None:
        return None, None
    ours = None
    if vr.headline.n and base.headline.n:
        ours = vr.headline.mean - base.headline.mean
    paper = None
    if vr.variant.paper is not None and base.variant.paper is not None:
        paper = vr.variant.paper - base.variant.paper
    return ours, paper


def format_table(results: ExperimentResults) -> str:
    """The markdown results table (title, notes, one row per variant)."""
    spec = results.spec
    has_baseline = any(v.variant.baseline for v in results.variants)
    k = spec.median_of_last
    head = ["variant"]
    if k:
        head.append(f"ours (median of last {k})")
    head += ["ours (final)", "ours (best epoch)", spec.paper_label, f"ours − {spec.paper_label}"]
    if has_baseline:
        head += ["Δ vs baseline (ours)", "Δ vs baseline (paper)"]
    lines = [f"## {spec.title}", ""]
    lines += [f"{note}" for note in spec.notes]
    if spec.notes:
        lines.append("")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for vr in results.variants:
        paper = vr.variant.paper
        diff = vr.headline.mean - paper if (vr.headline.n and paper is not None) else None
        best = _ours(vr.best, None, []) if vr.best.n else "—"
        cells = [vr.variant.label]
        if k:
            cells.append(_ours(vr.headline, vr.reason, vr.runs))
        cells += [
            _ours(vr.final, vr.reason, vr.runs),
            best,
            "—" if paper is None else f"{paper:.3f}",
            _signed(diff),
        ]
        if has_baseline:
            ours_d, paper_d = _deltas(results, vr)
            cells += [_signed(ours_d), _signed(paper_d)]
        lines.append("| " + " | ".join(cells) + " |")
    median = (
        f"median of last {k}: the median over each run's last {k} evaluated epochs (the "
        f"number compared with the paper); "
        if k
        else ""
    )
    lines += [
        "",
        f"ours: {'100 − ' if spec.as_error else ''}{spec.metric} ({spec.metric_label}), mean ± "
        "std over seeds (ddof=1) and the number of seeds in parentheses; "
        f"{median}final: at the last epoch; best epoch: the "
        f"{'lowest' if spec.as_error else 'highest'} value over the evaluated epochs (selected "
        "on the evaluation set, so optimistic).",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- json, csv
def results_dict(results: ExperimentResults) -> dict[str, Any]:
    """Everything results.json holds: the spec's settings, each variant's summaries and runs."""
    spec = results.spec
    variants = []
    for vr in results.variants:
        ours_d, paper_d = _deltas(results, vr)
        variants.append(
            {
                "name": vr.variant.name,
                "label": vr.variant.label,
                "overrides": vr.variant.overrides,
                "status": vr.status,
                "reason": vr.reason,
                "paper": vr.variant.paper,
                "baseline": vr.variant.baseline,
                "final": asdict(vr.final),
                "best": asdict(vr.best),
                "median_of_last": None if vr.median is None else asdict(vr.median),
                "diff_to_paper": (
                    vr.headline.mean - vr.variant.paper
                    if vr.headline.n and vr.variant.paper is not None
                    else None
                ),
                "delta_vs_baseline": ours_d,
                "paper_delta_vs_baseline": paper_d,
                "runs": [asdict(r) for r in vr.runs],
            }
        )
    return {
        "experiment": spec.experiment,
        "title": spec.title,
        "arguments": normalized(spec.settings),
        "seeds": spec.seeds,
        "recipe": spec.recipe,
        "base_overrides": spec.base_overrides,
        "metric": spec.metric,
        "median_of_last": spec.median_of_last,
        "paper_label": spec.paper_label,
        "notes": spec.notes,
        "seconds": results.seconds,
        "variants": variants,
    }


def _csv_text(results: ExperimentResults) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            "variant",
            "label",
            "status",
            "n",
            "final_mean",
            "final_std",
            "best_mean",
            "best_std",
            "median_last_mean",
            "median_last_std",
            "paper",
            "diff_to_paper",
            "final_values",
            "reason",
        ]
    )
    for vr in results.variants:
        paper = vr.variant.paper
        diff = vr.headline.mean - paper if (vr.headline.n and paper is not None) else None
        median = vr.median or Summary(None, None, 0, [])
        writer.writerow(
            [
                vr.variant.name,
                vr.variant.label,
                vr.status,
                vr.final.n,
                _num(vr.final.mean),
                _num(vr.final.std),
                _num(vr.best.mean),
                _num(vr.best.std),
                _num(median.mean),
                _num(median.std),
                _num(paper),
                _num(diff),
                ";".join(f"{v:.4f}" for v in vr.final.values),
                vr.reason or "",
            ]
        )
    return buf.getvalue()


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def write_results(results: ExperimentResults) -> None:
    """results.md, results.json, results.csv and results.png in the experiment's out dir."""
    out = Path(results.spec.out)
    write_text(out / "results.md", format_table(results) + "\n")
    write_text(
        out / "results.json", json.dumps(results_dict(results), indent=2, default=str) + "\n"
    )
    write_text(out / "results.csv", _csv_text(results))
    plot_results(results, out / "results.png")


# ----------------------------------------------------------------------------- the figure
def plot_results(results: ExperimentResults, path: Path) -> None:
    """Bar chart of ours (final, mean with std error bars) per variant; the paper as markers."""
    spec = results.spec
    variants = results.variants
    n = len(variants)
    fig = new_figure((max(7.0, 0.9 * n + 4.0), 4.8))
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(n))
    means = [vr.headline.mean if vr.headline.n else 0.0 for vr in variants]
    stds = [vr.headline.std if vr.headline.n else 0.0 for vr in variants]
    have = [vr.headline.n > 0 for vr in variants]
    values = [m for m, h in zip(means, have) if h]
    values += [vr.variant.paper for vr in variants if vr.variant.paper is not None]
    low = 0.0
    if values:  # accuracies sit in a narrow band: start the axis just below it (noted on it)
        span = max(values) - min(values)
        low = max(0.0, math.floor(min(values) - max(2.0, 0.5 * span) - max(stds, default=0.0)))
    ax.bar(
        [x for x, h in zip(xs, have) if h],
        [m - low for m, h in zip(means, have) if h],
        bottom=low,
        yerr=[s for s, h in zip(stds, have) if h],
        capsize=4,
        color="#4c72b0",
        label=(
            f"ours (median of last {spec.median_of_last}, mean ± std)"
            if spec.median_of_last
            else "ours (final, mean ± std)"
        ),
    )
    px = [x for x, vr in zip(xs, variants) if vr.variant.paper is not None]
    py = [vr.variant.paper for vr in variants if vr.variant.paper is not None]
    if px:
        ax.scatter(px, py, marker="D", color="#c44e52", zorder=3, label=spec.paper_label)
    top = max(values) if values else 1.0
    top += max(1.0, 0.08 * (top - low))
    for x, vr in zip(xs, variants):
        if not vr.headline.n:
            ax.text(x, low + 0.02 * (top - low), "n/a", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(xs)
    ax.set_xticklabels([vr.variant.label for vr in variants], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(low, top)
    cut = f" (axis starts at {low:g})" if low > 0 else ""
    ax.set_ylabel(f"{spec.metric_label}{cut}", fontsize=9)
    ax.set_title(textwrap.fill(spec.title, 70), fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
