"""Skip fusion layers (weight mechanism paper): values against hand-computed tensors, gradients,
state_dict contents, parameter counts, argument errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightnets.errors import UserError
from lightnets.nn import FUSION_KINDS, DynamicWeight, GatedFusion, WeightedConcat, make_fusion
from lightnets.nn.fusion import resize_to


def _t(rows) -> torch.Tensor:
    """A (1, 1, H, W) tensor from a list of rows."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- resize --------------------------------------------------------------------------------


def test_resize_doubles_with_bilinear_half_pixel_weights():
    # 1-d, align_corners=False, 2 -> 4: source positions -0.25 (clamped), 0.25, 0.75, 1.25
    # (clamped): [a, 0.75a + 0.25b, 0.25a + 0.75b, b]; here value = 2 * row + col
    up = _t([[0.0, 1.0], [2.0, 3.0]])
    expected = _t(
        [
            [0.0, 0.25, 0.75, 1.0],
            [0.5, 0.75, 1.25, 1.5],
            [1.5, 1.75, 2.25, 2.5],
            [2.0, 2.25, 2.75, 3.0],
        ]
    )
    assert torch.allclose(resize_to(up, torch.zeros(1, 1, 4, 4)), expected)


def test_resize_to_an_odd_size_is_exact_not_doubled():
    # 2 -> 3: source positions -1/6 (clamped), 1/2, 7/6 (clamped): [a, (a + b) / 2, b]
    up = _t([[0.0, 1.0], [2.0, 3.0]])
    expected = _t([[0.0, 0.5, 1.0], [1.0, 1.5, 2.0], [2.0, 2.5, 3.0]])
    out = resize_to(up, torch.zeros(1, 1, 3, 3))
    assert torch.allclose(out, expected)
    # the 125 -> 63 -> 32 -> 16 -> 8 path backwards: always the skip's exact size
    for small, big in ((8, 16), (16, 32), (32, 63), (63, 125), (4, 7)):
        x = torch.randn(1, 2, small, small + 1)
        assert resize_to(x, torch.zeros(1, 1, big, big + 2)).shape[-2:] == (big, big + 2)


def test_resize_to_the_same_size_is_the_identity():
    x = torch.randn(2, 3, 7, 9)
    assert torch.equal(resize_to(x, x), x)


# --- WeightedConcat ------------------------------------------------------------------------


