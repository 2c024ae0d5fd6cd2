"""Run plans: what every run of an experiment will train, resolved before anything runs.

`lightnets repro NAME ... --dry-run` prints one JSON line per run and trains nothing (it
reads no data either: a `--root` that does not exist yet is fine); a real `lightnets repro`
prints the same lines before it starts, and keeps them in `<out>/plan.jsonl`. A line holds the
resolved setting of one run (PLAN_KEYS): the model and its arguments, the data, the batch of
each process and over all processes, the peak learning rate after every scaling rule, the
weight decay, the length, the schedules, the augmentation ops with their parameters, what the
reported number is, and `deviations`: every known difference from the paper's setting.

Deviations are found by comparing the resolved run field by field with the experiment's
`PaperSetting` (the paper's setting of that run, transcribed with its section), so a
`--set` override, another `--epochs` or a CPU-scale dataset shows up without anyone
writing it down; differences that no field shows (an augmentation we do not have, a choice
the paper leaves open) are the setting's `notes`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lightnets.data.augment import describe_augment
from lightnets.data.registry import dataset_info, describe_loading
from lightnets.engine.config import Config, ScheduleConfig
from lightnets.experiments.outdir import is_main_process
from lightnets.models.registry import model_arguments

__all__ = [
    "PLAN_FILE",
    "PLAN_KEYS",
    "PaperSetting",
    "deviations",
    "describe_dataset",
    "describe_schedule",
    "plan_line",
    "plan_text",
    "print_plan",
    "resolve_run",
]

#: The plan of a real run, kept beside its results.
PLAN_FILE = "plan.jsonl"

#: The keys of a plan line, in order ("epochs" is "max_steps" for iteration-based runs).
PLAN_KEYS = (
    "run",
    "model",
    "model_args",
    "dataset",
    "processes",
    "batch_per_process",
    "global_batch",
    "lr",
    "weight_decay",
    "epochs",
    "schedule",
    "augment",
    "metric",
    "deviations",
)


@dataclass(frozen=True)
class PaperSetting:
    """The paper's setting of one run, field by field; None (or empty) where the paper does
    not fix it, so nothing is compared there.

    `source` cites the section. `model_args` and `schedule` are compared key by key (keys the
    paper fixes; a key our run leaves out is compared at the model's default; "a.b" compares
    key b of a table argument a, e.g. "norm_kwargs.r_max"). `config`
    compares resolved config values the plan does not print (dotted keys, e.g.
    {"optim.momentum": 0.9}). `notes` are known differences no field shows, and the choices
    the paper leaves open with what we chose, one sentence each.
    """

    source: str
    model: str | None = None
    model_args: Mapping[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    processes: int | None = None
    batch_per_process: int | None = None
    global_batch: int | None = None
    lr: float | None = None
    weight_decay: float | Mapping[str, float] | None = None
    epochs: int | None = None
    max_steps: int | None = None
    schedule: Mapping[str, Any] | None = None
    augment: list[Any] | None = None
    metric: str | None = None
    runs: int | None = None  # independent runs (seeds) per variant behind the paper's number
    config: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def updated(self, **changes: Any) -> PaperSetting:
        """A copy with `changes`; model_args and config are merged, notes appended."""
        for key in ("model_args", "config"):
            if key in changes:
                changes[key] = {**getattr(self, key), **changes[key]}
        if "notes" in changes:
            changes["notes"] = (*self.notes, *changes["notes"])
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- resolving
def describe_schedule(config: Config) -> dict[str, Any]:
    """The lr schedule (and, for binary networks, Bop's hyperparameters, their schedule and
    the no-flip stop) with only the values that apply to each schedule."""
    out = _schedule(config.schedule)
    o, t = config.optim, config.train
    if o.binary is not None:
        binary: dict[str, Any] = {
            "optimizer": o.binary,
            "gamma": o.bop_gamma,
            "threshold": o.bop_threshold,
            "schedule": {**_schedule(config.binary_schedule), "keys": config.binary_schedule.keys},
        }
        if t.stop_after_flipless_epochs:
            binary["stop_after_flipless_epochs"] = t.stop_after_flipless_epochs
        out["binary"] = binary
    return out


def _schedule(cfg: ScheduleConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"name": cfg.name}
    if cfg.name != "constant":
        out["unit"] = cfg.unit
    if cfg.name == "step":
        out.update(step_size=cfg.step_size, gamma=cfg.gamma)
    elif cfg.name == "multistep":
        out.update(milestones=list(cfg.milestones), gamma=cfg.gamma)
    elif cfg.name in ("linear", "cosine"):
        out.update(min_factor=cfg.min_factor)
    elif cfg.name == "poly":
        out.update(power=cfg.power, min_factor=cfg.min_factor)
    if cfg.warmup:
        out.update(unit=cfg.unit, warmup=cfg.warmup, warmup_start_factor=cfg.warmup_start_factor)
    return out


def describe_dataset(config: Config) -> str:
    """The dataset's name, with how the validation part is held out when it is."""
    d = config.data
    if d.val_fraction > 0:
        return f"{d.name}, val: {d.val_holdout} {d.val_fraction:.0%} of {d.train_split}"
    return d.name


