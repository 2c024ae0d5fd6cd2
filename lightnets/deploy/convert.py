"""`convert_norm(model, kind, **options)`: change the normalization of any model, in place.

A dispatcher over one converter per kind (`_CONVERTERS`). Each converter is a function
``_convert_<kind>(model, *, option=default, ...) -> model`` whose keyword-only options are the
ones `convert_norm` accepts for that kind; unknown kinds and unknown options are `UserError`s.

kind="fbn" turns every ``nn.Conv2d -> nn.BatchNorm2d`` pair (found from the data flow, as `fuse`
finds them) into one `FBNConv2d`, the BN replaced by `nn.Identity`. With G = 1 the converted
model computes exactly what the original did, in training and in eval. With G > 1 the eval
output (and so the fused model) is still exactly the original's at conversion time; see
`_fbn_state` for how BN's statistics and affine parameters are shared out over the groups.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightnets.deploy.fuse import find_pairs, is_foldable_linear, is_foldable_norm, set_module
from lightnets.errors import UserError, did_you_mean
from lightnets.nn.fbn import IMPLS, FBNConv2d

__all__ = ["convert_norm"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- fbn


def _is_conv2d(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and is_foldable_linear(m)


def _is_bn2d(m: nn.Module) -> bool:
    return isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and is_foldable_norm(m)


@torch.no_grad()
def _fbn_state(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm, fbn: FBNConv2d) -> None:
    """Copy conv + BN into `fbn` so that eval outputs are identical (train too when G = 1).

    Per output channel, with BN's running mean m and var v, gamma, beta and the conv bias b
    (0 if none), for every group g of G:

    - running_mean_g = (m - b) / G. The conv bias is folded into the running mean, not into
      beta: in training the batch mean cancels b exactly (so FBN without bias equals
      conv-with-bias + BN), and in eval a (z + b - m) = a (z - (m - b)).
    - affine BN: running_var_g = v / G, gamma_g = gamma * sqrt((v/G + eps) / (v + eps)),
      beta_g = beta / G. Then every group's scale a_g = gamma_g / sqrt(var_g + eps) equals BN's
      gamma / sqrt(v + eps) and sum_g (beta_g - a_g mean_g) = beta - a (m - b): the eval output
      is exactly the BN model's. v / G and gamma / ~sqrt(G) are also what the training-mode
      batch statistics give if the G partial sums are uncorrelated and share the variance
      equally, so training starts close to the BN model as well.
    - affine=False BN (gamma = 1 fixed): running_var_g = v, which keeps eval exact; training
      mode then scales the output by about sqrt(G) until the running statistics adapt.

    With G = 1 these are plain copies. BN's eps, momentum and num_batches_tracked carry over.
    """
    G = fbn.fbn_groups
    fbn.weight.copy_(conv.weight)
    m = bn.running_mean.double()
    v = bn.running_var.double()
    if conv.bias is not None:
        m = m - conv.bias.double()
    dtype = fbn.running_mean.dtype
    fbn.running_mean.copy_((m / G).expand(G, -1).to(dtype))
    fbn.num_batches_tracked.copy_(bn.num_batches_tracked)
    if not bn.affine:
        fbn.running_var.copy_(v.expand(G, -1).to(dtype))
        return
    if G == 1:
        fbn.running_var.copy_(bn.running_var[None])
        fbn.norm_weight.copy_(bn.weight[None])
        fbn.norm_bias.copy_(bn.bias[None])
        return
    var_g = v / G
    gamma = bn.weight.double() * torch.sqrt((var_g + bn.eps) / (v + bn.eps))
    fbn.running_var.copy_(var_g.expand(G, -1).to(dtype))
    fbn.norm_weight.copy_(gamma.expand(G, -1))
    fbn.norm_bias.copy_((bn.bias.double() / G).expand(G, -1))


def _convert_fbn(
    model: nn.Module,
    *,
    fbn_groups: int | None = None,
    channels_per_group: int | None = None,
    impl: str = "auto",
    strict: bool = False,
    sync_stats: bool | None = None,
) -> nn.Module:
    """Every Conv2d -> BatchNorm2d pair becomes an FBNConv2d (the BN an nn.Identity).

    fbn_groups (G) or channels_per_group (c, G = C_in / c per layer) is required. Left as they
    are: grouped/depthwise convs (nothing to group, logged), convs whose C_in G or c does not
    divide, BNs without running statistics, non-zero padding modes (warned; `strict=True`
    raises instead). sync_stats=None follows the BN (True for SyncBatchNorm).
    """
    if (fbn_groups is None) == (channels_per_group is None):
        raise UserError(
            "convert_norm(kind='fbn') needs exactly one of fbn_groups=G or channels_per_group=c"
        )
    for name, value in (("fbn_groups", fbn_groups), ("channels_per_group", channels_per_group)):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise UserError(f"convert_norm(kind='fbn') {name}={value!r}: expected a positive int")
    if impl not in IMPLS:
        raise UserError(
            f"convert_norm(kind='fbn') impl={impl!r}: expected one of {', '.join(IMPLS)}"
            + did_you_mean(str(impl), IMPLS)
        )

    indivisible, unsupported, grouped, plan = [], [], [], []
    for conv_name, bn_name in find_pairs(model, _is_conv2d, _is_bn2d):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if bn.num_features != conv.out_channels:
            continue
        if conv.groups != 1:
            grouped.append(conv_name)
            continue
        if bn.running_mean is None:
            unsupported.append(f"{conv_name} (its BN {bn_name} keeps no running statistics)")
            continue
        if conv.padding_mode != "zeros":
            unsupported.append(f"{conv_name} (padding_mode={conv.padding_mode!r})")
            continue
        c_in = conv.in_channels
        size = channels_per_group if channels_per_group is not None else fbn_groups
        if c_in % size:
            what = "channels_per_group" if channels_per_group is not None else "G"
            indivisible.append(f"{conv_name} (C_in={c_in}, {what}={size})")
            continue
        groups = c_in // channels_per_group if channels_per_group is not None else fbn_groups
        plan.append((conv_name, bn_name, groups))

    if grouped:
        log.info("convert_norm('fbn'): grouped/depthwise convs keep their BN: %s", grouped)
    problems = []
    if indivisible:
        problems.append(
            f"{len(indivisible)} conv(s) whose C_in is not divisible: {', '.join(indivisible)}"
        )
    if unsupported:
        problems.append(f"{len(unsupported)} unsupported conv(s): {', '.join(unsupported)}")
    if problems:
        message = "convert_norm(kind='fbn') left Conv2d+BatchNorm2d as they were for " + "; ".join(
            problems
        )
        if strict:  # raised before anything changed
            raise UserError(message + " (strict=True)")
        warnings.warn(message, stacklevel=3)

    for conv_name, bn_name, groups in plan:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        fbn = FBNConv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            fbn_groups=groups,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            impl=impl,
            sync_stats=isinstance(bn, nn.SyncBatchNorm) if sync_stats is None else sync_stats,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        _fbn_state(conv, bn, fbn)
        fbn.train(bn.training)
        set_module(model, conv_name, fbn)
        set_module(model, bn_name, nn.Identity())
    return model


# ------------------------------------------------------------------------------ dispatcher

# One converter per kind: ``_convert_<kind>(model, *, options...) -> model`` (in place).
# Kinds still to come here: "bn", "gn", "ln", "in", "frozen_bn", "brn", "none".
_CONVERTERS: dict[str, Callable[..., nn.Module]] = {
    "fbn": _convert_fbn,
}


def convert_norm(model: nn.Module, kind: str, **options: Any) -> nn.Module:
    """Convert the normalization layers of `model` to `kind`, IN PLACE; returns `model`.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm`` the model is modified and returned (deep-copy
    it first to keep the original). Kinds: see `_CONVERTERS`; e.g.
    ``convert_norm(model, "fbn", fbn_groups=4)`` (options: fbn_groups | channels_per_group,
    impl, strict, sync_stats).
    """
    if kind not in _CONVERTERS:
        raise UserError(
            f"convert_norm kind={kind!r}: expected one of {', '.join(sorted(_CONVERTERS))}"
            + did_you_mean(str(kind), list(_CONVERTERS))
        )
    converter = _CONVERTERS[kind]
    accepted = [
        p.name
        for p in inspect.signature(converter).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    for name in options:
        if name not in accepted:
            raise UserError(
                f"convert_norm(kind={kind!r}) got unknown option {name!r}; expected "
                f"{', '.join(accepted) or 'none'}" + did_you_mean(name, accepted)
            )
    return converter(model, **options)
