"""Norm layers with a built-in activation, split into the norm and what follows it.

timm's `BatchNormAct2d` (and `SyncBatchNormAct`, `GroupNormAct`, and any layer written the same
way) is a `BatchNorm2d` / `SyncBatchNorm` / `GroupNorm` subclass whose forward applies the
normalization and then its own child modules (a dropout, an activation). Being a BatchNorm
subclass with another forward, it is neither folded by `fuse` nor found by `convert_norm`, and
replacing it by a plain norm drops its activation: both silently wrong. Such layers are
recognised structurally, without importing timm: any torch BatchNorm (`_BatchNorm`, SyncBatchNorm
included) or GroupNorm subclass whose forward is not torch's. So are frozen BNs written outside
lightnets (torchvision's `FrozenBatchNorm2d`, timm's `FrozenBatchNorm2d` / `FrozenBatchNormAct2d`):
a module whose buffers (not parameters) weight, bias, running_mean, running_var are one value
per channel, with an `eps`; their norm is lightnets' `FrozenBatchNorm`. A candidate is split
only when "the plain norm, then its children in order" is checked to compute what its forward
computes (in eval mode, on a seeded random input); it then becomes
``NormAct(norm=<plain norm with its parameters and statistics>, <children>...)``, an
nn.Sequential that `fuse` folds and `convert_norm` converts like any other norm, the
activation kept, and that still answers `.running_mean`, `.weight`, ... for its norm (a
candidate without children becomes the plain norm itself). A candidate that fails the check
is reported by name (`NormActReport.unsplit`), never guessed, and never converted.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightnets.nn.norm import BatchRenorm, FrozenBatchNorm

__all__ = ["NormAct", "NormActReport", "is_norm_act_candidate", "name_a_few", "split_norm_act"]

_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: the torch norms a candidate can be rebuilt as (SyncBatchNorm derives from none of BatchNorm*d)
_TORCH_BASES = (*_TORCH_BN, nn.SyncBatchNorm, nn.GroupNorm)
#: spatial dims of a probe input for each norm base (SyncBatchNorm, GroupNorm and frozen BNs
#: written for images: 2-d)
_PROBE_DIMS = {nn.BatchNorm1d: (5,), nn.BatchNorm2d: (5, 5), nn.BatchNorm3d: (3, 3, 3)}
#: forwards that are torch's own BatchNorm code
_TORCH_BN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
#: the buffers of a frozen BN written outside lightnets (torchvision's, timm's)
_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


#: attributes of the norm a NormAct answers for, as the layer it replaced did (reparameterization
#: hooks such as timm's MobileOne read `branch.bn.running_mean` and friends)
_NORM_ATTRIBUTES = frozenset(
    {
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
        "eps",
        "momentum",
        "affine",
        "track_running_stats",
        "num_features",
        "num_groups",
        "num_channels",
    }
)


class NormAct(nn.Sequential):
    """A norm layer split from its activation: ``norm``, then the layer's own children.

    Runs as the nn.Sequential it is; the norm's attributes (running_mean, weight, eps, ...)
    are also readable on it, as they were on the layer it replaced, so code written for that
    layer (a model's reparameterization hook) still finds them.
    """

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _NORM_ATTRIBUTES and "norm" in self._modules:
                return getattr(self._modules["norm"], name)
            raise


@dataclass
class NormActReport:
    """What `split_norm_act` did: the layers it split (and the modules they were, for
    `undo`), and those it could not, with why."""

    split: list[str] = field(default_factory=list)
    unsplit: dict[str, str] = field(default_factory=dict)
    originals: dict[str, nn.Module] = field(default_factory=dict)

    def undo(self, model: nn.Module) -> None:
        """Put the split layers back as they were (after a conversion that failed)."""
        for name, module in self.originals.items():
            _set(model, name, module)

    def rejoin_unchanged(self, model: nn.Module) -> list[str]:
        """Put back the layers whose norm a conversion left alone (an identity branch's BN,
        which convert_norm('fbn') does not touch): they stay what the model's own code expects,
        e.g. the nn.BatchNorm2d a RepVGG / MobileOne hook asserts. Returns their names."""
        rejoined = []
        for name, original in self.originals.items():
            current = model.get_submodule(name) if name else model
            plain = self.plain.get(name)
            if current is plain or (isinstance(current, NormAct) and current.norm is plain):
                _set(model, name, original)
                rejoined.append(name)
        return rejoined

    plain: dict[str, nn.Module] = field(default_factory=dict)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _is_frozen_like(module: nn.Module) -> bool:
    """A frozen BN written outside lightnets (torchvision's FrozenBatchNorm2d, timm's
    FrozenBatchNorm2d / FrozenBatchNormAct2d): buffers, not parameters, weight, bias,
    running_mean and running_var of one value per channel, and a number `eps`."""
    if isinstance(module, (_BatchNorm, nn.GroupNorm, FrozenBatchNorm, BatchRenorm)):
        return False
    buffers = dict(module.named_buffers(recurse=False))
    if any(name not in buffers for name in _FROZEN_BUFFERS):
        return False
    shapes = {tuple(buffers[name].shape) for name in _FROZEN_BUFFERS}
    eps = getattr(module, "eps", None)
    return (
        len(shapes) == 1
        and len(next(iter(shapes))) == 1
        and isinstance(eps, (int, float))
        and not isinstance(eps, bool)
    )


def _torch_base(module: nn.Module) -> type | None:
    """The norm class a candidate is rebuilt as: the torch norm it derives from
    (BatchNorm1d/2d/3d, SyncBatchNorm or GroupNorm), FrozenBatchNorm for a frozen BN written
    outside lightnets, None for anything else."""
    for base in _TORCH_BASES:
        if isinstance(module, base):
            return base
    return FrozenBatchNorm if _is_frozen_like(module) else None


def is_norm_act_candidate(module: nn.Module) -> bool:
    """A layer that is a norm but whose forward is not torch's own: any torch BatchNorm
    (`_BatchNorm`, SyncBatchNorm included) or GroupNorm subclass with a forward of its own, or
    a frozen BN written outside lightnets (see the module docstring). Replacing one by a plain
    norm could drop what its forward adds; it is split (checked) or left alone."""
    if isinstance(module, _BatchNorm):
        return type(module).forward not in _TORCH_BN_FORWARDS
    if isinstance(module, nn.GroupNorm):
        return type(module).forward is not nn.GroupNorm.forward
    return _is_frozen_like(module)


def _channels(module: nn.Module, base: type) -> int:
    if base is nn.GroupNorm:
        return module.num_channels
    if base is FrozenBatchNorm:
        return module.running_mean.numel()
    return module.num_features


def _plain_norm(module: nn.Module, base: type) -> nn.Module:
    """A `base` norm with `module`'s settings, parameters and statistics."""
    if base is nn.GroupNorm:
        plain = nn.GroupNorm(module.num_groups, module.num_channels, module.eps, module.affine)
    elif base is FrozenBatchNorm:
        mean = module.running_mean
        plain = FrozenBatchNorm(
            mean.numel(), eps=float(module.eps), dims=2, device=mean.device, dtype=mean.dtype
        )
    else:
        extra = {"process_group": module.process_group} if base is nn.SyncBatchNorm else {}
        plain = base(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            **extra,
        )
    own = {k: v for k, v in module.state_dict().items() if "." not in k}  # not the children's
    missing, unexpected = plain.load_state_dict(own, strict=False)
    if missing or unexpected:
        raise ValueError(f"its own state {sorted(own)} is not a {base.__name__}'s")
    weight = getattr(module, "weight", None)
    return plain.to(device=weight.device if weight is not None else None).train(module.training)


@torch.no_grad()
def _same_function(module: nn.Module, candidate: nn.Module, channels: int, base: type) -> bool:
    """Eval outputs of both on a seeded random input agree (the module's mode is restored)."""
    dims = _PROBE_DIMS.get(base, (5, 5))
    param = next(module.parameters(), None)
    buffer = next(module.buffers(), None)
    like = param if param is not None else buffer
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, channels, *dims, generator=gen) * 2.0 + 0.5
    if like is not None:
        x = x.to(device=like.device, dtype=like.dtype if like.is_floating_point() else None)
    was = module.training
    module.eval()
    candidate.eval()
    try:
        want, got = module(x), candidate(x)
    finally:
        module.train(was)
        candidate.train(was)
    return (
        isinstance(want, torch.Tensor)
        and want.shape == got.shape
        and torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    )