def _weight_decay(config: Config) -> float | dict[str, float]:
    o = config.optim
    norm = o.weight_decay if o.norm_weight_decay is None else o.norm_weight_decay
    bias = o.weight_decay if o.bias_weight_decay is None else o.bias_weight_decay
    if norm == o.weight_decay and bias == o.weight_decay:
        return o.weight_decay
    return {"weights": o.weight_decay, "norm": norm, "bias": bias}


def resolve_run(config: Config, processes: int) -> dict[str, Any]:
    """The plan fields of one run (all but run, metric and deviations) with `processes`
    processes, from the config alone (no data is read)."""
    per = config.data.per_process_batch(processes)
    total = per * processes
    lr = config.optim.lr
    if config.optim.lr_reference_batch:
        lr = lr * total / config.optim.lr_reference_batch
    args = dict(config.model.args)
    accepted = model_arguments(config.model.name)
    info = dataset_info(config.data.name)
    for key in ("num_classes", "in_chans"):
        if key in accepted and key not in args and key in info:
            args[key] = info[key]
    length = (
        {"max_steps": config.train.max_steps}
        if config.train.max_steps
        else {"epochs": config.train.epochs}
    )
    loading = describe_loading(config.data.name, config.data.train_split, **config.data.args)
    augment = describe_augment(config.data.augment)
    if config.data.image_size:  # the size random_crop cuts (data.image_size)
        size = list(config.data.image_size) * (2 if len(config.data.image_size) == 1 else 1)
        for op in augment:
            if isinstance(op, dict) and "random_crop" in op:
                op["random_crop"] = {"size": size, **op["random_crop"]}
    return {
        "model": config.model.name,
        "model_args": args,
        "dataset": describe_dataset(config),
        "processes": processes,
        "batch_per_process": per,
        "global_batch": total,
        "lr": _round(lr),
        "weight_decay": _weight_decay(config),
        **length,
        "schedule": describe_schedule(config),
        "augment": loading + augment,
    }


def plan_line(
    run: str,
    config: Config,
    processes: int,
    metric: str,
    paper: PaperSetting | None,
    runs: int | None = None,
) -> dict[str, Any]:
    """One plan line: the resolved run, what is reported, and its deviations from `paper`
    (`runs`: the seeds the experiment trains per variant, compared with the paper's runs)."""
    line = {"run": run, **resolve_run(config, processes), "metric": metric}
    if paper is None:
        line["deviations"] = ["no paper setting is recorded for this run"]
    else:
        line["deviations"] = deviations(line, config, paper, runs)
    return line


