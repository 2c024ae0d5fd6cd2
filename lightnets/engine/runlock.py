"""One writer per run dir: an OS file lock on `<run_dir>/.lock`.

Two `lightnets train` processes on the same `--out` would interleave metrics rows and mix
one run's config with the other's checkpoints. The process that trains (rank 0 under
torchrun: it alone writes) holds an exclusive `flock` on the lock file while it trains and
writes its pid into it; a second process is refused with one line naming that pid. The OS
drops the lock when the process ends in any way, `kill -9` included, so a killed run never
leaves a stale lock behind: the file may stay, the lock does not. Where `fcntl` does not exist
(Windows) there is no lock.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from lightnets.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["LOCK_NAME", "RunLock"]

LOCK_NAME = ".lock"


class RunLock:
    """The lock of one run dir; `acquire()` or a UserError naming the holder's pid."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if fcntl is None or self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"run dir {self.run_dir} is in use by another lightnets process (pid {holder}): "
                "expected one writer per run dir; wait for it to end, stop it, or use another "
                "--out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __del__(self) -> None:
        self.release()
