"""What a resumed run checks against its checkpoint before it continues, and what it says.

A resume continues a run bit-exactly or is refused before anything is loaded or cut: the
config must be the one the run was started with, except for the keys a run can change mid-way
(its length, logging, data root, workers, device: `RESUMABLE_PREFIXES`), and it must be
launched as it was started (processes x batch). A new length changes a linear / cosine / poly
schedule from where the run is on; the resume says so (`say_stretched`).
"""

from __future__ import annotations

import math
import sys
from typing import Any

from lightnets.engine.config import Config, load_config
from lightnets.errors import UserError
from lightnets.optim.schedules import Scheduler

__all__ = [
    "LENGTH_SCHEDULES",
    "RESUMABLE_PREFIXES",
    "check_resumable_length",
    "check_resumed_config",
    "check_same_launch",
    "flatten_config",
    "load_optimizer_state",
    "load_schedulers",
    "say_stretched",
]

#: Config keys (prefixes) a resumed run may change: how long it runs, how it logs and
#: evaluates, where it reads data and on which device; nothing that the saved model,
#: optimizer or sampler state depends on. A new length changes a linear / cosine / poly
#: schedule (a function of the step and the run's length) from where the run is on: the
#: resume says so, with the value it jumps from and to (`say_stretched`).
RESUMABLE_PREFIXES = (
    "train.epochs",
    "train.max_steps",
    "train.progress",
    "train.eval_every",
    "train.checkpoint_every",
    "train.device",
    "train.stop_after_flipless_epochs",
    "data.root",
    "data.num_workers",
    "data.eval_batch_size",
    "output.",
)

#: schedules whose factor depends on the run's length (the others count steps from 0)
LENGTH_SCHEDULES = ("linear", "cosine", "poly")

#: checkpoint key -> (config section, its scheduler or None): the schedules of a run
Schedulers = dict[str, tuple[str, Scheduler | None]]


def flatten_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 3}} -> {"train.epochs": 3} (model.args and data.args kept whole)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in ("model.args", "data.args"):
            out.update(flatten_config(value, f"{name}."))
        else:
            out[name] = value
    return out


def check_resumed_config(ckpt: dict[str, Any], config: Config) -> dict[str, tuple[Any, Any]]:
    """Before anything is loaded or truncated: the checkpoint's config against this one.
    Keys a run can change mid-way (its length, logging, workers, device) are returned (the
    resume takes them, updates config.toml and says so); any other difference is one
    UserError."""
    saved = ckpt.get("config")
    if not isinstance(saved, dict):
        return {}  # a checkpoint of an older version: the other checks still apply
    try:
        old = flatten_config(load_config(saved).to_dict())
    except UserError:
        old = flatten_config(saved)
    new = flatten_config(config.to_dict())
    changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))}
    changed = {k: v for k, v in changed.items() if v[0] != v[1]}
    fixed = {k: v for k, v in changed.items() if not k.startswith(RESUMABLE_PREFIXES)}
    if fixed:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(fixed.items())[:6])
        raise UserError(
            f"cannot resume {ckpt['path']} with another config ({shown}"
            f"{'; ...' if len(fixed) > 6 else ''}): these cannot change mid-run (the model, "
            "optimizer and schedule states would not fit); expected the config the run was "
            f"started with, or a new --out (changeable: {', '.join(RESUMABLE_PREFIXES)})"
        )
    return changed


def check_resumable_length(
    ckpt: dict[str, Any], *, steps_per_epoch: int, epochs: int, max_steps: int | None
) -> None:
    """A run that stopped at train.max_steps in the middle of an epoch closed that epoch
    there (its metrics row, its epoch schedule step and callbacks are done; the checkpoint
    says epoch done, no batch into the next), so it cannot go on from its step: resuming
    it for longer is one UserError, before anything is loaded, cut or rewritten."""
    spe = steps_per_epoch
    epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
    into = step - (epoch - 1) * spe  # steps it did of its last epoch
    if ckpt["batch_in_epoch"] or not 0 < into < spe or ckpt.get("stop_reason"):
        return
    if not (max_steps > step if max_steps else epochs > epoch):
        return  # nothing more to train: it stays finished
    raise UserError(
        f"cannot resume {ckpt['path']} for longer: it stopped at train.max_steps={step}, "
        f"{into} of the {spe} steps of epoch {epoch}, and closed that epoch there (its "
        "metrics row, schedule step and callbacks are done), so it cannot go on from that "
        f"step: expected train.max_steps <= {step} for this run, or a new --out for a "
        f"longer one (a run whose max_steps is a multiple of the {spe} steps of an epoch "
        "can be lengthened)"
    )


