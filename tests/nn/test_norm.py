"""make_norm and its layers against independent references: the GN paper's equations written out
here, torch's own GroupNorm / layer_norm / instance_norm / BatchNorm, and Batch Renorm's formula."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightnets.errors import UserError
from lightnets.nn import (
    LAYER_NORM_KINDS,
    NORM_KINDS,
    BatchRenorm,
    FBNConv2d,
    FBNNormSlot,
    FrozenBatchNorm,
    NormSpec,
    make_norm,
)
from lightnets.optim import param_groups

torch.set_num_threads(1)

SHAPES = {1: (4, 6, 5), 2: (3, 6, 4, 5), 3: (2, 6, 3, 4, 2)}  # (N, C, *spatial) per dims


def _x(shape, seed=0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype) * 2 + 0.5).contiguous()


def _per_channel(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def gn_reference(x, num_groups, gamma, beta, eps=1e-5):
    """GN paper eq. (1), (2), (7), (6), literally: for each i, S_i = {k | k_N = i_N,
    floor(k_C / (C/G)) = floor(i_C / (C/G))}; x_hat = (x - mu) / sigma, y = gamma x_hat + beta."""
    n, c = x.shape[:2]
    per = c // num_groups
    out = torch.empty_like(x)
    for i_n in range(n):
        for g in range(num_groups):
            members = [k for k in range(c) if k // per == g]  # eq. (7)
            s = x[i_n, members]
            m = s.numel()
            mu = s.sum() / m  # eq. (2)
            sigma = torch.sqrt(((s - mu) ** 2).sum() / m + eps)
            out[i_n, members] = (s - mu) / sigma  # eq. (1)
    return out * _per_channel(x, gamma) + _per_channel(x, beta)  # eq. (6)


def _affine(c, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.rand(c, generator=g, dtype=dtype) + 0.5,
        torch.randn(c, generator=g, dtype=dtype),
    )


def _set_affine(layer: nn.Module, gamma, beta) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(gamma)
        layer.bias.copy_(beta)
    return layer


# ----------------------------------------------------------------------------------- GN/LN/IN


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_gn_is_the_papers_equations_and_torch_groupnorm(dims, groups):
    x = _x(SHAPES[dims])
    gamma, beta = _affine(6)
    gn = _set_affine(make_norm("gn", 6, num_groups=groups, dims=dims).double(), gamma, beta)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == groups
    expected = gn_reference(x, groups, gamma, beta)
    torch.testing.assert_close(gn(x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(F.group_norm(x, groups, gamma, beta, 1e-5), expected)


def test_gn_default_groups_and_channels_per_group():
    assert make_norm("gn", 64).num_groups == 32  # the paper's default G
    assert make_norm("gn", 64, channels_per_group=16).num_groups == 4  # G = C / c
    assert make_norm("gn", 64, num_groups=8, eps=1e-3).eps == 1e-3
    assert not make_norm("gn", 64, affine=False).affine


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 4),
    c_per=st.integers(1, 4),
    groups=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_gn_matches_reference_for_any_shape_and_groups(n, c_per, groups, spatial, seed):
    c = c_per * groups
    x = _x((n, c, *spatial), seed)
    gamma, beta = _affine(c, seed + 1)
    gn = _set_affine(make_norm("gn", c, num_groups=groups).double(), gamma, beta)
    torch.testing.assert_close(gn(x), gn_reference(x, groups, gamma, beta), rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["gn", "ln", "in"]),
    n=st.integers(2, 5),
    spatial=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    perm_seed=st.integers(0, 2**16),
)
def test_each_sample_is_normalized_independently_of_the_batch(kind, n, spatial, perm_seed):
    if kind == "in" and all(size == 1 for size in spatial):
        spatial = [2, *spatial[1:]]  # torch refuses groups of one value (nothing to normalize)
    x = _x((n, 8, *spatial), perm_seed, torch.float32)
    layer = make_norm(kind, 8, num_groups=4) if kind == "gn" else make_norm(kind, 8)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(n)])
    torch.testing.assert_close(layer(x), alone, rtol=1e-5, atol=1e-5)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed))
    torch.testing.assert_close(layer(x[perm]), alone[perm], rtol=1e-5, atol=1e-5)
    other = x.clone()
    other[1:] = _x(other[1:].shape, perm_seed + 1, torch.float32) * 10 - 3  # replace the rest
    torch.testing.assert_close(layer(other)[0], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_ln_is_gn_with_one_group_and_layer_norm_with_per_channel_affine(dims):
    x = _x(SHAPES[dims])
    gamma, beta = _affine(6)
    expected = F.layer_norm(x, x.shape[1:], eps=1e-5)  # over (C, *spatial), no affine
    expected = expected * _per_channel(x, gamma) + _per_channel(x, beta)
    ln = _set_affine(make_norm("ln", 6, dims=dims).double(), gamma, beta)
    gn1 = _set_affine(make_norm("gn", 6, num_groups=1).double(), gamma, beta)
    torch.testing.assert_close(ln(x), expected)
    torch.testing.assert_close(gn1(x), expected)
    assert ln.weight.shape == (6,)  # per channel, not per (C, H, W) element


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_in_is_gn_with_c_groups_and_instance_norm(dims):
    x = _x(SHAPES[dims])
    gamma, beta = _affine(6)
    expected = F.instance_norm(x, weight=gamma, bias=beta, eps=1e-5)
    inn = _set_affine(make_norm("in", 6, dims=dims).double(), gamma, beta)
    gnc = _set_affine(make_norm("gn", 6, num_groups=6).double(), gamma, beta)
    torch.testing.assert_close(inn(x), expected)
    torch.testing.assert_close(gnc(x), expected)


# ------------------------------------------------------------------------------------ kinds


@pytest.mark.parametrize(
    "dims, cls", [(1, nn.BatchNorm1d), (2, nn.BatchNorm2d), (3, nn.BatchNorm3d)]
)
def test_kinds_build_and_run_in_every_dims(dims, cls):
    assert type(make_norm("bn", 6, dims=dims)) is cls
    x = _x(SHAPES[dims], dtype=torch.float32)
    assert set(NORM_KINDS) == {*LAYER_NORM_KINDS, "fbn"}
    for kind in LAYER_NORM_KINDS:
        kw = {"num_groups": 3} if kind == "gn" else {}
        layer = make_norm(kind, 6, dims=dims, **kw)
        y = layer(x)
        assert y.shape == x.shape and torch.isfinite(y).all(), kind
        layer.eval()
        assert layer(x).shape == x.shape
    assert isinstance(make_norm("none", 6), nn.Identity)
    assert isinstance(make_norm("sync_bn", 6), nn.SyncBatchNorm)
    bn = make_norm("bn", 6, momentum=0.3, eps=1e-3, affine=False)
    assert (bn.momentum, bn.eps, bn.affine) == (0.3, 1e-3, False)


def test_custom_norms_are_norm_layers_for_the_optimizer():
    assert FrozenBatchNorm.is_norm_layer is True and BatchRenorm.is_norm_layer is True
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), BatchRenorm(4))
    groups = param_groups(model, weight_decay=1e-4, norm_weight_decay=0.0)
    norm_group = next(g for g in groups if g["weight_decay"] == 0.0)
    assert {id(p) for p in norm_group["params"]} == {id(model[1].weight), id(model[1].bias)}


def test_norm_spec_carries_options():
    spec = NormSpec("gn", {"num_groups": 4})
    assert spec(8).num_groups == 4 and spec(8, num_groups=2).num_groups == 2
    assert NormSpec.of(spec) is spec and NormSpec.of("bn") == NormSpec("bn")
    assert NormSpec.of(spec, eps=0.1).kwargs == {"num_groups": 4, "eps": 0.1}
    with pytest.raises(UserError, match="norm 'gnn' is unknown.*did you mean 'gn'"):
        NormSpec("gnn")
    with pytest.raises(UserError, match="norm 'gn' got unknown option 'groups'.*'num_groups'"):
        NormSpec("gn", {"groups": 4})  # option names are checked when the spec is made


def test_fbn_is_a_kind_made_with_its_conv():
    """fbn is a norm kind like the others (NormSpec, option names), but it normalizes a
    conv's partial sums: `conv_norm` makes the FBN conv and the slot where its norm stands;
    make_norm, which has no conv, refuses it and says what to use."""
    spec = NormSpec("fbn", {"fbn_groups": 2, "impl": "naive"})
    conv, norm = spec.conv_norm(8, 4, 3, 1, 1)
    assert isinstance(conv, FBNConv2d) and isinstance(norm, FBNNormSlot)
    assert (conv.fbn_groups, conv.impl, conv.padding) == (2, "naive", (1, 1))
    assert NormSpec("fbn", {"channels_per_group": 3}).conv_norm(8, 4, 1)[0].fbn_groups == 2
    conv, norm = NormSpec("gn", {"num_groups": 2}).conv_norm(8, 4, 3, 2, 1, groups=2)
    assert type(conv) is nn.Conv2d and conv.bias is None and conv.groups == 2
    assert conv.stride == (2, 2) and isinstance(norm, nn.GroupNorm) and norm.num_groups == 2
    with pytest.raises(UserError, match=r"make_norm\('fbn', 8\): fbn .* made with its conv"):
        make_norm("fbn", 8)
    with pytest.raises(UserError, match=r"made with its conv"):
        spec(8)
    with pytest.raises(UserError, match=r"norm 'fbn' got unknown option 'num_groups'"):
        NormSpec("fbn", {"num_groups": 2})
    with pytest.raises(UserError, match=r"^net layer3: FBNConv2d: fbn_groups=9 is more than"):
        NormSpec("fbn", {"fbn_groups": 9}).conv_norm(8, 4, 1, where="net layer3")


def test_errors_name_the_problem():
    with pytest.raises(UserError, match=r"norm 'bm' is unknown: expected one of bn, sync_bn.*"):
        make_norm("bm", 8)
    with pytest.raises(UserError, match="did you mean 'frozen_bn'"):
        make_norm("frozen_b", 8)
    with pytest.raises(UserError, match=r"C=48 .* G=32 .* 1, 2, 3, 4, 6, 8, 12, 16, 24, 48"):
        make_norm("gn", 48)
    with pytest.raises(UserError, match="channels_per_group=5 does not divide the C=48"):
        make_norm("gn", 48, channels_per_group=5)
    with pytest.raises(UserError, match="num_groups=8 and channels_per_group=6.*only one"):
        make_norm("gn", 48, num_groups=8, channels_per_group=6)
    with pytest.raises(UserError, match="num_groups=0"):
        make_norm("gn", 48, num_groups=0)
    with pytest.raises(UserError, match="unknown option 'num_groups'.*eps, affine"):
        make_norm("ln", 48, num_groups=2)
    with pytest.raises(UserError, match="dims=4"):
        make_norm("bn", 8, dims=4)
    with pytest.raises(UserError, match="num_channels=0"):
        make_norm("bn", 0)
    with pytest.raises(UserError, match="eps=-1"):
        make_norm("gn", 8, num_groups=2, eps=-1)
    with pytest.raises(UserError, match="momentum=2"):
        make_norm("bn", 8, momentum=2)
    with pytest.raises(UserError, match="r_max=0.5"):
        make_norm("brn", 8, r_max=0.5)
    with pytest.raises(UserError, match="warmup_steps=-1"):
        make_norm("brn", 8, warmup_steps=-1)
    with pytest.raises(UserError, match="no running statistics"):
        FrozenBatchNorm.from_bn(nn.BatchNorm2d(4, track_running_stats=False))


# --------------------------------------------------------------------------------- frozen BN


def _trained_bn(cls, c=6, affine=True, seed=0):
    torch.manual_seed(seed)
    bn = cls(c, affine=affine)
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return bn


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_frozen_bn_equals_the_eval_bn_it_came_from(dims, affine):
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    bn = _trained_bn(cls, affine=affine).train()
    frozen = FrozenBatchNorm.from_bn(bn)
    assert frozen.dims == dims and list(frozen.parameters()) == []
    x = _x(SHAPES[dims], dtype=torch.float32).requires_grad_()
    y = frozen(x)  # training mode too: nothing depends on the batch
    torch.testing.assert_close(y, bn.eval()(x), rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(y.sum(), x)
    scale = bn.weight if affine else torch.ones(6)
    expected = scale / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(g, _per_channel(x, expected).expand_as(x))
    if dims == 1:  # (N, C) features too
        x2 = _x((5, 6), dtype=torch.float32)
        torch.testing.assert_close(frozen(x2), bn(x2), rtol=1e-5, atol=1e-6)


def test_frozen_bn_loads_a_bn_state_dict_and_is_a_per_channel_linear_map():
    bn = _trained_bn(nn.BatchNorm2d)
    frozen = make_norm("frozen_bn", 6)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    x = _x(SHAPES[2], dtype=torch.float32)
    torch.testing.assert_close(frozen(x), bn.eval()(x), rtol=1e-5, atol=1e-6)
    scale, shift = frozen.scale_shift()
    torch.testing.assert_close(frozen(x), x * _per_channel(x, scale) + _per_channel(x, shift))
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}


def test_frozen_bn_and_brn_run_in_bfloat16():
    x = _x(SHAPES[2], dtype=torch.bfloat16)
    for layer in (FrozenBatchNorm.from_bn(_trained_bn(nn.BatchNorm2d)), BatchRenorm(6)):
        y = layer.to(torch.bfloat16)(x)
        assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


# ------------------------------------------------------------------------------------- BRN


def _steps(layer, xs):
    """Outputs and input/affine gradients for a sequence of training batches."""
    outs = []
    for i, x in enumerate(xs):
        x = x.clone().requires_grad_()
        y = layer(x)
        w = _x(y.shape, 100 + i, y.dtype)  # a loss that weighs every output differently
        params = [x] + [p for p in (layer.weight, layer.bias) if p is not None]
        grads = torch.autograd.grad((y * w).sum(), params)
        outs.append((y.detach(), *grads))
    return outs


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_brn_with_r_max_1_d_max_0_is_batch_norm(dims, affine):
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    bn = _trained_bn(cls, affine=affine).double().train()
    brn = BatchRenorm(6, affine=affine, r_max=1.0, d_max=0.0, warmup_steps=0, relax_steps=0)
    brn.double().load_state_dict(bn.state_dict())
    xs = [_x(SHAPES[dims], s) for s in range(3)]
    for got, want in zip(_steps(brn, xs), _steps(bn, xs)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(brn.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(brn.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
    assert int(brn.num_batches_tracked) == int(bn.num_batches_tracked)
    brn.eval(), bn.eval()
    torch.testing.assert_close(brn(xs[0]), bn(xs[0]), rtol=1e-12, atol=1e-12)


def test_brn_in_its_warmup_is_batch_norm_momentum_none_included():
    bn = nn.BatchNorm2d(6, momentum=None).double()
    brn = make_norm("brn", 6, momentum=None, warmup_steps=10).double()  # default r_max 3, d 5
    xs = [_x(SHAPES[2], s) * (s + 1) for s in range(4)]
    for got, want in zip(_steps(brn, xs), _steps(bn, xs)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(brn.running_var, bn.running_var, rtol=1e-12, atol=1e-12)


def brn_reference(x, mean, var, gamma, beta, r_max, d_max, momentum, eps=1e-5):
    """Ioffe (2017), Algorithm 1, written out: output (r, d stop-gradient) and new statistics."""
    reduce = [0, *range(2, x.dim())]
    m = x[:, 0].numel()
    mu_b = x.sum(reduce) / m
    centered = x - _per_channel(x, mu_b)
    var_b = (centered**2).sum(reduce) / m
    sigma_b = torch.sqrt(var_b + eps)
    sigma = torch.sqrt(var + eps)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max).detach()
    d = torch.clamp((mu_b - mean) / sigma, -d_max, d_max).detach()
    x_hat = centered / _per_channel(x, sigma_b) * _per_channel(x, r) + _per_channel(x, d)
    y = _per_channel(x, gamma) * x_hat + _per_channel(x, beta)
    new_mean = mean + momentum * (mu_b.detach() - mean)
    new_var = var + momentum * (var_b.detach() * m / (m - 1) - var)
    return y, new_mean, new_var, r, d


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_brn_with_active_limits_matches_the_formula(dims):
    gamma, beta = _affine(6)
    brn = BatchRenorm(6, r_max=1.5, d_max=0.5, warmup_steps=0, relax_steps=0, momentum=0.2)
    brn = _set_affine(brn.double(), gamma, beta)
    with torch.no_grad():  # running statistics off the batch's so that r and d are clipped
        brn.running_mean.copy_(torch.linspace(-1, 2, 6, dtype=torch.float64))
        brn.running_var.copy_(torch.linspace(0.3, 9, 6, dtype=torch.float64))
    mean, var = brn.running_mean.clone(), brn.running_var.clone()
    g, b = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    for step in range(3):
        x = _x(SHAPES[dims], step).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y = brn(x)
        y_ref, mean, var, r, d = brn_reference(x_ref, mean, var, g, b, 1.5, 0.5, 0.2)
        if step == 0:  # the clips are active somewhere, but not everywhere
            assert (r == 1.5).any() or (r == 1 / 1.5).any()
            assert (d.abs() == 0.5).any() and (d.abs() < 0.5).any()
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        w = _x(y.shape, 50 + step)
        got = torch.autograd.grad((y * w).sum(), [x, brn.weight, brn.bias])
        want = torch.autograd.grad((y_ref * w).sum(), [x_ref, g, b])
        for a, c in zip(got, want):
            torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(brn.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(brn.running_var, var, rtol=1e-12, atol=1e-12)
    brn.eval()
    x = _x(SHAPES[dims], 9)
    expected = (x - _per_channel(x, mean)) / _per_channel(x, torch.sqrt(var + 1e-5))
    expected = expected * _per_channel(x, gamma) + _per_channel(x, beta)
    torch.testing.assert_close(brn(x), expected.detach(), rtol=1e-10, atol=1e-10)


def test_brn_schedule_is_explicit_and_survives_save_load():
    brn = BatchRenorm(4, r_max=3.0, d_max=5.0, warmup_steps=10, relax_steps=20)
    assert brn.limits(0) == (1.0, 0.0) and brn.limits(9) == (1.0, 0.0)
    assert brn.limits(10) == (1.0, 0.0)
    assert brn.limits(20) == pytest.approx((2.0, 2.5))
    assert brn.limits(30) == (3.0, 5.0) and brn.limits(10_000) == (3.0, 5.0)
    assert BatchRenorm(4, warmup_steps=3, relax_steps=0).limits(3) == (3.0, 5.0)
    x = _x((8, 4, 3, 3), dtype=torch.float32)
    for _ in range(15):
        brn(x)
    assert int(brn.num_batches_tracked) == 15 and brn.limits() == pytest.approx((1.5, 1.25))
    again = BatchRenorm(4, r_max=3.0, d_max=5.0, warmup_steps=10, relax_steps=20)
    again.load_state_dict(copy.deepcopy(brn.state_dict()))
    assert again.limits() == brn.limits()
    brn.eval()
    brn(x)  # eval does not count
    assert int(brn.num_batches_tracked) == 15


@pytest.mark.parametrize("regime", ["bn", "clipped", "affine_only"])
def test_brn_gradcheck_float64(regime):
    torch.manual_seed(0)
    # momentum 0: running statistics (and so r, d) stay the same over gradcheck's evaluations
    limits = {"bn": (1.0, 0.0), "clipped": (1.2, 0.1), "affine_only": (3.0, 5.0)}[regime]
    brn = BatchRenorm(3, r_max=limits[0], d_max=limits[1], warmup_steps=0, relax_steps=0)
    brn.momentum = 0.0
    brn = brn.double()
    with torch.no_grad():
        brn.weight.uniform_(0.5, 1.5)
        brn.bias.normal_()
        if regime == "clipped":  # far from the batch: r and d sit on their clips
            brn.running_mean.fill_(5.0)
            brn.running_var.fill_(40.0)
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64)
    w, b = brn.weight.detach().clone(), brn.bias.detach().clone()

    def fn(x_, w_, b_):  # gamma and beta as inputs of the function
        layer = copy.deepcopy(brn)
        del layer.weight, layer.bias
        layer.weight, layer.bias = w_, b_
        return layer(x_)

    if regime == "affine_only":  # r, d depend on x (stop-gradient): check gamma, beta only
        inputs = (w.requires_grad_(), b.requires_grad_())
        assert torch.autograd.gradcheck(lambda w_, b_: fn(x, w_, b_), inputs)
    else:  # r, d constant near x: the stop-gradient is the true derivative
        inputs = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
        assert torch.autograd.gradcheck(fn, inputs)
