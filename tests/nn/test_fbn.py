"""FBNConv2d against independent references: torch's Conv2d + BatchNorm2d (G = 1), a literal
loop over the groups of paper eq. 4 (groups from `torch.tensor_split`, uneven where G does not
divide C_in), and the naive grouped-conv form (the paper's Fig. 3a)."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightnets.errors import UserError
from lightnets.nn import FBNConv2d
from lightnets.nn.fbn import fbn_group_count, group_sizes

REPO = Path(__file__).resolve().parents[2]
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention (and much time on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(m: FBNConv2d, seed: int = 0) -> FBNConv2d:
    """Non-trivial gamma/beta so that the affine parameters are really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if m.affine:
            m.norm_weight.copy_(torch.rand(m.norm_weight.shape, generator=g) + 0.5)
            m.norm_bias.copy_(torch.randn(m.norm_bias.shape, generator=g))
    return m


def _impls(kernel: int) -> list[str]:
    return ["naive", "cov", "recompute", "auto"] if kernel == 1 else ["naive", "recompute", "auto"]


# ------------------------------------------------------------------- G = 1: Conv2d + BN


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (1, 2, 1), (3, 1, 1), (3, 2, 0)])
def test_one_group_is_conv_then_batchnorm(kernel, stride, padding, momentum):
    torch.manual_seed(0)
    for impl in _impls(kernel):
        conv = nn.Conv2d(6, 5, kernel, stride, padding, bias=False).double()
        bn = nn.BatchNorm2d(5, momentum=momentum).double()
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
        fbn = FBNConv2d(6, 5, kernel, stride, padding, momentum=momentum, impl=impl).double()
        with torch.no_grad():
            fbn.weight.copy_(conv.weight)
            fbn.norm_weight.copy_(bn.weight[None])
            fbn.norm_bias.copy_(bn.bias[None])
        ref_params = [conv.weight, bn.weight, bn.bias]
        params = [fbn.weight, fbn.norm_weight, fbn.norm_bias]
        for step in range(3):
            x = torch.randn(4, 6, 7, 7, dtype=F64) + step
            r = torch.randn(4, 5, *conv(x).shape[2:], dtype=F64)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = bn(conv(xa)), fbn(xb)
            torch.testing.assert_close(yb, ya, msg=f"{impl} output")
            (ya * r).sum().backward()
            (yb * r).sum().backward()
            torch.testing.assert_close(xb.grad, xa.grad, msg=f"{impl} input grad")
            for p, q in zip(params, ref_params):
                torch.testing.assert_close(p.grad.reshape(q.shape), q.grad, msg=impl)
            torch.testing.assert_close(fbn.running_mean[0], bn.running_mean)
            torch.testing.assert_close(fbn.running_var[0], bn.running_var)
            assert int(fbn.num_batches_tracked) == int(bn.num_batches_tracked) == step + 1
            with torch.no_grad():  # an SGD step on both
                for p in [*params, *ref_params]:
                    p -= 0.1 * p.grad
                    p.grad = None
        bn.eval()
        fbn.eval()
        x = torch.randn(2, 6, 7, 7, dtype=F64)
        torch.testing.assert_close(fbn(x), bn(conv(x)), msg=f"{impl} eval")


# --------------------------------------------------------------- G > 1: literal eq. 4


