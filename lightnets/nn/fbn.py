"""Fine-grained Batch Normalization (FBN) fused with its convolution: `FBNConv2d`.

FBN (paper 001, eq. 4) splits the C_in input channels of a convolution into G groups, batch-
normalizes each partial sum z_{g,o} = conv(x_g, W[o, g]) with its own statistics and affine
parameters, and sums the results over g. Written out literally (the paper's Fig. 3a, kept here as
``impl="naive"``) that is a grouped convolution with G * C_out outputs followed by BN: G times the
activations of Conv2d + BatchNorm2d, all kept for backward.

Once the statistics mu_{g,o}, var_{g,o} are known the layer is ONE standard convolution with the
folded weight W~[o, g] = a_{g,o} W[o, g], a = gamma / sqrt(var + eps), plus the bias
sum_g (beta_{g,o} - a_{g,o} mu_{g,o}), in training as well as at inference. Only the statistics
need the groups:

- ``impl="cov"`` (1x1 kernels): with p the group-g input vector at an output pixel,
  mu = W[o, g] . E[p] and var = W[o, g]^T Cov(p) W[o, g]; Cov(p) is a (C_in/G)^2 matrix per
  group. The moments are a custom autograd Function that saves only the input (which the conv
  saves anyway), so the layer keeps what Conv2d + BatchNorm2d keep, or less.
- ``impl="recompute"`` (any kernel): the per-group partial sums are reduced to mean/var by a
  custom autograd Function that keeps only the input and the weight and recomputes the partial
  sums in backward (what `torch.utils.checkpoint` would do, without its first-call cost).
- ``impl="auto"``: cov for 1x1 kernels, recompute otherwise.

Eval mode turns the running statistics into the folded weight and bias: one conv, no groups
(``impl="naive"`` stays literal in eval too, grouped conv + BN on the running statistics, so it
checks the fold). Statistics are accumulated in float32 for bfloat16/float16 inputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightnets.errors import UserError, did_you_mean

__all__ = ["FBNConv2d", "IMPLS"]

IMPLS = ("auto", "naive", "cov", "recompute")


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return (int(value[0]), int(value[1]))
    raise UserError(f"FBNConv2d {name}={value!r}: expected an int or a pair of ints")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in float32 (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the gradient (as in SyncBatchNorm)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _sync_moments(
    mean: Tensor, var: Tensor, count: int, group: Any = None
) -> tuple[Tensor, Tensor, int]:
    """Combine per-process (mean, biased var, count) into the statistics of the global batch.

    Each process writes its row of a (world, 1 + 2K) table and one differentiable all_reduce
    gathers the table; the rows are then combined exactly (Chan et al.), so the result equals one
    process on the concatenated batch, and gradients reach every process's inputs.
    """
    dist = torch.distributed
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    shape = mean.shape
    row = torch.cat([mean.new_tensor([float(count)]), mean.reshape(-1), var.reshape(-1)])
    table = row.new_zeros(world, row.numel())
    table = table.index_copy(0, torch.tensor([rank], device=row.device), row[None])
    table = _AllReduceSum.apply(table, group)
    counts = table[:, :1]
    total = counts.sum()
    means = table[:, 1 : 1 + mean.numel()]
    variances = table[:, 1 + mean.numel() :]
    g_mean = (counts * means).sum(0) / total
    g_var = (counts * (variances + (means - g_mean) ** 2)).sum(0) / total
    return g_mean.reshape(shape), g_var.reshape(shape), int(total.item())


class _GroupMoments(torch.autograd.Function):
    """Mean (G, c) and biased covariance (G, c, c) of the input vectors a strided 1x1 conv sees.

    The pixels are x[:, :, start::s] of the zero-padded input; padded zeros count in n. Forward
    centres before the products (stable); backward recomputes from the saved input, the same
    tensor the convolution keeps, so nothing input-sized is added:
    dL/dp = (dL/dmean + (Gc + Gc^T)(p - mean)) / n for every real pixel p.
    """

    @staticmethod
    def forward(ctx, x, groups, stride, padding, out_hw):  # type: ignore[override]
        sel, n, n_pad = _pixel_selection(x.shape, stride, padding, out_hw)
        dtype = _stat_dtype(x.dtype)
        N, C = x.shape[:2]
        c = C // groups
        xs = x[sel].to(dtype)  # (N, C, h, w) real pixels only
        p = xs.reshape(N, groups, c, -1)
        mean = p.sum(dim=(0, 3)) / n  # (G, c)
        centred = p - mean[None, :, :, None]
        cov = torch.matmul(centred, centred.transpose(-1, -2)).sum(0)  # (G, c, c)
        if n_pad:
            cov = cov + n_pad * (mean[:, :, None] * mean[:, None, :])
        cov = cov / n
        ctx.save_for_backward(x, mean)
        ctx.meta = (groups, stride, padding, out_hw, n)
        return mean, cov

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean, grad_cov):  # type: ignore[override]
        x, mean = ctx.saved_tensors
        groups, stride, padding, out_hw, n = ctx.meta
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        sel, _, _ = _pixel_selection(x.shape, stride, padding, out_hw)
        N, C = x.shape[:2]
        c = C // groups
        xs = x[sel].to(mean.dtype)
        h, w = xs.shape[-2:]
        p = xs.reshape(N, groups, c, -1) - mean[None, :, :, None]
        gp = torch.zeros_like(p[..., :1])
        if grad_cov is not None:
            sym = grad_cov + grad_cov.transpose(-1, -2)  # (G, c, c)
            gp = torch.matmul(sym[None], p)
        if grad_mean is not None:
            gp = gp + grad_mean[None, :, :, None]
        gp = (gp / n).expand_as(p).reshape(N, C, h, w)
        grad_x = torch.zeros_like(x)
        grad_x[sel] = gp.to(x.dtype)
        return grad_x, None, None, None, None


def _grouped_conv(x: Tensor, weight: Tensor, groups: int, conv_args: tuple) -> Tensor:
    """The G*O partial sums: output channel g*O + o is conv(x_g, W[o, g]) (a grouped conv)."""
    O, C = weight.shape[:2]
    c = C // groups
    w = weight.reshape(O, groups, c, *weight.shape[2:]).transpose(0, 1)
    return F.conv2d(x, w.reshape(groups * O, c, *weight.shape[2:]), None, *conv_args, groups)


class _GroupedStats(torch.autograd.Function):
    """Biased (var, mean) over (N, H, W) of the G*O partial sums, which are never kept.

    Forward reduces the grouped conv's output at once; backward recomputes it from the saved
    input and weight (tensors the layer's conv keeps anyway) and back-propagates
    dL/dz = (dL/dmean + 2 dL/dvar (z - mean)) / n through the grouped conv.
    """

    @staticmethod
    def forward(ctx, x, weight, groups, conv_args):  # type: ignore[override]
        z = _grouped_conv(x, weight, groups, conv_args)
        var, mean = torch.var_mean(z.to(_stat_dtype(z.dtype)), dim=(0, 2, 3), correction=0)
        ctx.save_for_backward(x, weight, mean)
        ctx.meta = (groups, conv_args)
        return var, mean

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_var, grad_mean):  # type: ignore[override]
        x, weight, mean = ctx.saved_tensors
        groups, conv_args = ctx.meta
        needs = ctx.needs_input_grad[:2]
        if not any(needs):
            return None, None, None, None
        with torch.enable_grad():
            xd = x.detach().requires_grad_(needs[0])
            wd = weight.detach().requires_grad_(needs[1])
            z = _grouped_conv(xd, wd, groups, conv_args)
            n = z.numel() // z.shape[1]
            grad_z = torch.zeros((), dtype=mean.dtype, device=mean.device)
            if grad_mean is not None:
                grad_z = grad_mean[:, None, None] / n
            if grad_var is not None:
                centred = z.detach().to(mean.dtype) - mean[:, None, None]
                grad_z = grad_z + centred * (2 / n) * grad_var[:, None, None]
            grad_z = grad_z.to(z.dtype).expand_as(z)
            inputs = [t for t, need in zip((xd, wd), needs) if need]
            grads = iter(torch.autograd.grad(z, inputs, grad_z))
        return (
            next(grads) if needs[0] else None,
            next(grads) if needs[1] else None,
            None,
            None,
        )


def _pixel_selection(
    shape: torch.Size, stride: tuple[int, int], padding: tuple[int, int], out_hw: tuple[int, int]
) -> tuple[tuple[slice, ...], int, int]:
    """Index of the real (non-padding) input pixels a 1x1 conv visits, and the pixel counts."""
    slices = [slice(None), slice(None)]
    real = 1
    for size, s, pad, out in zip(shape[-2:], stride, padding, out_hw):
        first = -(-pad // s)  # first output index whose input lies inside the image
        last = min(out - 1, (size - 1 + pad) // s)  # last such index
        count = max(0, last - first + 1)
        start = first * s - pad
        slices.append(slice(start, start + (count - 1) * s + 1, s) if count else slice(0, 0))
        real *= count
    n = shape[0] * out_hw[0] * out_hw[1]
    return tuple(slices), n, n - shape[0] * real


class FBNConv2d(nn.Module):
    """Conv2d (no bias) whose G groups of input channels are batch-normalized separately.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation: as `nn.Conv2d`
            (padding also accepts "valid" / "same").
        fbn_groups: G, the number of consecutive input-channel groups; must divide in_channels.
        channels_per_group: alternatively the group size c, G = in_channels / c.
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
        if groups != 1:
            raise UserError(
                f"FBNConv2d groups={groups}: FBN needs several input channels per output: "
                "depthwise/grouped convs have nothing to group (use nn.Conv2d + BatchNorm2d)"
            )
        if bias:
            raise UserError(
                "FBNConv2d bias=True: FBN has no conv bias, norm_bias (beta) plays that role; "
                "expected bias=False"
            )
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"FBNConv2d {name}={value!r}: expected a positive int")
        groups_ = self._resolve_groups(in_channels, fbn_groups, channels_per_group)
        if impl not in IMPLS:
            raise UserError(
                f"FBNConv2d impl={impl!r}: expected one of {', '.join(IMPLS)}"
                + did_you_mean(str(impl), IMPLS)
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise UserError(
                    f"FBNConv2d padding={padding!r}: expected an int, a pair, 'valid' or 'same'"
                )
            if padding == "same" and self.stride != (1, 1):
                raise UserError("FBNConv2d padding='same' needs stride=1 (as nn.Conv2d)")
            self.padding: tuple[int, int] | str = padding
        else:
            self.padding = _pair(padding, "padding")
        self.fbn_groups = groups_
        if impl == "cov" and self.kernel_size != (1, 1):
            raise UserError(
                f"FBNConv2d impl='cov' needs a 1x1 kernel, got kernel_size={self.kernel_size}; "
                "expected impl='recompute' or 'auto' for larger kernels"
            )
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        self.impl = impl
        self.sync_stats = sync_stats

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

    @staticmethod
    def _resolve_groups(in_channels: int, fbn_groups: int, channels_per_group: int | None) -> int:
        valid = _divisors(in_channels)
        if not isinstance(fbn_groups, int) or isinstance(fbn_groups, bool) or fbn_groups < 1:
            raise UserError(f"FBNConv2d fbn_groups={fbn_groups!r}: expected a positive int")
        if channels_per_group is not None:
            if (
                not isinstance(channels_per_group, int)
                or channels_per_group < 1
                or in_channels % channels_per_group
            ):
                raise UserError(
                    f"FBNConv2d channels_per_group={channels_per_group!r} must divide "
                    f"C_in={in_channels}; valid: {valid}"
                )
            from_size = in_channels // channels_per_group
            if fbn_groups not in (1, from_size):
                raise UserError(
                    f"FBNConv2d fbn_groups={fbn_groups} and channels_per_group={channels_per_group}"
                    f" disagree for C_in={in_channels} (that group size means G={from_size}); "
                    "give only one"
                )
            return from_size
        if in_channels % fbn_groups:
            raise UserError(
                f"FBNConv2d fbn_groups G={fbn_groups} must divide C_in={in_channels}; "
                f"valid G for C_in={in_channels}: {valid}"
            )
        return fbn_groups

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
        s += f", fbn_groups={self.fbn_groups}, eps={self.eps}, momentum={self.momentum}"
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
        G, O = self.fbn_groups, self.out_channels
        sdt = mean.dtype
        a = torch.rsqrt(var + self.eps)  # (G, O)
        if self.affine:
            a = a * self.norm_weight.to(sdt)
        shift = -a * mean
        if self.affine:
            shift = shift + self.norm_bias.to(sdt)
        w = self.weight.to(sdt).reshape(O, G, -1) * a.t()[:, :, None]
        return w.reshape(self.weight.shape).to(dtype), shift.sum(0).to(dtype)

    def fused_weight_and_bias(self) -> tuple[Tensor, Tensor]:
        """(W~ (out, in, kh, kw), bias (out)) of the single conv equal to the layer in eval mode.

        W~[o, g-slice] = a_{g,o} W[o, g-slice], a = gamma / sqrt(running_var + eps),
        bias_o = sum_g (beta_{g,o} - a_{g,o} running_mean_{g,o}). Differentiable; wrap in
        `torch.no_grad()` for export.
        """
        sdt = _stat_dtype(self.weight.dtype)
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

    def _cov_stats(self, x: Tensor, out_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        G, O = self.fbn_groups, self.out_channels
        pad = (0, 0) if isinstance(self.padding, str) else self.padding  # "same" is 0 for 1x1
        mean_p, cov_p = _GroupMoments.apply(x, G, self.stride, pad, out_hw)
        w = self.weight.to(mean_p.dtype).reshape(O, G, -1)  # (O, G, c)
        mean = torch.einsum("ogc,gc->go", w, mean_p)
        var = torch.einsum("ogc,gcd,ogd->go", w, cov_p, w).clamp_min(0)
        return var, mean

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

        out_hw = self._out_hw(x)
        n = x.shape[0] * out_hw[0] * out_hw[1]
        if impl == "cov":
            var, mean = self._cov_stats(x, out_hw)
        else:
            var, mean = _GroupedStats.apply(x, self.weight, self.fbn_groups, self._conv_args())
            var, mean = var.reshape(self.fbn_groups, -1), mean.reshape(self.fbn_groups, -1)
        if self._syncing():
            mean, var, n = _sync_moments(mean, var, n)
        if n <= 1:
            raise ValueError(
                f"FBNConv2d expected more than 1 value per channel when training, got input "
                f"shape {tuple(x.shape)}"
            )
        self._update_running_stats(mean.detach(), var.detach(), n)
        w, b = self._fold(mean, var, x.dtype)
        return self._conv(x, w, b)

    def _naive(self, x: Tensor) -> Tensor:
        """The paper's Fig. 3a: grouped conv to G*O channels, BN over them, sum over groups."""
        G, O = self.fbn_groups, self.out_channels
        z = _grouped_conv(x, self.weight, G, self._conv_args())
        gamma = self.norm_weight.reshape(-1) if self.affine else None
        beta = self.norm_bias.reshape(-1) if self.affine else None
        if self._syncing():
            var, mean = torch.var_mean(z.to(_stat_dtype(z.dtype)), dim=(0, 2, 3), correction=0)
            n = z.shape[0] * z.shape[2] * z.shape[3]
            mean, var, n = _sync_moments(mean, var, n)
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
