"""lightnets: train light-weight and binary CNNs and ship them with no inference overhead."""

from __future__ import annotations

from lightnets import analysis, data, deploy, engine, models, nn, optim
from lightnets.analysis import profile
from lightnets.deploy import convert_norm, fuse, load_packed, pack_binary, save_packed
from lightnets.deploy.export import export
from lightnets.errors import UserError
from lightnets.models.registry import create_model, list_models, register_model
from lightnets.version import __version__

__all__ = [
    "UserError",
    "__version__",
    "analysis",
    "convert_norm",
    "create_model",
    "data",
    "deploy",
    "engine",
    "export",
    "fuse",
    "list_models",
    "load_packed",
    "models",
    "nn",
    "optim",
    "pack_binary",
    "profile",
    "register_model",
    "save_packed",
]
