"""Several optimizers over disjoint parameters, stepped as one: Bop for binary weights, Adam
(or any registered optimizer) for the rest.

A binary network has two kinds of parameters: the +1/-1 weights of binary layers in bop mode,
which only Bop may change (a real-valued step would make them real), and everything else
(BatchNorm, biases, latent weights), which needs a real-valued optimizer. `CompositeOptimizer`
holds one optimizer per kind and looks like one optimizer to the training loop:
`zero_grad`, `step`, `state_dict` / `load_state_dict` (both parts, so a resumed run continues
Adam's moments and Bop's averages exactly) and `param_groups`, the groups of all parts in
order (the real optimizer's first). Group dicts are the parts' own, so setting a value in one
(as `lightnets.optim.Scheduler` does) changes that part; a scheduler scales a key in the
groups that have it, e.g. "lr" in Adam's and "gamma" in Bop's.

`build_binary_optimizer(model, "adam", 1e-3, gamma=1e-4, threshold=1e-8)` splits a model with
`binary_parameters` / `real_parameters` and builds both parts, the real one through
`build_optimizer` with its weight / norm / bias weight-decay groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lightnets.errors import UserError, did_you_mean
from lightnets.optim.bop import Bop, binary_parameters, named_binary_parameters
from lightnets.optim.factory import build_optimizer

__all__ = ["BINARY_OPTIMIZERS", "CompositeOptimizer", "build_binary_optimizer"]

#: Optimizers for binary weights that `build_binary_optimizer` knows.
BINARY_OPTIMIZERS = ("bop",)


class CompositeOptimizer:
    """Named optimizers over disjoint parameters, used as one optimizer.

    Args:
        optimizers: name -> optimizer, e.g. ``{"real": adam, "binary": bop}``; at least one,
            and no parameter may belong to two of them.
    """

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise UserError("CompositeOptimizer needs at least one optimizer: got none")
        seen: dict[int, str] = {}
        for name, opt in optimizers.items():
            if not isinstance(opt, torch.optim.Optimizer):
                raise UserError(
                    f"CompositeOptimizer part {name!r} is a {type(opt).__name__}: expected a "
                    "torch.optim.Optimizer"
                )
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise UserError(
                            f"a parameter of shape {tuple(p.shape)} is in both {seen[id(p)]!r} "
                            f"and {name!r}: expected each parameter in one optimizer only"
                        )
                    seen[id(p)] = name
        self.optimizers: dict[str, torch.optim.Optimizer] = dict(optimizers)

    def __getitem__(self, name: str) -> torch.optim.Optimizer:
        return self.optimizers[name]

    def __contains__(self, name: str) -> bool:
        return name in self.optimizers

    def __iter__(self) -> Iterator[str]:
        return iter(self.optimizers)

    def get(self, name: str) -> torch.optim.Optimizer | None:
        """The part called `name`, or None."""
        return self.optimizers.get(name)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every part's param groups, in the parts' order (the dicts themselves, not copies)."""
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @property
    def state(self) -> dict[Any, Any]:
        """Per-parameter state of all parts (a merged view; parameters are disjoint)."""
        merged: dict[Any, Any] = {}
        for opt in self.optimizers.values():
            merged.update(opt.state)
        return merged

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Evaluate `closure` once (if given), then step every part."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore every part; the saved parts must be exactly this optimizer's."""
        parts = state.get("optimizers") if isinstance(state, dict) else None
        if not isinstance(parts, dict):
            raise ValueError(
                "the optimizer state is not a CompositeOptimizer's (no 'optimizers' entry): "
                f"expected the parts {sorted(self.optimizers)}"
            )
        if set(parts) != set(self.optimizers):
            raise ValueError(
                f"the optimizer state has parts {sorted(parts)}, this optimizer "
                f"{sorted(self.optimizers)}: expected the same parts"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(parts[name])

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={type(opt).__name__}" for name, opt in self.optimizers.items())
        return f"CompositeOptimizer({inner})"


def build_binary_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    *,
    binary: str = "bop",
    gamma: float = 1e-4,
    threshold: float = 1e-8,
    flip_test: str = "strict",
    **real_options: Any,
) -> CompositeOptimizer:
    """Bop over the model's binary weights and optimizer `name` over everything else.

    The parts are "real" (`build_optimizer(model, name, lr, **real_options)` without the
    binary weights; left out when the model has nothing else to train) and "binary"
    (`Bop(binary weights, threshold, gamma, flip_test=flip_test)`). A model without binary
    weights in bop mode is refused: Bop would have nothing to flip.
    """

    key = str(binary).lower()
    if key not in BINARY_OPTIMIZERS:
        raise UserError(
            f"unknown binary optimizer {binary!r}{did_you_mean(key, BINARY_OPTIMIZERS)}: "
            f"expected one of {', '.join(BINARY_OPTIMIZERS)}"
        )
    named = named_binary_parameters(model)
    if not named:
        raise UserError(
            f"{type(model).__name__} has no binary weights in mode='bop' for Bop to flip: "
            "expected BinaryConv2d / BinaryLinear layers with mode='bop' (latent-mode layers "
            "are trained by the real-valued optimizer alone)"
        )
    parts: dict[str, torch.optim.Optimizer] = {}
    binary_ids = {id(p) for p in binary_parameters(model)}
    if any(p.requires_grad and id(p) not in binary_ids for p in model.parameters()):
        exclude = [p for _, p in named]
        parts["real"] = build_optimizer(model, name, lr, exclude=exclude, **real_options)
    parts["binary"] = Bop(named, threshold=threshold, gamma=gamma, flip_test=flip_test)
    return CompositeOptimizer(parts)
