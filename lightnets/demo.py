"""The demo (`lightnets demo`, `make demo`): the whole lightnets story in one minute on a CPU.

Train Finet-small with FBN (G=4) on the bundled MNIST subset, fold every FBN/BN into its
conv, check that the fused model predicts exactly what the trained one does, export it to
ONNX and run the export in onnxruntime over the whole test set.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lightnets.analysis.complexity import format_count, profile
from lightnets.deploy.export import export
from lightnets.deploy.folding import fuse
from lightnets.engine.config import load_config
from lightnets.engine.trainer import Trainer
from lightnets.nn.fbn import FBNConv2d
from lightnets.optim.factory import is_norm_layer
from lightnets.optional import require


@torch.no_grad()
def _logits(fn, loader, augment) -> tuple[torch.Tensor, torch.Tensor]:
    outs, targets = [], []
    for x, y in loader:
        outs.append(fn(augment(x)))
        targets.append(y)
    return torch.cat(outs), torch.cat(targets)


def _norm_label(config) -> str:
    """What normalizes the demo model's grouped layers: FBN with G = 1 is plain BN."""
    groups = config.model.args.get("fbn_groups", 1)
    return "BN (fbn_groups=1)" if groups == 1 else f"FBN G={groups}"


def run_demo(run_dir: Path, overrides: list[str] = ()) -> dict[str, float]:
    """Train, fuse, export and check; print a summary and return its numbers."""
    config = load_config("mnist_demo", list(overrides))
    print(
        f"lightnets demo: {config.model.name} with {_norm_label(config)} "
        f"on {config.data.name} (CPU) -> {run_dir}"
    )
    start = time.perf_counter()
    trainer = Trainer(config, run_dir)
    trainer.fit()
    train_seconds = time.perf_counter() - start

    model = trainer.model.eval()
    loader = trainer.eval_loader(trainer.val_set)
    augment = trainer.eval_augment
    logits, targets = _logits(model, loader, augment)
    fused = fuse(model)
    fused_logits, _ = _logits(fused, loader, augment)
    acc = (logits.argmax(1) == targets).float().mean().item() * 100
    fused_acc = (fused_logits.argmax(1) == targets).float().mean().item() * 100

    x0 = next(iter(loader))[0]
    input_size = (1, *x0.shape[1:])
    prof = profile(model, input_size)

    onnx_path = Path(run_dir) / "model.onnx"
    result = export(model, onnx_path, input_size=input_size)
    ort = require("onnxruntime", "onnx", "the demo's ONNX check")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    onnx_logits, _ = _logits(
        lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0]), loader, augment
    )
    onnx_acc = (onnx_logits.argmax(1) == targets).float().mean().item() * 100
    leftover = [
        type(m).__name__ for m in fused.modules() if is_norm_layer(m) or isinstance(m, FBNConv2d)
    ]

    summary = {
        "test_acc": acc,
        "fused_test_acc": fused_acc,
        "onnx_test_acc": onnx_acc,
        "max_abs_diff_fused": (fused_logits - logits).abs().max().item(),
        "max_abs_diff_onnx": (onnx_logits - logits).abs().max().item(),
        "params": prof.params,
        "fused_params": prof.fused_params,
        "macs": prof.macs,
        "fused_macs": prof.fused_macs,
        "train_seconds": train_seconds,
    }
    print()
    print("summary")
    print(
        f"  model          {config.model.name}, {_norm_label(config)}, "
        f"trained {trainer.epoch} epochs in {train_seconds:.0f} s"
    )
    print(
        f"  data           {config.data.name}: {len(trainer.train_set)} train / "
        f"{len(trainer.val_set)} test images"
    )
    print(f"  test accuracy  {acc:.2f}% trained, {fused_acc:.2f}% fused, {onnx_acc:.2f}% ONNX")
    print(
        f"  fused vs model max |logit diff| {summary['max_abs_diff_fused']:.2e}; "
        f"ONNX vs model {summary['max_abs_diff_onnx']:.2e}"
    )
    print(
        f"  params         {prof.params:,} training -> {prof.fused_params:,} fused "
        f"(norm layers left after fusion: {len(leftover)})"
    )
    print(
        f"  MACs           {format_count(prof.macs)} training -> "
        f"{format_count(prof.fused_macs)} fused, at {tuple(input_size)}"
    )
    print(
        f"  ONNX           {onnx_path} ({result.file_size / 1e6:.2f} MB, opset {result.opset}),"
        f" onnxruntime check passed"
    )
    print(
        f"  run dir        {run_dir}: config.toml, last.pt, best.pt, metrics.jsonl/.csv, "
        "curves.png, model.onnx"
    )
    return summary
