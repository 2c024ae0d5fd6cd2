"""`lightnets repro NAME [options]`: reproduce a paper's experiment (see lightnets.experiments).

Each registered experiment is a sub-command with its own options, so
`lightnets repro fbn-cifar --help` lists exactly that experiment's options;
`lightnets repro --list` (or no name) lists the experiments.
"""

from __future__ import annotations

import argparse

from lightnets.errors import UserError
from lightnets.experiments import get_experiment, list_experiments
from lightnets.experiments.plan import print_plan

__all__ = ["add_repro_arguments", "repro_command"]


def _listing() -> str:
    experiments = list_experiments()
    width = max((len(e.name) for e in experiments), default=0)
    return "\n".join(f"  {e.name:<{width}}  {e.help}" for e in experiments)


def add_repro_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--list` and one sub-parser per registered experiment to `parser`."""
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    sub = parser.add_subparsers(dest="experiment", metavar="NAME", title="experiment")
    for exp in list_experiments():
        p = sub.add_parser(exp.name, help=exp.help, description=exp.help)
        exp.add_arguments(p)
        _add_plan_options(p)


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    """--dry-run and --processes, which every experiment has."""
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print one JSON line per run (resolved model, data, batch, lr, schedule, "
        "augmentation, metric and every deviation from the paper's setting) and exit: "
        "nothing is trained and no data is read",
    )
    p.add_argument(
        "--processes",
        type=int,
        metavar="W",
        help="processes (GPUs) the runs are planned for: with a per-process batch the global "
        "batch and the lr scale with it; a real run must be launched with as many (torchrun "
        "--nproc_per_node W); default: as many as launched (1 without torchrun)",
    )


def repro_command(args: argparse.Namespace) -> int:
    """Run the experiment named in `args.experiment` (or list them); returns the exit code."""
    name = getattr(args, "experiment", None)
    if getattr(args, "list", False) or name is None:
        print("experiments (lightnets repro NAME --help for the options of one):")
        print(_listing())
        if name is None and not getattr(args, "list", False):
            raise UserError("no experiment named: expected `lightnets repro NAME` (see above)")
        return 0
    experiment = get_experiment(name)
    processes = getattr(args, "processes", None)
    if processes is not None and processes < 1:
        raise UserError(f"--processes {processes}: expected at least 1")
    if getattr(args, "dry_run", False):
        if experiment.plan is None:
            raise UserError(f"experiment {name!r} cannot plan its runs: --dry-run is not available")
        print_plan(experiment.plan(args))
        return 0
    return int(experiment.run(args) or 0)
