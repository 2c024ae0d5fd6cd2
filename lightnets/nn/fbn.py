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
accumulated in float32 for bfloat16/float16 inputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightnets.errors import UserError, did_you_mean

__all__ = ["FBNConv2d", "FBNNormSlot", "IMPLS", "group_sizes"]

IMPLS = ("auto", "naive", "cov", "recompute")


def group_sizes(in_channels: int, groups: int) -> tuple[int, ...]:
    """Sizes of the G consecutive input-channel groups, `torch.tensor_split` order.

    They differ by at most one: the first in_channels % G groups get one channel more.
    """
    q, r = divmod(in_channels, groups)
    return (q + 1,) * r + (q,) * (groups - r)


def _blocks(sizes: tuple[int, ...]) -> tuple[tuple[int, int, int, int], ...]:
    """Runs of equal-sized groups as (first channel, first group, number of groups, size).

    One run when G divides C_in, else two (the larger groups, then the smaller ones); each run is
    handled as an even split, vectorized.
    """
    runs: list[tuple[int, int, int, int]] = []
    start = 0
    for g, size in enumerate(sizes):
        if runs and runs[-1][3] == size:
            first, g0, k, _ = runs[-1]
            runs[-1] = (first, g0, k + 1, size)
        else:
            runs.append((start, g, 1, size))
        start += size
    return tuple(runs)