def _literal_eq4(x, weight, gamma, beta, running_mean, running_var, groups, training, **conv):
    """sum_g BN_g(conv(x_g, W[:, g])), one F.batch_norm per group, as the paper writes it.

    The groups are torch.tensor_split's: sizes differ by at most one, the larger ones first.
    """
    out = 0
    channels = torch.arange(x.shape[1]).tensor_split(groups)
    for g, idx in enumerate(channels):
        sl = slice(int(idx[0]), int(idx[-1]) + 1)
        z = F.conv2d(x[:, sl], weight[:, sl], **conv)
        out = out + F.batch_norm(
            z,
            running_mean[g],
            running_var[g],
            gamma[g] if gamma is not None else None,
            beta[g] if beta is not None else None,
            training=training,
            momentum=0.1,
            eps=1e-5,
        )
    return out


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("groups", [2, 4, 3, 5])  # 8 channels: 3 -> (3, 3, 2), 5 -> (2, 2, 2, 1, 1)
@pytest.mark.parametrize(
    "kernel,stride,padding,dilation", [(1, 1, 0, 1), (3, 2, 1, 2), (1, 2, 1, 1)]
)
def test_matches_literal_eq4(groups, kernel, stride, padding, dilation, affine):
    torch.manual_seed(1)
    conv = {"stride": stride, "padding": padding, "dilation": dilation}
    for impl in _impls(kernel):
        m = FBNConv2d(8, 3, kernel, fbn_groups=groups, affine=affine, impl=impl, **conv)
        m = _randomize(m.double())
        weight = m.weight.detach().clone().requires_grad_()
        gamma = m.norm_weight.detach().clone().requires_grad_() if affine else None
        beta = m.norm_bias.detach().clone().requires_grad_() if affine else None
        rm, rv = m.running_mean.clone(), m.running_var.clone()
        for _ in range(2):
            x = torch.randn(3, 8, 9, 8, dtype=F64)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ref = _literal_eq4(xa, weight, gamma, beta, rm, rv, groups, True, **conv)
            out = m(xb)
            torch.testing.assert_close(out, ref, msg=impl)
            r = torch.randn_like(ref)
            (ref * r).sum().backward()
            (out * r).sum().backward()
            torch.testing.assert_close(xb.grad, xa.grad)
            torch.testing.assert_close(m.running_mean, rm)
            torch.testing.assert_close(m.running_var, rv)
        torch.testing.assert_close(m.weight.grad, weight.grad)
        if affine:
            torch.testing.assert_close(m.norm_weight.grad, gamma.grad)
            torch.testing.assert_close(m.norm_bias.grad, beta.grad)
        m.eval()
        x = torch.randn(2, 8, 9, 8, dtype=F64)
        ref = _literal_eq4(x, weight, gamma, beta, rm, rv, groups, False, **conv)
        torch.testing.assert_close(m(x), ref, msg=f"{impl} eval")
        with torch.no_grad():
            torch.testing.assert_close(m.to_conv()(x), ref, msg="to_conv")


# ---------------------------------------------------- property: every impl equals naive


