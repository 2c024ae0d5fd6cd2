"""LCE export pieces that need no TensorFlow: the layouts, TF's "same" padding, near-tie
margins, and the one clear error when the LCE stack is missing. The conversion itself runs in
the LCE lane (tests/lce, `make lce-test`)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import lightnets as ln
from lightnets.deploy import larq_model, lce
from lightnets.errors import UserError
from lightnets.nn import BinaryConv2d, BinaryLinear


@given(c=st.integers(1, 6), h=st.integers(1, 5), w=st.integers(1, 5))
def test_flatten_order_maps_keras_features_to_torch_features(c, h, w):
    x = torch.randn(2, c, h, w)
    perm = lce.flatten_order(c, h, w)
    nhwc = x.permute(0, 2, 3, 1).reshape(2, -1)  # what Keras' Reshape of an NHWC map holds
    torch_flat = x.flatten(1)
    if perm is None:
        assert (h, w) == (1, 1)
        assert torch.equal(nhwc, torch_flat)
    else:
        assert torch.equal(nhwc, torch_flat[:, torch.from_numpy(perm)])
        # a linear layer on torch's flatten == the same layer with permuted columns on Keras'
        weight = torch.randn(3, c * h * w)
        torch.testing.assert_close(
            nhwc @ weight[:, torch.from_numpy(perm)].T, torch_flat @ weight.T
        )


@pytest.mark.parametrize(
    "size, k, s, d, pad, same",
    [
        (32, 3, 1, 1, 1, True),  # the usual 3x3 'same'
        (28, 3, 1, 1, 0, False),  # valid is not same
        (32, 5, 1, 1, 2, True),
        (32, 3, 1, 2, 2, True),  # dilated
        (32, 3, 2, 1, 1, False),  # stride 2 on an even size: TF pads 0 before, 1 after
        (33, 3, 2, 1, 1, True),  # on an odd size TF pads 1 and 1, as torch
        (8, 2, 2, 1, 0, True),  # TF's same needs no padding here
    ],
)
def test_tf_same_padding_against_hand_computed_cases(size, k, s, d, pad, same):
    assert larq_model.pads_like_tf_same(size, k, s, d, pad) is same


def test_tie_margins_by_hand():
    # layer 1 takes the real input (no margin), layer 2 binarizes the BN output
    model = nn.Sequential(
        BinaryConv2d(1, 2, 1, input_quantizer=None, mode="bop"),
        nn.Flatten(),
        BinaryLinear(2, 1, input_quantizer="ste_sign", mode="bop"),
    )
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
    x = torch.tensor([[[[4.0]]], [[[1e-7]]]])  # features (4, -4) and (1e-7, -1e-7)
    margins = lce.tie_margins(model.eval(), x)
    assert margins.tolist() == [1.0, 1.0]  # min |v| / max |v| within each sample
    x = torch.tensor([[[[0.0]]]])
    assert lce.tie_margins(model, x).tolist() == [0.0]  # both exactly 0: max clamps, 0 / tiny
    real = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    assert lce.tie_margins(real, torch.randn(3, 4)).tolist() == [math.inf] * 3


def test_tie_margins_flag_the_integer_thresholds_that_make_ties():
    """A BN whose running mean is an integer the binary sum attains gives exact zeros."""
    conv = BinaryConv2d(4, 1, 1, input_quantizer="ste_sign", mode="bop")
    bn = nn.BatchNorm2d(1).eval()
    nxt = BinaryConv2d(1, 1, 1, input_quantizer="ste_sign", mode="bop")
    model = nn.Sequential(nn.Identity(), conv, bn, nxt).eval()
    with torch.no_grad():
        conv.weight.fill_(1.0)
        bn.running_mean.fill_(2.0)  # sum of 4 signs is in {-4, -2, 0, 2, 4}: ties at 2
    x = torch.ones(1, 4, 3, 3)
    x[0, 0] = -1  # sum 2 everywhere: BN output exactly 0
    assert lce.tie_margins(model, x).item() == 0.0
    with torch.no_grad():
        bn.running_mean.fill_(2.5)  # between integers: no tie
    assert lce.tie_margins(model, x).item() > lce.NEAR_TIE


@pytest.mark.skipif(lce.lce_available(), reason="the LCE stack is installed here")
def test_format_lce_without_tensorflow_is_one_clear_error(tmp_path):
    model = ln.create_model("bnn_mnist", mode="bop").eval()
    with pytest.raises(UserError, match=r"format .lce. needs TensorFlow.*lightnets\[lce\]"):
        ln.export(model, tmp_path / "m.tflite", (1, 1, 28, 28))
    assert not (tmp_path / "m.tflite").exists()


def test_lce_format_from_suffix_and_refused_options(tmp_path):
    from lightnets.deploy.export import format_for_path

    assert format_for_path("m.tflite") == "lce"
    model = ln.create_model("bnn_mnist", mode="bop").eval()
    with pytest.raises(UserError, match="fixed height and width"):
        ln.export(model, tmp_path / "m.tflite", (1, 1, 28, 28), dynamic_size=True)
