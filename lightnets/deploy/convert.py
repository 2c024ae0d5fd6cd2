"""`convert_norm(model, kind, **options)`: change the normalization of any model, in place.

A dispatcher over one converter per kind (`NORM_CONVERTERS`, a `Registry`). Each converter is a
function ``converter(model, *, option=default, ...) -> model`` whose keyword-only options are
the ones `convert_norm` accepts for that kind; unknown kinds and unknown options are
`UserError`s.

kinds bn, sync_bn, frozen_bn, gn, ln, in, brn, none replace every batch-statistics norm layer
(torch's BatchNorm1d/2d/3d and SyncBatchNorm, wherever they sit: attributes, Sequentials,
nested modules; and lightnets' FrozenBatchNorm and BatchRenorm) by the kind's layer from
`lightnets.nn.norm`, copying gamma/beta where the new layer has them, and the running
statistics for bn, sync_bn, brn and frozen_bn. GroupNorm layers (gn/ln/in) are never sources:
they have no statistics to turn back into a BN. "frozen_bn" freezes a trained model's BNs for
fine-tuning: its outputs equal the eval model's, in train mode too. "bn" rebuilds BNs with new
options (momentum, eps) and turns FrozenBN / BRN back into BN. kind="fbn" turns every
``nn.Conv2d -> nn.BatchNorm2d`` pair into one `FBNConv2d` (`lightnets.deploy.convert_fbn`),
with the groups the layer's rule gives (`lightnets.nn.fbn.fbn_group_count`, as the models').

Why this lives in `deploy` although it changes a model for training. `deploy` is the layer of
transformations of a built model (any nn.Module, ours or timm's / torchvision's); it sits above
`nn` and `models` and imports neither the engine nor the experiments. `convert_norm` is the
inverse of `fuse` over the same analysis of the model: the Conv2d -> BN pairs it turns into FBN
convs are found by `deploy.fuse.find_pairs` (torch.fx data flow), norm layers with a built-in
activation are split and rejoined by `deploy.normact`, and the `FBNNormSlot` it leaves is what
`fuse` shows a model's reparameterization hook. Keeping both directions in one package keeps
"what is a conv + norm pair" one definition, so that every model convert_norm makes, fuse can
fold. In `nn` or `models` it would need that analysis to move down with it (or import `deploy`
upward). A model built by name with ``norm=`` (`lightnets.models.norm_option`) needs none of
this: its norms are chosen when it is built; convert_norm is for models built elsewhere.
"""

from __future__ import annotations

import inspect
import logging
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightnets.checks import is_int, is_number
from lightnets.deploy.convert_fbn import convert_fbn
from lightnets.deploy.folding import set_module
from lightnets.deploy.normact import is_norm_act_candidate, name_a_few, split_norm_act
from lightnets.errors import UserError, did_you_mean
from lightnets.nn.norm import AUTO_GROUPS, BatchRenorm, FrozenBatchNorm, auto_groups, make_norm
from lightnets.registry import Registry