def check_same_launch(
    ckpt: dict[str, Any], *, model_name: str, processes: int, batch_per_process: int
) -> None:
    """The same model, launched with the same processes x batch per process (the batch, the
    lr scaled from it and the position in the epoch depend on them)."""
    if ckpt.get("model_name") != model_name:
        raise UserError(
            f"checkpoint {ckpt['path']} holds model {ckpt.get('model_name')!r}, but the "
            f"config asks for {model_name!r}: expected the same model"
        )
    saved = (ckpt.get("processes"), ckpt.get("batch_per_process"))
    if saved[0] is not None and saved != (processes, batch_per_process):
        raise UserError(
            f"checkpoint {ckpt['path']} was trained with {saved[0]} process(es) x "
            f"{saved[1]} images, this resume has {processes} x {batch_per_process}: expected "
            "the same (the batch, the lr scaled from it and the position in the epoch "
            "depend on them); launch it as it was started"
        )


def load_optimizer_state(optimizer: Any, ckpt: dict[str, Any], optim_name: str) -> None:
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as err:
        raise UserError(
            f"checkpoint {ckpt['path']} has optimizer state that does not fit "
            f"optim.name={optim_name!r}: {err}"
        ) from None


def load_schedulers(ckpt: dict[str, Any], schedulers: Schedulers) -> None:
    """Load each scheduler's state from its checkpoint key; a scheduler present on one side
    only, or scheduling other keys, is refused (also a saved scheduler this run has none
    for)."""
    unclaimed = [
        k for k, v in ckpt.items() if k.endswith("scheduler") and k not in schedulers and v
    ]
    if unclaimed:
        raise UserError(
            f"checkpoint {ckpt['path']} was trained with a {unclaimed[0].replace('_', ' ')} "
            "(this config has none): expected the config the run was started with"
        )
    for key, (_, sched) in schedulers.items():
        saved = ckpt.get(key)
        if (sched is None) != (saved is None) or (
            sched is not None and list(saved.get("keys", sched.keys)) != list(sched.keys)
        ):
            raise UserError(
                f"checkpoint {ckpt['path']} was trained with another {key.replace('_', ' ')} "
                "(present / scheduled keys differ from this config's): expected the config "
                "the run was started with"
            )
        if sched is not None:
            sched.load_state_dict(saved)


def say_stretched(
    ckpt: dict[str, Any],
    config: Config,
    *,
    steps_per_epoch: int,
    epochs: int,
    total_steps: int,
    schedulers: Schedulers,
) -> None:
    """A new length changes a linear / cosine / poly schedule from where the run is (its
    factor is a function of the step and the run's length): say so, with the jump."""
    saved = (ckpt.get("config") or {}).get("train") or {}
    spe = steps_per_epoch
    old_max, old_epochs = saved.get("max_steps"), saved.get("epochs")
    if not old_max and not old_epochs:
        return
    old = {
        "epoch": math.ceil(old_max / spe) if old_max else old_epochs,
        "step": old_max or old_epochs * spe,
    }
    new = {"epoch": epochs, "step": total_steps}
    for state, (section, sched) in schedulers.items():
        cfg = getattr(config, section)
        if sched is None or cfg.name not in LENGTH_SCHEDULES or old[cfg.unit] == new[cfg.unit]:
            continue
        key = sched.keys[0]
        group = next(g for g in sched.optimizer.param_groups if key in g)
        before = group[f"initial_{key}"] * float((ckpt.get(state) or {}).get("last_factor", 1))
        print(
            f"note: the {section} ({cfg.name}) now runs over {new[cfg.unit]} {cfg.unit}s "
            f"instead of {old[cfg.unit]}: it follows the new length from {cfg.unit} "
            f"{sched.t} on, so {key} goes from {before:.4g} to {group[key]:.4g} there",
            file=sys.stderr,
        )
