"""`lightnets repro` under torchrun: every process trains each run together (DDP), rank 0
alone writes and prints, and --processes must match the processes launched."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lightnets.engine.logging import read_rows
from tests.conftest import REPO, free_port, run_cli

ARGV = [
    "repro",
    "gn-batch-size",
    "--norms",
    "gn",
    "--batch-sizes",
    "4",
    "--max-steps",
    "3",
    "--seeds",
    "1",
    "--no-progress",
]


def test_repro_under_torchrun_two_processes(tmp_path):
    out = tmp_path / "gn"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
        + ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
        + ["-m", "lightnets", *ARGV, "--processes", "2", "--set", "output.plot=false"]
        + ["--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # rank 0 alone printed the plan: one line for the one run, planned for 2 processes
    plans = [json.loads(x) for x in done.stdout.splitlines() if x.startswith('{"run"')]
    assert len(plans) == 1
    plan = plans[0]
    assert (plan["processes"], plan["batch_per_process"], plan["global_batch"]) == (2, 4, 8)
    assert done.stdout.count("gn-batch-size: 1 variants x 1 seeds") == 1
    rows = read_rows(out / "gn-b4" / "seed0")
    assert len(rows) == 1  # one writer: one metrics row for the one (3-step) epoch
    # the lr the run used is the plan's: 0.1 x 4 images x 2 processes / 32 at the CPU scale
    assert abs(rows[0]["lr"] - plan["lr"]) < 1e-12 and abs(plan["lr"] - 0.025) < 1e-12
    results = json.loads((out / "results.json").read_text())
    (variant,) = results["variants"]
    assert variant["status"] == "ok" and variant["runs"][0]["step"] == 3
    assert (out / "plan.jsonl").read_text().strip() == json.dumps(plan, ensure_ascii=False)
    # the finished 2-process run is not reused by a 1-process launch (another batch and lr)
    again = run_cli(*ARGV, "--set", "output.plot=false", "--out", str(out))
    assert again.returncode == 2
    assert "trained with 2 process(es) x 4 images, this launch has 1 x 4" in again.stderr


def test_processes_must_match_the_launch(tmp_path):
    """A plan for 8 processes run in one would train with another batch and lr: refused."""
    done = run_cli(*ARGV, "--processes", "8", "--out", str(tmp_path / "x"))
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "--processes 8 but this experiment runs in 1 process" in err[0]
    assert "torchrun --nproc_per_node 8" in err[0]
    assert not (tmp_path / "x").exists()
