"""How a run starts in its run dir: lock it, clean what killed writes left, and decide whether
the run resumes (from which checkpoint), starts afresh, or is refused.

A run dir holds one run: config.toml, metrics.jsonl / metrics.csv, curves.png, last.pt and
best.pt (plus the lock and, after a kill, temporary files of unfinished writes). What a run
writes before its first checkpoint is lost by nothing when it starts again, so such a dir
needs no --overwrite; anything more is refused unless the user says --resume or --overwrite.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

from lightnets.engine import distributed as dist_utils
from lightnets.engine.runlock import LOCK_NAME, RunLock
from lightnets.errors import UserError

__all__ = [
    "BEFORE_CHECKPOINT",
    "abandon_start",
    "is_temp",
    "killed_between_checkpoints",
    "missing_dirs",
    "never_checkpointed",
    "prepare_run_dir",
    "run_dir_entries",
]

#: What a run writes before its first checkpoint: a run dir holding only these lost nothing
#: that a start from the beginning would not write again
BEFORE_CHECKPOINT = {"config.toml", "metrics.jsonl", "metrics.csv", "curves.png"}


def is_temp(path: Path) -> bool:
    """The temporary file of an atomic write (a killed one leaves it behind)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def run_dir_entries(run_dir: Path) -> list[Path]:
    """The run dir's entries, less the lock and temporary files of killed writes."""
    return [p for p in run_dir.iterdir() if p.name != LOCK_NAME and not is_temp(p)]


def never_checkpointed(run_dir: Path) -> bool:
    """A run dir of a run that stopped before its first checkpoint (its config, maybe a
    metrics row): nothing in it is lost by starting again, so that needs no --overwrite."""
    return {p.name for p in run_dir_entries(run_dir)} <= BEFORE_CHECKPOINT


def killed_between_checkpoints(run_dir: Path) -> bool:
    """best.pt but no last.pt: a run killed between the two writes of its first checkpoint
    (an improving epoch writes best.pt, then last.pt, with nothing changing in between, so
    best.pt holds exactly the state last.pt would). A resume continues from best.pt."""
    names = {p.name for p in run_dir_entries(run_dir)}
    return (
        "best.pt" in names and "last.pt" not in names and names <= BEFORE_CHECKPOINT | {"best.pt"}
    )


def missing_dirs(run_dir: Path) -> list[Path]:
    """The run dir and those of its parents that do not exist yet (innermost first): what a
    start creates, and a failed start removes again."""
    missing = []
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def abandon_start(lock: RunLock, created: list[Path], is_main: bool) -> None:
    """After a failed start: release the lock (this process could not start another run on
    the dir otherwise) and leave nothing new behind (the lock file and the empty directories
    the start created)."""
    lock.release(remove=True)  # the lock file only if this start created it
    if not is_main:
        return
    for path in created:
        try:
            path.rmdir()
        except OSError:  # not empty (or gone): what is in it is not this start's alone
            break


def prepare_run_dir(
    run_dir: Path, lock: RunLock, *, resume: bool, overwrite: bool, is_main: bool
) -> Path | None:
    """Lock the run dir (rank 0), clean what killed writes left, and decide how the run
    starts: returns the checkpoint a resumed run continues, or None for a new run. --resume
    of a dir that does not exist is refused (a mistyped --out must not start a new run); of
    a run with no checkpoint it starts afresh, saying so. Every rank calls it."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(
            f"--out {run_dir} is a file: expected a directory for the run (a new path, or "
            "an existing run dir)"
        )
    if resume and not run_dir.exists():
        raise UserError(
            f"cannot resume: run dir {run_dir} does not exist: expected the --out of an "
            "existing run (check its spelling), or no --resume to start a new run there"
        )
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        for temp in [p for p in run_dir.iterdir() if is_temp(p)]:  # killed writes
            with contextlib.suppress(OSError):
                temp.unlink()
    dist_utils.barrier()
    entries = run_dir_entries(run_dir)
    if resume and (run_dir / "last.pt").is_file():
        return run_dir / "last.pt"
    if resume and killed_between_checkpoints(run_dir):
        return run_dir / "best.pt"
    if resume and not never_checkpointed(run_dir):
        raise UserError(
            f"cannot resume: {run_dir / 'last.pt'} does not exist and {run_dir} holds "
            f"other files ({', '.join(sorted(p.name for p in entries)[:5])}): expected a run "
            "dir with a checkpoint (--overwrite replaces it)"
        )
    if entries and never_checkpointed(run_dir):
        if is_main:
            print(
                f"note: {run_dir} holds a run that stopped before its first checkpoint "
                f"({', '.join(sorted(p.name for p in entries))}); starting it afresh",
                file=sys.stderr,
            )
            for path in entries:
                path.unlink()
    elif resume:  # an empty dir: nothing to resume
        if is_main:
            print(
                f"note: {run_dir} holds no run to resume (no checkpoint); starting a new run there",
                file=sys.stderr,
            )
    elif entries:
        if not overwrite:
            raise UserError(
                f"run dir {run_dir} already exists and is not empty: pass --resume to "
                "continue it, --overwrite to replace it, or --out for a new dir"
            )
        if is_main:
            for path in entries:  # everything but the lock we hold
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    dist_utils.barrier()
    return None
