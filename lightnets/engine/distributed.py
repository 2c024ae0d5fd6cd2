"""Distributed data parallel set-up for runs started by torchrun.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything here is a no-op, so
the same trainer code runs single-process and DDP.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from lightnets.deploy.folding import is_foldable_norm, set_module
from lightnets.deploy.normact import name_a_few, split_norm_act
from lightnets.errors import UserError
from lightnets.nn.fbn import FBNConv2d


def env_world_size() -> int:
    """World size torchrun asked for (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun prepared; gloo on CPU, nccl on CUDA."""
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return dist.is_available() and dist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return True


def shutdown_distributed(wait: bool = True) -> None:
    """Leave the process group cleanly once every rank is done.

    Without the barrier one rank can tear gloo down while its peer still talks to it, and
    the process dies with "terminate called without an active exception" (SIGABRT) after
    its work is finished (seen in about 1 run of 4 with two CPU processes). wait=False (after
    an error, when the other ranks may never arrive) leaves without the barrier.
    """
    if is_distributed():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Only rank 0 logs, plots and writes checkpoints."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def local_device(requested: str) -> torch.device:
    """The device this process trains on: `auto` picks this rank's GPU if there is one."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={requested!r} but CUDA is not available: use 'cpu'")
    return device


def broadcast_object(obj):
    """Send a picklable object from rank 0 to every rank (identity when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_batch_statistics(model: nn.Module, device: torch.device) -> nn.Module:
    """`train.sync_bn`: batch statistics over all processes, for BN (torch's SyncBatchNorm,
    CUDA only) and for FBN (its sync_stats all-reduce, any backend). Returns the model.

    torch's `convert_sync_batchnorm` turns any BatchNorm subclass into a plain SyncBatchNorm,
    which drops the activation of timm's BatchNormAct2d and the like: such layers are split
    first (`lightnets.deploy.normact`: the norm is synced, the activation kept; their state
    keys gain a ``.norm``), and BN subclasses with a forward of their own that cannot be
    split are left unsynced, with a warning naming them. lightnets' FrozenBatchNorm and
    BatchRenorm are left as they are."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and device.type != "cuda":
        raise UserError(
            "train.sync_bn=true needs CUDA devices for the model's BatchNorm layers (torch's "
            "SyncBatchNorm has no CPU kernel): expected train.sync_bn=false on CPU, or a model "
            "whose only batch norms are FBN layers"
        )
    for m in model.modules():
        if isinstance(m, FBNConv2d):
            m.sync_stats = True
    if not has_bn:
        return model
    model, report = split_norm_act(model)
    if report.unsplit:
        names = list(report.unsplit)
        warnings.warn(
            f"train.sync_bn: left {len(names)} norm layer(s) with a forward of their own "
            f"unsynced: {name_a_few(names)} ({report.unsplit[names[0]]}; a plain SyncBatchNorm "
            "in their place would drop what their forward adds)",
            stacklevel=2,
        )
    plain = [
        (name, m)
        for name, m in model.named_modules()
        if is_foldable_norm(m) and not isinstance(m, nn.SyncBatchNorm)
    ]
    for name, m in plain:
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(m)
        if not name:
            return synced
        set_module(model, name, synced)
    return model
