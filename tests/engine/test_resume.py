"""A run killed with SIGKILL mid-epoch and resumed ends with exactly the uninterrupted weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lightnets.engine.checkpoint import load_checkpoint
from tests.conftest import REPO, TINY, run_cli

# Randomness everywhere the loop has it: shuffling, augmentation, dropout.
SETTINGS = [
    *TINY,
    "train.epochs=3",
    "train.checkpoint_every=5",
    "train.deterministic=true",
    "model.args.dropout=0.2",
    "data.augment=pad_crop,normalize",
    "schedule.name=multistep",
    "schedule.unit=step",
    "schedule.milestones=[60,120]",
]


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    full = run_cli("train", "mnist_cnn", *_sets(SETTINGS), "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr

    killed_dir = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightnets", "train", "mnist_cnn", *_sets(SETTINGS)]
        + ["--out", str(killed_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Wait for the first mid-epoch checkpoint after step 70 (epoch 2), then kill at once.
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        last = killed_dir / "last.pt"
        if last.exists():
            try:
                step = load_checkpoint(last)["step"]
            except Exception:  # being replaced right now
                step = 0
            if step >= 70:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = load_checkpoint(killed_dir / "last.pt")
    total = 3 * (4000 // 64)
    assert interrupted["step"] < total, "the run finished before it could be killed"
    assert interrupted["batch_in_epoch"] > 0, "killed at an epoch boundary, not mid-epoch"

    resumed = run_cli("train", "mnist_cnn", "--out", str(killed_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr

    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(killed_dir / "last.pt")
    assert a["step"] == b["step"] == total
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    epochs = [
        line.split(",")[0] for line in (killed_dir / "metrics.csv").read_text().splitlines()[1:]
    ]
    assert sorted(epochs) == ["1", "2", "3"]  # no duplicated rows after the resume


class _Killed(BaseException):
    """Stands for SIGKILL: nothing of the trainer runs after it (not an Exception)."""


@pytest.mark.parametrize("epoch", [1, 2])
@pytest.mark.parametrize("after", ["best", "last"])
def test_a_kill_at_an_improving_epoch_loses_no_best(tmp_path, monkeypatch, capsys, after, epoch):
    """An epoch that improves writes best.pt and last.pt (which records the new best). Killed
    right after either write and resumed, the run ends with best.pt holding the best epoch of
    its metrics, with the weights an uninterrupted run has there. Killed after best.pt in the
    first epoch, the run dir has no last.pt yet: the resume continues from best.pt, which holds
    exactly the state last.pt would (nothing changes between the two writes)."""
    from lightnets.engine import Trainer, load_config
    from lightnets.engine.logging import read_rows

    settings = [*TINY, "train.epochs=4", "train.deterministic=true", "data.batch_size=256"]
    config = load_config("mnist_cnn", [*settings, "schedule.warmup=0"])
    Trainer(config, tmp_path / "whole").fit()

    real_save = Trainer.save
    killed, bests = [], [None]

    def save(self, name="last"):
        path = real_save(self, name)
        improving = self.epoch >= epoch and self.best != bests[-1]
        if name == after and improving and not killed and self.batch_in_epoch == 0:
            killed.append(self.epoch)
            raise _Killed
        if name == "last":
            bests.append(self.best)
        return path

    monkeypatch.setattr(Trainer, "save", save)
    try:
        Trainer(config, tmp_path / "run").fit()
    except _Killed:
        pass
    assert killed  # an epoch (from `epoch` on) improved, and the run died in its writes
    assert (tmp_path / "run" / "last.pt").is_file() == (after == "last" or epoch > 1)
    monkeypatch.setattr(Trainer, "save", real_save)
    capsys.readouterr()
    Trainer(config, tmp_path / "run", resume=True).fit()
    from_best = "has best.pt but no last.pt" in capsys.readouterr().err
    assert from_best == (after == "best" and epoch == 1)
    rows = read_rows(tmp_path / "run")
    best_epoch = max(rows, key=lambda r: r["val_acc1"])["epoch"]
    best, whole = (load_checkpoint(d / "best.pt") for d in (tmp_path / "run", tmp_path / "whole"))
    assert best["epoch"] == best_epoch == whole["epoch"]
    for key, value in whole["model"].items():
        assert torch.equal(best["model"][key], value), key
    last, whole_last = (
        load_checkpoint(d / "last.pt") for d in (tmp_path / "run", tmp_path / "whole")
    )
    for key, value in whole_last["model"].items():  # and the run ends where the whole one does
        assert torch.equal(last["model"][key], value), key