def test_weighted_concat_values():
    skip = _t([[1.0, 2.0], [3.0, 4.0]])
    up = _t([[10.0]])  # a constant resizes to the same constant
    out = WeightedConcat(alpha=0.5, beta=0.1)(skip, up)
    expected = torch.tensor([[[[0.5, 1.0], [1.5, 2.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    assert out.shape == (1, 2, 2, 2)
    assert torch.allclose(out, expected)
    # defaults: plain concatenation, skip first
    plain = WeightedConcat()(skip, _t([[5.0, 6.0], [7.0, 8.0]]))
    assert torch.equal(plain[0, 0], skip[0, 0]) and torch.equal(
        plain[0, 1, 1], torch.tensor([7.0, 8.0])
    )


def test_weighted_concat_resizes_the_decoder_feature():
    skip = torch.zeros(1, 1, 3, 3)
    up = _t([[0.0, 1.0], [2.0, 3.0]])
    out = WeightedConcat(alpha=1.0, beta=2.0)(skip, up)
    assert torch.allclose(
        out[0, 1], 2.0 * torch.tensor([[0.0, 0.5, 1.0], [1.0, 1.5, 2.0], [2.0, 2.5, 3.0]])
    )


def test_weighted_concat_constants_are_buffers_without_gradient():
    layer = WeightedConcat(alpha=0.1, beta=0.5)
    assert _n_params(layer) == 0 and list(layer.parameters()) == []
    assert set(dict(layer.named_buffers())) == {"alpha", "beta"}
    skip = torch.randn(2, 3, 5, 5, requires_grad=True)
    up = torch.randn(2, 4, 5, 5, requires_grad=True)
    grad_out = torch.randn(2, 7, 5, 5)
    layer(skip, up).backward(grad_out)
    assert layer.alpha.grad is None and layer.beta.grad is None
    assert not layer.alpha.requires_grad
    # d out / d skip = alpha, d out / d up = beta (same size: the resize is the identity)
    assert torch.allclose(skip.grad, 0.1 * grad_out[:, :3])
    assert torch.allclose(up.grad, 0.5 * grad_out[:, 3:])


def test_weighted_concat_state_dict_saves_and_restores_the_constants():
    a = WeightedConcat(alpha=0.1, beta=0.7)
    sd = a.state_dict()
    assert set(sd) == {"alpha", "beta"}
    assert sd["alpha"].item() == pytest.approx(0.1) and sd["beta"].item() == pytest.approx(0.7)
    b = WeightedConcat(alpha=0.5)
    b.load_state_dict(sd)
    assert b.alpha.item() == pytest.approx(0.1) and b.beta.item() == pytest.approx(0.7)
    x, y = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 2, 2)
    assert torch.equal(a(x, y), b(x, y))


def test_weighted_concat_keeps_the_input_dtype():
    out = WeightedConcat(alpha=0.5)(
        torch.ones(1, 2, 4, 4, dtype=torch.bfloat16), torch.ones(1, 2, 2, 2, dtype=torch.bfloat16)
    )
    assert out.dtype == torch.bfloat16 and out[0, 0, 0, 0].item() == 0.5


# --- DynamicWeight -------------------------------------------------------------------------


def test_dynamic_weight_values_and_init():
    layer = DynamicWeight(2)
    assert _n_params(layer) == 2 and torch.equal(layer.weight.data, torch.ones(2))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([2.0, -3.0]))
    skip = torch.tensor([[[[1.0]], [[4.0]]]])  # (1, 2, 1, 1)
    up = torch.tensor([[[[7.0]]]])
    assert torch.equal(layer(skip, up), torch.tensor([[[[2.0]], [[-12.0]], [[7.0]]]]))


def test_dynamic_weight_gradient_matches_a_hand_written_expression():
    torch.manual_seed(0)
    layer = DynamicWeight(3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
    w_ref = layer.weight.detach().clone().requires_grad_(True)
    skip, up = torch.randn(2, 3, 6, 5), torch.randn(2, 4, 3, 3)
    r = torch.randn(2, 7, 6, 5)
    (layer(skip, up) * r).sum().backward()
    # reference: the same function written out, differentiated by autograd
    up_big = torch.nn.functional.interpolate(up, size=(6, 5), mode="bilinear", align_corners=False)
    ref = torch.cat([skip * w_ref[None, :, None, None], up_big], 1)
    (ref * r).sum().backward()
    assert torch.allclose(layer.weight.grad, w_ref.grad, atol=1e-5)
    # and in closed form: d/dw_c = sum over n, h, w of skip_c * r_c
    assert torch.allclose(layer.weight.grad, (skip * r[:, :3]).sum((0, 2, 3)), atol=1e-4)


def test_dynamic_weight_refuses_a_skip_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        DynamicWeight(3)(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2))


# --- GatedFusion ---------------------------------------------------------------------------


def _set(conv: nn.Conv2d, weight, bias) -> None:
    with torch.no_grad():
        conv.weight.copy_(torch.as_tensor(weight, dtype=torch.float32).reshape(conv.weight.shape))
        conv.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))


def test_gated_fusion_scalar_values_by_hand():
    # one channel each: no projection; G_1 = sigmoid(0) = 1/2, G_2 = sigmoid(ln 3) = 3/4
    layer = GatedFusion(1, 1)
    assert isinstance(layer.proj, nn.Identity)
    _set(layer.gate1, [0.0], [0.0])
    _set(layer.gate2, [0.0], [math.log(3.0)])
    skip, up = _t([[2.0]]), _t([[4.0]])
    # X~ = (1 + 1/2) * 2 + (1 - 1/2) * 3/4 * 4 = 3 + 1.5 = 4.5; then concat with the decoder feature
    out = layer(skip, up)
    assert torch.allclose(out, torch.tensor([[[[4.5]], [[4.0]]]]))


def test_gated_fusion_matches_eq_3_written_with_einsum():
    torch.manual_seed(1)
    cs, cu = 3, 6
    for gate, width in (("channel", cs), ("spatial", 1)):
        layer = GatedFusion(cs, cu, gate=gate)
        assert layer.gate1.out_channels == width and layer.proj.weight.shape == (cs, cu, 1, 1)
        skip, up = torch.randn(2, cs, 7, 5), torch.randn(2, cu, 4, 3)
        out = layer(skip, up)

        def conv1x1(conv, x):
            return torch.einsum("oc,nchw->nohw", conv.weight[:, :, 0, 0], x) + conv.bias.view(
                1, -1, 1, 1
            )

        up_big = torch.nn.functional.interpolate(
            up, size=(7, 5), mode="bilinear", align_corners=False
        )
        x2 = conv1x1(layer.proj, up_big)
        g1 = torch.sigmoid(conv1x1(layer.gate1, skip))
        g2 = torch.sigmoid(conv1x1(layer.gate2, x2))
        expected = torch.cat([(1 + g1) * skip + (1 - g1) * g2 * x2, up_big], 1)
        assert out.shape == (2, cs + cu, 7, 5)
        assert torch.allclose(out, expected, atol=1e-5), gate


@pytest.mark.parametrize(
    "gate,per_level",
    [
        # projection 2C -> C (+ bias) and two C -> C gates (+ bias)
        ("channel", lambda c: 2 * c * c + c + 2 * (c * c + c)),
        ("spatial", lambda c: 2 * c * c + c + 2 * (c + 1)),
    ],
)
def test_gated_fusion_parameter_counts(gate, per_level):
    for c in (32, 64, 128, 256):
        assert _n_params(GatedFusion(c, 2 * c, gate=gate)) == per_level(c)
    total = sum(_n_params(GatedFusion(c, 2 * c, gate=gate)) for c in (32, 64, 128, 256))
    assert total == {"channel": 349_600, "spatial": 175_528}[gate]


def test_gated_fusion_gradients_reach_every_gate():
    torch.manual_seed(2)
    layer = GatedFusion(4, 8)
    layer(torch.randn(2, 4, 6, 6), torch.randn(2, 8, 3, 3)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --- make_fusion ---------------------------------------------------------------------------


def test_make_fusion_kinds():
    assert FUSION_KINDS == ("concat", "alpha", "beta", "dynamic", "gate")
    concat = make_fusion("concat", 8, 16)
    assert (
        isinstance(concat, WeightedConcat) and concat.alpha.item() == 1 and concat.beta.item() == 1
    )
    alpha = make_fusion("alpha", 8, 16)
    assert alpha.alpha.item() == pytest.approx(0.5) and alpha.beta.item() == 1
    assert make_fusion("alpha", 8, 16, alpha=0.1).alpha.item() == pytest.approx(0.1)
    beta = make_fusion("beta", 8, 16, beta=0.3)
    assert beta.alpha.item() == 1 and beta.beta.item() == pytest.approx(0.3)
    assert make_fusion("beta", 8, 16).beta.item() == pytest.approx(0.1)
    assert isinstance(make_fusion("dynamic", 8, 16), DynamicWeight)
    gate = make_fusion("gate", 8, 16, gate="spatial")
    assert isinstance(gate, GatedFusion) and gate.gate == "spatial"
    skip, up = torch.randn(1, 8, 5, 5), torch.randn(1, 16, 3, 3)
    for kind in FUSION_KINDS:
        assert make_fusion(kind, 8, 16)(skip, up).shape == (1, 24, 5, 5), kind


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: make_fusion("cat", 8, 16),
            r"fusion 'cat' is unknown: expected one of concat, alpha, beta, dynamic, gate "
            r"\(did you mean 'concat'\?\)",
        ),
        (lambda: make_fusion(None, 8, 16), "expected one of concat"),
        (
            lambda: make_fusion("concat", 8, 16, alpha=0.5),
            "takes no alpha.*expected fusion='alpha'",
        ),
        (lambda: make_fusion("gate", 8, 16, beta=0.5), "takes no beta.*expected fusion='alpha'"),
        (lambda: make_fusion("dynamic", 8, 16, gate="spatial"), "takes no gate"),
        (
            lambda: make_fusion("alpha", 8, 16, alpha=0),
            r"alpha=0 is invalid: expected a finite number > 0",
        ),
        (lambda: make_fusion("alpha", 8, 16, alpha=-0.5), "alpha=-0.5 is invalid"),
        (lambda: make_fusion("beta", 8, 16, beta=float("nan")), "beta=nan is invalid"),
        (lambda: make_fusion("alpha", 8, 16, alpha=float("inf")), "alpha=inf is invalid"),
        (lambda: make_fusion("alpha", 8, 16, alpha="0.5"), "alpha='0.5' is invalid"),
        (lambda: make_fusion("alpha", 8, 16, alpha=True), "alpha=True is invalid"),
        (lambda: make_fusion("gate", 0, 16), "skip_channels=0 is invalid: expected an int >= 1"),
        (lambda: make_fusion("gate", 8, 2.5), "up_channels=2.5 is invalid"),
        (
            lambda: make_fusion("gate", 8, 16, gate="pixel"),
            "gate='pixel' is unknown: expected one of channel, spatial",
        ),
        (lambda: WeightedConcat(alpha=0), "WeightedConcat: alpha=0 is invalid"),
        (lambda: DynamicWeight(0), "channels=0 is invalid"),
    ],
)
def test_bad_arguments_are_user_errors(call, match):
    with pytest.raises(UserError, match=match):
        call()


def test_alpha_and_beta_together():
    """Both constants on one concatenation (the kind picks the default of the one not given)."""
    both = make_fusion("alpha", 8, 16, beta=0.1)
    assert (float(both.alpha), float(both.beta)) == (0.5, pytest.approx(0.1))
    assert (float(make_fusion("beta", 8, 16).alpha), float(make_fusion("beta", 8, 16).beta)) == (
        1.0,
        pytest.approx(0.1),
    )
    skip, up = torch.randn(2, 8, 5, 5), torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(both(skip, up), torch.cat([0.5 * skip, 0.1 * up], 1))
