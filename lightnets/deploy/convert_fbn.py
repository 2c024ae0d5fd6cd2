"""``convert_norm(model, "fbn", ...)``: every Conv2d -> BatchNorm2d pair becomes one FBNConv2d.

The pairs are found from the data flow, as `fuse` finds them
(`lightnets.deploy.folding.find_pairs`), and the BN is replaced by `FBNNormSlot` (an nn.Identity
that marks the pair for a model's reparameterization hook at fuse time). With G = 1 the
converted model computes exactly what the original did, in training and in eval. With G > 1 the
eval output (and so the fused model) is still exactly the original's at conversion time; see
`fbn_state` for how BN's statistics and affine parameters are shared out over the groups.
`lightnets.deploy.convert.convert_norm` is the entry point; this module is its "fbn" kind.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from lightnets.checks import check_bool, check_choice, check_int
from lightnets.deploy.folding import (
    UNPAIRED_REASONS,
    find_pairs,
    is_foldable_linear,
    is_foldable_norm,
    set_module,
)
from lightnets.deploy.normact import name_a_few
from lightnets.errors import UserError
from lightnets.nn.fbn import IMPLS, FBNConv2d, FBNNormSlot, fbn_group_count

__all__ = ["convert_fbn", "fbn_state"]

log = logging.getLogger("lightnets.deploy.convert")


def _is_conv2d(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and is_foldable_linear(m)


def _is_bn2d(m: nn.Module) -> bool:
    return isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and is_foldable_norm(m)


@torch.no_grad()
def fbn_state(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm, fbn: FBNConv2d) -> None:
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


def convert_fbn(
    model: nn.Module,
    *,
    fbn_groups: int | None = None,
    channels_per_group: int | None = None,
    impl: str = "auto",
    strict: bool = False,
    sync_stats: bool | None = None,
) -> nn.Module:
    """Every Conv2d -> BatchNorm2d pair becomes an FBNConv2d (the BN an `FBNNormSlot`).

    fbn_groups (G) or channels_per_group (c) is required; each conv's G follows the layer's rule
    (`lightnets.nn.fbn.fbn_group_count`: c means G = max(1, C_in // c), as in the models). Left
    as they are: depthwise convs (one input channel a group: nothing to split, logged); other
    grouped convs (FBNConv2d has no conv groups), convs with C_in < G, BNs without running
    statistics, non-zero padding modes (warned, each named; `strict=True` raises instead).
    sync_stats=None follows the BN (True for SyncBatchNorm).
    """
    where = "convert_norm(kind='fbn')"
    if (fbn_groups is None) == (channels_per_group is None):
        raise UserError(f"{where} needs exactly one of fbn_groups=G or channels_per_group=c")
    for name, value in (("fbn_groups", fbn_groups), ("channels_per_group", channels_per_group)):
        if value is not None:
            check_int(value, name, where)
    check_choice(impl, "impl", where, IMPLS)
    check_bool(strict, "strict", where)
    if sync_stats is not None:
        check_bool(sync_stats, "sync_stats", where)

    unsupported, depthwise, grouped, plan = [], [], [], []
    narrow: list[str] = []  # fewer input channels than G: nothing to split (an RGB stem)
    pairs = find_pairs(model, _is_conv2d, _is_bn2d)
    # BNs after a conv of another kind (a BinaryConv2d: FBN does not apply to it), and BNs
    # after no conv that could be found
    other_kind = {
        bn: type(model.get_submodule(conv)).__name__
        for conv, bn in find_pairs(model, lambda m: isinstance(m, nn.Conv2d), _is_bn2d)
        if (conv, bn) not in pairs
    }
    paired = {bn_name for _, bn_name in pairs} | set(other_kind)
    unpaired = [n for n, m in model.named_modules() if _is_bn2d(m) and n not in paired]
    if not pairs and (unpaired or other_kind):
        kinds = sorted(set(other_kind.values()))
        raise UserError(
            f"convert_norm(kind='fbn') found no Conv2d -> BatchNorm2d pair to convert in "
            f"{type(model).__name__}: "
            + (
                f"its BNs follow {', '.join(kinds)} layers, which FBN does not apply to"
                if kinds
                else ""
            )
            + ("; " if kinds and unpaired else "")
            + (
                f"{len(unpaired)} BatchNorm2d layer(s) ({', '.join(unpaired[:5])}"
                f"{', ...' if len(unpaired) > 5 else ''}) follow no conv that could be found "
                f"({UNPAIRED_REASONS})"
                if unpaired
                else ""
            )
        )
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if bn.num_features != conv.out_channels:
            continue
        if conv.groups != 1:
            if conv.in_channels == conv.groups:
                depthwise.append(conv_name)
            else:  # several input channels a group: FBN would apply, FBNConv2d has no groups
                grouped.append(f"{conv_name} (groups={conv.groups})")
            continue
        if bn.running_mean is None:
            unsupported.append(f"{conv_name} (its BN {bn_name} keeps no running statistics)")
            continue
        if conv.padding_mode != "zeros":
            unsupported.append(f"{conv_name} (padding_mode={conv.padding_mode!r})")
            continue
        c_in = conv.in_channels
        # G need not divide C_in (groups then differ by one channel); it cannot exceed it
        if fbn_groups is not None and fbn_groups > c_in:
            narrow.append(f"{conv_name} (C_in={c_in})")
            continue
        groups = fbn_group_count(c_in, fbn_groups, channels_per_group, where)
        plan.append((conv_name, bn_name, groups))

    if depthwise:
        log.info("convert_norm('fbn'): depthwise convs keep their BN: %s", depthwise)
    problems = []
    if grouped:
        problems.append(
            f"{len(grouped)} grouped conv(s), which FBNConv2d does not support (it has no conv "
            f"groups): {name_a_few(grouped)}"
        )
    if unsupported:
        problems.append(f"{len(unsupported)} unsupported conv(s): {name_a_few(unsupported)}")
    if narrow and strict:  # strict: every pair or nothing, these too
        problems.append(
            f"{len(narrow)} conv(s) with fewer input channels than G: "
            + name_a_few([n.replace(")", f", G={fbn_groups})") for n in narrow])
        )
    if problems:
        message = "convert_norm(kind='fbn') left Conv2d+BatchNorm2d as they were for " + "; ".join(
            problems
        )
        if strict:  # raised before anything changed
            raise UserError(message + " (strict=True)")
        warnings.warn(message, stacklevel=3)
    if narrow and not strict:  # expected on every image model: said once, as what it is
        warnings.warn(
            f"convert_norm(kind='fbn'): {len(narrow)} conv(s) with fewer input channels than "
            f"G={fbn_groups} keep their BN: {name_a_few(narrow)} (FBN splits a conv's input "
            "channels into G groups; with C_in < G there is nothing to split, as in a stem on "
            "the 3 RGB channels; every other conv+BN pair was converted or is listed apart)",
            stacklevel=3,
        )
    if unpaired:  # not a conv's to convert (after an add, a concat, ...): information
        warnings.warn(
            f"convert_norm(kind='fbn') left {len(unpaired)} BatchNorm2d layer(s) that follow no "
            f"Conv2d as they were: {name_a_few(unpaired)} ({UNPAIRED_REASONS})",
            stacklevel=3,
        )

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
        fbn_state(conv, bn, fbn)
        fbn.train(bn.training)
        set_module(model, conv_name, fbn)
        set_module(model, bn_name, FBNNormSlot())
    return model
