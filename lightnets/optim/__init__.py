"""Optimizers by name (with norm/bias weight-decay groups) and multiplicative schedules."""

from lightnets.optim.factory import (
    build_optimizer,
    is_norm_layer,
    list_optimizers,
    param_groups,
    register_optimizer,
)
from lightnets.optim.schedules import Scheduler, build_schedule, list_schedules

__all__ = [
    "Scheduler",
    "build_optimizer",
    "build_schedule",
    "is_norm_layer",
    "list_optimizers",
    "list_schedules",
    "param_groups",
    "register_optimizer",
]
