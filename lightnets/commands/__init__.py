"""Subcommands of the `lightnets` CLI that live outside cli.py, and the helpers they share.

Each command module defines `add_<name>_arguments(parser)` and `<name>_command(args) -> int`;
cli.py registers them. The helpers here turn what a user types into models and input sizes:
a checkpoint or run dir into the model it holds, `--input 224` / `--input 1,3,224,224` into
an input shape. `--set key=value` (lightnets.engine.overrides) and `load_checkpoint_model`
(lightnets.engine.checkpoint) live below the commands, since the experiments use them too;
they are re-exported here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lightnets.data import build_batch_augment, load_dataset
from lightnets.engine.checkpoint import load_checkpoint_model
from lightnets.engine.config import load_config
from lightnets.engine.datasets import dataset_attr
from lightnets.engine.overrides import add_set_option, parse_kwargs, parse_literal
from lightnets.errors import UserError

__all__ = [
    "add_set_option",
    "checkpoint_input_size",
    "eval_loader",
    "load_checkpoint_model",
    "parse_input_size",
    "parse_kwargs",
    "parse_literal",
    "resolve_checkpoint_path",
]


def parse_input_size(text: str | None, in_chans: int = 3) -> tuple[int, ...] | None:
    """--input: "224" -> (1, C, 224, 224); "32,48" -> (1, C, 32, 48); "1,3,224,224" as given.

    Separators may be commas or 'x'. None stays None (the caller infers a size).
    """
    if text is None:
        return None
    parts = [p for p in re.split(r"[,x\s]+", text.strip().lower()) if p]
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if not dims or any(d < 1 for d in dims):
        raise UserError(
            f"--input {text!r}: expected a size like 224, HEIGHT,WIDTH or a shape like 1,3,224,224"
        )
    if len(dims) == 1:
        return (1, in_chans, dims[0], dims[0])
    if len(dims) == 2:
        return (1, in_chans, *dims)
    return tuple(dims)


def resolve_checkpoint_path(path: str | Path, best: bool = False) -> Path:
    """A run dir means its last.pt (best.pt with best=True); a file is itself."""
    path = Path(path)
    if path.is_dir():
        return path / ("best.pt" if best else "last.pt")
    return path


def checkpoint_input_size(ckpt: dict[str, Any]) -> tuple[int, ...]:
    """(1, in_chans, H, W) of the run that wrote `ckpt`, from its config and dataset.

    data.image_size when the recipe sets it, else the dataset's own image size (the dataset is
    opened, not downloaded); in_chans from the model arguments, else the dataset's.
    """

    where = ckpt.get("path", "the checkpoint")
    model_args = ckpt.get("model_args") or {}
    in_chans = model_args.get("in_chans")
    config_dict = ckpt.get("config")
    if not isinstance(config_dict, dict):
        raise UserError(f"checkpoint {where} holds no run config: pass --input, e.g. --input 224")
    config = load_config(config_dict)
    size = config.data.image_size
    if size is None or in_chans is None:
        dataset = _open_dataset(config, where)
        if size is None:
            size = getattr(dataset, "image_size", None)
        if in_chans is None:
            in_chans = getattr(dataset, "in_chans", None)
    if size is None:
        raise UserError(
            f"cannot infer the input size of {where}: data.image_size is not set and the "
            f"images of dataset {config.data.name!r} differ in size; pass --input, e.g. 224"
        )
    hw = [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]
    return (1, int(in_chans or 3), *hw)


def eval_loader(config, split: str, batch_size: int | None = None):
    """(DataLoader, eval augmentation) of a run's `split`, as `lightnets eval` reads it."""
    dataset = load_dataset(config.data.name, root=config.data.root, split=split, **config.data.args)
    augment = build_batch_augment(
        config.data.eval_augment,
        mean=dataset_attr(dataset, "mean", None),
        std=dataset_attr(dataset, "std", None),
        image_size=config.data.image_size or dataset_attr(dataset, "image_size", None),
    )
    size = batch_size or config.data.eval_batch_size or config.data.per_process_batch(1)
    return torch.utils.data.DataLoader(dataset, batch_size=size), augment


def _open_dataset(config, where: str):

    split = config.data.val_split or config.data.train_split
    try:
        return load_dataset(
            config.data.name, root=config.data.root, split=split, **config.data.args
        )
    except Exception as err:  # missing root, moved files, ...: the user can give the size
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot infer the input size of {where}: dataset {config.data.name!r} of its run "
            f"could not be opened ({first[:200]}); pass --input, e.g. --input 224"
        ) from None
