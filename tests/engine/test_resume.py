"""A run killed with SIGKILL mid-epoch and resumed ends with exactly the uninterrupted weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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
