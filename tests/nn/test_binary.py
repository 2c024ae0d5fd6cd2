"""Binary quantizers and layers against hand-computed values and torch's F.conv2d / F.linear."""

from __future__ import annotations

import copy
import functools
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lightnets as ln
from lightnets.errors import UserError
from lightnets.nn import (
    BinaryConv2d,
    BinaryLinear,
    approx_sign,
    clip_latent_weights_,
    get_quantizer,
    hard_sigmoid,
    is_binary_parameter,
    ste_sign,
    stochastic_sign,
)

X = [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]
SIGN_X = [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]
UPSTREAM = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # distinct, so a mask shows where it applies


def sign(x: torch.Tensor) -> torch.Tensor:
    """The reference sign: +1 for x >= 0, -1 otherwise, in x's dtype."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def grad_of(quantizer, x_values, dtype=torch.float64, **kwargs):
    x = torch.tensor(x_values, dtype=dtype, requires_grad=True)
    y = quantizer(x, **kwargs)
    y.backward(torch.tensor(UPSTREAM, dtype=dtype))
    return y.detach(), x.grad


# ----------------------------------------------------------------------------- quantizers


@pytest.mark.parametrize(
    "clip, passed",
    [
        (1.0, [0, 1, 1, 1, 1, 1, 0]),  # |x| <= 1, inclusive
        (None, [1, 1, 1, 1, 1, 1, 1]),
        (0.5, [0, 0, 1, 1, 1, 0, 0]),
        (3, [1, 1, 1, 1, 1, 1, 1]),
    ],
)
def test_ste_sign_forward_and_gradient(clip, passed):
    y, g = grad_of(ste_sign, X, clip_value=clip)
    assert y.tolist() == SIGN_X
    assert g.tolist() == [u * k for u, k in zip(UPSTREAM, passed)]


def test_ste_sign_default_clip_is_one():
    _, g = grad_of(ste_sign, X)
    assert g.tolist() == [0, 2, 3, 4, 5, 6, 0]


def test_approx_sign_forward_and_gradient():
    y, g = grad_of(approx_sign, X)
    assert y.tolist() == SIGN_X
    # 2 - 2|x| on |x| < 1, else 0: x = -2, -1, -0.5, 0, 0.5, 1, 2
    bi_real = [0.0, 0.0, 1.0, 2.0, 1.0, 0.0, 0.0]
    assert g.tolist() == [u * d for u, d in zip(UPSTREAM, bi_real)]
    x = torch.tensor([-0.25, 0.75], dtype=torch.float64, requires_grad=True)
    approx_sign(x).backward(torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert x.grad.tolist() == [1 * 1.5, 2 * 0.5]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize(
    "quantizer",
    [
        ste_sign,
        approx_sign,
        stochastic_sign,
        functools.partial(stochastic_sign, training=False),
        ln.nn.swish_sign,
    ],
)
def test_quantizers_output_exactly_plus_minus_one_in_input_dtype(quantizer, dtype):
    x = torch.randn(257, dtype=dtype)
    x[:5] = 0
    y = quantizer(x)
    assert y.dtype == dtype
    assert bool(((y == 1) | (y == -1)).all())
    if quantizer is not stochastic_sign:
        assert torch.equal(y, sign(x))


def test_hard_sigmoid_by_hand():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.4, 1.0, 5.0])
    assert hard_sigmoid(x).tolist() == pytest.approx([0, 0, 0.25, 0.5, 0.7, 1, 1])


def test_stochastic_sign_frequency_matches_hard_sigmoid():
    values = [-1.5, -1.0, -0.6, -0.2, 0.0, 0.3, 0.9, 1.0, 2.0]
    expected = [0.0, 0.0, 0.2, 0.4, 0.5, 0.65, 0.95, 1.0, 1.0]  # clip((x + 1) / 2, 0, 1)
    n = 40_000
    x = torch.tensor(values).expand(n, -1)
    gen = torch.Generator().manual_seed(1234)
    y = stochastic_sign(x, training=True, generator=gen)
    assert bool(((y == 1) | (y == -1)).all())
    freq = (y == 1).double().mean(0).tolist()
    for f, p in zip(freq, expected):
        assert abs(f - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12, (f, p)


def test_stochastic_sign_generator_reproducible_and_eval_deterministic():
    x = torch.randn(1000)
    a = stochastic_sign(x, generator=torch.Generator().manual_seed(7))
    b = stochastic_sign(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, sign(x))  # 1000 draws with p strictly inside (0, 1)
    for _ in range(3):
        assert torch.equal(stochastic_sign(x, training=False), sign(x))


def test_stochastic_sign_gradient_is_clipped_ste():
    for training in (True, False):
        _, g = grad_of(stochastic_sign, X, training=training)
        assert g.tolist() == [0, 2, 3, 4, 5, 6, 0]


def test_get_quantizer_resolves_names_callables_none():
    assert get_quantizer("ste_sign") is ste_sign
    assert get_quantizer("approx_sign") is approx_sign
    assert get_quantizer("stochastic_sign") is stochastic_sign
    assert get_quantizer(torch.tanh) is torch.tanh
    x = torch.randn(4)
    assert get_quantizer(None)(x) is x


def test_get_quantizer_refuses_unknown_names_and_types():
    with pytest.raises(UserError, match="did you mean 'ste_sign'.*approx_sign.*ste_sign"):
        get_quantizer("ste_sgn")
    with pytest.raises(UserError, match="int"):
        get_quantizer(3)


@pytest.mark.parametrize("clip", [0, -1.0, float("inf"), "1", True])
def test_ste_sign_refuses_bad_clip(clip):
    with pytest.raises(UserError, match="clip_value"):
        ste_sign(torch.randn(3), clip_value=clip)


# ----------------------------------------------------------------------------- layers


def with_zeros(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x.view(-1)[::7] = 0  # sign(0) = +1 must be exercised
    return x


def test_binary_conv2d_latent_equals_conv_of_signs_forward_and_backward():
    torch.manual_seed(0)
    layer = BinaryConv2d(3, 5, 3, stride=2, padding=1, bias=True, input_quantizer="ste_sign")
    with torch.no_grad():
        layer.weight.mul_(10)  # about half the latent weights outside [-1, 1]
        layer.weight.view(-1)[:4] = torch.tensor([1.0, -1.0, 0.0, 1.5])
    x = with_zeros(torch.randn(2, 3, 9, 8) * 2).requires_grad_()
    out = layer(x)

    xb = sign(x.detach()).requires_grad_()
    wb = sign(layer.weight.detach()).requires_grad_()
    ref = F.conv2d(xb, wb, layer.bias.detach(), stride=2, padding=1)
    assert torch.equal(out, ref)

    upstream = torch.randn_like(out)
    out.backward(upstream)
    ref.backward(upstream)
    w = layer.weight.detach()
    assert torch.allclose(layer.weight.grad, wb.grad * (w.abs() <= 1), atol=1e-6)
    assert torch.allclose(x.grad, xb.grad * (x.detach().abs() <= 1), atol=1e-6)


def test_binary_conv2d_first_layer_takes_real_input():
    torch.manual_seed(1)
    layer = BinaryConv2d(1, 4, 3, padding=1)  # input_quantizer=None by default
    x = torch.randn(2, 1, 6, 6)
    assert torch.allclose(layer(x), F.conv2d(x, sign(layer.weight.detach()), padding=1))


def test_binary_linear_equals_linear_of_signs():
    torch.manual_seed(2)
    layer = BinaryLinear(7, 3, bias=True, input_quantizer="ste_sign")
    x = with_zeros(torch.randn(4, 7))
    ref = F.linear(sign(x), sign(layer.weight.detach()), layer.bias.detach())
    assert torch.allclose(layer(x), ref, atol=1e-6)


def test_full_precision_quantizers_equal_torch_layers():
    torch.manual_seed(3)
    binary = BinaryConv2d(3, 4, 3, padding=1, bias=True, kernel_quantizer=None)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    conv.load_state_dict(binary.state_dict())
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(binary(x), conv(x))
    lin = BinaryLinear(3, 2, kernel_quantizer=None)
    assert torch.equal(lin(x[:, :, 0, 0]), F.linear(x[:, :, 0, 0], lin.weight))


def test_approx_sign_kernel_gradient_in_latent_mode():
    layer = BinaryLinear(4, 1, kernel_quantizer="approx_sign")
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-2.0, -0.5, 0.25, 1.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    layer(x).sum().backward()
    # d out / d sign(w) = x; times max(2 - 2|w|, 0)
    assert layer.weight.grad.tolist() == [[0.0, 2.0 * 1.0, 3.0 * 1.5, 0.0]]


def test_stochastic_input_quantizer_follows_train_and_eval():
    torch.manual_seed(4)
    layer = BinaryLinear(64, 3, input_quantizer="stochastic_sign")
    x = torch.rand(8, 64) * 1.6 - 0.8  # inside (-1, 1): every entry is random in training
    det = F.linear(sign(x), sign(layer.weight.detach()))
    layer.train()
    assert not torch.equal(layer(x), det)
    layer.eval()
    assert torch.equal(layer(x), det)


def test_layers_pass_training_to_quantizers_that_take_it():
    seen = []

    def recording(x, training):
        seen.append(training)
        return sign(x)

    def plain(x):
        seen.append("plain")
        return sign(x)

    layer = BinaryLinear(3, 2, input_quantizer=recording, kernel_quantizer=plain)
    x = torch.randn(2, 3)
    layer.train()
    layer(x)
    layer.eval()
    layer(x)
    assert seen == [True, "plain", False, "plain"]
    assert "input_quantizer=recording" in repr(layer)


def test_bop_mode_weight_is_sign_of_he_normal():
    torch.manual_seed(5)
    layer = BinaryConv2d(6, 8, 3, mode="bop")
    torch.manual_seed(5)
    draw = torch.empty(8, 6, 3, 3)
    nn.init.kaiming_normal_(draw, mode="fan_in", nonlinearity="relu")
    assert torch.equal(layer.weight.detach(), torch.where(draw >= 0, 1.0, -1.0))
    assert layer.weight.dtype == torch.float32
    lin = BinaryLinear(20, 10, mode="bop", dtype=torch.float64)
    assert lin.weight.dtype == torch.float64
    assert bool(((lin.weight == 1) | (lin.weight == -1)).all())


def test_bop_mode_uses_weight_as_is_with_full_gradient():
    torch.manual_seed(6)
    layer = BinaryConv2d(2, 3, 3, padding=1, mode="bop", input_quantizer="ste_sign")
    x = with_zeros(torch.randn(2, 2, 5, 5))
    out = layer(x)
    w = layer.weight.detach().clone().requires_grad_()
    ref = F.conv2d(sign(x), w, padding=1)
    assert torch.equal(out, ref)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    ref.backward(upstream)
    assert torch.allclose(layer.weight.grad, w.grad)
    none = BinaryConv2d(2, 3, 3, padding=1, mode="bop", kernel_quantizer=None)
    assert none.kernel_quantizer is None


def test_clip_latent_weights():
    model = nn.Sequential(
        BinaryConv2d(1, 2, 1, clip_weights=True),
        BinaryLinear(2, 2),
        BinaryLinear(2, 2, clip_weights=True),
        BinaryLinear(2, 2, mode="bop"),
    )
    with torch.no_grad():
        for layer in model[:3]:
            layer.weight.copy_(torch.linspace(-3, 3, layer.weight.numel()).view_as(layer.weight))
    before = [layer.weight.detach().clone() for layer in model]
    assert clip_latent_weights_(model) == 2
    assert model[0].weight.flatten().tolist() == [-1.0, 1.0]
    assert model[2].weight.flatten().tolist() == [-1.0, -1.0, 1.0, 1.0]
    assert torch.equal(model[1].weight, before[1])  # no clip_weights
    assert torch.equal(model[3].weight, before[3])  # bop
    assert model[1].clip_latent_weights_() is False


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "bopp"}, "did you mean 'bop'"),
        ({"mode": "bop", "kernel_quantizer": "approx_sign"}, "expected 'ste_sign' or None"),
        ({"mode": "bop", "kernel_quantizer": torch.sign}, "expected 'ste_sign' or None"),
        ({"mode": "bop", "clip_weights": True}, "clip_weights"),
        ({"clip_weights": 1}, "clip_weights"),
        ({"input_quantizer": "sign"}, "unknown quantizer 'sign'"),
        ({"kernel_quantizer": nn.Hardtanh()}, "is a module"),
    ],
)
def test_bad_layer_arguments(kwargs, match):
    with pytest.raises(UserError, match=match):
        BinaryConv2d(2, 2, 3, **kwargs)
    with pytest.raises(UserError, match=match):
        BinaryLinear(2, 2, **kwargs)


def test_extra_repr_shows_quantizers_and_mode():
    text = repr(BinaryConv2d(3, 4, 3, input_quantizer="ste_sign", mode="bop"))
    assert "input_quantizer='ste_sign'" in text
    assert "kernel_quantizer='ste_sign'" in text
    assert "mode='bop'" in text
    text = repr(BinaryLinear(3, 4, kernel_quantizer="approx_sign", clip_weights=True))
    assert "input_quantizer=None, kernel_quantizer='approx_sign', mode='latent'" in text
    assert "clip_weights=True" in text


def test_quantizers_can_be_changed_after_construction():
    layer = BinaryLinear(3, 2)
    x = torch.randn(4, 3)
    layer.input_quantizer = "ste_sign"
    assert "input_quantizer='ste_sign'" in repr(layer)
    assert torch.equal(layer(x), F.linear(sign(x), sign(layer.weight.detach())))
    bop = BinaryLinear(3, 2, mode="bop")
    with pytest.raises(UserError, match="mode='bop'"):
        bop.kernel_quantizer = "approx_sign"
    assert bop.kernel_quantizer == "ste_sign"


def test_state_dict_keys_and_bop_checkpoint_check():
    conv = BinaryConv2d(2, 3, 3, bias=True, mode="bop")
    assert list(conv.state_dict()) == ["weight", "bias"]
    assert list(BinaryLinear(2, 3).state_dict()) == ["weight"]
    real = nn.Conv2d(2, 3, 3)
    latent = BinaryConv2d(2, 3, 3, bias=True)
    latent.load_state_dict(real.state_dict())  # a latent layer loads any conv weights
    with pytest.raises(UserError, match="weight in the state_dict has values other than"):
        conv.load_state_dict(real.state_dict())


# ----------------------------------------------------------------------------- marking


def mixed_model() -> nn.Sequential:
    return nn.Sequential(
        BinaryConv2d(1, 4, 3, padding=1, mode="bop", bias=True),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        BinaryLinear(4 * 4 * 4, 10, input_quantizer="ste_sign"),
        BinaryLinear(10, 2, mode="bop", input_quantizer="ste_sign"),
    )


def marks(model: nn.Sequential) -> list[bool]:
    return [is_binary_parameter(p) for p in model.parameters()]


EXPECTED_MARKS = [True, False, False, False, False, True]  # conv w, conv b, bn w, bn b, lat, bop


def test_is_binary_parameter_marks_bop_weights_only():
    model = mixed_model()
    assert marks(model) == EXPECTED_MARKS
    assert not is_binary_parameter(torch.ones(3))
    assert not is_binary_parameter(nn.Parameter(model[0].weight.detach().clone()))
    plain = nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        plain.weight.fill_(1)  # +1 values alone do not make a weight binary
    assert not is_binary_parameter(plain.weight)
    assert list(model[0].binary_parameters()) == [model[0].weight]
    assert list(model[3].binary_parameters()) == []


def test_marking_survives_deepcopy_to_load_and_pickle():
    model = mixed_model()
    clone = copy.deepcopy(model)
    assert clone[0].weight is not model[0].weight
    assert marks(clone) == EXPECTED_MARKS
    assert marks(model) == EXPECTED_MARKS

    assert marks(model.to(torch.float64)) == EXPECTED_MARKS
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        assert marks(model.to(torch.float32)) == EXPECTED_MARKS
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)

    fresh = mixed_model()
    fresh.load_state_dict(clone.state_dict())
    assert marks(fresh) == EXPECTED_MARKS
    fresh.load_state_dict(clone.state_dict(), assign=True)
    assert fresh[0].weight is not None and torch.equal(fresh[0].weight, clone[0].weight)
    assert marks(fresh) == EXPECTED_MARKS

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert marks(loaded) == EXPECTED_MARKS


# ----------------------------------------------------------------------------- deploy / profile


def test_fuse_leaves_binary_layers_and_profile_counts_them():
    torch.manual_seed(8)
    model = mixed_model()
    model.train()
    model(torch.randn(8, 1, 4, 4))
    model.eval()
    with pytest.warns(UserWarning, match="kept 1 BatchNorm .* follow a binary layer: 1 "):
        fused = ln.fuse(model)
    x = torch.randn(3, 1, 4, 4)
    assert torch.equal(fused(x), model(x))
    assert isinstance(fused[0], BinaryConv2d) and bool((fused[0].weight.abs() == 1).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # profiled packed: nothing to warn about
        prof = ln.profile(model, (1, 1, 4, 4))
    # conv: 16 pixels x 4 outputs x 9 taps; linears 64 x 10 and 10 x 2
    assert prof.macs == prof.fused_macs == 16 * 4 * 9 + 64 * 10 + 10 * 2
    assert prof.params == sum(p.numel() for p in model.parameters())
    assert prof.binary_weights == 4 * 9 + 64 * 10 + 10 * 2  # every layer is binary here
    assert prof.fused_by == "lightnets.pack_binary + fuse"


# ----------------------------------------------------------------------------- property


@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 2))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, 2))
    dilation = draw(st.integers(1, 2))
    span = dilation * (k - 1) + 1
    h = draw(st.integers(max(1, span - 2 * padding), 9))
    w = draw(st.integers(max(1, span - 2 * padding), 9))
    n = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    return groups, cin, cout, k, stride, padding, dilation, (n, cin, h, w), dtype, seed


@settings(max_examples=60, deadline=None)
@given(conv_cases())
def test_binary_conv2d_is_conv_of_signs(case):
    groups, cin, cout, k, stride, padding, dilation, shape, dtype, seed = case
    gen = torch.Generator().manual_seed(seed)
    layer = BinaryConv2d(
        cin,
        cout,
        k,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        input_quantizer="ste_sign",
        dtype=dtype,
    )
    x = torch.randn(shape, generator=gen).to(dtype)
    x.view(-1)[:: max(1, x.numel() // 3)] = 0
    # Sums of at most 3*3*3 = 27 products of +-1 are exact in every dtype tried.
    ref = F.conv2d(
        sign(x.double()),
        sign(layer.weight.detach().double()),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    out = layer(x)
    assert out.dtype == dtype
    assert torch.equal(out.double(), ref)


# ----------------------------------------------------------------------------- larq's other two


@pytest.mark.parametrize("beta", [5.0, 1.0, 10.0])
def test_swish_sign_forward_is_sign_and_gradient_is_bnn_plus_derivative(beta):
    """d/dx of BNN+'s SS_beta(x) = 2 sigmoid(beta x)(1 + beta x (1 - sigmoid(beta x))) - 1,
    by autograd through that definition in float64, against swish_sign's backward."""
    x = torch.linspace(-2, 2, 81, dtype=torch.float64, requires_grad=True)
    y = ln.nn.swish_sign(x, beta=beta)
    assert torch.equal(y, torch.where(x < 0, -1.0, 1.0).double())
    (grad,) = torch.autograd.grad(y.sum(), x)
    z = x.detach().clone().requires_grad_(True)
    s = torch.sigmoid(beta * z)
    smooth = 2 * s * (1 + beta * z * (1 - s)) - 1
    (ref,) = torch.autograd.grad(smooth.sum(), z)
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12)
    assert grad[40] == pytest.approx(beta)  # at 0: beta (2 - 0) / (1 + 1)
    big = torch.tensor([-100.0, 100.0], requires_grad=True)  # cosh overflows: gradient 0
    (g,) = torch.autograd.grad(ln.nn.swish_sign(big).sum(), big)
    assert g.tolist() == [0.0, 0.0]