def _split_one(module: nn.Module) -> nn.Module:
    """NormAct(norm=plain norm, children...) computing what `module` computes (the plain norm
    itself when it has no children); raises ValueError saying why when it cannot."""
    base = _torch_base(module)
    if base is None:
        raise ValueError(
            "it derives from none of the norms it could be rebuilt as (BatchNorm1d/2d/3d, "
            "SyncBatchNorm, GroupNorm)"
        )
    plain = _plain_norm(module, base)
    children = [(name, copy.deepcopy(child)) for name, child in module.named_children()]
    if any(name == "norm" for name, _ in children):
        raise ValueError("a child is called 'norm'")
    candidate = NormAct(OrderedDict([("norm", plain), *children])) if children else plain
    try:
        same = _same_function(module, candidate, _channels(module, base), base)
    except Exception as err:  # the probe itself failed: not a norm we understand
        raise ValueError(f"{type(err).__name__} on a probe input") from None
    if not same:
        raise ValueError("its forward is not its norm followed by its child modules")
    return candidate


def split_norm_act(model: nn.Module) -> tuple[nn.Module, NormActReport]:
    """Split every norm-with-activation layer of `model` in place (see the module docstring).

    Returns the model (a new object only when `model` itself is such a layer) and a report.
    """
    report = NormActReport()
    if is_norm_act_candidate(model):
        try:
            return _split_one(model), NormActReport(split=[type(model).__name__])
        except ValueError as err:
            return model, NormActReport(unsplit={type(model).__name__: str(err)})
    for name, module in list(model.named_modules()):
        if not name or not is_norm_act_candidate(module):
            continue
        if any(name.startswith(done + ".") for done in report.split):
            continue
        try:
            new = _split_one(module)
        except ValueError as err:
            report.unsplit[name] = str(err)
            continue
        _set(model, name, new)
        report.split.append(name)
        report.originals[name] = module
        report.plain[name] = new.norm if isinstance(new, NormAct) else new
    return model, report


def name_a_few(names: list[str], few: int = 5) -> str:
    """'a, b, c and 59 more' for long lists of layer names in warnings."""
    if len(names) <= few:
        return ", ".join(names)
    return f"{', '.join(names[:few])} and {len(names) - few} more"
