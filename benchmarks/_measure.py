"""Shared measuring helpers for the benchmarks: peak tensor memory of one step.

The method is the one `benchmarks/fbn_cost.py` describes (kept here so that other benchmarks
measure memory the same way):

- CPU: torch has no peak counter, so the step runs under ``torch.profiler`` with
  ``profile_memory=True``; every allocation and free of the CPU allocator is an event with a
  signed byte count; the running sum of those events in time order, maximized, is the peak of
  bytes allocated during the step above what was alive at its start. Added to it: the bytes of
  the tensors alive at the start (parameters, buffers, optimizer state, the batch), each storage
  counted once.
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``.

Both count tensor memory (what the allocator hands out), not the process's RSS. Run each
configuration in a fresh process so that nothing cached by another model is counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["alive_tensors", "peak_step_bytes", "tensor_bytes"]


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind `tensors`, each storage counted once."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def alive_tensors(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: Iterable[torch.Tensor] = (),
) -> list[torch.Tensor]:
    """Parameters, buffers, optimizer state and `extra` (the batch): what a step starts with."""
    alive = [*model.parameters(), *model.buffers(), *extra]
    if optimizer is not None:
        for state in optimizer.state.values():
            alive += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return alive


def peak_step_bytes(
    step: Callable[[], None], alive: Iterable[torch.Tensor], device: str = "cpu"
) -> int:
    """Peak tensor bytes while `step()` runs once, `alive` (tensors present before) included."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    resident = tensor_bytes(alive)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return resident + peak
