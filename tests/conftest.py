"""Shared test helpers: run the CLI in a subprocess, tiny recipe overrides."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from torch import nn

# pytest-xdist runs one worker per core: more threads per worker only oversubscribes.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent

# Small, fast settings for the demo recipe: a narrow CNN, no progress bar, no plots.
TINY = [
    "model.args.width=16",
    "train.progress=false",
    "output.plot=false",
]


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python -m lightnets ARGS` in a fresh process (exit code and stderr as a user sees them)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "lightnets", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    """A TCP port nothing listens on now (for a gloo / nccl rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)


# Hypothesis: CI draws the same examples every run (a red CI is reproducible, never a dice
# roll); `HYPOTHESIS_PROFILE=explore` draws new, more examples to hunt for bugs locally.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", max_examples=500, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class ExplodesAfter(nn.Module):
    """A linear classifier whose output is NaN from forward `after + 1` on (a test model)."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, 10)
        self.calls, self.after = 0, after

    def forward(self, x):
        self.calls += 1
        out = self.fc(x.flatten(1))
        return out * math.nan if self.calls > self.after else out


class GradientExplodesAfter(ExplodesAfter):
    """Finite outputs and loss, but an infinite gradient from forward `after + 1` on."""

    def forward(self, x):
        self.calls += 1
        out = self.fc(x.flatten(1))
        if self.calls > self.after and out.requires_grad:
            out.register_hook(lambda grad: grad * math.inf)  # the backward pass only
        return out