def _per_channel(values: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """(G, O) per-group values -> (O, C_in): each group's value repeated over its channels."""
    O = values.shape[1]
    parts = [
        values[g0 : g0 + k].t()[:, :, None].expand(O, k, c).reshape(O, k * c)
        for _, g0, k, c in _blocks(sizes)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


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
    """Per-group mean (k, c) and biased covariance (k, c, c) of the inputs a strided 1x1 conv sees.

    One (mean, cov) pair per run of equal-sized groups (`_blocks`), flattened into the outputs.
    The pixels are x[:, :, start::s] of the zero-padded input; padded zeros count in n. Forward
    centres before the products (stable), writing the centred copy as (k, c, N*pixels) so that
    the covariance is one GEMM per group over all pixels; backward recomputes from the saved
    input, the same tensor the convolution keeps, so nothing input-sized is added:
    dL/dp = (dL/dmean + (Gc + Gc^T)(p - mean)) / n for every real pixel p.
    """

    @staticmethod
    def forward(ctx, x, blocks, stride, padding, out_hw):  # type: ignore[override]
        sel, n, n_pad = _pixel_selection(x.shape, stride, padding, out_hw)
        dtype = _stat_dtype(x.dtype)
        xs = x[sel]  # (N, C, h, w) real pixels only; a view
        N, L = x.shape[0], xs.shape[-2] * xs.shape[-1]
        outputs, means = [], []
        for start, _, k, c in blocks:
            p = xs[:, start : start + k * c].reshape(N, k, c, L)
            mean = p.sum(dim=(0, 3), dtype=dtype) / n  # (k, c)
            centred = torch.empty((k, c, N, L), dtype=dtype, device=x.device)
            torch.sub(p.permute(1, 2, 0, 3), mean[:, :, None, None], out=centred)
            flat = centred.view(k, c, N * L)
            # each padded zero adds (0 - mean)(0 - mean)^T
            extra = mean[:, :, None] * mean[:, None, :] * (n_pad / n)
            cov = torch.baddbmm(extra, flat, flat.transpose(1, 2), alpha=1.0 / n)
            del centred, flat
            outputs += [mean, cov]
            means.append(mean)
        ctx.save_for_backward(x, *means)
        ctx.meta = (blocks, stride, padding, out_hw, n)
        return tuple(outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):  # type: ignore[override]
        x, *means = ctx.saved_tensors
        blocks, stride, padding, out_hw, n = ctx.meta
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        with torch.autocast(x.device.type, enabled=False):
            return _GroupMoments._backward(x, means, blocks, stride, padding, out_hw, n, grads)

    @staticmethod
    def _backward(x, means, blocks, stride, padding, out_hw, n, grads):
        sel, _, n_pad = _pixel_selection(x.shape, stride, padding, out_hw)
        xs = x[sel]
        N, h, w = xs.shape[0], xs.shape[-2], xs.shape[-1]
        whole = n_pad == 0 and xs.shape == x.shape
        parts = []
        for (start, _, k, c), mean, grad_mean, grad_cov in zip(
            blocks, means, grads[0::2], grads[1::2]
        ):
            p = xs[:, start : start + k * c].to(mean.dtype).reshape(N * k, c, h * w)
            if grad_cov is None:
                sym = mean.new_zeros(k, c, c)
            else:
                grad_cov = grad_cov.to(mean.dtype)
                sym = (grad_cov + grad_cov.transpose(-1, -2)) / n
            bias = -(sym @ mean[:, :, None])  # (k, c, 1): the centring, moved into the bias
            if grad_mean is not None:
                bias = bias + grad_mean[:, :, None].to(mean.dtype) / n
            gp = torch.baddbmm(
                bias.expand(N, k, c, 1).reshape(N * k, c, 1),
                sym.expand(N, k, c, c).reshape(N * k, c, c),
                p,
            )
            parts.append(gp.view(N, k * c, h, w).to(x.dtype))
        if whole:
            return (parts[0] if len(parts) == 1 else torch.cat(parts, 1)), None, None, None, None
        grad_x = torch.zeros_like(x)
        inside = grad_x[sel]  # a view: writing it writes grad_x
        for (start, _, k, c), part in zip(blocks, parts):
            inside[:, start : start + k * c] = part
        return grad_x, None, None, None, None


_conv_backward = torch.ops.aten.convolution_backward


def _contiguous_like(t: Tensor, like: Tensor) -> Tensor:
    fmt = (
        torch.channels_last
        if like.dim() == 4
        and like.is_contiguous(memory_format=torch.channels_last)
        and not like.is_contiguous()
        else torch.contiguous_format
    )
    return t.contiguous(memory_format=fmt)


def _channel_sum(t: Tensor) -> Tensor:
    """Sum over (N, H, W) of an (N, C, H, W) tensor (contiguous reductions, no temporaries)."""
    return t.flatten(2).sum(2).sum(0)


def _channel_sum_of_squares(t: Tensor) -> Tensor:
    """Sum of squares over (N, H, W), via 2-norms over the contiguous H*W (no temporaries)."""
    return torch.linalg.vector_norm(t.flatten(2), 2, dim=2).square().sum(0)


class _RecomputedFBN(torch.autograd.Function):
    """The training forward of a whole FBN conv; keeps x, W and the statistics only.

    Forward, per group g: z_g = conv(x_g, W_g), centred in place by its mean, var from the
    centred values, out += a_g (z_g - mu_g), z_g freed; finally out += sum_g beta_g. Returns
    (out, mean, var) with the (G, O) statistics non-differentiable (for the running averages).
    With a process group (sync_stats) the statistics of all processes are combined first (so
    every z_g is kept until then) and backward all-reduces the two per-channel sums of the BN
    gradient, as SyncBatchNorm does.
    Backward, per group: recompute z_g, S2_g = sum dy (z_g - mu_g), S1 = sum dy,
    dz_g = a_g (dy - S1/n - (z_g - mu_g) rstd_g^2 S2_g / n), then the group conv's input and
    weight gradients. One scratch tensor serves every group.
    """

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, sizes, conv_args, eps, sync, info):  # type: ignore[override]
        stride, padding, dilation = conv_args
        sdt = _stat_dtype(x.dtype)
        x_groups = x.split(sizes, 1) if len(sizes) > 1 else (x,)
        w_groups = weight.split(sizes, 1) if len(sizes) > 1 else (weight,)
        out = None
        kept, means, variances = [], [], []
        out_dtype = x.dtype
        n = 0
        for g, (xg, wg) in enumerate(zip(x_groups, w_groups)):
            z = F.conv2d(xg, wg, None, stride, padding, dilation)
            out_dtype = z.dtype  # the conv's dtype (autocast may lower it)
            zc = z.to(sdt)
            del z
            n = zc.numel() // zc.shape[1]
            mean = _channel_sum(zc) / n
            zc.sub_(mean[:, None, None])
            var = _channel_sum_of_squares(zc) / n
            means.append(mean)
            variances.append(var)
            if sync is not None:
                kept.append(zc)
                continue
            a = torch.rsqrt(var + eps)
            if gamma is not None:
                a = a * gamma[g].to(sdt)
            if out is None:
                out = zc.mul_(a[:, None, None])
            else:
                out.addcmul_(zc, a[:, None, None])
            del zc
        mean, var = torch.stack(means), torch.stack(variances)
        shift = beta.to(sdt).sum(0) if beta is not None else None
        if sync is not None:
            local_mean = mean
            mean, var, n = _sync_moments(mean, var, n, sync)
            a = torch.rsqrt(var + eps)
            if gamma is not None:
                a = a * gamma.to(sdt)
            # kept holds z_g - local mean; the output needs z_g - global mean
            adjust = -(a * (mean - local_mean)).sum(0)
            shift = adjust if shift is None else shift + adjust
            for g in range(len(kept)):
                zc, kept[g] = kept[g], None
                if out is None:
                    out = zc.mul_(a[g][:, None, None])
                else:
                    out.addcmul_(zc, a[g][:, None, None])
                del zc
        if shift is not None:
            out.add_(shift[:, None, None])
        out = out.to(out_dtype)
        rstd = torch.rsqrt(var + eps)
        info["n"] = n
        ctx.save_for_backward(x, weight, gamma, mean, rstd)
        ctx.meta = (sizes, conv_args, n, sync, out_dtype)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_mean, _grad_var):  # type: ignore[override]
        x, weight, gamma, mean, rstd = ctx.saved_tensors
        sizes, (stride, padding, dilation), n, sync, cdt = ctx.meta
        need_x, need_w, need_gamma, need_beta = ctx.needs_input_grad[:4]
        sdt = mean.dtype
        dy = grad_out.to(sdt)
        s1 = _channel_sum(dy)  # (O,)
        alpha = rstd if gamma is None else rstd * gamma.to(sdt)  # (G, O)
        starts = [sum(sizes[:g]) for g in range(len(sizes))]
        mask = (need_x, need_w, False)
        dx = torch.empty_like(x) if need_x else None
        dw = torch.empty_like(weight) if need_w else None
        scratch: list[Tensor] = []  # one (N, O, h, w) buffer for every group

        def recompute(g: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            sl = slice(starts[g], starts[g] + sizes[g])
            xg = _contiguous_like(x[:, sl].to(cdt), x)
            wg = weight[:, sl].to(cdt).contiguous()
            with torch.autocast(x.device.type, enabled=False):
                zc = F.conv2d(xg, wg, None, stride, padding, dilation).to(sdt)
            zc.sub_(mean[g][:, None, None])
            if not scratch:
                scratch.append(torch.empty_like(zc))
            s2 = _channel_sum(torch.mul(dy, zc, out=scratch[0]))  # sum dy (z - mu)
            return xg, wg, zc, s2

        def input_grads(g: int, xg: Tensor, wg: Tensor, zc: Tensor, s1g: Tensor, s2g: Tensor):
            if not (need_x or need_w):
                return
            kappa = -alpha[g] * rstd[g] ** 2 * s2g / n
            const = -alpha[g] * s1g / n
            dz = torch.addcmul(const[:, None, None], dy, alpha[g][:, None, None], out=scratch[0])
            dz.addcmul_(zc, kappa[:, None, None])
            gx, gw, _ = _conv_backward(
                dz.to(cdt), xg, wg, None, stride, padding, dilation, False, (0, 0), 1, mask
            )
            sl = slice(starts[g], starts[g] + sizes[g])
            if need_x:
                dx[:, sl] = gx
            if need_w:
                dw[:, sl] = gw

        s2_local = []
        if sync is None:
            for g in range(len(sizes)):
                xg, wg, zc, s2 = recompute(g)
                s2_local.append(s2)
                input_grads(g, xg, wg, zc, s1, s2)
                del xg, wg, zc
        else:
            saved = []
            for g in range(len(sizes)):
                xg, wg, zc, s2 = recompute(g)
                s2_local.append(s2)
                saved.append((xg, wg, zc))
            sums = torch.cat([s1[None], torch.stack(s2_local)])
            torch.distributed.all_reduce(sums, group=sync)
            for g in range(len(sizes)):
                (xg, wg, zc), saved[g] = saved[g], None
                input_grads(g, xg, wg, zc, sums[0], sums[1 + g])
                del xg, wg, zc
        d_gamma = (rstd * torch.stack(s2_local)).to(gamma.dtype) if need_gamma else None
        d_beta = s1.to(gamma.dtype).repeat(len(sizes), 1) if need_beta else None
        return dx, dw, d_gamma, d_beta, None, None, None, None, None


def _partial_sums(x: Tensor, weight: Tensor, sizes: tuple[int, ...], conv: tuple) -> Tensor:
    """The G*O partial sums of eq. 4: output channel g*O + o is conv(x_g, W[o, g]).

    Even groups: one grouped conv (the paper's Fig. 3a). Uneven groups: one conv per group,
    concatenated.
    """
    G = len(sizes)
    O = weight.shape[0]
    if len(set(sizes)) == 1:
        c = sizes[0]
        w = weight.reshape(O, G, c, *weight.shape[2:]).transpose(0, 1)
        return F.conv2d(x, w.reshape(G * O, c, *weight.shape[2:]), None, *conv, G)
    return torch.cat(
        [
            F.conv2d(xg, wg, None, *conv)
            for xg, wg in zip(x.split(sizes, 1), weight.split(sizes, 1))
        ],
        1,
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
        fbn_groups: G, the number of consecutive input-channel groups, 1 <= G <= in_channels.
            When G does not divide in_channels the group sizes differ by one: the first
            in_channels % G groups get in_channels // G + 1 channels, the rest in_channels // G
            (`torch.tensor_split` order; `group_sizes`).
        channels_per_group: alternatively the group size c, which must divide in_channels;
            G = in_channels / c.
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
        self.group_sizes = group_sizes(in_channels, groups_)
        self._blocks = _blocks(self.group_sizes)
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
        if not isinstance(fbn_groups, int) or isinstance(fbn_groups, bool) or fbn_groups < 1:
            raise UserError(
                f"FBNConv2d fbn_groups={fbn_groups!r}: expected an int G with "
                f"1 <= G <= C_in={in_channels}"
            )
        if channels_per_group is not None:
            if (
                not isinstance(channels_per_group, int)
                or channels_per_group < 1
                or in_channels % channels_per_group
            ):
                raise UserError(
                    f"FBNConv2d channels_per_group={channels_per_group!r} must divide "
                    f"C_in={in_channels}; valid: {_divisors(in_channels)}"
                )
            from_size = in_channels // channels_per_group
            if fbn_groups not in (1, from_size):
                raise UserError(
                    f"FBNConv2d fbn_groups={fbn_groups} and channels_per_group={channels_per_group}"
                    f" disagree for C_in={in_channels} (that group size means G={from_size}); "
                    "give only one"
                )
            return from_size
        if fbn_groups > in_channels:
            raise UserError(
                f"FBNConv2d fbn_groups G={fbn_groups} > C_in={in_channels}: every group needs at "
                f"least one input channel; expected 1 <= G <= {in_channels}"
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
        w = self.weight.to(sdt) * _per_channel(a, self.group_sizes)[:, :, None, None]
        return w.to(dtype), shift.sum(0).to(dtype)

    def fused_weight_and_bias(self) -> tuple[Tensor, Tensor]:
        """(W~ (out, in, kh, kw), bias (out)) of the single conv equal to the layer in eval mode.

        W~[o, g-slice] = a_{g,o} W[o, g-slice] (g-slice: the channels of group g, `group_sizes`),
        a = gamma / sqrt(running_var + eps),
        bias_o = sum_g (beta_{g,o} - a_{g,o} running_mean_{g,o}).
        Differentiable; wrap in `torch.no_grad()` for export.
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
            moments = _GroupMoments.apply(x, self._blocks, self.stride, pad, out_hw)
            w = self.weight.to(moments[0].dtype).reshape(O, -1)
            means, variances = [], []
            for (start, _, k, c), mean_p, cov_p in zip(self._blocks, moments[0::2], moments[1::2]):
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
            mean, var, n = _sync_moments(mean, var, n)
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
        out, mean, var = _RecomputedFBN.apply(
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
        z = _partial_sums(x, self.weight, self.group_sizes, self._conv_args())
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


class FBNNormSlot(nn.Identity):
    """Where the BatchNorm of a conv that `convert_norm(kind="fbn")` turned into an FBNConv2d
    stood: the identity (the FBN conv normalizes). It marks the pair, so that `fuse` can show a
    model's own reparameterization hook (RepVGG / MobileOne branches) the conv + BN it expects."""
