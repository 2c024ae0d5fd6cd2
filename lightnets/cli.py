"""The `lightnets` command line.

Each subcommand registers itself in COMMANDS with a function that adds its arguments and a
function that runs it, so later features add commands without touching the dispatch.
Errors the user caused (UserError) print one line and exit with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lightnets.commands import add_set_option, eval_loader
from lightnets.commands.data import add_data_arguments, data_command
from lightnets.commands.export import add_export_arguments, export_command
from lightnets.commands.predict import add_predict_arguments, predict_command
from lightnets.commands.profile import add_profile_arguments, profile_command
from lightnets.commands.repro import add_repro_arguments, repro_command
from lightnets.demo import run_demo
from lightnets.engine.checkpoint import load_checkpoint, load_model_state
from lightnets.engine.config import Config, list_recipes, load_config, recipe_path
from lightnets.engine.distributed import shutdown_distributed
from lightnets.engine.trainer import Trainer, evaluate
from lightnets.errors import StorageError, UserError
from lightnets.models.registry import create_model
from lightnets.registry import Registry

#: Subcommands: name -> (help, add_arguments(parser), run(args) -> exit code).
COMMANDS: Registry[tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = Registry(
    "command"
)


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Decorator: register `fn(args) -> int | None` as subcommand `name`."""

    def wrap(fn: Callable) -> Callable:
        COMMANDS.add(name, (help, add_arguments, fn))
        return fn

    return wrap


def _add_set(parser: argparse.ArgumentParser) -> None:
    add_set_option(
        parser, "override a recipe value, e.g. --set train.epochs=1 --set model.args.width=16"
    )


# ---------------------------------------------------------------------------- train
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "recipe", nargs="?", help="recipe name (see `lightnets train --list`) or TOML path"
    )
    p.add_argument(
        "--list", action="store_true", help="list the shipped recipes (model, data, purpose)"
    )
    _add_set(p)
    p.add_argument("--out", type=Path, help="run directory (default: runs/<recipe name>)")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--resume", action="store_true", help="continue the run in the run dir from last.pt"
    )
    group.add_argument(
        "--overwrite", action="store_true", help="replace an existing run dir instead of refusing"
    )


@command("train", "train a model from a recipe", _train_args)
def train_command(args: argparse.Namespace) -> int:

    if args.list:
        print(_recipe_table())
        return 0
    if args.recipe is None:
        raise UserError("train: expected a recipe name or TOML path (`lightnets train --list`)")
    if args.resume:
        run_dir = args.out or _default_run_dir(load_config(args.recipe))
        saved = run_dir / "config.toml"
        if saved.is_file():
            config: Config = load_config(saved, args.overrides)
        elif (run_dir / "last.pt").is_file():
            raise UserError(
                f"cannot resume: {saved} does not exist beside {run_dir / 'last.pt'}: expected "
                "the run dir lightnets train wrote (it keeps the run's config.toml)"
            )
        else:  # killed before its config was written: nothing to resume, start from the recipe
            config = load_config(args.recipe, args.overrides)
    else:
        config = load_config(args.recipe, args.overrides)
        run_dir = args.out or _default_run_dir(config)
    trainer = Trainer(config, run_dir, resume=args.resume, overwrite=args.overwrite)
    try:
        row = trainer.fit()
    except BaseException:
        shutdown_distributed(wait=False)  # the other ranks may never reach a barrier
        raise
    if trainer.is_main:
        print(json.dumps({"run_dir": str(run_dir), **_plain(row)}))
    shutdown_distributed()
    return 0


def _recipe_table() -> str:
    """One line per shipped recipe: name, model on dataset, the first sentence of its header
    comment (whole, never cut in the middle)."""

    lines = []
    for name in list_recipes():
        config = load_config(name)
        what = f"{config.model.name} on {config.data.name}"
        lines.append(f"{name:<22} {what:<34} {_first_sentence(recipe_path(name).read_text())}")
    return "\n".join(lines)


def _first_sentence(text: str) -> str:
    """The first sentence of a recipe's leading comment block (a long one: the clause before
    its first colon)."""
    words: list[str] = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        words.append(line.lstrip("#").strip())
    comment = " ".join(w for w in words if w)
    match = re.search(r"(?<=\.)\s(?=[A-Z`(])", comment)
    sentence = comment[: match.start()] if match else comment
    lead = sentence.split(": ", 1)[0]
    if len(sentence) > 110 and len(lead) >= 40:  # a long sentence: its lead clause, whole
        return lead + "."
    return sentence


