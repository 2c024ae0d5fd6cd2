"""DDP over two GPUs with nccl: `torchrun --nproc_per_node 2 -m lightnets train ...`.

Needs at least two CUDA devices (skipped otherwise, with the count found). Two runs, each the
real command line in a fresh process, as tests/engine/test_distributed.py does with gloo:
- mnist_cnn with GroupNorm (batch-independent): the DDP run on a global batch of 32 ends with
  the weights of one process on the same batch (within 1e-4: the all-reduce sums in another
  order, and cuDNN may pick other kernels for half the batch);
- Finet-small with FBN and train.sync_bn=true: FBN's sync_stats and torch's SyncBatchNorm
  all-reduce over nccl (there is no gloo path for SyncBatchNorm); the run finishes and its run
  dir is complete, written by rank 0 only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lightnets.engine.checkpoint import load_checkpoint
from tests.conftest import REPO, free_port, run_cli
from tests.cuda.support import require_cuda

pytestmark = pytest.mark.cuda

COMMON = [
    "train.progress=false",
    "output.plot=false",
    "data.batch_size=32",
    "train.max_steps=8",
    "schedule.warmup=0",
    "data.eval_batch_size=500",
    "train.deterministic=true",
]
RUNS = {
    "gn-equals-single": (
        "mnist_cnn",
        ["model.args.width=16", "model.args.norm=gn", "optim.lr=0.02"],
    ),
    "fbn-sync_bn": ("mnist_demo", ["train.sync_bn=true"]),
}
RUN_FILES = {"config.toml", "last.pt", "best.pt", "metrics.jsonl", "metrics.csv"}


@pytest.fixture
def two_gpus(device):
    require_cuda(device, "DDP with nccl")
    count = torch.cuda.device_count()
    if count < 2:
        pytest.skip(f"DDP with nccl needs at least 2 CUDA devices; this machine has {count}")
    if not torch.distributed.is_nccl_available():
        pytest.skip("this torch build has no nccl backend")


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.parametrize("run", list(RUNS))
def test_torchrun_two_gpus(two_gpus, tmp_path, run):
    recipe, extra = RUNS[run]
    sets = _sets([*COMMON, *extra])
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
        + ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
        + ["-m", "lightnets", "train", recipe, *sets, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert {p.name for p in out.iterdir()} >= RUN_FILES
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 8  # one writer: rank 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 8
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    if run != "gn-equals-single":
        return
    single = run_cli("train", recipe, *sets, "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr[-3000:]
    ref = load_checkpoint(tmp_path / "single" / "last.pt")
    assert ref["step"] == 8
    for key, value in ref["model"].items():
        torch.testing.assert_close(ckpt["model"][key], value, rtol=1e-4, atol=1e-4, msg=key)
