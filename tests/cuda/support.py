"""Helpers of the GPU lane (tests/cuda): the device under test, IEEE float32, a sync guard.

The lane runs on CUDA. ``LIGHTNETS_TEST_DEVICE=cpu`` runs the same tests on the CPU, so that
their logic can be checked on a machine without a GPU; only what is inherently CUDA (the sync
debug mode, nccl, more than one GPU) is skipped there. Nothing here touches CUDA at import.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

ENV = "LIGHTNETS_TEST_DEVICE"


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max |got - ref| relative to the reference's largest magnitude (both moved to float64
    on the CPU): a scale-free error that is not inflated where the reference is near zero."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert got.shape == ref.shape, (tuple(got.shape), tuple(ref.shape))
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """float32 convolutions and matmuls in full precision: cuDNN uses TF32 for float32
    convolutions by default (about 10 bits of mantissa), which no float32 tolerance survives.
    The legacy flags set conv and rnn alike (mixing them with the per-op fp32_precision API
    makes torch refuse to answer the legacy getter)."""
    flags = [f for f in (torch.backends.cudnn, torch.backends.cuda.matmul) if f.allow_tf32]
    for f in flags:  # only what is on: a flag set back to what it was read as is not a no-op
        f.allow_tf32 = False
    try:
        yield
    finally:
        for f in flags:
            f.allow_tf32 = True


class SyncError(RuntimeError):
    """A read of tensor data into Python inside `no_host_sync` (the CPU stand-in)."""


_aten = torch.ops.aten
# Ops that need the tensor's values on the host: a CUDA tensor would be synchronized.
_HOST_READS = {
    _aten._local_scalar_dense,  # .item(), float(t), int(t), bool(t)
    _aten.is_nonzero,
    _aten.equal,
    _aten.nonzero,  # data-dependent output shapes
    _aten.masked_select,
    _aten._unique2,
    _aten.unique_dim,
    _aten.unique_consecutive,
    _aten.bincount,
}
_MASK_INDEXING = {_aten.index, _aten.index_put, _aten.index_put_}  # t[mask], t[mask] = v


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
    )


class _HostReadAudit(TorchDispatchMode):
    """Raises SyncError on any op that reads tensor values into the host, except on tensors
    that `host_resident()` names (evaluated at the read, so state created inside the block
    counts)."""

    def __init__(self, host_resident: Callable[[], Iterable[torch.Tensor]]) -> None:
        super().__init__()
        self.host_resident = host_resident

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _HOST_READS or (packet in _MASK_INDEXING and _bool_index(args)):
            allowed = {t.untyped_storage().data_ptr() for t in self.host_resident()}
            leaves = pytree.tree_leaves((args, kwargs))
            read = [t for t in leaves if isinstance(t, torch.Tensor)]
            if any(t.untyped_storage().data_ptr() not in allowed for t in read):
                raise SyncError(
                    f"{func} reads tensor data into the host: on CUDA this is a synchronizing "
                    "operation (the CPU stand-in of torch.cuda.set_sync_debug_mode('error'))"
                )
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync(
    device: torch.device, host_resident: Callable[[], Iterable[torch.Tensor]] = tuple
) -> Iterator[None]:
    """Any host-device synchronization inside the block raises.

    CUDA: torch.cuda.set_sync_debug_mode("error") (blocking copies between host and device,
    .item() and friends, nonzero, stream synchronizations), restored to "default" after.
    CPU: a stand-in that raises `SyncError` on reads of tensor values into Python (.item(),
    float(), bool(), ...) and on ops with data-dependent output shapes (nonzero, boolean
    indexing, ...), except on the tensors `host_resident()` names: those torch keeps on the host
    even for CUDA parameters (Adam's step counters). It cannot see blocking copies between host
    and device (there is no device), so a pass on the CPU is evidence, not proof.
    """
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:
        import lightnets.optim.bop as bop_module

        free = bop_module._host_reads_are_free
        bop_module._host_reads_are_free = lambda device: False
        try:
            with _HostReadAudit(host_resident):
                yield
        finally:
            bop_module._host_reads_are_free = free


def host_resident_state(optimizer) -> list[torch.Tensor]:
    """The step counters torch's optimizers keep as CPU tensors (capturable=False, fused=False),
    whatever the device of the parameters."""
    return [
        s["step"]
        for s in optimizer.state.values()
        if isinstance(s.get("step"), torch.Tensor) and s["step"].dim() == 0
    ]


def lane_device() -> tuple[torch.device, str | None]:
    """The device under test and, when it cannot run here, why (the skip reason).

    ``LIGHTNETS_TEST_DEVICE`` unset: "cuda" (the current GPU); "cpu": the CPU; "cuda:N": GPU N.
    A value that is no device raises ValueError.
    """
    name = os.environ.get(ENV, "").strip() or "cuda"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"{ENV}={name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cpu":
        return device, None
    if not torch.cuda.is_available():
        return device, (
            f"CUDA is not available (torch {torch.__version__}, CUDA build: "
            f"{torch.version.cuda or 'none'}): the GPU lane runs on an NVIDIA GPU "
            f"(make gpu-check); {ENV}=cpu runs these tests' logic on the CPU"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        return device, f"{ENV}={name!r}: there are only {torch.cuda.device_count()} CUDA devices"
    return torch.device("cuda", index), None


def require_cuda(device: torch.device, what: str) -> None:
    """Skip the calling test on the CPU: `what` exists on CUDA only."""
    import pytest

    if device.type != "cuda":
        pytest.skip(f"{what} is CUDA only (this run: {ENV}={device})")
