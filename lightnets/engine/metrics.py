"""Evaluation metrics: top-k accuracy for classification, mIoU & co for segmentation.

Meters keep sums (never per-batch averages) on the device of the inputs, so nothing syncs
with the GPU until `compute()`, and so the sums of all ranks add up to the exact global
value: under torch.distributed, `compute()` all-reduces them (every rank must call it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from lightnets.errors import UserError

__all__ = [
    "ClassificationMeter",
    "SegmentationMeter",
    "TrainSums",
    "accuracy",
    "correct_predictions",
    "topk_correct",
]


def _labels(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Class indices; soft or one-hot targets (N, C) (mixup, cutmix) count as their argmax."""
    if target.ndim == logits.ndim and target.shape == logits.shape:
        return target.argmax(1)
    return target


def topk_correct(
    logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[int, int]:
    """How many samples have their target among the k highest logits, for each k.

    k is capped at the number of classes (top-5 of 3 classes is top-3).
    """
    counts = _topk_counts(logits, target, ks)
    return {k: int(c) for k, c in zip(ks, counts.tolist())}


def _topk_counts(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    if logits.ndim != 2:
        raise UserError(f"logits of shape {tuple(logits.shape)}: expected (N, num_classes)")
    target = _labels(target, logits)
    if target.shape != logits.shape[:1]:
        raise UserError(
            f"target of shape {tuple(target.shape)} does not fit logits of shape "
            f"{tuple(logits.shape)}: expected ({logits.shape[0]},)"
        )
    num_classes = logits.shape[1]
    if any(int(k) < 1 for k in ks):
        raise UserError(f"top-k with ks={tuple(ks)}: expected every k >= 1")
    maxk = min(max(int(k) for k in ks), num_classes)
    top = logits.topk(maxk, dim=1).indices  # (N, maxk), best first
    hit = top.eq(target.view(-1, 1))
    # A target appears at most once in top, so the cumulative sum is 0/1 per sample.
    hit_upto = hit.cumsum(1).sum(0)  # hit_upto[j]: samples correct within the top j+1
    return torch.stack([hit_upto[min(int(k), num_classes) - 1] for k in ks])


def accuracy(logits: torch.Tensor, target: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy of one batch in percent (0..100, like the meters); nan when empty."""
    n = logits.shape[0]
    if n == 0:
        return math.nan
    return topk_correct(logits, target, (k,))[k] * 100.0 / n


def _sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks (a copy; the input is left alone) when distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    device = t.device
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    out = t.detach().to(device, copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def _loss_value(loss: torch.Tensor | float) -> torch.Tensor | float:
    return loss.detach().float().reshape(()) if isinstance(loss, torch.Tensor) else float(loss)


class ClassificationMeter:
    """Loss and top-k accuracy over a whole evaluation set."""

    def __init__(self, num_classes: int, topk: Sequence[int] = (1, 5)) -> None:
        self.num_classes = int(num_classes)
        self.topk = tuple(int(k) for k in topk)
        self.reset()

    def reset(self) -> None:
        # [n, loss * n, n with a loss, correct@k...]
        self._sums: torch.Tensor | None = None

    def _state(self, device: torch.device) -> torch.Tensor:
        if self._sums is None:
            self._sums = torch.zeros(3 + len(self.topk), dtype=_sum_dtype(device), device=device)
        return self._sums

    @torch.no_grad()
    def update(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        loss: torch.Tensor | float | None = None,
    ) -> None:
        """Add one batch; `loss` is the batch's mean loss (weighted by the batch size)."""
        sums = self._state(logits.device)
        n = logits.shape[0]
        counts = _topk_counts(logits.detach(), target, self.topk)
        sums[3:] += counts.to(sums.dtype)
        sums[0] += n
        if loss is not None and n:
            sums[1] += _loss_value(loss) * n
            sums[2] += n

    def compute(self) -> dict[str, Any]:
        """{"loss" (if losses were given), "acc1", "acc5", ..., "n"}; accuracies in percent."""
        device = self._sums.device if self._sums is not None else torch.device("cpu")
        values = _all_reduce(self._state(device)).tolist()
        n, loss_sum, loss_n = values[0], values[1], values[2]
        result: dict[str, Any] = {}
        if loss_n > 0:
            result["loss"] = loss_sum / loss_n
        for k, correct in zip(self.topk, values[3:]):
            result[f"acc{k}"] = correct * 100.0 / n if n else math.nan
        result["n"] = int(n)
        return result


class SegmentationMeter:
    """One confusion matrix over the whole set, then mIoU, pixel and mean accuracy.

    Classes that appear neither in the targets nor in the predictions have no IoU (0/0): they
    are reported as nan in `iou_per_class` and left out of the mean, and likewise classes
    absent from the targets are left out of `mean_acc`.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        if int(num_classes) < 2:
            raise UserError(f"num_classes={num_classes}: expected at least 2 for segmentation")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self._confusion: torch.Tensor | None = None  # (K, K) int64: rows target, cols pred
        self._loss: torch.Tensor | None = None  # [loss * pixels, pixels with a loss, images]

    def _state(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._confusion is None or self._loss is None:
            k = self.num_classes
            self._confusion = torch.zeros(k, k, dtype=torch.int64, device=device)
            self._loss = torch.zeros(3, dtype=_sum_dtype(device), device=device)
        return self._confusion, self._loss

    def _predictions(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if output.ndim == target.ndim + 1:
            if output.shape[1] == 1 and self.num_classes == 2:
                return (output[:, 0] > 0).long()  # one binary logit per pixel
            if output.shape[1] != self.num_classes:
                raise UserError(
                    f"logits with {output.shape[1]} channels: expected num_classes="
                    f"{self.num_classes} (shape (N, K, H, W))"
                )
            return output.argmax(1)
        if output.ndim == target.ndim and not output.is_floating_point():
            return output
        raise UserError(
            f"segmentation output of shape {tuple(output.shape)} ({output.dtype}) and target of "
            f"shape {tuple(target.shape)}: expected logits (N, K, H, W) or labels (N, H, W)"
        )

    @torch.no_grad()
    def update(
        self,
        output: torch.Tensor,
        target: torch.Tensor,
        loss: torch.Tensor | float | None = None,
    ) -> None:
        """Add one batch of logits (N, K, H, W) or labels (N, H, W) against target (N, H, W).

        `loss` is the batch's mean loss over its non-ignored pixels; it is weighted by their
        number, so "loss" is the mean over every pixel of the set.
        """
        # imported here: torchmetrics pulls in scipy (about a second), for segmentation only
        from torchmetrics.functional.classification import (  # noqa: PLC0415
            multiclass_confusion_matrix,
        )

        preds = self._predictions(output.detach(), target)
        if preds.shape != target.shape:
            raise UserError(
                f"predictions of shape {tuple(preds.shape)} and target of shape "
                f"{tuple(target.shape)}: expected the same (N, H, W)"
            )
        target = target.long()
        valid = torch.ones_like(target, dtype=torch.bool)
        if self.ignore_index is not None:
            valid = target != self.ignore_index
        bad = valid & ((target < 0) | (target >= self.num_classes))
        if bool(bad.any()):
            value = int(target[bad][0])
            raise UserError(
                f"target holds label {value}, outside 0..{self.num_classes - 1}: expected class "
                f"indices (or set ignore_index, now {self.ignore_index})"
            )
        confusion, sums = self._state(target.device)
        confusion += multiclass_confusion_matrix(
            preds.clamp(0, self.num_classes - 1),
            target,
            self.num_classes,
            ignore_index=self.ignore_index,
            validate_args=False,
        ).to(confusion)
        sums[2] += target.shape[0]
        if loss is not None:
            pixels = valid.sum()
            value = _loss_value(loss)
            # A batch with every pixel ignored has a nan mean loss and weight 0: skip it.
            sums[0] += torch.where(pixels > 0, value * pixels, 0.0)
            sums[1] += pixels

    def confusion_matrix(self) -> torch.Tensor:
        """The (K, K) counts summed over ranks: rows are targets, columns predictions."""
        device = self._confusion.device if self._confusion is not None else torch.device("cpu")
        return _all_reduce(self._state(device)[0]).cpu()

    def compute(self) -> dict[str, Any]:
        """{"miou", "pixel_acc", "mean_acc", "iou_per_class", "n", "loss"?}, in percent."""
        device = self._confusion.device if self._confusion is not None else torch.device("cpu")
        confusion, sums = self._state(device)
        cm = _all_reduce(confusion).cpu().double()
        loss_sum, loss_n, images = _all_reduce(sums).tolist()
        tp = cm.diag()
        per_target = cm.sum(1)
        per_pred = cm.sum(0)
        total = cm.sum()
        union = per_target + per_pred - tp
        nan = torch.tensor(math.nan, dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan) * 100
        recall = torch.where(per_target > 0, tp / per_target.clamp(min=1), nan) * 100
        result: dict[str, Any] = {
            "miou": _nanmean(iou),
            "pixel_acc": float(tp.sum() / total * 100) if total > 0 else math.nan,
            "mean_acc": _nanmean(recall),
            "iou_per_class": iou.tolist(),
            "n": int(images),
        }
        if loss_n > 0:
            result["loss"] = loss_sum / loss_n
        return result


def _nanmean(values: torch.Tensor) -> float:
    keep = ~values.isnan()
    return float(values[keep].mean()) if bool(keep.any()) else math.nan


def correct_predictions(
    output: torch.Tensor, target: torch.Tensor, task: str, ignore_index: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | int]:
    """(correct, counted) top-1 predictions of a training batch, without a sync: images, or for
    segmentation labelled pixels (`ignore_index`, -100 when unset, is what augmentation pads
    with). `correct` is a device tensor; `counted` too for segmentation."""
    hit = output.argmax(1) == target
    if task == "classification":
        return hit.sum(), target.shape[0]
    valid = target != (-100 if ignore_index is None else ignore_index)
    return (hit & valid).sum(), valid.sum()


class TrainSums:
    """An epoch's running training sums on the device: loss x samples, samples, correct and
    counted predictions. Adding a step waits for nothing; `values()` reads them (one sync),
    `reduced()` summed over ranks. Sums in float64 (float32 on MPS), so the epoch's mean
    loss is the same as summing each step's float32 loss on the host."""

    KEYS = ("loss", "n", "correct", "counted")

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.dtype = _sum_dtype(self.device)
        self.sums = torch.zeros(len(self.KEYS), dtype=self.dtype, device=self.device)

    def reset(self) -> None:
        self.sums.zero_()

    @torch.no_grad()
    def add(
        self,
        loss: torch.Tensor,
        n: int,
        correct: torch.Tensor | int,
        counted: torch.Tensor | int,
    ) -> None:
        """One step: its mean loss (a 0-dim tensor) over `n` samples, its correct and counted
        predictions."""
        sums = self.sums
        sums[0] += loss.detach().to(self.dtype) * n
        sums[1] += n
        sums[2] += correct.to(self.dtype) if isinstance(correct, torch.Tensor) else correct
        sums[3] += counted.to(self.dtype) if isinstance(counted, torch.Tensor) else counted

    def values(self) -> dict[str, float]:
        """The sums as floats (a sync), e.g. for a checkpoint."""
        return dict(zip(self.KEYS, self.sums.tolist()))

    def load(self, values: dict[str, float]) -> None:
        """Take back `values()`; a checkpoint from before "counted" counted every sample."""
        values = {**values, "counted": values.get("counted", values.get("n", 0.0))}
        self.sums = torch.tensor(
            [float(values.get(k, 0.0)) for k in self.KEYS], dtype=self.dtype, device=self.device
        )

    def reduced(self) -> dict[str, float]:
        """The sums over all ranks (every rank must call it when distributed)."""
        return dict(zip(self.KEYS, _all_reduce(self.sums).tolist()))

    def accuracy(self) -> float:
        """Correct predictions in percent of the counted ones, this rank (a sync)."""
        correct, counted = self.sums[2:].tolist()
        return correct / max(counted, 1) * 100

    @staticmethod
    def mean_loss(values: dict[str, float]) -> float:
        return values["loss"] / max(values["n"], 1)

    @staticmethod
    def percent_correct(values: dict[str, float]) -> float:
        return values["correct"] / max(values["counted"], 1) * 100
