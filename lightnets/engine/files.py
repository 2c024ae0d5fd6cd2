"""Atomic file writes: a reader (or a killed run) never sees half a file.

Everything a run or an export writes goes to a temporary file in the destination's directory
and is moved into place with os.replace. The temporary file is created with mode 0666 minus
the umask, like any file a program opens for writing: tempfile.mkstemp's private 0600 would
leave checkpoints and exported models unreadable to the rest of a team.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from lightnets.errors import StorageError

__all__ = ["atomic_path", "atomic_write_bytes", "fsync_file", "storage_errors"]


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
