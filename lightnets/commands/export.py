"""`lightnets export CHECKPOINT`: write the fused model of a run as ONNX, TorchScript or LCE.

A binary model (bnn_mnist, binarynet_cifar) has its binary layers packed (lightnets.pack_binary,
BatchNorm folded into the packed layers): the file holds its weights as bits. ``--format lce``
(.tflite) writes it for Larq Compute Engine instead, with 1-bit convolutions
(lightnets.deploy.lce; needs ``pip install "lightnets[lce]"``).

The model is rebuilt from the checkpoint (model_name, model_args, weights loaded strictly),
its normalization folded into the convolutions, written, and checked: onnxruntime (or
torch.jit.load, LCE's interpreter) must reproduce both the fused and the unfused PyTorch model.
``--check-split test`` also runs every image of that split of the run's data through the file
and the model and reports both accuracies and how many predictions differ. Prints a short
report and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lightnets.commands import (
    checkpoint_input_size,
    eval_loader,
    load_checkpoint_model,
    parse_input_size,
    resolve_checkpoint_path,
)
from lightnets.deploy.export import LCE_CHECK_BATCH, SUFFIXES, export
from lightnets.deploy.lce import LceModel
from lightnets.engine.config import load_config
from lightnets.errors import UserError
from lightnets.optional import require

__all__ = ["add_export_arguments", "export_command"]

_DEFAULT_NAMES = {"onnx": "model.onnx", "torchscript": "model.ts", "lce": "model.tflite"}


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `lightnets export`."""
    p.add_argument("checkpoint", type=Path, help="a .pt checkpoint or a run dir (uses last.pt)")
    p.add_argument(
        "--format",
        choices=("onnx", "torchscript", "lce"),
        help="file format (default: from the --out suffix, else onnx); lce: a Larq Compute "
        "Engine flatbuffer with 1-bit convolutions, for binary networks",
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
    p.add_argument(
        "--check-split",
        metavar="SPLIT",
        help="also run every image of this split of the run's data (e.g. test) through the "
        "file and the model: both accuracies and how many predictions differ",
    )


def export_command(args: argparse.Namespace) -> int:
    """Run `lightnets export`; returns the exit code."""

    ckpt_path = resolve_checkpoint_path(args.checkpoint, args.best)
    fmt = args.format
    if args.out is not None:
        suffix_fmt = SUFFIXES.get(args.out.suffix.lower())
        if fmt is None:
            if suffix_fmt is None:
                raise UserError(
                    f"--out {args.out}: cannot tell the format from the suffix "
                    f"{args.out.suffix!r}: expected .onnx, .pt, .ts or .tflite, or pass --format"
                )
            fmt = suffix_fmt
        elif suffix_fmt is not None and suffix_fmt != fmt:
            raise UserError(
                f"--out {args.out} looks like a {suffix_fmt} file but --format is {fmt}: "
                "expected a matching suffix (.onnx for onnx, .pt / .ts for torchscript, .tflite "
                "for lce)"
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

    checker = {"onnx": "onnxruntime", "torchscript": "torch.jit.load", "lce": "LCE"}[fmt]
    kind = f"{fmt}, opset {result.opset}" if result.opset is not None else fmt
    batch = "static batch" if args.static_batch else "dynamic batch"
    spatial = "any height and width" if dynamic_size else "fixed height and width"
    print(f"exported {result.path} ({kind}, {_size_text(result.file_size)})")
    print(f"  model         {ckpt['model_name']} from {ckpt['path']}")
    print(f"  input         {'x'.join(map(str, result.input_size))}, {batch}, {spatial}")
    if fmt == "lce":
        print(f"  params        {result.params:,} (LCE's converter folds the BatchNorms)")
    elif result.fused:
        print(f"  params        {result.params_unfused:,} -> {result.params:,} after fusion")
    else:
        print(f"  params        {result.params:,} (not fused)")
    if result.binary_weights:
        print(f"  binary        {result.binary_weights:,} weights stored as bits (1 bit each)")
    if result.ops is not None:
        ops = ", ".join(f"{n} {c}" for n, c in sorted(result.ops.items(), key=lambda i: -i[1]))
        print(f"  operators     {ops}")
        print(
            f"  {checker:<13} ok: max |diff| {result.max_abs_diff_fused:.3g} vs PyTorch on "
            f"{LCE_CHECK_BATCH} inputs clear of near-ties "
            f"({result.near_ties_skipped} drawn were not)"
        )
    else:
        print(
            f"  {checker:<13} ok: max |diff| {result.max_abs_diff_fused:.3g} vs fused PyTorch, "
            f"{result.max_abs_diff_unfused:.3g} vs unfused"
        )
    extra = {}
    if args.check_split:
        extra["split_check"] = _check_split(Path(result.path), fmt, model, ckpt, args.check_split)
        c = extra["split_check"]
        print(
            f"  {args.check_split + ' split':<13} {c['images']} images: accuracy "
            f"{100 * c['accuracy_model']:.2f}% PyTorch, {100 * c['accuracy_file']:.2f}% file; "
            f"{c['predictions_differ']} predictions differ"
        )
    print(
        json.dumps(
            {"checkpoint": ckpt["path"], "model": ckpt["model_name"], **result.to_dict(), **extra}
        )
    )
    return 0


def _file_runner(path: Path, fmt: str):
    """A callable running the exported file on an NCHW batch (CPU)."""
    if fmt == "lce":
        return LceModel(path.read_bytes())
    if fmt == "torchscript":
        return torch.jit.load(str(path), map_location="cpu")
    ort = require("onnxruntime", "onnx", "--check-split of an ONNX file")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _check_split(path: Path, fmt: str, model, ckpt: dict, split: str) -> dict:
    """Accuracy of the model and of the file on every image of `split`, and disagreements."""
    config = load_config(ckpt["config"])
    if config.train.task != "classification":
        raise UserError(
            f"--check-split compares class predictions: the run's task is {config.train.task}"
        )
    loader, augment = eval_loader(config, split, batch_size=64)
    run = _file_runner(path, fmt)
    model = model.eval().to("cpu").float()
    n = correct_model = correct_file = differ = 0
    with torch.no_grad():
        for x, y in loader:
            x = augment(x) if augment is not None else x
            pred_model = model(x).argmax(1)
            pred_file = run(x).argmax(1)
            n += len(y)
            correct_model += int((pred_model == y).sum())
            correct_file += int((pred_file == y).sum())
            differ += int((pred_model != pred_file).sum())
    return {
        "split": split,
        "images": n,
        "accuracy_model": correct_model / max(n, 1),
        "accuracy_file": correct_file / max(n, 1),
        "predictions_differ": differ,
    }


def _is_segmentation(ckpt: dict) -> bool:
    config = ckpt.get("config")
    return isinstance(config, dict) and (config.get("train") or {}).get("task") == "segmentation"


def _size_text(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"