def test_swish_sign_refuses_a_bad_beta():
    with pytest.raises(UserError, match="beta"):
        ln.nn.swish_sign(torch.zeros(2), beta=0)


def test_magnitude_aware_sign_is_mean_abs_per_output_channel_times_sign():
    w = torch.tensor([[[[0.5, -1.5]], [[2.0, 0.0]]], [[[-0.1, 0.1]], [[0.3, -0.3]]]])
    w.requires_grad_(True)
    q = ln.nn.magnitude_aware_sign(w)
    alpha = torch.tensor([1.0, 0.2])  # (0.5 + 1.5 + 2 + 0) / 4, (0.1 + 0.1 + 0.3 + 0.3) / 4
    expected = torch.where(w < 0, -1.0, 1.0) * alpha.view(2, 1, 1, 1)
    torch.testing.assert_close(q, expected)
    # backward: the STE (|w| <= 1) times alpha, alpha held constant (larq's stop_gradient)
    (g,) = torch.autograd.grad(q.sum(), w)
    mask = (w.detach().abs() <= 1).float()
    torch.testing.assert_close(g, mask * alpha.view(2, 1, 1, 1))
    lin = torch.tensor([[3.0, -1.0], [0.5, 0.5]])
    torch.testing.assert_close(
        ln.nn.magnitude_aware_sign(lin), torch.tensor([[2.0, -2.0], [0.5, 0.5]])
    )


def test_new_quantizers_by_name_in_layers_and_packed():
    conv = BinaryConv2d(
        3, 4, 3, padding=1, input_quantizer="swish_sign", kernel_quantizer="magnitude_aware_sign"
    )
    x = torch.randn(2, 3, 5, 5)
    alpha = conv.weight.detach().abs().flatten(1).mean(1)
    w = torch.where(conv.weight < 0, -1.0, 1.0) * alpha.view(-1, 1, 1, 1)
    ref = F.conv2d(torch.where(x < 0, -1.0, 1.0), w, padding=1)
    torch.testing.assert_close(conv(x), ref)
    packed = ln.pack_binary(nn.Sequential(conv))
    torch.testing.assert_close(packed(x), ref, rtol=1e-6, atol=1e-5)
    with pytest.raises(UserError, match="kernel quantizer"):
        BinaryConv2d(3, 4, 3, input_quantizer="magnitude_aware_sign")
    with pytest.raises(UserError, match="kernel quantizer"):
        conv.input_quantizer = ln.nn.magnitude_aware_sign
    with pytest.raises(UserError, match="mode='bop'"):
        BinaryConv2d(3, 4, 3, kernel_quantizer="magnitude_aware_sign", mode="bop")
