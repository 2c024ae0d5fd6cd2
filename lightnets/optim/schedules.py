"""Schedules: a multiplicative factor f(t) of each param group's base value, with warmup.

t counts "steps"; the trainer decides whether a step is an iteration or an epoch. The factor
can scale any numeric param-group hyperparameter, not only the learning rate, so Bop's
`gamma` and `threshold` use the same schedules as `lr`.

Warmup: for t < warmup_steps the factor ramps linearly from `warmup_start_factor` to 1.
- linear / cosine / poly then run over the *remaining* steps (total_steps - warmup_steps),
  starting at 1 when warmup ends and reaching `min_factor` at `total_steps`;
- step / multistep count from t = 0 of the whole run (milestones are absolute), and the ramp
  multiplies them during warmup; constant is 1 after warmup.
Past `total_steps` the factor stays at its final value.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightnets.errors import UserError, did_you_mean

__all__ = ["SCHEDULES", "Scheduler", "build_schedule", "list_schedules", "schedule_factor"]

SCHEDULES = ("constant", "step", "multistep", "linear", "cosine", "poly")


def list_schedules() -> list[str]:
    """Names `build_schedule` accepts."""
    return list(SCHEDULES)


def schedule_factor(
    name: str,
    t: int,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.0,
    step_size: int | None = None,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    power: float = 0.9,
    min_factor: float = 0.0,
) -> float:
    """The factor f(t) of schedule `name` (arguments already validated by `build_schedule`)."""
    t = min(max(int(t), 0), total_steps)
    ramp = 1.0
    if t < warmup_steps:
        ramp = warmup_start_factor + (1.0 - warmup_start_factor) * t / warmup_steps
    if name == "constant":
        main = 1.0
    elif name == "step":
        main = gamma ** (t // step_size)
    elif name == "multistep":
        main = gamma ** bisect.bisect_right(list(milestones), t)
    else:
        progress = max(t - warmup_steps, 0) / (total_steps - warmup_steps)
        if name == "linear":
            decay = 1.0 - progress
        elif name == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif name == "poly":
            decay = (1.0 - progress) ** power
        else:
            raise UserError(_unknown(name))
        main = min_factor + (1.0 - min_factor) * decay
    return ramp * main


class Scheduler:
    """Sets `group[key] = group[f"initial_{key}"] * factor(t)` for every group and key.

    Groups without a key are left alone (a CompositeOptimizer's Adam groups have no Bop
    `gamma`, its Bop groups no `lr`); a key that no group has is refused.

    At construction each group's current value is stored as `initial_<key>` (unless already
    there, like torch's `initial_lr`) and the factor for t = 0 is applied. Call `step()` after
    each optimizer step (or epoch). `state_dict()` holds t; the base values live in the
    optimizer's param groups, which the optimizer's own state_dict saves.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        factor_fn: Callable[[int], float],
        keys: Sequence[str] = ("lr",),
        name: str = "custom",
    ) -> None:
        if isinstance(keys, str):
            keys = (keys,)
        if not keys:
            raise UserError("keys=() names no hyperparameter to schedule: expected e.g. ('lr',)")
        self.optimizer = optimizer
        self.factor_fn = factor_fn
        self.keys = tuple(keys)
        self.name = name
        groups = optimizer.param_groups
        for key in self.keys:
            # A group without the key belongs to another kind of optimizer (Adam's groups in a
            # CompositeOptimizer have no Bop gamma): skipped. Some group must have it.
            if not any(key in g for g in groups):
                first = groups[0] if groups else {}
                raise UserError(
                    f"param group 0 has no numeric {key!r} to schedule "
                    f"(it has {sorted(k for k in first if k != 'params')}), nor has any other "
                    "group: expected a hyperparameter the optimizer keeps per group"
                )
            for i, group in enumerate(groups):
                if key not in group:
                    continue
                value = group[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise UserError(
                        f"param group {i} has a non-numeric {key!r}={value!r}: expected a "
                        "number to schedule"
                    )
                group.setdefault(f"initial_{key}", value)
        self.t = 0
        self.last_factor = 1.0
        self._apply()

    @property
    def last_epoch(self) -> int:
        """torch's name for t."""
        return self.t

    def factor(self, t: int | None = None) -> float:
        """The factor at step t (default: the current one) without changing anything."""
        return float(self.factor_fn(self.t if t is None else t))

    def step(self) -> None:
        """Advance t by one and set every scheduled value."""
        self.t += 1
        self._apply()

    def _apply(self) -> None:
        self.last_factor = self.factor()
        for group in self.optimizer.param_groups:
            for key in self.keys:
                if key in group:
                    group[key] = group[f"initial_{key}"] * self.last_factor

    def get_last_value(self, key: str = "lr") -> list[float]:
        """The current value of `key` in each param group that has it (like get_last_lr)."""
        if key not in self.keys:
            raise UserError(f"{key!r} is not scheduled: expected one of {list(self.keys)}")
        return [float(group[key]) for group in self.optimizer.param_groups if key in group]

    def get_last_lr(self) -> list[float]:
        """torch-compatible alias of get_last_value('lr')."""
        return self.get_last_value("lr")

    def state_dict(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "last_factor": self.last_factor,
            "name": self.name,
            "keys": list(self.keys),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore t (resuming a run) and set the values for it."""
        self.t = int(state["t"])
        self._apply()

    def __repr__(self) -> str:
        return f"Scheduler(name={self.name!r}, keys={self.keys}, t={self.t})"


def _unknown(name: str) -> str:
    return (
        f"unknown schedule {name!r}{did_you_mean(name, SCHEDULES)}: "
        f"expected one of {', '.join(SCHEDULES)}"
    )


def build_schedule(
    optimizer: torch.optim.Optimizer,
    name: str,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.0,
    step_size: int | None = None,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    power: float = 0.9,
    min_factor: float = 0.0,
    keys: Sequence[str] = ("lr",),
) -> Scheduler:
    """A `Scheduler` for one of SCHEDULES; see the module docstring for the warmup rule."""
    key = str(name).lower()
    if key not in SCHEDULES:
        raise UserError(_unknown(str(name)))
    total_steps, warmup_steps = int(total_steps), int(warmup_steps)
    if total_steps < 1:
        raise UserError(f"total_steps={total_steps} must be at least 1: expected total_steps >= 1")
    if warmup_steps < 0:
        raise UserError(f"warmup_steps={warmup_steps} is negative: expected warmup_steps >= 0")
    if warmup_steps >= total_steps:
        raise UserError(
            f"warmup_steps={warmup_steps} must be shorter than the run: "
            f"expected warmup_steps < total_steps={total_steps}"
        )
    if not 0.0 <= warmup_start_factor <= 1.0:
        raise UserError(
            f"warmup_start_factor={warmup_start_factor} is out of range: expected 0 <= it <= 1"
        )
    if not 0.0 <= min_factor <= 1.0:
        raise UserError(f"min_factor={min_factor} is out of range: expected 0 <= min_factor <= 1")
    milestones = tuple(int(m) for m in milestones)
    if key == "step":
        if step_size is None or int(step_size) < 1:
            raise UserError(
                f"schedule 'step' needs step_size (got {step_size}): expected an integer >= 1"
            )
        step_size = int(step_size)
    if key == "multistep":
        if not milestones:
            raise UserError("schedule 'multistep' needs milestones: expected e.g. [30, 60, 90]")
        if milestones[0] < 1 or any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise UserError(
                f"milestones={list(milestones)} must be positive and strictly increasing"
            )
    if key in ("step", "multistep") and not gamma > 0:
        raise UserError(f"gamma={gamma} must be positive: expected gamma > 0 (e.g. 0.1)")
    if key == "poly" and not power > 0:
        raise UserError(f"power={power} must be positive: expected power > 0 (e.g. 0.9)")

    options = dict(
        warmup_steps=warmup_steps,
        warmup_start_factor=float(warmup_start_factor),
        step_size=step_size,
        milestones=milestones,
        gamma=float(gamma),
        power=float(power),
        min_factor=float(min_factor),
    )

    def factor_fn(t: int) -> float:
        return schedule_factor(key, t, total_steps, **options)

    return Scheduler(optimizer, factor_fn, keys=keys, name=key)
