"""`lightnets export CHECKPOINT`: write the fused model of a run as ONNX or TorchScript.

A binary model (bnn_mnist, binarynet_cifar) has its binary layers packed (lightnets.pack_binary,
BatchNorm folded into the packed layers): the file holds its weights as bits.

The model is rebuilt from the checkpoint (model_name, model_args, weights loaded strictly),
its normalization folded into the convolutions, written, and checked: onnxruntime (or
torch.jit.load) must reproduce both the fused and the unfused PyTorch model. Prints a short
report and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightnets.errors import UserError

__all__ = ["add_export_arguments", "export_command"]

_DEFAULT_NAMES = {"onnx": "model.onnx", "torchscript": "model.ts"}


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `lightnets export`."""
    p.add_argument("checkpoint", type=Path, help="a .pt checkpoint or a run dir (uses last.pt)")
    p.add_argument(
        "--format",
        choices=("onnx", "torchscript"),
        help="file format (default: from the --out suffix, else onnx)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="output file (default: model.onnx / model.ts next to the checkpoint)",
    )
    p.add_argument(
        "--input",
        metavar="SIZE",
        help="example input: 224, H,W or a full shape 1,3,224,224 (default: from the run's "
        "config and dataset)",
    )
    p.add_argument("--best", action="store_true", help="with a run dir: use best.pt")
    p.add_argument(
        "--no-fuse", action="store_true", help="export without folding BN / FBN into the convs"
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default: torch's)")
    p.add_argument(
        "--static-batch", action="store_true", help="fix the batch size instead of a dynamic axis"
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--dynamic-size",
        action="store_true",
        help="leave height and width symbolic in the file (default for segmentation runs: "
        "the U-Nets then predict on any image size)",
    )
    size.add_argument(
        "--static-size",
        action="store_true",
        help="fix height and width at --input (default for classification runs)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def export_command(args: argparse.Namespace) -> int:
    """Run `lightnets export`; returns the exit code."""
    from lightnets.commands import (
        checkpoint_input_size,
        load_checkpoint_model,
        parse_input_size,
        resolve_checkpoint_path,
    )
    from lightnets.deploy.export import SUFFIXES, export

    ckpt_path = resolve_checkpoint_path(args.checkpoint, args.best)
    fmt = args.format
    if args.out is not None:
        suffix_fmt = SUFFIXES.get(args.out.suffix.lower())
        if fmt is None:
            if suffix_fmt is None:
                raise UserError(
                    f"--out {args.out}: cannot tell the format from the suffix "
                    f"{args.out.suffix!r}: expected .onnx, .pt or .ts, or pass --format"
                )
            fmt = suffix_fmt
        elif suffix_fmt is not None and suffix_fmt != fmt:
            raise UserError(
                f"--out {args.out} looks like a {suffix_fmt} file but --format is {fmt}: "
                "expected a matching suffix (.onnx for onnx, .pt / .ts for torchscript)"
            )
    fmt = fmt or "onnx"
    out = args.out or ckpt_path.parent / _DEFAULT_NAMES[fmt]
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists: expected a new --out path, or pass --overwrite")

    model, ckpt = load_checkpoint_model(ckpt_path)
    in_chans = int(ckpt["model_args"].get("in_chans", 3))
    size = parse_input_size(args.input, in_chans) or checkpoint_input_size(ckpt)
    dynamic_size = args.dynamic_size or (not args.static_size and _is_segmentation(ckpt))

    result = export(
        model,
        out,
        size,
        fmt,
        fuse=not args.no_fuse,
        check=True,
        opset=args.opset,
        dynamic_batch=not args.static_batch,
        dynamic_size=dynamic_size,
        overwrite=args.overwrite,
    )

    checker = "onnxruntime" if fmt == "onnx" else "torch.jit.load"
    kind = f"{fmt}, opset {result.opset}" if result.opset is not None else fmt
    batch = "static batch" if args.static_batch else "dynamic batch"
    spatial = "any height and width" if dynamic_size else "fixed height and width"
    print(f"exported {result.path} ({kind}, {_size_text(result.file_size)})")
    print(f"  model         {ckpt['model_name']} from {ckpt['path']}")
    print(f"  input         {'x'.join(map(str, result.input_size))}, {batch}, {spatial}")
    print(
        f"  params        {result.params_unfused:,} -> {result.params:,} after fusion"
        if result.fused
        else f"  params        {result.params:,} (not fused)"
    )
    if result.binary_weights:
        print(f"  binary        {result.binary_weights:,} weights stored as bits (1 bit each)")
    print(
        f"  {checker:<13} ok: max |diff| {result.max_abs_diff_fused:.3g} vs fused PyTorch, "
        f"{result.max_abs_diff_unfused:.3g} vs unfused"
    )
    print(json.dumps({"checkpoint": ckpt["path"], "model": ckpt["model_name"], **result.to_dict()}))
    return 0


def _is_segmentation(ckpt: dict) -> bool:
    config = ckpt.get("config")
    return isinstance(config, dict) and (config.get("train") or {}).get("task") == "segmentation"


def _size_text(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"
