"""A run's optimizer and schedules from its config.

`optim.name` trains the model's real-valued parameters; with `optim.binary = "bop"` the
optimizer is a `CompositeOptimizer` whose "binary" part (Bop) trains the +1/-1 weights of
bop-mode binary layers and whose "real" part (`optim.name`) trains the rest. The lr (scaled by
the linear rule on the global batch when `optim.lr_reference_batch` is set) and its schedule
belong to the real part; gradient clipping too (`real_optimizer`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightnets.engine.config import Config, ScheduleConfig
from lightnets.errors import UserError
from lightnets.optim import CompositeOptimizer, build_binary_optimizer, build_optimizer
from lightnets.optim.bop import named_binary_parameters
from lightnets.optim.schedules import Scheduler, build_schedule

__all__ = ["build_run_optimizer", "build_run_schedule", "real_optimizer", "scaled_lr"]


def scaled_lr(config: Config, global_batch: int) -> float:
    """optim.lr, scaled by global batch / optim.lr_reference_batch when that is set."""
    cfg = config.optim
    if cfg.lr_reference_batch:  # the linear scaling rule, on the global batch
        return cfg.lr * global_batch / cfg.lr_reference_batch
    return cfg.lr


def build_run_optimizer(config: Config, model: nn.Module, lr: float) -> Any:
    """The optimizer `config.optim` asks for, over `model`: refused when the model's bop-mode
    binary weights and optim.binary do not go together."""
    cfg = config.optim
    options = dict(
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        norm_weight_decay=cfg.norm_weight_decay,
        bias_weight_decay=cfg.bias_weight_decay,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
    )
    binary = named_binary_parameters(model)
    model_name = config.model.name
    if cfg.binary is None:
        if binary:
            raise UserError(
                f"model {model_name!r} has {len(binary)} binary layer weight(s) in "
                f"mode='bop' (+1/-1), which optim.name={cfg.name!r} would make real: "
                "expected optim.binary = 'bop' (Bop flips them, optim.name trains the rest), "
                "or the model in latent mode (e.g. model.args.mode = 'latent')"
            )
        return build_optimizer(model, cfg.name, lr, **options)
    if not binary:
        raise UserError(
            f"optim.binary={cfg.binary!r}, but model {model_name!r} has no binary layer "
            "weights in mode='bop' for it: expected a model with BinaryConv2d / BinaryLinear "
            "in bop mode (e.g. model.args.mode = 'bop'), or no optim.binary"
        )
    return build_binary_optimizer(
        model,
        cfg.name,
        lr,
        binary=cfg.binary,
        gamma=cfg.bop_gamma,
        threshold=cfg.bop_threshold,
        flip_test=cfg.bop_flip_test,
        **options,
    )


def real_optimizer(optimizer: Any) -> Any:
    """The optimizer of the real-valued parameters (None when there are none): a composite
    optimizer's "real" part, or the optimizer itself."""
    if isinstance(optimizer, CompositeOptimizer):
        return optimizer.get("real")
    return optimizer


def build_run_schedule(
    optimizer: Any,
    cfg: ScheduleConfig,
    section: str,
    keys: tuple[str, ...],
    *,
    epochs: int,
    total_steps: int,
) -> Scheduler:
    """The schedule `cfg` (the config's [section]) of the param-group `keys` of `optimizer`,
    over the run's epochs or steps (cfg.unit); a warmup as long as the run is refused."""
    total = epochs if cfg.unit == "epoch" else total_steps
    if cfg.warmup >= total:
        raise UserError(
            f"{section}.warmup={cfg.warmup} must be shorter than the run ({total} {cfg.unit}s)"
        )
    return build_schedule(
        optimizer,
        cfg.name,
        total,
        warmup_steps=cfg.warmup,
        warmup_start_factor=cfg.warmup_start_factor,
        step_size=cfg.step_size,
        milestones=tuple(cfg.milestones),
        gamma=cfg.gamma,
        power=cfg.power,
        min_factor=cfg.min_factor,
        keys=keys,
    )
