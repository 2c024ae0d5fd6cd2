"""num_groups="auto": GN on architectures whose widths are not multiples of 32 (mobile nets:
16, 24, 40, 58, 116, ...), in convert_norm and in the models' norm option; an explicit G that
does not fit stays an error."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import lightnets as ln
from lightnets.errors import UserError
from lightnets.nn.norm import auto_groups, make_norm

WIDTHS = (24, 40, 64, 58, 1000)


def _largest_divisor_at_most_32(c: int) -> int:
    """Independent reference: count down from 32."""
    for g in range(32, 0, -1):
        if c % g == 0:
            return g
    raise AssertionError


@given(st.integers(1, 4096))
def test_auto_groups_is_32_or_the_largest_divisor_below(c):
    g = auto_groups(c)
    assert g == _largest_divisor_at_most_32(c) and c % g == 0
    assert (g == 32) == (c % 32 == 0)


def _odd_net() -> nn.Module:
    layers, cin = [], 3
    for c in WIDTHS:
        layers += [nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
        cin = c
    return nn.Sequential(*layers)


def test_convert_norm_gn_auto_fits_every_layer_and_says_where_g_is_not_32():
    model = _odd_net()
    with pytest.warns(UserWarning, match=r"4 layer\(s\) whose C is not divisible by 32") as rec:
        ln.convert_norm(model, "gn", num_groups="auto")
    assert len(rec) == 1
    message = str(rec[0].message)
    assert "1 (C=24: G=24)" in message and "4 (C=40: G=20)" in message
    assert "10 (C=58: G=29)" in message and "13 (C=1000: G=25)" in message
    groups = [m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert groups == [24, 20, 32, 29, 25]
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, 1000, 6, 6)


def test_an_explicit_g_that_does_not_fit_is_still_an_error():
    model = _odd_net()
    with pytest.raises(UserError, match="num_groups=32 does not divide the channels of 4"):
        ln.convert_norm(model, "gn", num_groups=32)
    with pytest.raises(UserError, match="num_groups='many' is invalid: expected an int >= 1 or"):
        make_norm("gn", 40, num_groups="many")


def test_make_norm_and_model_norm_options_take_auto():
    with pytest.warns(UserWarning, match="num_groups='auto' uses G=20"):
        gn = make_norm("gn", 40, num_groups="auto")
    assert gn.num_groups == 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 32 divides every width of resnet18: no warning
        model = ln.create_model("resnet18", norm="gn", norm_kwargs={"num_groups": "auto"})
    assert {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)} == {32}
    with pytest.warns(UserWarning, match="G=24"):
        finet = ln.create_model("finet_small", norm="gn", norm_kwargs={"num_groups": "auto"})
    assert finet(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
