"""What an experiment measured: one result per run, summarized per variant over its seeds.

Per run: the final and the best value of the metric (best over evaluated epochs, as the
Trainer's `best.pt`), and with `median_of_last = k` the median of the last k evaluated epochs
(the GN paper's statistic), which is then the headline number compared with the paper. Per
variant: mean ± std over seeds (std with ddof=1, 0 for one seed). The values are read back
from each run dir's metrics, so a finished run reports the same whether it was trained now
or before.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from lightnets.engine.logging import read_rows
from lightnets.experiments.spec import ExperimentSpec, Variant

__all__ = [
    "ExperimentResults",
    "RunResult",
    "Summary",
    "VariantResult",
    "as_error",
    "best_of",
    "median_of_last",
    "metric_values",
    "summarize",
    "variant_result",
]


@dataclass
class RunResult:
    """One variant x seed. `status`: trained, resumed, skipped (finished before), failed, n/a."""

    variant: str
    seed: int
    run_dir: str
    status: str
    final: float | None = None
    best: float | None = None
    epoch: int | None = None
    step: int | None = None
    seconds: float | None = None
    reason: str | None = None
    #: median of the metric over the last k evaluated epochs (ExperimentSpec.median_of_last)
    median_last: float | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("trained", "resumed", "skipped") and self.final is not None


@dataclass
class Summary:
    """Mean ± std (ddof=1; 0 for a single value) of `values`."""

    mean: float | None
    std: float | None
    n: int
    values: list[float]


def summarize(values: list[float]) -> Summary:
    """Mean and sample standard deviation (ddof=1 when n > 1, else 0) of `values`."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return Summary(None, None, 0, [])
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Summary(mean, std, n, values)


@dataclass
class VariantResult:
    """A variant's runs and their summaries; `reason` says why it has no result (n/a).

    `headline` is the number compared with the paper: the final value, or the median of the
    last epochs when the experiment reports that (`median`).
    """

    variant: Variant
    runs: list[RunResult]
    final: Summary
    best: Summary
    reason: str | None = None
    median: Summary | None = None

    @property
    def headline(self) -> Summary:
        return self.median if self.median is not None else self.final

    @property
    def status(self) -> str:
        if self.final.n:
            return "ok"
        return "n/a" if any(r.status == "n/a" for r in self.runs) else "failed"


@dataclass
class ExperimentResults:
    """What `run_experiment` returns (and the report writes to results.json)."""

    spec: ExperimentSpec
    variants: list[VariantResult]
    seconds: float

    def by_name(self, name: str) -> VariantResult | None:
        return next((v for v in self.variants if v.variant.name == name), None)


def variant_result(
    variant: Variant, runs: list[RunResult], reason: str | None, median_k: int | None = None
) -> VariantResult:
    """A variant's summaries over its finished runs."""
    ok = [r for r in runs if r.ok]
    median = None
    if median_k:
        median = summarize([r.median_last for r in ok if r.median_last is not None])
    return VariantResult(
        variant,
        runs,
        summarize([r.final for r in ok]),
        summarize([r.best for r in ok if r.best is not None]),
        reason,
        median,
    )


def as_error(run: RunResult) -> RunResult:
    """The run with its accuracy values (%) turned into errors (100 - accuracy), in place."""
    for name in ("final", "best", "median_last"):
        value = getattr(run, name)
        if value is not None:
            setattr(run, name, 100.0 - value)
    return run


# ----------------------------------------------------------------------------- run dirs
def metric_values(run_dir: str | Path, metric: str) -> list[float]:
    """The metric's value of every evaluated epoch of a run, in order."""
    return [
        float(r[metric])
        for r in read_rows(run_dir)
        if isinstance(r.get(metric), (int, float)) and not isinstance(r.get(metric), bool)
    ]


def best_of(run_dir: str | Path, metric: str, fallback: float | None) -> float | None:
    """The run's best value of the metric over its evaluated epochs (the lowest of a loss),
    `fallback` when it has none."""
    values = metric_values(run_dir, metric)
    if not values:
        return fallback
    return min(values) if metric.endswith("loss") else max(values)


def median_of_last(run_dir: str | Path, metric: str, k: int) -> float | None:
    """Median of the metric over the run's last k epochs: the evaluated epochs among the last
    k (all k with train.eval_every = 1; fewer if the run has fewer)."""
    rows = [
        r
        for r in read_rows(run_dir)
        if isinstance(r.get(metric), (int, float)) and not isinstance(r.get(metric), bool)
    ]
    if not rows:
        return None
    last = max(int(r.get("epoch", 0)) for r in rows)
    values = [float(r[metric]) for r in rows if int(r.get("epoch", 0)) > last - k]
    return float(statistics.median(values))
