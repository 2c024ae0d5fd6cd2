"""Normalization layers by name: `make_norm(kind, num_channels, dims=2, **options)`.

Kinds (`NORM_KINDS`), for 1-d (N, C, L), 2-d (N, C, H, W) and 3-d (N, C, T, H, W) features:

- ``bn``: torch's BatchNorm1d/2d/3d, picked by `dims`. ``sync_bn``: torch's SyncBatchNorm
  (statistics over all processes when distributed; any dims).
- ``frozen_bn``: `FrozenBatchNorm`, the GN paper's BN*: statistics and affine are fixed buffers,
  so the layer is the per-channel linear map y = x * scale + shift with
  scale = gamma / sqrt(var + eps), shift = beta - mean * scale. `FrozenBatchNorm.from_bn(bn)`
  equals ``bn.eval()``; `lightnets.fuse` folds it into the preceding conv like a BN.
- ``gn``: torch's `nn.GroupNorm` (GN paper eq. 1, 2, 7, 6): mean and variance per sample over
  each group of C/G consecutive channels and all positions, then a per-channel gamma, beta.
  ``num_groups=32`` (the paper's default) or ``channels_per_group=c`` (G = C / c, Table 3);
  ``num_groups="auto"``: 32 where it divides C, else the largest divisor of C below 32 (a
  warning names each such C), for architectures whose widths are not multiples of 32.
- ``ln``: GN with one group (mean/var over (C, *spatial) per sample, per-channel affine, as in
  the GN paper). ``in``: GN with C groups (per sample and channel).
- ``brn``: `BatchRenorm` (Ioffe 2017).
- ``none``: `nn.Identity`.
- ``fbn``: Fine-grained BN (`lightnets.nn.fbn.FBNConv2d`). It normalizes the partial sums of a
  convolution, so it is not a layer after one: it is made together with its conv, by
  `NormSpec.conv_norm` (``NormSpec("fbn", {"fbn_groups": 4}).conv_norm(64, 64, 3)``), by a model
  (``norm="fbn"``) or by ``convert_norm(model, "fbn", ...)``; `make_norm` refuses it and says
  so. Its options: fbn_groups | channels_per_group (checked once, by the layer:
  `lightnets.nn.fbn.fbn_group_count`), eps, momentum, affine, impl, sync_stats.

`dims` picks torch's BatchNorm class for ``bn``; every other kind works on any (N, C, ...)
input (``frozen_bn`` and ``brn`` record `dims` only as the BatchNorm class to convert back to). The
classes here set ``is_norm_layer = True`` so the optimizer factory puts their parameters in the
normalization weight-decay group; GroupNorm and BatchNorm are recognized by type.

`NormSpec(kind, kwargs)` is the one value that carries a norm kind with its options through
code that passes a norm along (``ConvNormAct(norm=NormSpec("gn", {"num_groups": 8}))``); its
`conv_norm` builds a conv with its norm for every kind, fbn included.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightnets.checks import check_bool, check_int, check_number, is_int
from lightnets.errors import UserError, did_you_mean
from lightnets.nn.fbn import FBNConv2d, FBNNormSlot

__all__ = [
    "LAYER_NORM_KINDS",
    "NORM_KINDS",
    "BatchRenorm",
    "FrozenBatchNorm",
    "NormSpec",
    "auto_groups",
    "make_norm",
    "valid_group_counts",
]

NORM_KINDS = ("bn", "sync_bn", "frozen_bn", "gn", "ln", "in", "brn", "fbn", "none")
#: the kinds that are a layer of their own, after any conv: all but fbn, which is its conv
LAYER_NORM_KINDS = tuple(kind for kind in NORM_KINDS if kind != "fbn")

_FACTORY = ("device", "dtype")
# The options each kind accepts. `affine` is accepted (and ignored) by frozen_bn, whose affine
# is a fixed buffer, and by none, so that code passing `affine=` works with every kind.
_OPTIONS: dict[str, tuple[str, ...]] = {
    "bn": ("eps", "momentum", "affine", "track_running_stats", *_FACTORY),
    "sync_bn": ("eps", "momentum", "affine", "track_running_stats", "process_group", *_FACTORY),
    "frozen_bn": ("eps", "affine", *_FACTORY),
    "gn": ("num_groups", "channels_per_group", "eps", "affine", *_FACTORY),
    "ln": ("eps", "affine", *_FACTORY),
    "in": ("eps", "affine", *_FACTORY),
    "brn": (
        "eps",
        "momentum",
        "affine",
        "r_max",
        "d_max",
        "warmup_steps",
        "relax_steps",
        *_FACTORY,
    ),
    "fbn": (
        "fbn_groups",
        "channels_per_group",
        "eps",
        "momentum",
        "affine",
        "impl",
        "sync_stats",
        *_FACTORY,
    ),
    "none": ("affine",),
}


def _check_momentum(value: Any, where: str) -> float | None:
    """A BN momentum: a number in [0, 1], or None (a cumulative average)."""
    if value is not None and not (
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    ):
        raise UserError(
            f"{where}: momentum={value!r} is invalid: expected a number in [0, 1] or None "
            "(cumulative average)"
        )
    return None if value is None else float(value)


def _check_dims(dims: Any, where: str, allow_none: bool = False) -> int | None:
    if dims is None and allow_none:
        return None
    if not is_int(dims) or dims not in (1, 2, 3):
        raise UserError(
            f"{where}: dims={dims!r} is invalid: expected 1 (N, C, L), 2 (N, C, H, W) or "
            "3 (N, C, T, H, W)"
        )
    return dims


def _check_input(x: Tensor, num_features: int, name: str) -> None:
    if x.dim() < 2 or x.shape[1] != num_features:
        raise ValueError(
            f"{name} expects input (N, {num_features}, ...), got shape {tuple(x.shape)}"
        )


def valid_group_counts(num_channels: int) -> list[int]:
    """The group counts G that divide `num_channels` (GN needs C / G whole channels a group)."""
    return [g for g in range(1, num_channels + 1) if num_channels % g == 0]


#: num_groups="auto": the GN paper's G where it divides C, else the largest divisor below it
AUTO_GROUPS = 32


def auto_groups(num_channels: int, preferred: int = AUTO_GROUPS) -> int:
    """G for num_groups="auto": `preferred` (32) where it divides C, else the largest divisor
    of C not above it (24 channels: 24 groups; 40: 20; 1000: 25), so that GN fits any layer
    of a real architecture whose widths are not multiples of 32."""
    return max(g for g in valid_group_counts(num_channels) if g <= preferred)


def _gn_groups(
    num_channels: int, num_groups: int | None, channels_per_group: int | None, where: str
) -> int:
    if num_groups is not None and channels_per_group is not None:
        raise UserError(
            f"{where}: got num_groups={num_groups} and channels_per_group={channels_per_group}: "
            "expected only one of them"
        )
    valid = valid_group_counts(num_channels)
    if num_groups == "auto":
        g = auto_groups(num_channels)
        if g != AUTO_GROUPS:
            warnings.warn(
                f"{where}: num_groups='auto' uses G={g} ({num_channels // g} channel(s) a "
                f"group): {AUTO_GROUPS} does not divide C={num_channels}",
                stacklevel=4,
            )
        return g
    if channels_per_group is not None:
        c = check_int(channels_per_group, "channels_per_group", where)
        if num_channels % c:
            raise UserError(
                f"{where}: channels_per_group={c} does not divide the C={num_channels} channels: "
                f"expected a divisor of {num_channels} ({', '.join(map(str, valid))})"
            )
        return num_channels // c
    if isinstance(num_groups, str):
        raise UserError(
            f"{where}: num_groups={num_groups!r} is invalid: expected an int >= 1 or 'auto' "
            f"({AUTO_GROUPS} where it divides C, else the largest divisor of C below it)"
        )
    g = check_int(32 if num_groups is None else num_groups, "num_groups", where)
    if num_channels % g:
        raise UserError(
            f"{where}: C={num_channels} channels are not divisible by G={g} groups: expected "
            f"num_groups in {', '.join(map(str, valid))} (or channels_per_group=c, or 'auto' to "
            "fit each layer)"
        )
    return g


def _check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or kind not in NORM_KINDS:
        raise UserError(
            f"norm {kind!r} is unknown: expected one of {', '.join(NORM_KINDS)}"
            + did_you_mean(str(kind), NORM_KINDS)
        )
    return kind


def _check_options(kind: str, names: Any, where: str) -> None:
    accepted = _OPTIONS[kind]
    for name in names:
        if name not in accepted:
            raise UserError(
                f"{where} got unknown option {name!r}: expected any of {', '.join(accepted)}"
                + did_you_mean(str(name), accepted)
            )


def make_norm(kind: str, num_channels: int, *, dims: int = 2, **options: Any) -> nn.Module:
    """The normalization layer `kind` (see `LAYER_NORM_KINDS`) over `num_channels` channels.

    dims (1, 2, 3) picks BatchNorm1d/2d/3d for ``bn``; every other kind takes any (N, C, ...)
    input (``frozen_bn`` / ``brn`` record dims, for `convert_norm(model, "bn")`). Options by
    kind: bn, sync_bn: eps, momentum, affine, track_running_stats (sync_bn: process_group);
    frozen_bn: eps; gn: num_groups (default 32) | channels_per_group, eps, affine; ln, in: eps,
    affine; brn: eps, momentum, affine, r_max, d_max, warmup_steps, relax_steps (see
    `BatchRenorm`); all but none: device, dtype. frozen_bn and none also accept affine and
    ignore it (a frozen affine is fixed). ``fbn`` is made with its conv (`NormSpec.conv_norm`),
    not here. Unknown kinds and options are UserErrors.
    """
    kind = _check_kind(kind)
    where = f"make_norm({kind!r}, {num_channels!r})"
    _check_options(kind, options, where)
    if kind == "fbn":
        raise UserError(
            f"{where}: fbn normalizes the partial sums of a convolution, so it is made with its "
            "conv, not after it: expected NormSpec('fbn', options).conv_norm(in_channels, "
            "out_channels, kernel_size), lightnets.nn.FBNConv2d, or convert_norm(model, 'fbn', "
            "fbn_groups=G) for a model"
        )
    check_int(num_channels, "num_channels", where)
    dims = _check_dims(dims, where)
    if kind == "none":
        return nn.Identity()
    factory = {k: options.pop(k) for k in _FACTORY if k in options}
    eps = check_number(options.pop("eps", 1e-5), "eps", where, minimum=0.0, open_minimum=True)
    affine = check_bool(options.pop("affine", True), "affine", where)

    if kind in ("bn", "sync_bn"):
        momentum = _check_momentum(options.pop("momentum", 0.1), where)
        track = check_bool(options.pop("track_running_stats", True), "track_running_stats", where)
        kw = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track, **factory)
        if kind == "sync_bn":
            return nn.SyncBatchNorm(
                num_channels, process_group=options.pop("process_group", None), **kw
            )
        cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        return cls(num_channels, **kw)
    if kind == "frozen_bn":
        return FrozenBatchNorm(num_channels, eps=eps, dims=dims, **factory)
    if kind in ("gn", "ln", "in"):
        if kind == "gn":
            groups = _gn_groups(
                num_channels,
                options.pop("num_groups", None),
                options.pop("channels_per_group", None),
                where,
            )
        else:
            groups = 1 if kind == "ln" else num_channels
        return nn.GroupNorm(groups, num_channels, eps=eps, affine=affine, **factory)
    # brn
    return BatchRenorm(num_channels, eps=eps, affine=affine, dims=dims, **options, **factory)


@dataclass(frozen=True)
class NormSpec:
    """A norm kind with its options: the one value code passes around to say "this norm".

    ``NormSpec("gn", {"num_groups": 8})``, ``NormSpec("fbn", {"fbn_groups": 4})``. The kind
    and the option names are checked when the spec is made; the values by the layer that takes
    them (FBN's groups by `FBNConv2d`, for every conv it is used on). `spec(channels)` makes a
    norm layer (every kind but fbn); `spec.conv_norm(...)` makes a conv with its norm (every
    kind). Options given at the call win over the spec's.
    """

    kind: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        if not isinstance(self.kwargs, Mapping):
            raise UserError(f"norm options {self.kwargs!r}: expected a table (dict) of options")
        _check_options(self.kind, self.kwargs, f"norm {self.kind!r}")

    @classmethod
    def of(cls, norm: str | NormSpec, **options: Any) -> NormSpec:
        """`norm` (a kind, or a NormSpec) as a NormSpec, with `options` added (they win)."""
        if isinstance(norm, NormSpec):
            return norm if not options else cls(norm.kind, {**norm.kwargs, **options})
        return cls(norm, options)

    def __call__(self, num_channels: int, *, dims: int = 2, **overrides: Any) -> nn.Module:
        return make_norm(self.kind, num_channels, dims=dims, **{**self.kwargs, **overrides})

    def conv_norm(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        *,
        groups: int = 1,
        where: str = "",
        **overrides: Any,
    ) -> tuple[nn.Module, nn.Module]:
        """(conv, norm): a 2-d conv without bias and its normalization of this kind.

        fbn: an `FBNConv2d` (the conv and its norm in one module) and an `FBNNormSlot` (an
        nn.Identity) that marks where the norm stands; every other kind: ``nn.Conv2d`` and the
        kind's layer. A UserError (an option a layer refuses: G larger than the conv's inputs,
        GN groups that do not divide the channels) starts with `where`, the model's name for
        the layer.
        """
        options = {**self.kwargs, **overrides}
        _check_options(self.kind, overrides, f"norm {self.kind!r}")
        try:
            if self.kind == "fbn":
                conv = FBNConv2d(
                    in_channels,
                    out_channels,
                    kernel_size,
                    stride=stride,
                    padding=padding,
                    groups=groups,
                    **options,
                )
                return conv, FBNNormSlot()
            conv = nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
            )
            return conv, make_norm(self.kind, out_channels, **options)
        except UserError as err:
            if not where:
                raise
            raise UserError(f"{where}: {err}") from None


def _param_shape(x: Tensor, values: Tensor) -> Tensor:
    return values.reshape(1, -1, *([1] * (x.dim() - 2)))


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine (the GN paper's BN*): a per-channel linear map.

    y = x * scale + shift, scale = weight / sqrt(running_var + eps),
    shift = bias - running_mean * scale. weight, bias, running_mean, running_var are buffers
    (state_dict keys as BN's; a BN's ``num_batches_tracked`` is ignored when loading), so
    nothing here trains and batch size does not matter. `from_bn` converts a (trained) BN so
    that the outputs equal its eval mode. Works on any (N, C, ...) input; `dims` only records
    which BatchNorm*d it stands for (`convert_norm(model, "bn")` turns it back into that one).
    """

    is_norm_layer = True

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        dims: int | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        where = "FrozenBatchNorm"
        self.num_features = check_int(num_features, "num_features", where)
        self.eps = check_number(eps, "eps", where, minimum=0.0)
        self.dims = _check_dims(dims, where, allow_none=True)
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))

    @classmethod
    @torch.no_grad()
    def from_bn(cls, bn: nn.Module) -> FrozenBatchNorm:
        """A FrozenBatchNorm equal to ``bn.eval()`` (BatchNorm*d, SyncBatchNorm, BatchRenorm).

        Statistics and affine are copied (gamma = 1, beta = 0 when bn has no affine); eps is
        kept; the device and dtype are the statistics'. A BN that keeps no running statistics
        normalizes with batch statistics even in eval and cannot be frozen: UserError.
        """
        mean, var = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
        if mean is None or var is None:
            raise UserError(
                f"cannot freeze {type(bn).__name__}({getattr(bn, 'num_features', '?')}): it keeps "
                "no running statistics (track_running_stats=False): expected a BN with running "
                "statistics"
            )
        dims = getattr(bn, "dims", None)
        for cls_, d in ((nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3)):
            if isinstance(bn, cls_):
                dims = d
        frozen = cls(bn.num_features, eps=bn.eps, dims=dims, device=mean.device, dtype=mean.dtype)
        frozen.running_mean.copy_(mean)
        frozen.running_var.copy_(var)
        if getattr(bn, "weight", None) is not None:
            frozen.weight.copy_(bn.weight)
        if getattr(bn, "bias", None) is not None:
            frozen.bias.copy_(bn.bias)
        frozen.train(bn.training)
        return frozen

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """(scale, shift) per channel: the layer is y = x * scale + shift."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.num_features, type(self).__name__)
        scale, shift = self.scale_shift()
        scale, shift = scale.to(x.dtype), shift.to(x.dtype)
        return torch.addcmul(_param_shape(x, shift), x, _param_shape(x, scale))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)  # loading a BN's state_dict
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}" + (
            f", dims={self.dims}" if self.dims is not None else ""
        )


class BatchRenorm(nn.Module):
    """Batch Renormalization (Ioffe, 2017) for (N, C, ...) inputs.

    Training: with the batch statistics mu_B, sigma_B = sqrt(var_B + eps) (biased variance)
    and the running ones mu, sigma = sqrt(running_var + eps),

        r = clip(sigma_B / sigma, 1 / r_max_t, r_max_t)
        d = clip((mu_B - mu) / sigma, -d_max_t, d_max_t)
        y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

    where r and d are constants for backpropagation (stop-gradient). It is computed by torch's
    batch_norm kernel with weight gamma * r and bias gamma * d + beta, which also updates the
    running statistics exactly as BatchNorm does (momentum; unbiased batch variance; momentum
    None: cumulative average). Eval: y = gamma * (x - mu) / sigma + beta, as BN (and so
    `lightnets.fuse` folds it). With r_max = 1 and d_max = 0 the layer is BatchNorm in training
    and eval: outputs, running statistics and gradients.

    Limits schedule (the step t is the buffer ``num_batches_tracked``, the number of training
    forwards before this one, saved in the state_dict so the schedule survives save/load):
    r_max_t = 1 + (r_max - 1) * f(t), d_max_t = d_max * f(t), with
    f(t) = 0 for t < warmup_steps, then (t - warmup_steps) / relax_steps, capped at 1 (1 at once
    when relax_steps = 0). Defaults follow the paper: r_max = 3, d_max = 5, BN for the first
    5k steps, then relaxed linearly (over 40k steps here for both limits; the paper relaxed d_max
    over 25k: pass relax_steps to change it). The GN paper used r_max = 1.5, d_max = 0.5 for
    ResNet-50. Parameters weight, bias and buffers running_mean, running_var,
    num_batches_tracked have BN's names, so a BN state_dict loads as is. Any (N, C, ...) input;
    `dims` only records which BatchNorm*d it stands for, as for `FrozenBatchNorm`.
    """

    is_norm_layer = True

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        relax_steps: int = 40000,
        dims: int | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        where = "BatchRenorm"
        self.num_features = check_int(num_features, "num_features", where)
        self.eps = check_number(eps, "eps", where, minimum=0.0, open_minimum=True)
        self.momentum = _check_momentum(momentum, where)
        self.affine = bool(affine)
        self.r_max = check_number(r_max, "r_max", where, minimum=1.0)
        self.d_max = check_number(d_max, "d_max", where, minimum=0.0)
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", where, minimum=0)
        self.relax_steps = check_int(relax_steps, "relax_steps", where, minimum=0)
        self.dims = _check_dims(dims, where, allow_none=True)
        kw = {"device": device, "dtype": dtype}
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_features, **kw))
            self.bias = nn.Parameter(torch.empty(num_features, **kw))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def limits(self, step: int | None = None) -> tuple[float, float]:
        """(r_max_t, d_max_t) at `step` (default: the current ``num_batches_tracked``)."""
        t = int(self.num_batches_tracked) if step is None else int(step)
        if t < self.warmup_steps:
            f = 0.0
        elif self.relax_steps == 0:
            f = 1.0
        else:
            f = min(1.0, (t - self.warmup_steps) / self.relax_steps)
        return 1.0 + (self.r_max - 1.0) * f, self.d_max * f

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.num_features, type(self).__name__)
        if not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        r_lim, d_lim = self.limits()
        with torch.no_grad():
            reduce = [0, *range(2, x.dim())]
            var_b, mu_b = torch.var_mean(x, dim=reduce, correction=0)
            stats = self.running_mean.dtype
            sigma = torch.sqrt(self.running_var + self.eps)
            r = (torch.sqrt(var_b.to(stats) + self.eps) / sigma).clamp(1.0 / r_lim, r_lim)
            d = ((mu_b.to(stats) - self.running_mean) / sigma).clamp(-d_lim, d_lim)
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            momentum = 1.0 / float(self.num_batches_tracked)
        else:
            momentum = self.momentum
        if self.affine:
            weight, bias = self.weight * r, torch.addcmul(self.bias, self.weight, d)
        else:
            weight, bias = r, d
        return F.batch_norm(
            x, self.running_mean, self.running_var, weight, bias, True, momentum, self.eps
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}, relax_steps={self.relax_steps}"
        )
        return s + (f", dims={self.dims}" if self.dims is not None else "")