def _run(m: FBNConv2d, xs: list[torch.Tensor], r_seed: int):
    """Two training steps and one eval step; everything a test compares."""
    out = {}
    g = torch.Generator().manual_seed(r_seed)
    for i, x in enumerate(xs[:2]):
        x = x.clone().requires_grad_()
        y = m(x)
        r = torch.randn(y.shape, generator=g, dtype=torch.float64)  # same r in any dtype
        (y * r.to(y.dtype)).sum().backward()
        out[f"y{i}"], out[f"dx{i}"] = y.detach(), x.grad
    for name, p in m.named_parameters():
        out[f"d{name}"] = p.grad
    out["running_mean"], out["running_var"] = m.running_mean.clone(), m.running_var.clone()
    m.eval()
    out["eval"] = m(xs[2]).detach()
    m.train()
    return out


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 3),
    groups=st.integers(1, 5),
    per_group=st.integers(1, 3),
    extra=st.integers(0, 4),
    c_out=st.integers(1, 5),
    kernel=st.sampled_from([1, 3]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    dilation=st.integers(1, 2),
    size=st.integers(3, 7),
    affine=st.booleans(),
    momentum=st.sampled_from([0.1, None]),
)
def test_impls_agree_with_naive(
    n, groups, per_group, extra, c_out, kernel, stride, padding, dilation, size, affine, momentum
):
    c_in = groups * per_group + extra % groups  # extra % groups > 0: uneven groups
    n = n + 1
    torch.manual_seed(size * 100 + c_in)
    xs = [torch.randn(n, c_in, size, size + 1, dtype=F64) * 2 + 1 for _ in range(3)]
    kw = {"stride": stride, "padding": padding, "dilation": dilation}
    kw |= {"fbn_groups": groups, "affine": affine, "momentum": momentum}
    naive = _randomize(FBNConv2d(c_in, c_out, kernel, impl="naive", **kw).double())
    state = {k: v.clone() for k, v in naive.state_dict().items()}
    expected = _run(naive, xs, r_seed=3)
    for impl in _impls(kernel)[1:]:
        m = FBNConv2d(c_in, c_out, kernel, impl=impl, **kw).double()
        m.load_state_dict(state)
        got = _run(m, xs, r_seed=3)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-8, msg=f"{impl} {key}")


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference relative to the reference's largest magnitude."""
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    groups=st.integers(1, 4),
    per_group=st.integers(2, 6),
    c_out=st.integers(1, 6),
    kernel=st.sampled_from([1, 3]),
    stride=st.integers(1, 2),
    size=st.integers(4, 8),
    affine=st.booleans(),
)
def test_float32_impls_are_as_accurate_as_naive(
    groups, per_group, c_out, kernel, stride, size, affine
):
    """In float32 the implementations sum in different orders, so they do not agree with
    naive to 1e-4 in every gradient (naive itself is ~1e-3 off in a weight gradient summed
    over many pixels). What must hold: against the exact (float64) result, each impl's
    float32 error is within 1e-4 relative or at most 4x naive's own float32 error."""
    c_in = groups * per_group
    torch.manual_seed(c_in * 10 + size)
    xs = [torch.randn(4, c_in, size, size + 1, dtype=F64) * 2 + 1 for _ in range(3)]
    kw = {"stride": stride, "padding": kernel // 2, "fbn_groups": groups, "affine": affine}
    exact_model = _randomize(FBNConv2d(c_in, c_out, kernel, impl="naive", **kw).double())
    state = {k: v.clone() for k, v in exact_model.state_dict().items()}
    exact = _run(exact_model, xs, r_seed=3)
    errors = {}
    for impl in _impls(kernel):
        m = FBNConv2d(c_in, c_out, kernel, impl=impl, **kw)
        m.load_state_dict(state)  # cast to float32
        got = _run(m, [x.float() for x in xs], r_seed=3)
        errors[impl] = {k: _rel_err(v, exact[k]) for k, v in got.items() if v.is_floating_point()}
    assert max(errors["naive"].values()) < 1e-2  # the comparison itself is sound
    for impl in _impls(kernel)[1:]:
        for key, err in errors[impl].items():
            bound = max(1e-4, 4 * errors["naive"][key])
            assert err <= bound, (
                f"{impl} {key}: {err:.2e} > {bound:.2e} (naive {errors['naive'][key]:.2e})"
            )


@pytest.mark.parametrize("kernel", [1, 3])
def test_bfloat16_smoke(kernel):
    torch.manual_seed(2)
    x = torch.randn(4, 16, 8, 8)
    ref = _randomize(FBNConv2d(16, 8, kernel, padding=kernel // 2, fbn_groups=4, impl="naive"))
    expected = ref(x)
    for impl in _impls(kernel):
        m = FBNConv2d(16, 8, kernel, padding=kernel // 2, fbn_groups=4, impl=impl)
        m.load_state_dict(ref.state_dict())
        m = m.to(torch.bfloat16)
        xb = x.to(torch.bfloat16).requires_grad_()
        y = m(xb)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(m.weight.grad.float()).all()
        torch.testing.assert_close(y.float(), expected, rtol=0.05, atol=0.1, msg=impl)
        m.eval()
        assert m(xb).dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("kernel,dilation", [(2, 1), (4, 1), ((2, 3), (1, 2)), (3, 2)])
def test_same_padding_even_kernels_match_naive(kernel, dilation):
    """padding='same' with an even extent pads right/bottom more: recompute pads x first."""
    torch.manual_seed(5)
    kw = {"padding": "same", "dilation": dilation, "fbn_groups": 3}
    ref = _randomize(FBNConv2d(10, 6, kernel, impl="naive", **kw).double())
    m = FBNConv2d(10, 6, kernel, impl="recompute", **kw).double()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(4, 10, 7, 8, dtype=F64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), m(xb)
    assert yb.shape == ya.shape == (4, 6, 7, 8)
    torch.testing.assert_close(yb, ya)
    r = torch.randn_like(ya)
    (ya * r).sum().backward()
    (yb * r).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(m.weight.grad, ref.weight.grad)
    torch.testing.assert_close(m.norm_weight.grad, ref.norm_weight.grad)


@pytest.mark.parametrize("kernel", [1, 3])
def test_cpu_autocast_keeps_float32_statistics(kernel):
    torch.manual_seed(6)
    x = torch.randn(8, 10, 8, 8)
    ref = _randomize(FBNConv2d(10, 6, kernel, padding=kernel // 2, fbn_groups=3, impl="naive"))
    expected = ref(x)
    for impl in _impls(kernel):
        m = FBNConv2d(10, 6, kernel, padding=kernel // 2, fbn_groups=3, impl=impl)
        m.load_state_dict(ref.state_dict())
        xb = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(xb)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        assert xb.grad.dtype == m.weight.grad.dtype == m.norm_weight.grad.dtype == torch.float32
        assert m.running_var.dtype == torch.float32
        torch.testing.assert_close(y.float(), expected, rtol=0.05, atol=0.1, msg=impl)


@pytest.mark.parametrize("kernel", [1, 3])
def test_running_stats_updated_once_per_forward_never_in_backward(kernel):
    torch.manual_seed(7)
    for impl in _impls(kernel):
        m = FBNConv2d(10, 6, kernel, padding=kernel // 2, fbn_groups=4, impl=impl)
        x = torch.randn(4, 10, 6, 6, requires_grad=True)
        y = m(x)
        assert int(m.num_batches_tracked) == 1
        after_forward = (m.running_mean.clone(), m.running_var.clone())
        assert not torch.equal(after_forward[0], torch.zeros_like(after_forward[0]))
        y.square().sum().backward()
        assert int(m.num_batches_tracked) == 1, impl
        assert torch.equal(m.running_mean, after_forward[0]), impl
        assert torch.equal(m.running_var, after_forward[1]), impl


# --------------------------------------------------------------------------- the module


def test_fused_weight_and_bias_is_the_eval_layer():
    torch.manual_seed(3)
    m = _randomize(FBNConv2d(8, 4, 3, padding=1, fbn_groups=2, impl="naive").double())
    for _ in range(3):
        m(torch.randn(4, 8, 6, 6, dtype=F64))
    m.eval()
    x = torch.randn(2, 8, 6, 6, dtype=F64)
    with torch.no_grad():
        w, b = m.fused_weight_and_bias()
        # by hand, from the definition: W~[o, g] = a_{g,o} W[o, g]
        a = m.norm_weight / torch.sqrt(m.running_var + m.eps)
        w_hand = torch.cat(
            [m.weight[:, g * 4 : g * 4 + 4] * a[g, :, None, None, None] for g in (0, 1)], 1
        )
        b_hand = (m.norm_bias - a * m.running_mean).sum(0)
        torch.testing.assert_close(w, w_hand)
        torch.testing.assert_close(b, b_hand)
        conv = m.to_conv()
        assert type(conv) is nn.Conv2d and conv.bias is not None
        torch.testing.assert_close(conv(x), m(x))


def test_channels_per_group_state_dict_and_repr(tmp_path):
    a = FBNConv2d(12, 6, 1, channels_per_group=4)
    assert a.fbn_groups == 3
    assert a.norm_weight.shape == a.running_var.shape == (3, 6)
    assert set(a.state_dict()) == {
        "weight",
        "norm_weight",
        "norm_bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    a(torch.randn(4, 12, 5, 5))
    torch.save(a.state_dict(), tmp_path / "fbn.pt")
    b = FBNConv2d(12, 6, 1, fbn_groups=3)
    b.load_state_dict(torch.load(tmp_path / "fbn.pt", weights_only=True))
    a.eval()
    b.eval()
    x = torch.randn(2, 12, 5, 5)
    torch.testing.assert_close(b(x), a(x))
    assert "fbn_groups=3" in repr(a) and "impl='auto'" in repr(a)
    assert FBNConv2d(4, 4, 3).resolved_impl == "recompute"
    assert FBNConv2d(4, 4, 1).resolved_impl == "cov"
    plain = FBNConv2d(4, 2, 1, affine=False)
    assert plain.norm_weight is None and set(plain.state_dict()) == {
        "weight",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    a.reset_running_stats()
    assert int(a.num_batches_tracked) == 0 and bool((a.running_var == 1).all())


@pytest.mark.parametrize("c_in", [1, 7, 8, 30, 31])
def test_uneven_groups_are_tensor_split_sizes(c_in):
    for groups in range(1, c_in + 1):
        m = FBNConv2d(c_in, 2, 1, fbn_groups=groups)
        expected = tuple(len(t) for t in torch.arange(c_in).tensor_split(groups))
        assert m.group_sizes == group_sizes(c_in, groups) == expected
        assert m.norm_weight.shape == m.running_mean.shape == (groups, 2)
        assert ("group_sizes=" in repr(m)) == (c_in % groups != 0)
    assert "fbn_groups=4, group_sizes=(8, 8, 7, 7)" in repr(FBNConv2d(30, 2, 1, fbn_groups=4))


@pytest.mark.parametrize("c_in", [1, 7, 8, 24, 30, 100])
@pytest.mark.parametrize("c", [1, 3, 7, 8, 20, 50])
def test_channels_per_group_rounds_down_to_whole_groups(c_in, c):
    """channels_per_group=c means G = max(1, C_in // c): every group holds at least c channels
    (or all of them when there are fewer than c), and c need not divide C_in (Table 6)."""
    m = FBNConv2d(c_in, 2, 1, channels_per_group=c)
    expected = max(1, c_in // c)  # by hand: as many whole groups of c as fit, at least one
    assert m.fbn_groups == fbn_group_count(c_in, channels_per_group=c) == expected
    assert sum(m.group_sizes) == c_in and min(m.group_sizes) >= min(c, c_in)
    assert max(m.group_sizes) - min(m.group_sizes) <= 1


def test_channels_per_group_gives_the_layer_of_that_many_groups():
    """A layer made with channels_per_group equals the one made with the G it means."""
    torch.manual_seed(0)
    by_size = _randomize(FBNConv2d(30, 4, 1, channels_per_group=7, impl="naive").double())
    by_count = FBNConv2d(30, 4, 1, fbn_groups=4, impl="naive").double()
    by_count.load_state_dict(by_size.state_dict())
    assert by_size.group_sizes == (8, 8, 7, 7)
    x = torch.randn(3, 30, 4, 4, dtype=F64)
    torch.testing.assert_close(by_size(x), by_count(x))


def test_errors_name_the_problem():
    with pytest.raises(UserError, match=r"fbn_groups=9 is more than the 8 input.*1 <= G <= 8"):
        FBNConv2d(8, 4, 1, fbn_groups=9)
    with pytest.raises(UserError, match=r"fbn_groups=0 is invalid: expected an int G with 1 <= G"):
        FBNConv2d(8, 4, 1, fbn_groups=0)
    with pytest.raises(UserError, match=r"fbn_groups=True is invalid"):
        FBNConv2d(8, 4, 1, fbn_groups=True)
    with pytest.raises(UserError, match=r"channels_per_group=0 is invalid: expected an int >= 1"):
        FBNConv2d(8, 4, 1, channels_per_group=0)
    with pytest.raises(UserError, match=r"fbn_groups=2 and channels_per_group=4.*only one"):
        FBNConv2d(8, 4, 1, fbn_groups=2, channels_per_group=4)
    with pytest.raises(
        UserError, match=r"kernel_size=\(1, 2, 3\) is invalid: expected an int or a"
    ):
        FBNConv2d(8, 4, (1, 2, 3))
    with pytest.raises(UserError, match=r"affine=1 is invalid: expected true or false"):
        FBNConv2d(8, 4, 1, affine=1)
    with pytest.raises(UserError, match=r"momentum=2 is invalid"):
        FBNConv2d(8, 4, 1, momentum=2)
    with pytest.raises(UserError, match=r"depthwise/grouped convs have nothing to group"):
        FBNConv2d(8, 8, 3, groups=8)
    with pytest.raises(UserError, match=r"impl='naiv'.*did you mean 'naive'"):
        FBNConv2d(8, 4, 1, impl="naiv")
    with pytest.raises(UserError, match=r"impl='cov' needs a 1x1 kernel"):
        FBNConv2d(8, 4, 3, impl="cov")
    with pytest.raises(UserError, match=r"bias"):
        FBNConv2d(8, 4, 3, bias=True)
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        FBNConv2d(8, 4, 1)(torch.randn(1, 8, 1, 1))


# ----------------------------------------------------------------------- memory: no G x


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


@pytest.mark.parametrize("channels", [32, 30])  # 30 in 4 groups: 8, 8, 7, 7
@pytest.mark.parametrize("kernel,impl", [(1, "cov"), (3, "recompute"), (1, "auto"), (3, "auto")])
def test_saved_for_backward_is_what_conv_bn_saves(kernel, impl, channels):
    torch.manual_seed(4)
    c = channels
    x = torch.randn(8, c, 16, 16, requires_grad=True)
    conv_bn = nn.Sequential(
        nn.Conv2d(c, c, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c)
    )
    base = _saved_bytes(conv_bn, x)
    naive = _saved_bytes(
        FBNConv2d(c, c, kernel, padding=kernel // 2, fbn_groups=4, impl="naive"), x
    )
    ours = _saved_bytes(FBNConv2d(c, c, kernel, padding=kernel // 2, fbn_groups=4, impl=impl), x)
    assert naive > 2 * base  # the measurement sees the G * C_out activations
    assert ours <= 1.3 * base, (ours, base, naive)


# ------------------------------------------------------------- sync_stats over 2 processes

_WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[5])
    from lightnets.nn import FBNConv2d
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if world > 1:
        dist.init_process_group("gloo", init_method="file://" + init, rank=rank,
                                world_size=world)
    results = {}
    for impl, k, groups in (("naive", 3, 2), ("cov", 1, 2), ("recompute", 3, 2),
                            ("naive", 3, 3), ("cov", 1, 3), ("recompute", 3, 3)):
        torch.manual_seed(0)
        m = FBNConv2d(8, 6, k, padding=k // 2, fbn_groups=groups, impl=impl,
                      sync_stats=True).double()
        with torch.no_grad():
            m.norm_weight.uniform_(0.5, 1.5)
            m.norm_bias.normal_()
        xs, ys, dxs = [], [], []
        for step in range(2):
            x = torch.randn(8, 8, 5, 5, dtype=torch.float64) * (step + 1)
            r = torch.randn(8, 6, 5, 5, dtype=torch.float64)
            part = slice(rank * 8 // world, (rank + 1) * 8 // world)
            x = x[part].clone().requires_grad_()
            y = m(x)
            (y * r[part]).sum().backward()
            ys.append(y.detach())
            dxs.append(x.grad)
        grads = {}
        for name, p in m.named_parameters():
            g = p.grad.clone()
            if world > 1:
                dist.all_reduce(g)  # what DDP does (up to its 1/world)
            grads[name] = g
        results[f"{impl}-G{groups}"] = {"y": ys, "dx": dxs, "grads": grads,
                         "running_mean": m.running_mean, "running_var": m.running_var,
                         "n": int(m.num_batches_tracked)}
    torch.save(results, out)
    if world > 1:
        dist.barrier()  # no rank tears gloo down while its peer still talks to it
        dist.destroy_process_group()
        # and no C++ static teardown at interpreter exit, where gloo can still abort
        # ("terminate called without an active exception") under load: the work is saved
        import os
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)
    """
)


def test_sync_stats_two_processes_equal_one_process_on_the_whole_batch(tmp_path, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")

    def launch(rank: int, world: int, out: Path) -> subprocess.Popen:
        args = [str(rank), str(world), str(tmp_path / "init"), str(out), str(REPO)]
        return subprocess.Popen(
            [sys.executable, str(script), *args], env=env, stderr=subprocess.PIPE, text=True
        )

    procs = [launch(r, 2, tmp_path / f"rank{r}.pt") for r in range(2)]
    # The reference: the same script, one process, the whole batch (here, while they run).
    single_args = ["0", "1", str(tmp_path / "unused"), str(tmp_path / "single.pt"), str(REPO)]
    monkeypatch.setattr(sys, "argv", [str(script), *single_args])
    runpy.run_path(str(script), run_name="__main__")
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    close = {"rtol": 1e-5, "atol": 1e-5}
    for impl, ref in single.items():
        for step in range(2):
            for key in ("y", "dx"):
                got = torch.cat([ranks[0][impl][key][step], ranks[1][impl][key][step]])
                torch.testing.assert_close(got, ref[key][step], **close, msg=f"{impl} {key}")
        for rank in ranks:
            for name, g in ref["grads"].items():
                torch.testing.assert_close(rank[impl]["grads"][name], g, **close, msg=name)
            for key in ("running_mean", "running_var"):
                torch.testing.assert_close(rank[impl][key], ref[key], **close, msg=key)
            assert rank[impl]["n"] == 2
