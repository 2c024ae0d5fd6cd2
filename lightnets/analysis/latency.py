"""Inference latency: how long one forward pass takes, and how models compare.

`measure_latency` times one model; `compare_latency` times several in the same process with
their iterations interleaved (round i times every model once, in an order that rotates with
i), so drift in machine load (other processes, frequency scaling, thermal state) affects every
model alike and the ratios to the baseline stay meaningful even when absolute times move.
Timing runs under `torch.inference_mode` with the models in eval mode (their flags are
restored afterwards). Report medians; absolute times are for information, ratios are the
result.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightnets.errors import UserError

__all__ = ["compare_latency", "measure_latency", "summarize_times"]


def measure_latency(
    model: nn.Module,
    input_size: Sequence[int] | int = (1, 3, 224, 224),
    *,
    warmup: int = 10,
    iters: int = 50,
    threads: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Milliseconds per forward pass of `model` on a random input of `input_size`.

    input_size: the full input shape, or an int n for (1, 3, n, n). threads: torch intra-op
    threads while timing (restored afterwards); None keeps the current setting. Returns
    median_ms, mean_ms, p90_ms, min_ms, max_ms, iters, warmup, threads, device, input_size.
    """
    rows = compare_latency(
        {"model": model},
        input_size,
        warmup=warmup,
        iters=iters,
        threads=threads,
        device=device,
    )
    row = rows[0]
    row.pop("name")
    row.pop("ratio")
    return row


def compare_latency(
    models: Mapping[str, nn.Module],
    input_size: Sequence[int] | int = (1, 3, 224, 224),
    *,
    baseline: str | None = None,
    warmup: int = 10,
    iters: int = 50,
    threads: int | None = None,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """Latency of each model, measured interleaved, with its median's ratio to `baseline`.

    baseline: the name of the model the ratios divide by (default: the first). Returns one
    row per model, in the given order: name, median_ms, mean_ms, p90_ms, min_ms, max_ms,
    ratio (median / baseline median), iters, warmup, threads, device, input_size.
    """
    if not models:
        raise UserError("compare_latency needs at least one model: got none")
    names = list(models)
    baseline = names[0] if baseline is None else baseline
    if baseline not in models:
        raise UserError(f"baseline {baseline!r} is not one of the models: {', '.join(names)}")
    size = _size(input_size)
    for what, value, low in (("warmup", warmup, 0), ("iters", iters, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{what}={value!r}: expected an int >= {low}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)):
        raise UserError(f"threads={threads!r}: expected an int >= 1 or None")
    if threads is not None and threads < 1:
        raise UserError(f"threads={threads!r}: expected an int >= 1 or None")
    device = torch.device(device)

    runnable = {name: _on_device(m, device) for name, m in models.items()}
    x = torch.randn(size, generator=torch.Generator().manual_seed(0)).to(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    with _threads(threads), _eval_mode(runnable.values()), torch.inference_mode():
        inputs = {name: x.to(_dtype(m)) for name, m in runnable.items()}
        for _ in range(warmup):
            for name in names:
                runnable[name](inputs[name])
        _sync(device)
        for i in range(iters):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                times[name].append(_time_one(runnable[name], inputs[name], device))
        used_threads = torch.get_num_threads()

    base = statistics.median(times[baseline])
    rows = []
    for name in names:
        row = {"name": name, **summarize_times(times[name])}
        row["ratio"] = row["median_ms"] / base if base > 0 else float("nan")
        row.update(
            iters=iters,
            warmup=warmup,
            threads=used_threads,
            device=str(device),
            input_size=list(size),
        )
        rows.append(row)
    return rows


def summarize_times(times_ms: Sequence[float]) -> dict[str, float]:
    """median / mean / p90 / min / max of a list of times in milliseconds."""
    ordered = sorted(times_ms)
    if not ordered:
        raise ValueError("no times to summarize")
    p90 = ordered[min(len(ordered) - 1, max(0, round(0.9 * len(ordered)) - 1))]
    return {
        "median_ms": statistics.median(ordered),
        "mean_ms": statistics.fmean(ordered),
        "p90_ms": p90,
        "min_ms": ordered[0],
        "max_ms": ordered[-1],
    }


# --- internals ---------------------------------------------------------------------------


def _size(input_size: Sequence[int] | int) -> tuple[int, ...]:
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        input_size = (1, 3, input_size, input_size)
    ok = isinstance(input_size, Sequence) and len(input_size) > 0
    ok = ok and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in input_size)
    if not ok:
        raise UserError(
            f"input_size must be an int or positive ints like (1, 3, 224, 224), got {input_size!r}"
        )
    return tuple(input_size)


def _on_device(model: nn.Module, device: torch.device) -> nn.Module:
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == device.type for t in tensors):
        return model
    return copy.deepcopy(model).to(device)


def _dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(before)


@contextlib.contextmanager
def _eval_mode(models) -> Iterator[None]:
    flags = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_one(model: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    model(x)
    _sync(device)
    return (time.perf_counter() - start) * 1e3
