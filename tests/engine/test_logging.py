"""metrics.jsonl / metrics.csv bookkeeping, curves PNG, progress bar output."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import torch

from lightnets.engine.logging import MetricsLogger, ProgressBar, plot_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_csv(path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_log_appends_to_both_files(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log({"epoch": 1, "lr": 0.1, "train_loss": np.float32(2.5), "acc": torch.tensor(12.5)})
    logger.log({"epoch": 2, "lr": 0.01, "train_loss": 1.25, "acc": 50.0})
    rows = logger.rows()
    assert rows == [
        {"epoch": 1, "lr": 0.1, "train_loss": 2.5, "acc": 12.5},
        {"epoch": 2, "lr": 0.01, "train_loss": 1.25, "acc": 50.0},
    ]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
    header, csv_rows = read_csv(tmp_path / "metrics.csv")
    assert header == ["epoch", "lr", "train_loss", "acc"]
    assert csv_rows[0] == {"epoch": "1", "lr": "0.1", "train_loss": "2.5", "acc": "12.5"}
    assert csv_rows[1]["lr"] == "0.01"


def test_new_column_rewrites_csv_with_union(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log({"epoch": 1, "train_loss": 1.0})
    logger.log({"epoch": 2, "train_loss": 0.5, "val_acc1": 80.0})
    logger.log({"epoch": 3, "train_loss": 0.25})
    header, rows = read_csv(tmp_path / "metrics.csv")
    assert header == ["epoch", "train_loss", "val_acc1"]
    assert [r["val_acc1"] for r in rows] == ["", "80.0", ""]
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_truncate_on_resume(tmp_path):
    logger = MetricsLogger(tmp_path)
    for epoch in range(1, 6):
        logger.log({"epoch": epoch, "train_loss": 1.0 / epoch, **({"x": 1} if epoch == 5 else {})})
    # the run resumes from the checkpoint of epoch 3: rows 4 and 5 will be written again
    resumed = MetricsLogger(tmp_path)
    resumed.truncate(after_epoch=4)
    assert [r["epoch"] for r in resumed.rows()] == [1, 2, 3]
    header, rows = read_csv(tmp_path / "metrics.csv")
    assert header == ["epoch", "train_loss"] and [r["epoch"] for r in rows] == ["1", "2", "3"]
    resumed.log({"epoch": 4, "train_loss": 0.2})
    assert [r["epoch"] for r in MetricsLogger(tmp_path).rows()] == [1, 2, 3, 4]
    MetricsLogger(tmp_path / "new").truncate(after_epoch=1)  # nothing there: no error


def test_torn_last_line_is_skipped_and_repaired(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log({"epoch": 1, "loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "lo')  # killed mid-write
    logger = MetricsLogger(tmp_path)
    assert logger.rows() == [{"epoch": 1, "loss": 1.0}]
    logger.log({"epoch": 2, "loss": 0.5})
    assert logger.rows() == [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}]


def test_csv_rebuilt_when_missing(tmp_path):
    MetricsLogger(tmp_path).log({"epoch": 1, "loss": 1.0})
    (tmp_path / "metrics.csv").unlink()
    MetricsLogger(tmp_path)
    assert read_csv(tmp_path / "metrics.csv")[1] == [{"epoch": "1", "loss": "1.0"}]


def test_plot_curves_writes_png(tmp_path):
    pyplot_loaded = "matplotlib.pyplot" in sys.modules
    assert plot_curves(tmp_path) is None  # no metrics yet
    logger = MetricsLogger(tmp_path)
    for epoch in range(1, 5):
        row = {
            "epoch": epoch,
            "step": 10 * epoch,
            "lr": 0.1 / epoch,
            "train_loss": 2.0 / epoch,
            "train_acc1": 20.0 * epoch,
            "images_per_s": 1000.0 + epoch,
        }
        if epoch % 2 == 0:
            row.update(
                val_loss=2.2 / epoch,
                val_acc1=19.0 * epoch,
                val_acc5=25.0 * epoch,
                val_miou=float("nan"),
            )
        logger.log(row)
    out = plot_curves(tmp_path)
    assert out == tmp_path / "curves.png"
    data = out.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)
    assert plot_curves(tmp_path, out_name="other.png").is_file()
    if not pyplot_loaded:
        assert "matplotlib.pyplot" not in sys.modules  # global backend left alone


def test_plot_curves_nothing_numeric(tmp_path):
    MetricsLogger(tmp_path).log({"epoch": 1, "note": "x"})
    assert plot_curves(tmp_path) is None


def test_progress_bar_not_a_tty(capsys):
    bar = ProgressBar(total=3, desc="epoch 1/2")
    for _ in range(3):
        bar.update(32, loss=torch.tensor(0.51234), acc=12.0)
    bar.close()
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "3/3" in err
    assert "loss=0.5123" in err and "img/s" in err
    assert bar.images == 96 and bar.images_per_s > 0


def test_progress_bar_reads_values_only_when_it_refreshes(capsys):
    """A callable postfix value (the trainer's accuracy, which waits for the device) is called
    at a refresh only: the first step, then every `mininterval` seconds, and the last step."""
    calls = []

    def acc() -> float:
        calls.append(1)
        return 50.0

    bar = ProgressBar(total=10, desc="lazy", mininterval=3600)
    dues = []
    for _ in range(10):
        dues.append(bar.due())
        bar.update(8, acc=acc)
    bar.close()
    assert len(calls) == 2 and dues == [True] + [False] * 8 + [True]
    assert "acc=50" in capsys.readouterr().err
    assert not ProgressBar(total=3, disable=True).due()


def test_progress_bar_disabled_and_resumed(capsys):
    bar = ProgressBar(total=3, desc="quiet", disable=True)
    bar.update(8, loss=1.0)
    bar.close()
    assert capsys.readouterr().err == ""
    with ProgressBar(total=5, desc="resumed", initial=3) as bar:
        bar.update(4, loss=1.0)
    assert "4/5" in capsys.readouterr().err


def test_curves_use_whole_epochs_and_a_log_scale_where_values_span_decades():
    """The demo's first val_loss of 160 made the later 0.1s a flat line; 4 epochs were ticked
    0.5, 1.0, 1.5, ..."""
    from lightnets.engine.logging import curves_figure

    rows = [
        {"epoch": e, "train_loss": t, "val_loss": v, "val_acc1": a}
        for e, t, v, a in [(1, 2.3, 160.0, 11.0), (2, 0.6, 0.4, 88.0), (3, 0.3, 0.2, 95.0),
                           (4, 0.2, 0.15, 96.0)]
    ]  # fmt: skip
    fig = curves_figure(rows)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(panels) == {"loss (log scale)", "accuracy (%)"}
    assert panels["accuracy (%)"].get_yscale() == "linear"
    fig.canvas.draw()
    for ax in panels.values():
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 4]
        assert ticks and all(float(t).is_integer() for t in ticks)