def _default_run_dir(config) -> Path:
    return Path(config.output.root) / (config.output.name or config.model.name)


def _plain(row: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}


# ---------------------------------------------------------------------------- eval
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="a .pt checkpoint or a run dir (uses last.pt)")
    p.add_argument("--split", help="data split to evaluate (default: the run's validation split)")
    p.add_argument("--best", action="store_true", help="with a run dir: use best.pt")
    add_set_option(
        p,
        "override a value of the run's config for evaluation, e.g. --set data.root=/new/path "
        "--set data.eval_batch_size=256 (the model is rebuilt from the checkpoint: model.* "
        "cannot change)",
    )


@command("eval", "evaluate a checkpoint on a data split", _eval_args)
def eval_command(args: argparse.Namespace) -> int:

    path = args.checkpoint
    if path.is_dir():
        path = path / ("best.pt" if args.best else "last.pt")
    model_keys = [o.split("=", 1)[0] for o in args.overrides if o.startswith("model.")]
    if model_keys:  # the model is the checkpoint's: its weights fit no other
        raise UserError(
            f"eval --set {model_keys[0]}: the model is rebuilt from the checkpoint, so model.* "
            "cannot be changed here: expected data.* or train.* keys (e.g. data.root=...)"
        )
    ckpt = load_checkpoint(path)
    config = load_config(ckpt["config"], args.overrides)
    split = args.split or config.data.val_split or "test"
    model = create_model(ckpt["model_name"], **ckpt["model_args"])
    load_model_state(model, ckpt["model"], ckpt["path"])
    loader, augment = eval_loader(config, split)
    metrics = evaluate(
        model,
        loader,
        task=config.train.task,
        augment=augment,
        num_classes=ckpt["model_args"].get("num_classes"),
        ignore_index=config.train.ignore_index,
    )
    print(json.dumps({"checkpoint": str(path), "split": split, **_plain(metrics)}))
    return 0


# ---------------------------------------------------------------------------- demo
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="run directory (default: runs/demo-<timestamp>)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the recipe's)")
    add_set_option(p, "override a value of the mnist_demo recipe")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


@command(
    "demo",
    "train Finet-small with FBN on the bundled MNIST subset, fuse it, export it to ONNX",
    _demo_args,
)
def demo_command(args: argparse.Namespace) -> int:

    overrides = []
    if args.epochs is not None:
        if args.epochs < 1:
            raise UserError(f"--epochs {args.epochs}: expected at least 1")
        # The recipe warms up over 60 steps, one of its 4 epochs (62 steps each); a shorter
        # demo keeps that quarter, or it would end at the peak lr with nothing learned.
        overrides += [f"train.epochs={args.epochs}", f"schedule.warmup={min(60, 15 * args.epochs)}"]
    overrides += args.overrides  # --set wins
    if args.no_progress:
        overrides.append("train.progress=false")
    run_dir = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    run_demo(run_dir, overrides)
    return 0


# ---------------------------------------------------------------------------- deploy & analysis
def _register_feature_commands() -> None:
    """Commands whose code lives in lightnets.commands (one module per command)."""

    command(
        "export",
        "export a checkpoint's fused model to ONNX or TorchScript, checked with onnxruntime",
        add_export_arguments,
    )(export_command)
    command(
        "predict",
        "segment an image of any size with a segmentation run (sliding window): mask + overlay",
        add_predict_arguments,
    )(predict_command)
    command("repro", "reproduce a paper's experiment", add_repro_arguments)(repro_command)
    command(
        "data", "prepare datasets on disk (tile: cut aerial images into tiles)", add_data_arguments
    )(data_command)
    command(
        "profile",
        "parameters and MACs of a model, training-time and fused, per layer",
        add_profile_arguments,
    )(profile_command)


_register_feature_commands()


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightnets",
        description="Train light-weight and binary CNNs and ship them with no inference overhead.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lightnets` console script and `python -m lightnets`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        # under torchrun a rank may fail alone (a path missing on one node): every rank says
        # why, the others with their rank, so repeated lines are understandable
        rank = os.environ.get("RANK", "0")
        where = "" if rank == "0" else f" [rank {rank}]"
        print(f"lightnets {args.command}{where}: error: {err}", file=sys.stderr)
        return 2
    except StorageError as err:  # a full disk, no permission: not a bug, not the input's fault
        print(f"lightnets {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lightnets {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
