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

__all__ = [
    "FORMAT",
    "VERSION",
    "atomic_torch_save",
    "load_checkpoint",
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
