"""Evaluate a model over a loader: accuracy (classification) or mIoU & co (segmentation).

The meters keep their sums on the device, so nothing waits for it until the end; under
torch.distributed each rank evaluates its shard and the sums are added over ranks.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightnets.engine.metrics import ClassificationMeter, SegmentationMeter

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    task: str = "classification",
    device: torch.device | str = "cpu",
    augment: nn.Module | None = None,
    loss_fn=None,
    num_classes: int | None = None,
    autocast=contextlib.nullcontext,
    ignore_index: int | None = None,
) -> dict[str, Any]:
    """Evaluate `model` over `loader`: accuracy (classification) or mIoU & co (segmentation)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out.float(), y))
    if task == "segmentation":
        meter = SegmentationMeter(num_classes or 2, ignore_index=ignore_index)
    else:
        meter = ClassificationMeter(num_classes or 1000)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if augment is not None:
            if task == "segmentation":
                x, y = augment(x, y)
            else:
                x = augment(x)
        with autocast():
            out = model(x)
        meter.update(out.float(), y, loss=loss_fn(out, y))
    model.train(was_training)
    result = meter.compute()
    return {k: v for k, v in result.items() if k != "n" and not isinstance(v, list)}
