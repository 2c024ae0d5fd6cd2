"""Checkpoints that survive a kill and never execute what they read.

Writes go to a temporary file in the same directory and are moved into place with
os.replace, so a run killed mid-write leaves the previous checkpoint intact. Reads use
torch.load(weights_only=True): a checkpoint can hold tensors and plain containers only.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightnets.errors import UserError
from lightnets.files import atomic_torch_save, load_model_state, read_weights_only
from lightnets.models.registry import create_model

__all__ = [
    "FORMAT",
    "VERSION",
    "atomic_torch_save",
    "load_checkpoint",
    "load_checkpoint_model",
    "load_model_state",
    "read_weights_only",
    "rng_state",
    "set_rng_state",
]

FORMAT = "lightnets-checkpoint"
VERSION = 1


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a lightnets checkpoint with weights_only=True, or explain why it can't be used."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: expected a .pt file or a run dir")
    ckpt = read_weights_only(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a lightnets checkpoint: expected a file written by it")
    if ckpt.get("version", 0) > VERSION:
        raise UserError(
            f"checkpoint {path} has format version {ckpt.get('version')}: this lightnets "
            f"reads versions <= {VERSION}; upgrade lightnets"
        )
    ckpt["path"] = str(path)
    return ckpt


def load_checkpoint_model(path: str | Path, overrides: dict[str, Any] | None = None):
    """(model, checkpoint) from a lightnets checkpoint: rebuilt by name, weights loaded strictly.

    With `overrides` (model kwargs replacing the checkpoint's), the weights are loaded only if
    they still fit; a model that no longer fits them is returned with its initial weights.
    """
    ckpt = load_checkpoint(path)
    name, args = ckpt.get("model_name"), ckpt.get("model_args")
    if not isinstance(name, str) or not isinstance(args, dict) or "model" not in ckpt:
        raise UserError(
            f"checkpoint {ckpt['path']} has no model_name / model_args / model: expected a "
            "checkpoint written by `lightnets train`"
        )
    model = create_model(name, **{**args, **(overrides or {})})
    if overrides:
        try:
            load_model_state(model, ckpt["model"], ckpt["path"])
        except UserError:
            pass  # different architecture: the profile does not depend on the weights
    else:
        load_model_state(model, ckpt["model"], ckpt["path"])
    return model, ckpt


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from, in weights-only-loadable form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() captured."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]
