"""lightnets: train light-weight and binary CNNs and ship them with no inference overhead."""

from __future__ import annotations

from typing import Any

from lightnets import analysis, data, deploy, engine, models, nn, optim
from lightnets.analysis import profile
from lightnets.deploy import convert_norm, fuse, load_packed, pack_binary, save_packed
from lightnets.errors import UserError
from lightnets.models.registry import create_model, list_models, register_model
from lightnets.version import __version__


def export(model: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
    """Export the fused model to ONNX or TorchScript (see lightnets.deploy.export.export).

    Imported on first use so that `import lightnets` does not load onnx/onnxruntime.
    """
    from lightnets.deploy.export import export as _export

    return _export(model, path, *args, **kwargs)


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
