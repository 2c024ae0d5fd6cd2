"""Metrics against hand-computed values; batches accumulate to the whole-set value."""

from __future__ import annotations

import math
import multiprocessing as mp
import os

import pytest
import torch

from lightnets.engine.metrics import (
    ClassificationMeter,
    SegmentationMeter,
    accuracy,
    topk_correct,
)
from lightnets.errors import UserError
from tests.conftest import free_port

# Rank of each class per sample (0 = highest logit), chosen by hand.
LOGITS = torch.tensor(
    [
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # target 0: rank 0
        [0.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # target 3: rank 2
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # target 0: rank 5
        [9.0, 0.0, 1.0, 2.0, 3.0, 8.0],  # target 5: rank 1
    ]
)
TARGET = torch.tensor([0, 3, 0, 5])


def test_topk_correct_by_hand():
    assert topk_correct(LOGITS, TARGET, ks=(1, 2, 3, 5, 6)) == {1: 1, 2: 2, 3: 3, 5: 3, 6: 4}
    assert accuracy(LOGITS, TARGET) == 25.0
    assert accuracy(LOGITS, TARGET, k=3) == 75.0


def test_topk_capped_at_num_classes():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    assert topk_correct(logits, torch.tensor([0, 0]), ks=(1, 5)) == {1: 1, 5: 2}


def test_classification_meter_accumulates_like_one_batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=gen)
    target = torch.randint(0, 7, (50,), generator=gen)
    losses = torch.nn.functional.cross_entropy(logits, target, reduction="none")

    meter = ClassificationMeter(7)
    for lo, hi in [(0, 13), (13, 14), (14, 40), (40, 50)]:
        meter.update(logits[lo:hi], target[lo:hi], loss=losses[lo:hi].mean())
    result = meter.compute()

    manual = {k: 0 for k in (1, 5)}
    for row, t in zip(logits, target):
        rank = int((row > row[t]).sum())
        for k in manual:
            manual[k] += rank < k
    assert result["n"] == 50
    assert result["acc1"] == pytest.approx(manual[1] * 2.0)
    assert result["acc5"] == pytest.approx(manual[5] * 2.0)
    assert result["loss"] == pytest.approx(float(losses.mean()), rel=1e-6)

    meter.reset()
    meter.update(logits, target)
    assert "loss" not in meter.compute() and meter.compute()["acc1"] == result["acc1"]


def test_classification_meter_soft_targets_and_empty():
    meter = ClassificationMeter(6, topk=(1,))
    meter.update(LOGITS, torch.nn.functional.one_hot(TARGET, 6).float() * 0.9 + 0.01)
    assert meter.compute() == {"acc1": 25.0, "n": 4}
    empty = ClassificationMeter(6).compute()
    assert empty["n"] == 0 and math.isnan(empty["acc1"])


# Two classes, 8 pixels. Confusion (rows target, cols pred): [[4, 2], [1, 1]].
SEG_TARGET = torch.tensor([[[0, 0, 0, 0], [0, 0, 1, 1]]])
SEG_PRED = torch.tensor([[[0, 0, 0, 0], [1, 1, 1, 0]]])


def test_segmentation_by_hand():
    meter = SegmentationMeter(2)
    meter.update(SEG_PRED, SEG_TARGET)
    result = meter.compute()
    assert meter.confusion_matrix().tolist() == [[4, 2], [1, 1]]
    iou = [4 / (4 + 2 + 1) * 100, 1 / (1 + 1 + 2) * 100]
    assert result["iou_per_class"] == pytest.approx(iou)
    assert result["miou"] == pytest.approx(sum(iou) / 2)
    assert result["pixel_acc"] == pytest.approx(5 / 8 * 100)
    assert result["mean_acc"] == pytest.approx((4 / 6 + 1 / 2) / 2 * 100)
    assert result["n"] == 1 and "loss" not in result


