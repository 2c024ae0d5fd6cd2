"""Files that survive a kill and never execute what they read: the I/O every layer shares.

Writes (checkpoints, logs, configs, results, figures, exports, packed models) go to a temporary
file in the destination's directory and are moved into place with os.replace, so a reader (or
a killed run) never sees half a file. The temporary file is created with mode 0666 minus the
umask, like any file a program opens for writing: tempfile.mkstemp's private 0600 would leave
checkpoints and exported models unreadable to the rest of a team. A write that fails for the
storage's sake is one StorageError. Reads of torch files use torch.load(weights_only=True): a
file can hold tensors and plain containers only, and a corrupt or pickled-object file is one
UserError. This module depends on nothing of lightnets but its errors, so that the training
engine and deployment both use it without depending on each other.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import secrets
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lightnets.errors import StorageError, UserError

__all__ = [
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_bytes",
    "fsync_file",
    "load_model_state",
    "read_weights_only",
    "storage_errors",
]


def _new_temp_beside(path: Path) -> Path:
    """Create an empty, uniquely named file next to `path` (O_EXCL: never an existing one)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file next to {path}")


def fsync_file(path: Path) -> None:
    """Flush `path`'s data to disk, so that a crash after the rename cannot leave it empty."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and moved onto `path`.

    With replace=False the caller moves it (or not) itself, after `fsync_file`; the temporary
    file is removed whenever it is still there at the end, so an exception leaves `path` as
    it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        tmp = _new_temp_beside(path)
        yield tmp
        if replace:
            fsync_file(tmp)
            os.replace(tmp, path)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):  # never hide the error that got us here
                tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: str | bytes) -> None:
    """Write `data` (text is UTF-8 encoded) to `path` atomically."""
    with storage_errors(path), atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


#: How torch.save's C++ writer reports a failed write (a full disk) as a RuntimeError
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "file write failed", "unexpected pos")


@contextlib.contextmanager
def storage_errors(path: str | Path):
    """A write of `path` that fails for the storage's sake (an OSError: a full disk, no
    permission; torch.save's C++ writer failing to write) becomes one StorageError naming the
    file and the reason, without the chain of the writer's internals; the atomic write left
    the previous file intact. Other errors (a bug) pass through as they are."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, RuntimeError) as err:
        text = str(err).strip()
        if isinstance(err, RuntimeError) and not any(s in text for s in _TORCH_WRITE_FAILURES):
            raise
        reason = text.splitlines()[-1] if text else type(err).__name__
        if isinstance(err, RuntimeError):
            reason = f"{reason} (the disk may be full)"
        raise StorageError(
            f"cannot write {path}: {type(err).__name__}: {reason[:300]}; the previous "
            f"{Path(path).name}, if any, is intact"
        ) from None


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
