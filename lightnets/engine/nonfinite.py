"""Stopping a run whose loss or gradient became NaN / Inf, without waiting for the device at
every step.

Each step's verdict (loss finite? gradient norm finite?) stays a device tensor; `check()` reads
all the pending ones at once (one sync) and raises `NonFiniteError` naming the first step that
went wrong. The Trainer checks at every refresh of the progress bar (which reads the loss
anyway), before every checkpoint, at every epoch's end, when an error escapes the loop, and at
least every `CHECK_EVERY_STEPS` steps: a run stops at most that many steps after the bad one,
and since every checkpoint is preceded by a check, the last one written holds the last good
state. The steps in between are wasted work, never saved.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightnets.errors import UserError

__all__ = ["CHECK_EVERY_STEPS", "NonFiniteError", "NonFiniteWatch"]

#: The most steps a non-finite loss or gradient goes unnoticed (every rank checks at the same
#: steps, so under DDP they all stop together)
CHECK_EVERY_STEPS = 50


class NonFiniteError(UserError):
    """The loss or the gradient became NaN/Inf; the last good checkpoint is kept."""


class NonFiniteWatch:
    """The finite-ness of each step's loss and gradient norm, kept on the device until read."""

    def __init__(self, every: int = CHECK_EVERY_STEPS) -> None:
        self.every = every
        # (flags [loss finite, gradient norm finite] on the device, epoch, step), 1-based
        self.pending: list[tuple[torch.Tensor, int, int]] = []

    def record(self, loss: torch.Tensor, grad_norm: torch.Tensor, epoch: int, step: int) -> None:
        """Keep one step's verdict (no sync); `epoch` and `step` count from 1."""
        flags = torch.stack([torch.isfinite(loss), torch.isfinite(grad_norm.to(loss.device))])
        self.pending.append((flags, epoch, step))

    def due(self) -> bool:
        """CHECK_EVERY_STEPS steps are waiting to be read."""
        return len(self.pending) >= self.every

    def check(self, run_dir: Path) -> None:
        """Read the pending verdicts (one sync); raise NonFiniteError for the first bad step."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        verdicts = torch.stack([flags for flags, _, _ in pending]).tolist()  # one sync
        for (loss_ok, grad_ok), (_, epoch, step) in zip(verdicts, pending):
            if loss_ok and grad_ok:
                continue
            what = "loss" if not loss_ok else "gradient norm"
            last = run_dir / "last.pt"
            kept = (
                f"{last} keeps the last good state"
                if last.is_file()
                else "no checkpoint had been written yet"
            )
            later = pending[-1][2] - step
            noticed = f" (noticed {later} step(s) later)" if later else ""
            raise NonFiniteError(
                f"the {what} became non-finite at epoch {epoch} step {step}{noticed}; "
                f"stopped without saving ({kept}): expected finite values (try a lower "
                "optim.lr or train.grad_clip)"
            )