def test_segmentation_logits_and_ignore_index():
    logits = torch.nn.functional.one_hot(SEG_PRED, 2).permute(0, 3, 1, 2).float()
    target = SEG_TARGET.clone()
    extra_t = torch.tensor([[[255, 255, 1, 0], [255, 0, 0, 0]]])  # 3 ignored pixels
    extra_p = torch.tensor([[[1, 0, 1, 0], [1, 0, 0, 0]]])
    meter = SegmentationMeter(2, ignore_index=255)
    meter.update(logits, target)
    meter.update(extra_p, extra_t)
    # extra, not ignored: (t1,p1), (t0,p0) x4  ->  [[8, 2], [1, 2]]
    assert meter.confusion_matrix().tolist() == [[8, 2], [1, 2]]
    result = meter.compute()
    assert result["pixel_acc"] == pytest.approx(10 / 13 * 100)
    assert result["miou"] == pytest.approx((8 / 11 + 2 / 5) / 2 * 100)


def test_segmentation_absent_class_left_out_of_means():
    meter = SegmentationMeter(3)
    meter.update(SEG_PRED, SEG_TARGET)
    result = meter.compute()
    assert math.isnan(result["iou_per_class"][2])
    assert result["miou"] == pytest.approx((4 / 7 + 1 / 4) / 2 * 100)
    assert result["mean_acc"] == pytest.approx((4 / 6 + 1 / 2) / 2 * 100)


def test_segmentation_accumulates_like_one_batch():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, 5, 7, generator=gen)
    target = torch.randint(0, 4, (6, 5, 7), generator=gen)
    target[0, 0, :3] = -1
    loss_fn = torch.nn.functional.cross_entropy
    whole = SegmentationMeter(4, ignore_index=-1)
    whole.update(logits, target, loss=loss_fn(logits, target, ignore_index=-1))
    parts = SegmentationMeter(4, ignore_index=-1)
    for lo, hi in [(0, 1), (1, 4), (4, 6)]:
        x, y = logits[lo:hi], target[lo:hi]
        parts.update(x, y, loss=loss_fn(x, y, ignore_index=-1))
    a, b = whole.compute(), parts.compute()
    assert torch.equal(whole.confusion_matrix(), parts.confusion_matrix())
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert {k: v for k, v in a.items() if k not in ("loss", "iou_per_class")} == {
        k: v for k, v in b.items() if k not in ("loss", "iou_per_class")
    }
    # independent reference for the confusion matrix
    pred = logits.argmax(1)
    keep = target != -1
    manual = torch.zeros(4, 4, dtype=torch.int64)
    for t, p in zip(target[keep].tolist(), pred[keep].tolist()):
        manual[t, p] += 1
    assert torch.equal(whole.confusion_matrix(), manual)


def test_segmentation_refusals():
    meter = SegmentationMeter(2)
    with pytest.raises(UserError, match="label 255"):
        meter.update(SEG_PRED, torch.full_like(SEG_TARGET, 255))
    with pytest.raises(UserError, match="3 channels"):
        meter.update(torch.randn(1, 3, 2, 4), SEG_TARGET)


def _dist_worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cls = ClassificationMeter(6)
        seg = SegmentationMeter(2)
        if rank == 0:
            cls.update(LOGITS[:1], TARGET[:1], loss=1.0)
            seg.update(SEG_PRED[:, :1], SEG_TARGET[:, :1])
        else:
            cls.update(LOGITS[1:], TARGET[1:], loss=2.0)
            seg.update(SEG_PRED[:, 1:], SEG_TARGET[:, 1:])
        queue.put((rank, cls.compute(), seg.compute()))
        dist.barrier()  # no rank tears gloo down while its peer still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    not torch.distributed.is_available() or "fork" not in mp.get_all_start_methods(),
    reason="needs torch.distributed and fork",
)
def test_meters_sum_over_ranks():
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_dist_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for _, cls, seg in results:
        assert cls["n"] == 4 and cls["acc1"] == 25.0
        assert cls["loss"] == pytest.approx((1.0 * 1 + 2.0 * 3) / 4)
        assert seg["pixel_acc"] == pytest.approx(5 / 8 * 100)
        assert seg["miou"] == pytest.approx((4 / 7 + 1 / 4) / 2 * 100)
