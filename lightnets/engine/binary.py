"""Training binary networks (paper 004) as one part the Trainer composes: it knows Bop, the
trainer does not.

With `optim.binary = "bop"` the optimizer is a `CompositeOptimizer` (Bop for the +1/-1 weights
of bop-mode binary layers, `optim.name` for the rest) and `[binary_schedule]` schedules Bop's
gamma (or threshold) apart from the lr. Each epoch row then has `flips` (weights flipped in the
epoch), `log_flip_ratio` (eq. 7's pi_t = ln(flips_t / n + 1e-9), averaged over the epoch's
steps), `log_flip_ratio_steps` (pi_t of every step, for per-step plots) and `bop_gamma` (the
gamma of the epoch's last step). `train.stop_after_flipless_epochs = N` ends the run after N
epochs without a flip (`NoFlipStopping`). After every optimizer step, the latent weights of
binary layers with clip_weights=True are clamped to [-1, 1].

Flip counts stay device tensors until the epoch ends (or a checkpoint is written): one sync
for all of an epoch's steps. At each epoch's end every Bop weight is checked to be +1/-1 (also
writes through `.data`, which torch does not count) and skipped non-finite gradients are
warned about.
"""

from __future__ import annotations

from typing import Any

import torch

from lightnets.engine.callbacks import Callback, NoFlipStopping, Trainer, TrainingPart
from lightnets.engine.optimizers import build_run_schedule
from lightnets.errors import UserError
from lightnets.nn.binary import clip_latent_weights_, is_binary_layer
from lightnets.optim import Bop, CompositeOptimizer
from lightnets.optim.bop import log_flip_ratio
from lightnets.optim.schedules import Scheduler

__all__ = ["BinaryTraining", "find_bop"]


def find_bop(optimizer: Any) -> Bop | None:
    """The Bop part of an optimizer (Bop itself, or a composite's "binary" part), or None."""
    if isinstance(optimizer, Bop):
        return optimizer
    if isinstance(optimizer, CompositeOptimizer):
        return optimizer.get("binary")
    return None


class BinaryTraining(TrainingPart):
    """Bop's flips, its gamma / threshold schedule and the no-flip stop, and latent-weight
    clipping, for a run whose model has binary layers (see the module docstring).

    `bop` and `binary_scheduler` are None without Bop (binary layers in latent mode trained
    by a real-valued optimizer: only their clipping applies).
    """

    def __init__(
        self,
        bop: Bop | None,
        binary_scheduler: Scheduler | None,
        *,
        unit: str = "epoch",
        clip_latent: bool = True,
        stop_after_flipless_epochs: int | None = None,
    ) -> None:
        self.bop = bop
        self.binary_scheduler = binary_scheduler
        self.unit = unit  # [binary_schedule] unit: "epoch" or "step"
        self.clip_latent = clip_latent
        self.stop_after_flipless_epochs = stop_after_flipless_epochs
        self.flip_counts: list[Any] = []  # flips of each step of this epoch (tensors or ints)
        self.last_gamma: float | None = None  # Bop's gamma in the last step

    @classmethod
    def for_run(cls, trainer: Trainer) -> BinaryTraining | None:
        """The part for the trainer's model and optimizer; None when the model has no binary
        layer and the optimizer no Bop (nothing binary to train)."""
        bop = find_bop(trainer.optimizer)
        has_layers = any(is_binary_layer(m) for m in trainer.model.modules())
        stop_after = trainer.config.train.stop_after_flipless_epochs
        if bop is None and stop_after:
            raise UserError(
                f"train.stop_after_flipless_epochs={stop_after} needs Bop: expected "
                "optim.binary = 'bop' and a model with binary layers in bop mode"
            )
        if bop is None and not has_layers:
            return None
        cfg = trainer.config.binary_schedule
        scheduler = None
        if bop is not None:
            scheduler = build_run_schedule(
                bop,
                cfg,
                "binary_schedule",
                tuple(cfg.keys),
                epochs=trainer.epochs,
                total_steps=trainer.total_steps,
            )
        return cls(
            bop,
            scheduler,
            unit=cfg.unit,
            clip_latent=has_layers,
            stop_after_flipless_epochs=stop_after,
        )

    # ------------------------------------------------------------------ TrainingPart hooks
    def unclipped_parameters(self) -> list[torch.nn.Parameter]:
        """Bop's +1/-1 weights: their gradients are Bop's signal, compared with a threshold
        after a moving average; train.grad_clip rescaling them would change which flip."""
        if self.bop is None:
            return []
        return [p for group in self.bop.param_groups for p in group["params"]]

    def after_optimizer_step(self, trainer: Trainer) -> None:
        if self.clip_latent:
            clip_latent_weights_(trainer.model)
        if self.bop is None:
            return
        self.flip_counts.append(self.bop.last_flips_tensor)
        self.last_gamma = float(self.bop.param_groups[0]["gamma"])  # before it is scheduled
        if self.unit == "step" and self.binary_scheduler is not None:
            self.binary_scheduler.step()

    def end_epoch(self, trainer: Trainer) -> dict[str, Any]:
        if self.bop is None:
            return {}
        columns = self.flip_columns()
        if self.unit == "epoch" and self.binary_scheduler is not None:
            self.binary_scheduler.step()
        return columns

    def callbacks(self) -> list[Callback]:
        if not self.stop_after_flipless_epochs:
            return []
        return [NoFlipStopping(self.stop_after_flipless_epochs)]

    def schedulers(self) -> dict[str, tuple[str, Any]]:
        if self.binary_scheduler is None:
            return {}
        return {"binary_scheduler": ("binary_schedule", self.binary_scheduler)}

    def state_entries(self) -> dict[str, Any]:
        return {"flip_counts": self.flip_list()}

    def load_state_entries(self, ckpt: dict[str, Any]) -> None:
        self.flip_counts = list(ckpt.get("flip_counts") or [])

    # ------------------------------------------------------------------ flips
    def flip_list(self) -> list[int]:
        """This epoch's per-step flip counts as ints (one device sync for all of them)."""
        tensors = [c for c in self.flip_counts if isinstance(c, torch.Tensor)]
        if tensors:
            values = iter(torch.stack([t.to(tensors[0].device) for t in tensors]).tolist())
            self.flip_counts = [
                next(values) if isinstance(c, torch.Tensor) else int(c) for c in self.flip_counts
            ]
        return [int(c) for c in self.flip_counts]

    def flip_columns(self) -> dict[str, Any]:
        """flips, log_flip_ratio (eq. 7 averaged over the epoch's steps), per-step pi, gamma;
        starts the next epoch's counts."""
        flips = self.flip_list()
        self.flip_counts = []
        self.bop.check_binary(full=True)  # also what .data writes did, which torch does not count
        self.bop.warn_nonfinite()
        n = self.bop.num_binary
        pis = [log_flip_ratio(f, n) for f in flips]
        columns: dict[str, Any] = {"flips": sum(flips)}
        if pis:
            columns["log_flip_ratio"] = sum(pis) / len(pis)
        columns["log_flip_ratio_steps"] = [round(p, 4) for p in pis]
        gamma = self.last_gamma
        columns["bop_gamma"] = float(self.bop.param_groups[0]["gamma"]) if gamma is None else gamma
        return columns
