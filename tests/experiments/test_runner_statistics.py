"""The runner's per-run statistics: the median of the last k epochs (the GN paper's "median
error rate of the final 5 epochs"), and its place as the headline of the tables."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from lightnets.experiments.report import format_table
from lightnets.experiments.results import (
    ExperimentResults,
    RunResult,
    median_of_last,
    variant_result,
)
from lightnets.experiments.spec import ExperimentSpec, Variant

# val_acc1 per epoch, up and down: no order statistic of a monotonic series hides a bug
SERIES = [50.0, 71.0, 64.0, 80.0, 77.0, 91.0, 85.0, 88.0, 79.0, 90.0]


def _run_dir(tmp_path: Path, epochs: list[int]) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"epoch": e, "val_acc1": SERIES[e - 1], "train_loss": 1.0} for e in epochs]
    rows.append({"epoch": epochs[-1], "train_loss": 0.5})  # a row without the metric
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_median_of_the_last_5_epochs(tmp_path):
    run = _run_dir(tmp_path, list(range(1, 11)))
    # epochs 6..10: 91, 85, 88, 79, 90 -> sorted 79, 85, 88, 90, 91
    assert median_of_last(run, "val_acc1", 5) == 88.0
    assert median_of_last(run, "val_acc1", 1) == 90.0  # the final epoch
    assert median_of_last(run, "val_acc1", 4) == statistics.median([85, 88, 79, 90])
    assert median_of_last(run, "val_acc1", 50) == statistics.median(SERIES)  # all there is
    assert median_of_last(tmp_path, "val_acc1", 5) is None  # no metrics file


def test_median_counts_epochs_not_rows_when_not_every_epoch_is_evaluated(tmp_path):
    """train.eval_every = 2: the last 5 epochs (6..10) hold evaluations at 6, 8 and 10."""
    run = _run_dir(tmp_path, [2, 4, 6, 8, 10])
    assert median_of_last(run, "val_acc1", 5) == statistics.median([91.0, 88.0, 90.0])


def test_the_median_is_the_headline_of_the_table():
    spec = ExperimentSpec(
        experiment="x",
        title="x",
        out=Path("unused"),
        recipe="mnist_cnn",
        variants=[Variant("a", "A", paper=20.0)],
        seeds=[0, 1],
        settings={},
        as_error=True,
        median_of_last=5,
    )
    runs = [
        RunResult("a", 0, "r0", "trained", final=12.0, best=10.0, median_last=11.0),
        RunResult("a", 1, "r1", "trained", final=14.0, best=12.0, median_last=13.0),
    ]
    vr = variant_result(spec.variants[0], runs, None, 5)
    assert vr.headline is vr.median and vr.median.mean == 12.0
    table = format_table(ExperimentResults(spec, [vr], 0.0))
    header, _, row = table.splitlines()[2:5]
    assert "ours (median of last 5)" in header
    cells = [c.strip() for c in row.strip("|").split("|")]
    # median, final, best, paper, ours - paper (the median's)
    assert cells[1:6] == ["12.00 ± 1.41 (2)", "13.00 ± 1.41 (2)", "11.00 ± 1.41 (2)", "20.000",
                          "-8.00"]  # fmt: skip


@pytest.mark.parametrize("k", [None, 0])
def test_without_a_median_the_final_value_is_the_headline(k):
    runs = [RunResult("a", 0, "r0", "trained", final=12.0, best=10.0)]
    vr = variant_result(Variant("a", "A"), runs, None, k)
    assert vr.median is None and vr.headline is vr.final
