"""Checkpoints that survive a kill and never execute what they read.

Writes go to a temporary file in the same directory and are moved into place with
os.replace, so a run killed mid-write leaves the previous checkpoint intact. Reads use
torch.load(weights_only=True): a checkpoint can hold tensors and plain containers only.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightnets.engine.files import atomic_path, storage_errors
from lightnets.errors import UserError

FORMAT = "lightnets-checkpoint"
VERSION = 1


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to `path` atomically; a failed write (a full disk) is one StorageError and
    leaves the previous file as it was."""
    with storage_errors(path), atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_weights_only(path: Path, what: str) -> Any:
    """torch.load(path, weights_only=True) on the CPU; any failure is one UserError naming
    `what` and the file (a corrupt, truncated or pickled-object file never runs code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        zipfile.BadZipFile,
        ValueError,
        OSError,
        AttributeError,
        KeyError,
    ) as err:
        raise UserError(
            f"cannot read {what} {path}: corrupt, truncated or not a weights-only torch file "
            f"({_load_failure_reason(err)[:200]})"
        ) from None


def _load_failure_reason(err: BaseException) -> str:
    """The reason in torch.load's message, without its advice to retry with
    weights_only=False (that would run whatever code the file holds: never do it here)."""
    text = str(err).strip()
    if not text.startswith("Weights only load failed"):
        return text.splitlines()[0] if text else type(err).__name__
    advice = ("weights_only", "Weights only load failed", "Check the documentation", "(2)")
    lines = [line.strip() for line in text.splitlines()]
    reasons = [line for line in lines if line and not any(a in line for a in advice)]
    reason = " ".join(reasons).replace("WeightsUnpickler error:", "").strip()
    reason = reason.split(". Please use", 1)[0]  # the allow-list advice
    return "weights-only unpickler: " + (reason or "refused the file")


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


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly, naming missing, unexpected and mis-shaped keys on failure."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch (checkpoint vs model) {_few(shapes)}")
        raise UserError(
            f"checkpoint {source} does not fit the model {type(model).__name__}: "
            + "; ".join(parts)
        )
    model.load_state_dict(state)


def _few(items: list[str], n: int = 4) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


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
