"""lightnets: train light-weight and binary CNNs and ship them with no inference overhead."""

from __future__ import annotations

from lightnets import data, engine, models, nn, optim
from lightnets.errors import UserError
from lightnets.models.registry import create_model, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "UserError",
    "create_model",
    "data",
    "engine",
    "list_models",
    "models",
    "nn",
    "optim",
    "register_model",
]
