"""The arithmetic behind `lightnets.nn.fbn.FBNConv2d`: FBN's statistics and training forward.

The layer (`lightnets.nn.fbn`) holds the parameters, buffers, options and the choice of
implementation; this module holds what those implementations compute, as functions of
tensors and custom autograd Functions, with no module state:

- `GroupMoments` (``impl="cov"``, 1x1 kernels): per-group mean and covariance of the inputs a
  strided 1x1 conv sees, saving only the input for backward;
- `RecomputedFBN` (``impl="recompute"``, any kernel): the whole training forward from each
  group's partial sums, which backward recomputes instead of keeping;
- `partial_sums` (``impl="naive"``): the G * C_out partial sums of the paper's Fig. 3a;
- `sync_moments`: statistics combined over `torch.distributed` processes (``sync_stats``);
- `group_runs`, `per_channel`, `stat_dtype`: the bookkeeping of uneven groups and dtypes.

See the docstring of `lightnets.nn.fbn` for the definition and why it costs what BN costs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GroupMoments",
    "RecomputedFBN",
    "group_runs",
    "partial_sums",
    "per_channel",
    "stat_dtype",
    "sync_moments",
]


def group_runs(sizes: tuple[int, ...]) -> tuple[tuple[int, int, int, int], ...]:
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


def per_channel(values: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """(G, O) per-group values -> (O, C_in): each group's value repeated over its channels."""
    O = values.shape[1]
    parts = [
        values[g0 : g0 + k].t()[:, :, None].expand(O, k, c).reshape(O, k * c)
        for _, g0, k, c in group_runs(sizes)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
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


def sync_moments(
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


class GroupMoments(torch.autograd.Function):
    """Per-group mean (k, c) and biased covariance (k, c, c) of the inputs a strided 1x1 conv sees.

    One (mean, cov) pair per run of equal-sized groups (`group_runs`), flattened into the outputs.
    The pixels are x[:, :, start::s] of the zero-padded input; padded zeros count in n. Forward
    centres before the products (stable), writing the centred copy as (k, c, N*pixels) so that
    the covariance is one GEMM per group over all pixels; backward recomputes from the saved
    input, the same tensor the convolution keeps, so nothing input-sized is added:
    dL/dp = (dL/dmean + (Gc + Gc^T)(p - mean)) / n for every real pixel p.
    """

    @staticmethod
    def forward(ctx, x, blocks, stride, padding, out_hw):  # type: ignore[override]
        sel, n, n_pad = _pixel_selection(x.shape, stride, padding, out_hw)
        dtype = stat_dtype(x.dtype)
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
            return GroupMoments._backward(x, means, blocks, stride, padding, out_hw, n, grads)

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


class RecomputedFBN(torch.autograd.Function):
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
        sdt = stat_dtype(x.dtype)
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
            mean, var, n = sync_moments(mean, var, n, sync)
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


def partial_sums(x: Tensor, weight: Tensor, sizes: tuple[int, ...], conv: tuple) -> Tensor:
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
