"""One writer per run dir: an OS file lock on `<run_dir>/.lock`.

Two `lightnets train` processes on the same `--out` would interleave metrics rows and mix
one run's config with the other's checkpoints. The process that trains (rank 0 under
torchrun: it alone writes) holds an exclusive `flock` on the lock file while it trains and
writes its pid into it; a second process is refused with one line naming that pid (and saying
when that pid is this very process, or no longer running). The OS drops the lock when the
process ends in any way, `kill -9` included, so a killed run never leaves a stale lock behind:
the file may stay, the lock does not. A flock belongs to the open file, which a fork shares:
so that DataLoader workers (forked) do not keep the lock alive after the trainer is killed, a
forked child closes its copy of the lock file at once (`os.register_at_fork`). Where `fcntl`
does not exist (Windows) there is no lock.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from pathlib import Path

from lightnets.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["LOCK_NAME", "RunLock"]

LOCK_NAME = ".lock"

#: the locks this process holds, for the fork hook
_HELD: weakref.WeakSet[RunLock] = weakref.WeakSet()


def _forget_in_child() -> None:
    """In a forked child: close the inherited lock files without unlocking them (an unlock
    would drop the parent's lock: a flock belongs to the file both share)."""
    for lock in list(_HELD):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def _holder(text: str) -> str:
    """'pid N' with what is known about N: this process, or no longer running."""
    text = text.strip()
    if not text.isdigit():
        return "pid unknown"
    pid = int(text)
    if pid == os.getpid():
        return (
            f"pid {pid}, this very process: a Trainer on this run dir has not finished or "
            "released it"
        )
    if not _is_running(pid):
        return (
            f"pid {pid}, which is no longer running: a process it started (a DataLoader "
            "worker?) still holds the lock; end that process"
        )
    return f"pid {pid}"


class RunLock:
    """The lock of one run dir; `acquire()` or a UserError naming the holder's pid."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self.created = False  # this lock created the lock file

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if fcntl is None or self._fd is not None:
            return self
        for _ in range(100):  # the file may be removed under us (`release(remove=True)`)
            fd, created = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(os.read(fd, 64).decode(errors="replace"))
                os.close(fd)
                raise UserError(
                    f"run dir {self.run_dir} is in use by another lightnets process ({holder}): "
                    "expected one writer per run dir; wait for it to end, stop it, or use "
                    "another --out"
                ) from None
            if self._is_current(fd):
                break
            os.close(fd)  # locked a file that was removed meanwhile: lock the new one
        else:  # pragma: no cover - a file replaced 100 times in a row
            raise UserError(f"cannot lock {self.path}: it keeps being replaced")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd, self.created = fd, created
        _HELD.add(self)
        return self

    def _open(self) -> tuple[int, bool]:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666), False

    def _is_current(self, fd: int) -> bool:
        """The locked file is still the one at the path (not removed by its last holder)."""
        try:
            here = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self, remove: bool = False) -> None:
        """Drop the lock; with remove=True also delete the lock file if this lock created
        it (a start that failed leaves nothing new behind)."""
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        if fd is not None and fcntl is not None:
            if remove and self.created:  # while still locked: see _is_current
                with contextlib.suppress(OSError):
                    self.path.unlink()
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __del__(self) -> None:
        self.release()