def plan_text(lines: list[dict[str, Any]]) -> str:
    """The plan as JSON lines (what --dry-run prints and plan.jsonl holds)."""
    return "".join(json.dumps(line, default=str, ensure_ascii=False) + "\n" for line in lines)


def print_plan(lines: list[dict[str, Any]]) -> None:
    """Print the plan, one JSON line per run (rank 0 only)."""
    if is_main_process():
        print(plan_text(lines), end="", flush=True)


def _round(value: float) -> float:
    """Drop float noise from products (0.1 * 8 * 32 / 256 -> 0.1), keeping 12 digits."""
    return float(f"{value:.12g}")


# ----------------------------------------------------------------------------- comparing
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-15)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


def _show(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


def _model_default(model: str, key: str) -> Any:
    param = model_arguments(model).get(key)
    if param is None or param.default is param.empty:
        return None
    return param.default


def _model_arg(line: Mapping[str, Any], dotted: str) -> Any:
    """A model argument of the plan line, "a.b" reaching into a table argument; a top-level
    argument the run leaves out has the model's default."""
    head, *rest = dotted.split(".")
    args = line["model_args"]
    value = args[head] if head in args else _model_default(line["model"], head)
    for part in rest:
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _config_value(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else getattr(value, part, None)
    return value


def deviations(
    line: Mapping[str, Any], config: Config, paper: PaperSetting, runs: int | None = None
) -> list[str]:
    """Every known difference of the resolved run `line` from the paper's setting: one
    sentence per differing field (ours, then the paper's), then the setting's notes. A model
    argument the run's model does not take is not compared (the model's line says it differs).
    """
    out: list[str] = []

    def mismatch(what: str, ours: Any, theirs: Any) -> None:
        if not _same(ours, theirs):
            out.append(f"{what}: {_show(ours)} here, the paper's is {_show(theirs)}")

    def differ(what: str, ours: Any, theirs: Any) -> None:
        if theirs is not None:  # None: the paper does not fix it
            mismatch(what, ours, theirs)

    differ("model", line["model"], paper.model)
    accepted = model_arguments(line["model"])
    for key, theirs in paper.model_args.items():
        if key.split(".")[0] in accepted or key.split(".")[0] in line["model_args"]:
            differ(f"model_args.{key}", _model_arg(line, key), theirs)
    for key in ("dataset", "processes", "batch_per_process", "global_batch", "lr", "weight_decay"):
        differ(key, line.get(key), getattr(paper, key))
    if paper.epochs is not None and "epochs" not in line:
        out.append(
            f"length: {line['max_steps']} iterations (train.max_steps) here, the paper's is "
            f"{paper.epochs} epochs"
        )
    elif paper.max_steps is not None and "max_steps" not in line:
        out.append(
            f"length: {line['epochs']} epochs here, the paper's is {paper.max_steps} iterations"
        )
    else:
        differ("epochs", line.get("epochs"), paper.epochs)
        differ("max_steps", line.get("max_steps"), paper.max_steps)
    if paper.schedule is not None:  # the paper's schedule is complete: compare every key
        ours_s, theirs_s = line["schedule"], paper.schedule
        for key in dict.fromkeys([*theirs_s, *ours_s]):
            ours_v, theirs_v = ours_s.get(key), theirs_s.get(key)
            if isinstance(theirs_v, Mapping) and isinstance(ours_v, Mapping):
                for sub in dict.fromkeys([*theirs_v, *ours_v]):
                    mismatch(f"schedule.{key}.{sub}", ours_v.get(sub), theirs_v.get(sub))
            else:
                mismatch(f"schedule.{key}", ours_v, theirs_v)
    differ("augment", line["augment"], paper.augment)
    differ("metric", line["metric"], paper.metric)
    if runs is not None:
        differ("runs (seeds per variant)", runs, paper.runs)
    for dotted, theirs in paper.config.items():
        differ(dotted, _config_value(config, dotted), theirs)
    out.extend(paper.notes)
    return out
