"""Test accuracy outside the training loop: of a model as it is (bop-approx evaluates one net
with binary and with real weights), and of a run's best checkpoint (bop-cifar)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightnets.data import build_batch_augment, load_dataset
from lightnets.engine.checkpoint import load_checkpoint, load_checkpoint_model
from lightnets.engine.config import Config
from lightnets.engine.datasets import dataset_attr
from lightnets.engine.evaluation import evaluate
from lightnets.experiments.outdir import write_text

__all__ = ["TEST_FILE", "best_checkpoint_test_accuracy", "eval_accuracy"]

#: The cached test accuracy of a run's best checkpoint, in its run dir.
TEST_FILE = "test.json"


def eval_accuracy(model: nn.Module, config: Config, dataset: Dataset) -> float:
    """Top-1 accuracy (%) of `model` on `dataset` with the config's evaluation transform, on
    the device the model is on."""
    device = next(model.parameters()).device
    augment = build_batch_augment(
        config.data.eval_augment,
        mean=dataset_attr(dataset, "mean", None),
        std=dataset_attr(dataset, "std", None),
        image_size=config.data.image_size or dataset_attr(dataset, "image_size", None),
    ).to(device)
    loader = DataLoader(
        dataset,
        batch_size=config.data.eval_batch_size or config.data.per_process_batch(1),
        generator=torch.Generator(),
    )
    num_classes = dataset_attr(dataset, "num_classes", None)
    metrics = evaluate(model, loader, augment=augment, device=device, num_classes=num_classes)
    return float(metrics["acc1"])


def best_checkpoint_test_accuracy(run_dir: Path, config: Config) -> dict[str, Any]:
    """Test accuracy of the run's best.pt (cached in test.json per checkpoint epoch/step)."""
    path = run_dir / "best.pt"
    if not path.is_file():
        path = run_dir / "last.pt"
    ckpt = load_checkpoint(path)
    key = {"checkpoint": path.name, "epoch": ckpt.get("epoch"), "step": ckpt.get("step")}
    cache = run_dir / TEST_FILE
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if all(stored.get(k) == v for k, v in key.items()):
            return stored
    model, _ = load_checkpoint_model(path)
    cfg = config.data
    test_set = load_dataset(cfg.name, root=cfg.root, split="test", **cfg.args)
    device = "cuda" if torch.cuda.is_available() and config.train.device != "cpu" else "cpu"
    acc = eval_accuracy(model.to(device), config, test_set)
    record = {**key, "test_acc1": acc, "val_loss": (ckpt.get("metrics") or {}).get("val_loss")}
    write_text(cache, json.dumps(record) + "\n")
    return record
