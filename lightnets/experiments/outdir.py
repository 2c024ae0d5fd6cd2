"""An experiment's out dir: who writes it, what marks it as an experiment's, and how files get
into it.

Under torchrun every process runs the same experiment, but only rank 0 writes and prints
(`is_main_process`). Every file is written atomically (temp file + rename), so a killed
experiment never leaves a half-written table. `<out>/experiment.json` holds the experiment's
name and the arguments that define its runs: an out dir holding another experiment, other
arguments, or anything else is refused unless `overwrite` (which deletes it first).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lightnets.errors import UserError
from lightnets.files import atomic_write_bytes

__all__ = [
    "EXPERIMENT_FILE",
    "is_main_process",
    "normalized",
    "prepare_out_dir",
    "say",
    "write_text",
]

EXPERIMENT_FILE = "experiment.json"


def is_main_process() -> bool:
    """Rank 0 (or not launched by torchrun): the process that writes and prints. Experiments
    write their own tables and figures only there, after run_experiment."""
    return int(os.environ.get("RANK", "0")) == 0


def say(text: str) -> None:
    """Print `text` on rank 0 only (flushed: progress lines of long experiments)."""
    if is_main_process():
        print(text, flush=True)


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (temp file + rename), as every results file is."""
    atomic_write_bytes(path, text)


def normalized(value: Any) -> Any:
    """JSON round trip: tuples become lists, so stored and fresh settings compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def prepare_out_dir(
    out: Path, experiment: str, settings: dict[str, Any], overwrite: bool, seeds: list[int]
) -> None:
    """Create `out` (or accept it when it holds the same experiment and settings).

    A different experiment or different settings in `out` is refused unless `overwrite`,
    which deletes the dir first. The seeds are recorded but may differ between invocations.
    """
    out = Path(out)
    settings = normalized(settings)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: expected a directory for the experiment")
    if out.is_dir() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        else:
            stored = _read_experiment_file(out)
            if stored is None:
                raise UserError(
                    f"--out {out} already exists and holds no {EXPERIMENT_FILE}: expected an "
                    "empty or new dir, or an experiment's out dir (pass --overwrite to replace it)"
                )
            if stored.get("experiment") != experiment:
                raise UserError(
                    f"--out {out} holds experiment {stored.get('experiment')!r}, not "
                    f"{experiment!r}: pass --overwrite to replace it, or another --out"
                )
            old = stored.get("arguments", {})
            if old != settings:
                keys = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                diffs = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in keys)
                raise UserError(
                    f"--out {out} holds experiment {experiment!r} run with other arguments "
                    f"({diffs}): expected the same arguments to continue it; pass --overwrite "
                    "to replace it, or another --out"
                )
    out.mkdir(parents=True, exist_ok=True)
    record = {"experiment": experiment, "arguments": settings, "seeds": list(seeds)}
    write_text(out / EXPERIMENT_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")


def _read_experiment_file(out: Path) -> dict[str, Any] | None:
    path = out / EXPERIMENT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(
            f"{path} is not valid JSON: expected the file lightnets repro writes (pass "
            "--overwrite to start the experiment afresh)"
        ) from None
    return data if isinstance(data, dict) else None