__all__ = ["NORM_CONVERTERS", "convert_norm"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------- bn, gn, frozen_bn, ...

_BN_CLASSES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _is_batch_norm(m: nn.Module) -> bool:
    """The layers the other kinds replace: torch's BatchNorm1d/2d/3d and SyncBatchNorm (and
    subclasses that keep torch's forward), and the batch-statistics norms of lightnets.nn.norm
    (FrozenBatchNorm, BatchRenorm). GroupNorm (gn/ln/in), FBN convs and InstanceNorm are left
    alone, and so is any BN subclass with a forward of its own (timm's SyncBatchNormAct too)
    that could not be split into the norm and its activation: replacing it would drop what
    its forward adds."""
    if is_norm_act_candidate(m):
        return False
    return isinstance(m, (_BatchNorm, FrozenBatchNorm, BatchRenorm))


def _dims_of(m: nn.Module) -> int | None:
    for d, cls in _BN_CLASSES.items():
        if isinstance(m, cls):
            return d
    return getattr(m, "dims", None)


def _factory(m: nn.Module) -> dict[str, Any]:
    ref = m.running_mean if getattr(m, "running_mean", None) is not None else m.weight
    if ref is None:
        return {}
    return {"device": ref.device, "dtype": ref.dtype}


def _has_stats(m: nn.Module) -> bool:
    return getattr(m, "running_mean", None) is not None and m.running_var is not None


def _affine_of(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(gamma, beta) of a source norm, or None when it has no affine transform."""
    if getattr(m, "weight", None) is None or getattr(m, "bias", None) is None:
        return None
    return m.weight, m.bias


@torch.no_grad()
def _copy_affine(new: nn.Module, src: nn.Module) -> None:
    affine = _affine_of(src)
    if affine is None or getattr(new, "weight", None) is None:
        return
    new.weight.copy_(affine[0])
    new.bias.copy_(affine[1])


@torch.no_grad()
def _copy_stats(new: nn.Module, src: nn.Module) -> None:
    if not (_has_stats(src) and _has_stats(new)):
        return
    new.running_mean.copy_(src.running_mean)
    new.running_var.copy_(src.running_var)


def _check_option(ok: bool, kind: str, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise UserError(f"convert_norm(kind={kind!r}) {name}={value!r}: expected {expected}")


def _replace_norms(
    model: nn.Module, kind: str, build: Callable[[str, nn.Module], nn.Module]
) -> nn.Module:
    """Replace every `_is_batch_norm` layer of `model` by ``build(name, layer)``, in place.

    All replacements are built first (so a UserError leaves the model unchanged), then set; a
    layer shared under several names gets one replacement for all of them, and the new layer
    takes the old one's training flag. Returns the model (the replacement when `model` itself
    is a norm layer).
    """
    built: dict[int, nn.Module] = {}
    names: list[tuple[str, int]] = []
    for name, m in model.named_modules(remove_duplicate=False):
        if not _is_batch_norm(m):
            continue
        if id(m) not in built:
            new = build(name, m)
            new.train(m.training)
            built[id(m)] = new
        names.append((name, id(m)))
    for name, key in names:
        if not name:
            return built[key]
        set_module(model, name, built[key])
    if not names:
        log.info("convert_norm(%r): the model has no BatchNorm layer to convert", kind)
    return model


def _convert_bn(
    model: nn.Module,
    *,
    eps: float | None = None,
    momentum: float | None | str = "keep",
    dims: int | None = None,
    sync: bool = False,
) -> nn.Module:
    """Every BN / SyncBN / FrozenBatchNorm / BatchRenorm becomes a torch BatchNorm.

    Affine parameters, running statistics and num_batches_tracked are copied (a FrozenBN's
    fixed gamma, beta become trainable parameters again; a BRN becomes the BN it is in eval),
    so the eval output is unchanged; eps and momentum are kept unless given (momentum=None:
    cumulative average). Use it to change a BN model's momentum/eps, or to unfreeze a frozen
    model. The class is BatchNorm1d/2d/3d as the source's (FrozenBN / BRN record theirs),
    `dims` to force one, 2 where unknown (SyncBN); sync=True makes SyncBatchNorms instead.
    GroupNorm layers (gn, ln, in) are not converted back: they have no statistics to give.
    """
    if eps is not None:
        _check_option(is_number(eps) and eps > 0, "bn", "eps", eps, "a number > 0")
    if momentum != "keep" and momentum is not None:
        ok = is_number(momentum) and 0 <= momentum <= 1
        _check_option(ok, "bn", "momentum", momentum, "a number in [0, 1] or None")
    if dims is not None:
        _check_option(dims in (1, 2, 3), "bn", "dims", dims, "1, 2 or 3")

    def build(name: str, src: nn.Module) -> nn.Module:
        track = _has_stats(src)
        kw = dict(
            eps=src.eps if eps is None else eps,
            momentum=getattr(src, "momentum", 0.1) if momentum == "keep" else momentum,
            affine=_affine_of(src) is not None,
            track_running_stats=track,
            **_factory(src),
        )
        if sync:
            new = nn.SyncBatchNorm(src.num_features, **kw)
        else:
            cls = _BN_CLASSES[dims or _dims_of(src) or 2]
            new = cls(src.num_features, **kw)
        _copy_affine(new, src)
        _copy_stats(new, src)
        if track and getattr(src, "num_batches_tracked", None) is not None:
            new.num_batches_tracked.copy_(src.num_batches_tracked)
        return new

    return _replace_norms(model, "bn", build)


def _convert_sync_bn(
    model: nn.Module, *, eps: float | None = None, momentum: float | None | str = "keep"
) -> nn.Module:
    """As kind="bn" with sync=True: every batch-statistics norm becomes a SyncBatchNorm."""
    return _convert_bn(model, eps=eps, momentum=momentum, sync=True)


def _convert_frozen_bn(model: nn.Module) -> nn.Module:
    """Every BN / SyncBN / BatchRenorm becomes `FrozenBatchNorm.from_bn`: its eval output, with
    statistics and affine fixed (BN*, for fine-tuning with small batches). BNs that keep no
    running statistics cannot be frozen: UserError naming them, the model unchanged."""
    missing = [
        name or type(m).__name__
        for name, m in model.named_modules()
        if _is_batch_norm(m) and not _has_stats(m)
    ]
    if missing:
        raise UserError(
            f"convert_norm(kind='frozen_bn'): {name_a_few(missing)} keep(s) no running "
            "statistics (track_running_stats=False): expected BNs with running statistics"
        )
    return _replace_norms(model, "frozen_bn", lambda name, src: FrozenBatchNorm.from_bn(src))


def _convert_group(
    kind: str,
    model: nn.Module,
    num_groups: int | str | None,
    channels_per_group: int | None,
    eps: float | None,
    affine: bool | None,
) -> nn.Module:
    """BN-like layers -> nn.GroupNorm through `make_norm(kind, ...)`; see _convert_gn."""
    if affine is not None:
        _check_option(isinstance(affine, bool), kind, "affine", affine, "true, false or None")
    if num_groups is not None and channels_per_group is not None:
        raise UserError(
            f"convert_norm(kind={kind!r}) got num_groups={num_groups} and "
            f"channels_per_group={channels_per_group}: expected only one of them"
        )
    auto = num_groups == "auto"
    for what, value in (("num_groups", num_groups), ("channels_per_group", channels_per_group)):
        if value is not None and not (what == "num_groups" and auto):
            ok = is_int(value) and value >= 1
            _check_option(ok, kind, what, value, "an int >= 1")
    sources = [(name, m) for name, m in model.named_modules() if _is_batch_norm(m)]
    if kind == "gn" and auto:
        odd = [
            f"{name or type(m).__name__} (C={m.num_features}: G={auto_groups(m.num_features)})"
            for name, m in sources
            if auto_groups(m.num_features) != AUTO_GROUPS
        ]
        if odd:
            warnings.warn(
                f"convert_norm(kind='gn', num_groups='auto'): {len(odd)} layer(s) whose C is "
                f"not divisible by {AUTO_GROUPS} get the largest divisor below it: "
                f"{name_a_few(odd)}",
                stacklevel=4,
            )
    elif kind == "gn":
        size = channels_per_group or num_groups or 32
        bad = [f"{name or type(m).__name__} (C={m.num_features})" for name, m in sources]
        bad = [b for b, (_, m) in zip(bad, sources) if m.num_features % size]
        if bad:
            what = "channels_per_group" if channels_per_group else "num_groups"
            common = [
                g
                for g in range(1, min(m.num_features for _, m in sources) + 1)
                if all(m.num_features % g == 0 for _, m in sources)
            ]
            raise UserError(
                f"convert_norm(kind='gn') {what}={size} does not divide the channels of "
                f"{len(bad)} layer(s): {name_a_few(bad)}: expected a value that divides every "
                f"layer's C (for this model: {', '.join(map(str, common))}), or "
                "num_groups='auto' (32 where it divides C, else the largest divisor below it)"
            )

    def build(name: str, src: nn.Module) -> nn.Module:
        kw: dict[str, Any] = {"eps": src.eps if eps is None else eps, **_factory(src)}
        kw["affine"] = (_affine_of(src) is not None) if affine is None else affine
        if num_groups is not None:
            kw["num_groups"] = num_groups
        if channels_per_group is not None:
            kw["channels_per_group"] = channels_per_group
        try:
            with warnings.catch_warnings():  # "auto": one warning for the model, above
                warnings.simplefilter("ignore")
                new = make_norm(kind, src.num_features, **kw)
        except UserError as err:
            raise UserError(
                f"convert_norm(kind={kind!r}) at {name or 'the model'}: {err}"
            ) from None
        _copy_affine(new, src)
        return new

    return _replace_norms(model, kind, build)


def _convert_gn(
    model: nn.Module,
    *,
    num_groups: int | str | None = None,
    channels_per_group: int | None = None,
    eps: float | None = None,
    affine: bool | None = None,
) -> nn.Module:
    """Every BN-like layer becomes nn.GroupNorm with num_groups (default 32, the GN paper's)
    or channels_per_group; gamma, beta are copied (affine follows the BN unless given); the
    running statistics are dropped (GN has none). A G that does not divide some layer's C is a
    UserError naming every such layer, and nothing is changed. num_groups="auto" fits every
    layer: 32 where it divides C, else the largest divisor of C below 32 (one warning lists
    those layers), so GN converts any timm / torchvision mobile net in one call."""
    return _convert_group("gn", model, num_groups, channels_per_group, eps, affine)


def _convert_ln(model: nn.Module, *, eps: float | None = None, affine: bool | None = None):
    """Every BN-like layer becomes GN with one group (LN over (C, *spatial), per-channel
    affine, as in the GN paper); gamma, beta copied."""
    return _convert_group("ln", model, None, None, eps, affine)


def _convert_in(model: nn.Module, *, eps: float | None = None, affine: bool | None = None):
    """Every BN-like layer becomes GN with C groups (IN); gamma, beta copied."""
    return _convert_group("in", model, None, None, eps, affine)


def _convert_brn(
    model: nn.Module,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_steps: int = 5000,
    relax_steps: int = 40000,
    eps: float | None = None,
    momentum: float | None | str = "keep",
) -> nn.Module:
    """Every BN-like layer becomes a `BatchRenorm` with the BN's affine and running
    statistics (a FrozenBN's buffers become parameters again): the eval output is unchanged.
    The step counter starts at 0, so the warm-up runs again and training starts as the BN it
    came from. Options as `BatchRenorm`'s; eps and momentum are kept unless given."""

    def build(name: str, src: nn.Module) -> nn.Module:
        try:
            new = BatchRenorm(
                src.num_features,
                eps=src.eps if eps is None else eps,
                momentum=getattr(src, "momentum", 0.1) if momentum == "keep" else momentum,
                affine=_affine_of(src) is not None,
                r_max=r_max,
                d_max=d_max,
                warmup_steps=warmup_steps,
                relax_steps=relax_steps,
                dims=_dims_of(src),
                **_factory(src),
            )
        except UserError as err:
            raise UserError(f"convert_norm(kind='brn'): {err}") from None
        _copy_affine(new, src)
        _copy_stats(new, src)
        return new

    return _replace_norms(model, "brn", build)


def _convert_none(model: nn.Module) -> nn.Module:
    """Every BN-like layer becomes nn.Identity (no normalization)."""
    return _replace_norms(model, "none", lambda name, src: nn.Identity())


# ------------------------------------------------------------------------------ dispatcher

#: One converter per kind: ``converter(model, *, options...) -> model`` (in place).
NORM_CONVERTERS: Registry[Callable[..., nn.Module]] = Registry("convert_norm kind")
NORM_CONVERTERS.add("fbn", convert_fbn)
NORM_CONVERTERS.add("bn", _convert_bn)
NORM_CONVERTERS.add("sync_bn", _convert_sync_bn)
NORM_CONVERTERS.add("frozen_bn", _convert_frozen_bn)
NORM_CONVERTERS.add("gn", _convert_gn)
NORM_CONVERTERS.add("ln", _convert_ln)
NORM_CONVERTERS.add("in", _convert_in)
NORM_CONVERTERS.add("brn", _convert_brn)
NORM_CONVERTERS.add("none", _convert_none)


def convert_norm(model: nn.Module, kind: str, **options: Any) -> nn.Module:
    """Convert the normalization layers of `model` to `kind`, IN PLACE; returns `model`.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm`` the model is modified and returned (deep-copy
    it first to keep the original; when `model` itself is a norm layer the new layer is
    returned). Kinds and their options:

    - "bn": eps, momentum, dims, sync; "sync_bn": eps, momentum (statistics and affine kept)
    - "frozen_bn": none (FrozenBatchNorm.from_bn: equals the eval BN)
    - "gn": num_groups (default 32, or "auto") | channels_per_group, eps, affine; "ln", "in":
      eps, affine
    - "brn": r_max, d_max, warmup_steps, relax_steps, eps, momentum (statistics kept)
    - "none": none (nn.Identity)
    - "fbn": fbn_groups | channels_per_group, impl, strict, sync_stats (Conv2d + BN pairs)

    e.g. ``convert_norm(model, "gn", num_groups=32)``, ``convert_norm(model, "frozen_bn")``.
    Options left out keep the source layer's eps / momentum / affine.
    """
    converter = NORM_CONVERTERS.lookup(kind)
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
    # norm layers with a built-in activation (timm's BatchNormAct2d): the norm is converted,
    # the activation kept
    split, report = split_norm_act(model)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            converted = converter(split, **options)
    except BaseException:
        report.undo(split)
        raise
    rejoined = report.rejoin_unchanged(converted)
    for warning in caught:  # name the layers as the model has them again
        message = str(warning.message)
        for name in rejoined:
            message = re.sub(re.escape(name) + r"\.norm(?![\w.])", name, message)
        warnings.warn(message, warning.category, stacklevel=2)
    if report.unsplit:
        names = list(report.unsplit)
        warnings.warn(
            f"convert_norm(kind={kind!r}) left {len(names)} norm layer(s) with a forward of "
            f"their own as they were: {name_a_few(names)} ({report.unsplit[names[0]]}; "
            "replacing one by a plain norm would change what it computes)",
            stacklevel=2,
        )
    return converted
