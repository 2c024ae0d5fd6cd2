"""Fine-grained Batch Normalization (FBN) fused with its convolution: `FBNConv2d`.

FBN (paper 001, eq. 4) splits the C_in input channels of a convolution into G groups, batch-
normalizes each partial sum z_{g,o} = conv(x_g, W[o, g]) with its own statistics and affine
parameters, and sums the results over g. Written out literally (the paper's Fig. 3a, kept here as
``impl="naive"``) that is a grouped convolution with G * C_out outputs followed by BN: G times the
activations of Conv2d + BatchNorm2d, all kept for backward.

Groups: G consecutive groups of input channels, 1 <= G <= C_in, whose sizes differ by at most one
when G does not divide C_in, in `torch.tensor_split` order: the first C_in % G groups hold
C_in // G + 1 channels, the others C_in // G (30 channels in 4 groups: 8, 8, 7, 7). Finet-small's
30-channel 1x1 convs with G=4 (the paper's Table 2) need this. `group_sizes(C_in, G)` gives them.
G is given as `fbn_groups`, or as `channels_per_group` = c (the paper's Table 6), which means
G = max(1, C_in // c): groups of c channels, rounded down to whole groups (`fbn_group_count`, the
one rule that models, this layer and `convert_norm` share).

Once the statistics mu_{g,o}, var_{g,o} are known the layer is ONE standard convolution with the
folded weight W~[o, g] = a_{g,o} W[o, g], a = gamma / sqrt(var + eps), plus the bias
sum_g (beta_{g,o} - a_{g,o} mu_{g,o}), in training as well as at inference. Only the statistics
need the groups:

- ``impl="cov"`` (1x1 kernels): with p the group-g input vector at an output pixel,
  mu = W[o, g] . E[p] and var = W[o, g]^T Cov(p) W[o, g]; Cov(p) is a (C_in/G)^2 matrix per
  group (one GEMM per group over all pixels, float32 or wider). The moments are a custom autograd
  Function that saves only the input (which the conv saves anyway), so the layer keeps what
  Conv2d + BatchNorm2d keep, or less. Then the folded conv gives the output.
- ``impl="recompute"`` (any kernel): one custom autograd Function for the whole layer. Forward
  computes each group's partial sums z_g = conv(x_g, W_g) (one conv in all, as G convs of
  C_in/G inputs), reduces them to mean/var, adds a_g (z_g - mu_g) into the output and frees
  z_g: the output comes from the partial sums, not from a second (folded) conv. It keeps x, W
  and the (G, C_out) statistics only; backward recomputes z_g group by group and
  back-propagates through the normalization and the group's conv: about 4 conv-equivalents per
  step (Conv2d + BN: 3) and G x BN's elementwise work, with memory like BN's (one group's
  partial sums alive at a time; G of them with ``sync_stats``, whose all-reduce needs every
  group's statistics before any output). Not `torch.utils.checkpoint`: its first call costs an
  import of about a second and it would recompute the whole layer, running-stat update included.
- ``impl="auto"``: cov for 1x1 kernels, recompute otherwise.

Running statistics are updated once per training forward, by the module, from statistics the
Functions return; nothing that is recomputed touches them. Eval mode turns the running
statistics into the folded weight and bias: one conv, no groups (``impl="naive"`` stays literal
in eval too, grouped conv + BN on the running statistics, so it checks the fold). Statistics are
accumulated in float32 for bfloat16/float16 inputs. The Functions that compute the statistics
and the training forward live in `lightnets.nn.fbn_autograd`; this module is the layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightnets.checks import check_bool, check_choice, check_int, check_number, is_int, pair
from lightnets.errors import UserError
from lightnets.nn.fbn_autograd import (
    GroupMoments,
    RecomputedFBN,
    group_runs,
    partial_sums,
    per_channel,
    stat_dtype,
    sync_moments,
)

__all__ = ["FBNConv2d", "FBNNormSlot", "IMPLS", "fbn_group_count", "group_sizes"]

IMPLS = ("auto", "naive", "cov", "recompute")


def group_sizes(in_channels: int, groups: int) -> tuple[int, ...]:
    """Sizes of the G consecutive input-channel groups, `torch.tensor_split` order.

    They differ by at most one: the first in_channels % G groups get one channel more.
    """
    q, r = divmod(in_channels, groups)
    return (q + 1,) * r + (q,) * (groups - r)


def fbn_group_count(
    in_channels: int,
    fbn_groups: int | None = 1,
    channels_per_group: int | None = None,
    where: str = "FBNConv2d",
) -> int:
    """G, the number of input-channel groups of an FBN conv with `in_channels` inputs.

    The one rule for FBN's two options, used by `FBNConv2d`, by the models' ``fbn_groups`` /
    ``fbn_channels_per_group`` and by ``convert_norm(model, "fbn", ...)``:

    - ``fbn_groups=G`` (default 1; None means "not given"): 1 <= G <= in_channels. A G that does
      not divide in_channels gives groups whose sizes differ by one (`group_sizes`).
    - ``channels_per_group=c`` (the paper's Table 6): G = max(1, in_channels // c). The count is
      rounded down, so every group holds c channels or a few more: 30 inputs with c = 7 give
      G = 4 (groups 8, 8, 7, 7), 24 inputs with c = 20, 50 or 100 give one group of 24 (Finet's
      first block). c need not divide in_channels. Only one of the two may be given
      (fbn_groups stays at its default 1 with channels_per_group).

    Anything else is a UserError that starts with `where`.
    """
    in_channels = check_int(in_channels, "in_channels", where)
    if channels_per_group is not None:
        if fbn_groups not in (None, 1) or isinstance(fbn_groups, bool):
            raise UserError(
                f"{where}: got fbn_groups={fbn_groups!r} and channels_per_group="
                f"{channels_per_group!r}: expected only one of them"
            )
        c = check_int(channels_per_group, "channels_per_group", where)
        return max(1, in_channels // c)
    if fbn_groups is None:
        return 1
    if not is_int(fbn_groups) or fbn_groups < 1:
        raise UserError(
            f"{where}: fbn_groups={fbn_groups!r} is invalid: expected an int G with "
            f"1 <= G <= C_in={in_channels}"
        )
    if fbn_groups > in_channels:
        raise UserError(
            f"{where}: fbn_groups={fbn_groups} is more than the {in_channels} input channels: "
            f"expected 1 <= G <= {in_channels} (every group needs at least one input channel)"
        )
    return fbn_groups


class FBNConv2d(nn.Module):
    """Conv2d (no bias) whose G groups of input channels are batch-normalized separately.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation: as `nn.Conv2d`
            (padding also accepts "valid" / "same").
        fbn_groups: G, the number of consecutive input-channel groups, 1 <= G <= in_channels.
            When G does not divide in_channels the group sizes differ by one: the first
            in_channels % G groups get in_channels // G + 1 channels, the rest in_channels // G
            (`torch.tensor_split` order; `group_sizes`).
        channels_per_group: alternatively the group size c: G = max(1, in_channels // c), whole
            groups of c channels or a few more (`fbn_group_count`); fbn_groups stays 1.
        eps, momentum, affine: as `nn.BatchNorm2d` (momentum=None: cumulative average).
        impl: "auto" | "naive" | "cov" | "recompute" (how the training statistics are computed;
            all give the same result, see the module docstring).
        sync_stats: all-reduce the statistics over `torch.distributed` (like SyncBatchNorm) when
            it is initialized and the layer is training.

    Parameters: ``weight`` (out, in, kh, kw); ``norm_weight``, ``norm_bias`` (G, out) (None when
    affine=False). Buffers: ``running_mean``, ``running_var`` (G, out), ``num_batches_tracked``.
    With G = 1 this is exactly ``nn.Conv2d(bias=False)`` followed by ``nn.BatchNorm2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        fbn_groups: int = 1,
        channels_per_group: int | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        impl: str = "auto",
        sync_stats: bool = False,
        *,
        groups: int = 1,
        bias: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        where = "FBNConv2d"
        if groups != 1:
            raise UserError(
                f"{where} groups={groups}: FBN needs several input channels per output: "
                "depthwise/grouped convs have nothing to group (use nn.Conv2d + BatchNorm2d)"
            )
        if bias:
            raise UserError(
                f"{where} bias=True: FBN has no conv bias, norm_bias (beta) plays that role; "
                "expected bias=False"
            )
        check_int(in_channels, "in_channels", where)
        check_int(out_channels, "out_channels", where)
        groups_ = fbn_group_count(in_channels, fbn_groups, channels_per_group, where)
        self.impl = check_choice(impl, "impl", where, IMPLS)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair(kernel_size, "kernel_size", where)
        self.stride = pair(stride, "stride", where)
        self.dilation = pair(dilation, "dilation", where)
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise UserError(
                    f"{where} padding={padding!r}: expected an int, a pair, 'valid' or 'same'"
                )
            if padding == "same" and self.stride != (1, 1):
                raise UserError(f"{where} padding='same' needs stride=1 (as nn.Conv2d)")
            self.padding: tuple[int, int] | str = padding
        else:
            self.padding = pair(padding, "padding", where)
        self.fbn_groups = groups_
        self.group_sizes = group_sizes(in_channels, groups_)
        self._runs = group_runs(self.group_sizes)
        if impl == "cov" and self.kernel_size != (1, 1):
            raise UserError(
                f"{where} impl='cov' needs a 1x1 kernel, got kernel_size={self.kernel_size}; "
                "expected impl='recompute' or 'auto' for larger kernels"
            )
        self.eps = check_number(eps, "eps", where, minimum=0)
        if momentum is not None:
            momentum = check_number(momentum, "momentum", where, minimum=0, maximum=1)
        self.momentum = momentum
        self.affine = check_bool(affine, "affine", where)
        self.sync_stats = check_bool(sync_stats, "sync_stats", where)

        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **kw))
        if affine:
            self.norm_weight = nn.Parameter(torch.empty(groups_, out_channels, **kw))
            self.norm_bias = nn.Parameter(torch.empty(groups_, out_channels, **kw))
        else:
            self.register_parameter("norm_weight", None)
            self.register_parameter("norm_bias", None)
        self.register_buffer("running_mean", torch.zeros(groups_, out_channels, **kw))
        self.register_buffer("running_var", torch.ones(groups_, out_channels, **kw))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )
        self.reset_parameters()

    # ----------------------------------------------------------------------------- set-up

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Conv2d
        if self.affine:
            nn.init.ones_(self.norm_weight)
            nn.init.zeros_(self.norm_bias)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        s += f", fbn_groups={self.fbn_groups}"
        if len(set(self.group_sizes)) > 1:
            s += f", group_sizes={self.group_sizes}"
        s += f", eps={self.eps}, momentum={self.momentum}"
        if not self.affine:
            s += ", affine=False"
        s += f", impl={self.impl!r}"
        if self.sync_stats:
            s += ", sync_stats=True"
        return s

    @property
    def resolved_impl(self) -> str:
        """The implementation "auto" stands for: cov for 1x1 kernels, recompute otherwise."""
        if self.impl != "auto":
            return self.impl
        return "cov" if self.kernel_size == (1, 1) else "recompute"

    # ----------------------------------------------------------------------------- folding

    def _fold(self, mean: Tensor, var: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Weight and bias of the one conv equal to the layer with statistics (mean, var)."""
        sdt = mean.dtype
        a = torch.rsqrt(var + self.eps)  # (G, O)
        if self.affine:
            a = a * self.norm_weight.to(sdt)
        shift = -a * mean
        if self.affine:
            shift = shift + self.norm_bias.to(sdt)
        w = self.weight.to(sdt) * per_channel(a, self.group_sizes)[:, :, None, None]
        return w.to(dtype), shift.sum(0).to(dtype)

    def fused_weight_and_bias(self) -> tuple[Tensor, Tensor]:
        """(W~ (out, in, kh, kw), bias (out)) of the single conv equal to the layer in eval mode.

        W~[o, g-slice] = a_{g,o} W[o, g-slice] (g-slice: the channels of group g, `group_sizes`),
        a = gamma / sqrt(running_var + eps),
        bias_o = sum_g (beta_{g,o} - a_{g,o} running_mean_{g,o}).
        Differentiable; wrap in `torch.no_grad()` for export.
        """
        sdt = stat_dtype(self.weight.dtype)
        return self._fold(self.running_mean.to(sdt), self.running_var.to(sdt), self.weight.dtype)

    def to_conv(self) -> nn.Conv2d:
        """An `nn.Conv2d` with bias that equals this layer in eval mode (what `fuse` ships)."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            w, b = self.fused_weight_and_bias()
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        return conv

    # ----------------------------------------------------------------------------- forward

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None = None, groups: int = 1):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def _conv_args(self) -> tuple[Any, Any, Any]:
        return (self.stride, self.padding, self.dilation)

    def _out_hw(self, x: Tensor) -> tuple[int, int]:
        if self.padding == "same":
            return (x.shape[-2], x.shape[-1])
        pad = (0, 0) if self.padding == "valid" else self.padding
        return tuple(  # type: ignore[return-value]
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(
                x.shape[-2:], pad, self.dilation, self.kernel_size, self.stride
            )
        )

    def _int_padding(self) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
        """Symmetric conv padding, plus the F.pad of the input that "same" may need first."""
        if self.padding == "valid":
            return (0, 0), None
        if self.padding != "same":
            return self.padding, None  # type: ignore[return-value]
        totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
        left = (totals[0] // 2, totals[1] // 2)
        extra = (totals[1] - 2 * left[1], totals[0] - 2 * left[0])  # torch pads right/bottom
        return left, (0, extra[0], 0, extra[1]) if any(extra) else None

    def _cov_stats(self, x: Tensor, out_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        O = self.out_channels
        pad = (0, 0) if isinstance(self.padding, str) else self.padding  # "same" is 0 for 1x1
        with torch.autocast(x.device.type, enabled=False):  # the statistics stay float32
            moments = GroupMoments.apply(x, self._runs, self.stride, pad, out_hw)
            w = self.weight.to(moments[0].dtype).reshape(O, -1)
            means, variances = [], []
            for (start, _, k, c), mean_p, cov_p in zip(self._runs, moments[0::2], moments[1::2]):
                wb = w[:, start : start + k * c].reshape(O, k, c).permute(1, 2, 0)  # (k, c, O)
                means.append((wb * mean_p[:, :, None]).sum(1))  # (k, O)
                variances.append((torch.bmm(cov_p, wb) * wb).sum(1))
        mean = means[0] if len(means) == 1 else torch.cat(means)
        var = variances[0] if len(variances) == 1 else torch.cat(variances)
        return var.clamp_min(0), mean

    def _exponential_average_factor(self) -> float:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return float(self.momentum)

    def _update_running_stats(self, mean: Tensor, var: Tensor, n: int) -> None:
        factor = self._exponential_average_factor()
        with torch.no_grad():
            unbiased = var * (n / (n - 1))
            self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
            self.running_var.mul_(1 - factor).add_(
                unbiased.to(self.running_var.dtype), alpha=factor
            )

    def _syncing(self) -> bool:
        dist = torch.distributed
        return (
            self.sync_stats
            and self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"FBNConv2d expects a 4D input (N, C, H, W), got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"FBNConv2d expects {self.in_channels} input channels, got shape {tuple(x.shape)}"
            )
        impl = self.resolved_impl
        if not self.training:
            if impl == "naive":  # the literal form stays literal: it checks the fold
                return self._naive(x)
            w, b = self.fused_weight_and_bias()
            return self._conv(x, w, b)
        if impl == "naive":
            return self._naive(x)
        if impl == "recompute":
            return self._recompute(x)
        out_hw = self._out_hw(x)
        n = x.shape[0] * out_hw[0] * out_hw[1]
        var, mean = self._cov_stats(x, out_hw)
        if self._syncing():
            mean, var, n = sync_moments(mean, var, n)
        self._check_count(n, x)
        self._update_running_stats(mean.detach(), var.detach(), n)
        w, b = self._fold(mean, var, x.dtype)
        return self._conv(x, w, b)

    @staticmethod
    def _check_count(n: int, x: Tensor) -> None:
        if n <= 1:
            raise ValueError(
                f"FBNConv2d expected more than 1 value per channel when training, got input "
                f"shape {tuple(x.shape)}"
            )

    def _recompute(self, x: Tensor) -> Tensor:
        padding, pre_pad = self._int_padding()
        if pre_pad is not None:
            x = F.pad(x, pre_pad)
        sync = None
        if self._syncing():
            sync = torch.distributed.group.WORLD
        info: dict[str, int] = {}
        out, mean, var = RecomputedFBN.apply(
            x,
            self.weight,
            self.norm_weight,
            self.norm_bias,
            self.group_sizes,
            (self.stride, padding, self.dilation),
            self.eps,
            sync,
            info,
        )
        self._check_count(info["n"], x)
        self._update_running_stats(mean, var, info["n"])
        return out

    def _naive(self, x: Tensor) -> Tensor:
        """The paper's Fig. 3a: grouped conv to G*O channels, BN over them, sum over groups.

        (Uneven groups: one conv per group, concatenated, instead of the grouped conv.)
        """
        G, O = self.fbn_groups, self.out_channels
        z = partial_sums(x, self.weight, self.group_sizes, self._conv_args())
        gamma = self.norm_weight.reshape(-1) if self.affine else None
        beta = self.norm_bias.reshape(-1) if self.affine else None
        if self._syncing():
            var, mean = torch.var_mean(z.to(stat_dtype(z.dtype)), dim=(0, 2, 3), correction=0)
            n = z.shape[0] * z.shape[2] * z.shape[3]
            mean, var, n = sync_moments(mean, var, n)
            self._update_running_stats(mean.detach().view(G, O), var.detach().view(G, O), n)
            scale = torch.rsqrt(var + self.eps)
            y = (z - mean[:, None, None].to(z.dtype)) * scale[:, None, None].to(z.dtype)
            if self.affine:
                y = y * gamma[:, None, None] + beta[:, None, None]
        else:
            factor = self._exponential_average_factor() if self.training else 0.0
            rm, rv = self.running_mean.view(-1), self.running_var.view(-1)
            y = F.batch_norm(z, rm, rv, gamma, beta, self.training, factor, self.eps)
        return y.reshape(y.shape[0], G, O, *y.shape[2:]).sum(1)


class FBNNormSlot(nn.Identity):
    """Where the norm of an FBN conv stands: the identity (the FBN conv normalizes).

    A model built with ``norm="fbn"`` (`lightnets.nn.NormSpec.conv_norm`) and
    ``convert_norm(model, "fbn")`` leave one in the norm's place. It marks the pair, so that
    `fuse` can show a model's own reparameterization hook (RepVGG / MobileOne branches) the
    conv + BN it expects."""
