"""`lightnets profile MODEL`: parameters and MACs of a model, training-time and fused.

MODEL is a registered model name (built with `--set key=value` keyword arguments, values
read as TOML literals) or a checkpoint / run dir (the model it holds). `--table` adds the
per-layer table; `--json` prints one JSON object instead of the text report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightnets.analysis.complexity import format_count, profile
from lightnets.commands import (
    add_set_option,
    checkpoint_input_size,
    load_checkpoint_model,
    parse_input_size,
    parse_kwargs,
    resolve_checkpoint_path,
)
from lightnets.errors import UserError
from lightnets.models.registry import create_model, list_models

__all__ = ["add_profile_arguments", "profile_command"]


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `lightnets profile`."""
    p.add_argument("model", help="a registered model name, or a checkpoint / run dir")
    p.add_argument(
        "--input",
        metavar="SIZE",
        help="input: 224, H,W or a full shape 1,3,224,224 (default: 224, or the run's size "
        "for a checkpoint)",
    )
    add_set_option(
        p,
        "model keyword argument, e.g. --set fbn_groups=4 --set cifar_stem=true",
        dest="model_kwargs",
    )
    p.add_argument("--best", action="store_true", help="with a run dir: use best.pt")
    p.add_argument("--table", action="store_true", help="print the per-layer table")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")


def profile_command(args: argparse.Namespace) -> int:
    """Run `lightnets profile`; returns the exit code."""

    kwargs = parse_kwargs(args.model_kwargs)
    if args.model not in list_models() and _looks_like_path(args.model):
        model, ckpt = load_checkpoint_model(resolve_checkpoint_path(args.model, args.best), kwargs)
        name = ckpt["model_name"]
        model_args = {**ckpt["model_args"], **kwargs}
        in_chans = int(model_args.get("in_chans", 3))
        size = parse_input_size(args.input, in_chans) or checkpoint_input_size(ckpt)
        source = ckpt["path"]
    else:
        model = create_model(args.model, **kwargs)
        name, model_args, source = args.model, kwargs, None
        in_chans = kwargs.get("in_chans", 3)
        if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
            raise UserError(f"--set in_chans={in_chans!r}: expected an int >= 1")
        size = parse_input_size(args.input or "224", in_chans)

    try:
        prof = profile(model, size)
    except UserError as err:
        if "does not fit" not in str(err):
            raise
        raise UserError(f"--input: {err}") from None

    if args.json:
        out = {
            "model": name,
            "model_args": model_args,
            "input_size": list(prof.input_size),
            "params": prof.params,
            "macs": prof.macs,
            "fused_params": prof.fused_params,
            "fused_macs": prof.fused_macs,
            "fused_by": prof.fused_by,
            "binary_weights": prof.binary_weights,
        }
        if source is not None:
            out["checkpoint"] = source
        if args.table:
            out["table"] = [
                {
                    "name": r.name,
                    "type": r.type,
                    "output_shape": list(r.output_shape) if r.output_shape else None,
                    "params": r.params,
                    "macs": r.macs,
                }
                for r in prof.table
            ]
        print(json.dumps(out))
        return 0

    opts = ", ".join(f"{k}={v!r}" for k, v in model_args.items())
    print(f"{name}({opts})" + (f" from {source}" if source else ""))
    if args.table:
        print()
        print(prof.format())
        print()
    print(f"  input          {'x'.join(map(str, prof.input_size))}")
    print(
        f"  params         {format_count(prof.params)} ({prof.params:,}) training-time, "
        f"{format_count(prof.fused_params)} ({prof.fused_params:,}) fused"
    )
    print(
        f"  MACs           {format_count(prof.macs)} MACs training-time, "
        f"{format_count(prof.fused_macs)} MACs fused"
    )
    if prof.binary_weights:
        bits = prof.binary_weights
        print(
            f"  binary         {bits:,} of the fused params are 1-bit weights ({prof.fused_by}): "
            f"{format_count(bits / 8)}B instead of {format_count(bits * 4)}B as float32"
        )
    return 0


def _looks_like_path(text: str) -> bool:
    path = Path(text)
    return path.exists() or path.suffix in (".pt", ".pth") or "/" in text or "\\" in text
