"""DDP with 2 gloo processes on global batch B equals one process on batch B."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from lightnets.engine.checkpoint import load_checkpoint
from tests.conftest import REPO, TINY, free_port, run_cli

SETTINGS = [
    *TINY,
    "model.args.norm=gn",  # batch-independent, so the split over ranks cannot matter
    "data.batch_size=32",
    "train.max_steps=12",
    "schedule.warmup=0",
    "optim.lr=0.02",
    "train.deterministic=true",
    "schedule.name=cosine",
    "schedule.unit=step",
]


def test_ddp_two_processes_equal_single_process(tmp_path):
    sets = [arg for item in SETTINGS for arg in ("--set", item)]
    single = run_cli("train", "mnist_cnn", *sets, "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
        + ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
        + ["-m", "lightnets", "train", "mnist_cnn", *sets, "--out", str(tmp_path / "ddp")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    a = load_checkpoint(tmp_path / "single" / "last.pt")
    b = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert a["step"] == b["step"] == 12
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-5, msg=key)
    # Only rank 0 wrote: one metrics row, one set of checkpoints.
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 1
