"""Hooks into the training loop, so features like early stopping stay out of the loop itself."""

from __future__ import annotations

import math
from typing import Any

from lightnets.errors import UserError

#: What the hooks' `trainer` is: a `lightnets.engine.trainer.Trainer`. Named here, not imported
#: (not even for type checkers): the trainer imports this module, and an import back would
#: close a circle between the two.
Trainer = Any


class Callback:
    """Base class: override the hooks you need. Set `trainer.should_stop = True` to end a run."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, info: dict[str, Any]) -> None: ...

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """What must survive a resume (plain values and tensors only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainingPart:
    """A part of training that the Trainer composes without knowing what it is about (e.g.
    `lightnets.engine.binary.BinaryTraining`): hooks at the points of a step and an epoch that
    callbacks do not reach, its own schedulers and checkpoint entries. Override what you need.
    """

    def unclipped_parameters(self) -> list:
        """Parameters whose gradients train.grad_clip must leave alone (a signal of their own,
        e.g. Bop's, which one norm over all parameters would rescale)."""
        return []

    def after_optimizer_step(self, trainer: Trainer) -> None:
        """After every optimizer step, before the lr schedule steps."""

    def end_epoch(self, trainer: Trainer) -> dict[str, Any]:
        """At an epoch's end, before the row is complete: columns to add to it."""
        return {}

    def callbacks(self) -> list[Callback]:
        """Callbacks the part brings along (added after the user's)."""
        return []

    def schedulers(self) -> dict[str, tuple[str, Any]]:
        """checkpoint key -> (config section, scheduler) of the part's schedules."""
        return {}

    def state_entries(self) -> dict[str, Any]:
        """Checkpoint entries of the part (plain values and tensors only)."""
        return {}

    def load_state_entries(self, ckpt: dict[str, Any]) -> None:
        """Take the part's entries back from a checkpoint (missing ones keep their default)."""


class EarlyStopping(Callback):
    """Stop when `monitor` (a column of the epoch row) has not improved for `patience` epochs."""

    def __init__(
        self, monitor: str, patience: int, mode: str = "max", min_delta: float = 0.0
    ) -> None:
        if patience < 1:
            raise UserError(f"EarlyStopping patience={patience} is invalid: expected >= 1")
        if mode not in ("max", "min"):
            raise UserError(f"EarlyStopping mode={mode!r} is invalid: expected 'max' or 'min'")
        self.monitor, self.patience, self.mode, self.min_delta = monitor, patience, mode, min_delta
        self.best = -math.inf if mode == "max" else math.inf
        self.bad_epochs = 0

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if self.monitor not in row:
            return
        value = float(row[self.monitor])
        better = (
            value > self.best + self.min_delta
            if self.mode == "max"
            else value < self.best - self.min_delta
        )
        if better:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            trainer.should_stop = True
            trainer.stop_reason = (
                f"early stop: {self.monitor} did not improve for {self.patience} epochs"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]


class NoFlipStopping(Callback):
    """Stop after `patience` consecutive epochs in which Bop flipped no weight.

    The [Re] CIFAR recipe (paper 004, Sec. 3.3) halts when no weight flipped in 10 consecutive
    epochs: with gamma decayed that far, the binary network no longer changes. Reads the
    epoch row's `flips` column, which the Trainer writes when the optimizer has a Bop part;
    set from a recipe with `train.stop_after_flipless_epochs = N`.
    """

    def __init__(self, patience: int) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise UserError(
                f"NoFlipStopping patience={patience!r} is invalid: expected an int >= 1"
            )
        self.patience = patience
        self.flipless = 0

    def on_train_start(self, trainer: Trainer) -> None:
        if all(getattr(part, "bop", None) is None for part in trainer.parts):
            raise UserError(
                "stopping after epochs without flips needs Bop: expected optim.binary = 'bop' "
                "and a model with binary layers in bop mode"
            )

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if "flips" not in row:
            return
        self.flipless = self.flipless + 1 if int(row["flips"]) == 0 else 0
        if self.flipless >= self.patience:
            trainer.should_stop = True
            trainer.stop_reason = f"no weight flipped in {self.patience} consecutive epochs"

    def state_dict(self) -> dict[str, Any]:
        return {"flipless": self.flipless}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.flipless = int(state["flipless"])
