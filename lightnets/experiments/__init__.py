"""Named experiments that reproduce a paper's tables: `lightnets repro NAME`.

Each experiment module in this package registers itself with `register_experiment`, giving a
function that adds its command-line options and a function that runs it. What they share:

    spec      ExperimentSpec / Variant: what to train (variants x seeds), the paper beside it
    runner    run_experiment(spec) and run_one(...): train, resume or skip runs, resumably
    results   RunResult / VariantResult / ExperimentResults and their statistics
    report    results.md / .json / .csv / .png, mean ± std formatting, figures
    plan      one JSON line per run and its deviations from the paper's setting (--dry-run)
    outdir    the out dir: experiment.json, atomic writes, rank 0 only
    options   the options every experiment takes and their checks

    @register_experiment("fbn-cifar", "FBN vs BN on CIFAR", add_arguments=_add_args)
    def fbn_cifar(args: argparse.Namespace) -> int: ...

Experiment modules (one per paper: a module, or a package of one module per experiment) are
imported on first use of the registry (every module of this package but the shared ones
above), so adding an experiment means adding a module; nothing else is edited.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from lightnets.registry import Registry

__all__ = [
    "EXPERIMENTS",
    "Experiment",
    "get_experiment",
    "list_experiments",
    "register_experiment",
]

#: The shared modules, which define no experiment.
_NOT_EXPERIMENTS = frozenset({"options", "outdir", "plan", "report", "results", "runner", "spec"})


@dataclass(frozen=True)
class Experiment:
    """A registered experiment: its name, one-line help, option adder, run function, and
    plan function (parsed options -> one plan line per run, nothing trained: --dry-run)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    plan: Callable[[argparse.Namespace], list[dict]] | None = None


#: Every registered experiment by name (filled as the experiment modules are imported).
EXPERIMENTS: Registry[Experiment] = Registry("experiment")
_loaded = False


def register_experiment(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    plan: Callable[[argparse.Namespace], list[dict]] | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator: register `run(args) -> int | None` as experiment `name`.

    `add_arguments(parser)` adds the experiment's options to its `lightnets repro NAME`
    parser; without it the experiment takes no options. `plan(args)` returns the plan lines
    of its runs (`lightnets.experiments.plan`) for `--dry-run`, which every experiment
    parser has, with `--processes`.
    """

    def wrap(run: Callable) -> Callable:
        if name in EXPERIMENTS and EXPERIMENTS[name].run is run:
            return run  # the same module imported again
        EXPERIMENTS.add(name, Experiment(name, help, add_arguments or (lambda p: None), run, plan))
        return run

    return wrap


def _load_all() -> None:
    """Import every experiment module of this package once (they register on import)."""
    global _loaded
    if _loaded:
        return
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name not in _NOT_EXPERIMENTS and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def list_experiments() -> list[Experiment]:
    """All registered experiments, sorted by name."""
    _load_all()
    return [EXPERIMENTS[name] for name in EXPERIMENTS.names()]


def get_experiment(name: str) -> Experiment:
    """The experiment registered as `name`; an unknown name is a UserError naming valid ones."""
    _load_all()
    return EXPERIMENTS.lookup(name)
