"""Optimizers by name (with norm/bias weight-decay groups), Bop, Bop + a real-valued optimizer
as one (CompositeOptimizer), and multiplicative schedules."""

from lightnets.optim.bop import (
    Bop,
    binary_parameters,
    log_flip_ratio,
    named_binary_parameters,
    real_parameters,
)
from lightnets.optim.composite import (
    BINARY_OPTIMIZERS,
    CompositeOptimizer,
    build_binary_optimizer,
)
from lightnets.optim.factory import (
    build_optimizer,
    is_norm_layer,
    list_optimizers,
    param_groups,
    register_optimizer,
)
from lightnets.optim.schedules import Scheduler, build_schedule, list_schedules

__all__ = [
    "BINARY_OPTIMIZERS",
    "Bop",
    "CompositeOptimizer",
    "Scheduler",
    "binary_parameters",
    "build_binary_optimizer",
    "build_optimizer",
    "build_schedule",
    "is_norm_layer",
    "list_optimizers",
    "list_schedules",
    "log_flip_ratio",
    "named_binary_parameters",
    "param_groups",
    "real_parameters",
    "register_optimizer",
]
