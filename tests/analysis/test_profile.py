"""profile(): hand-counted MACs and parameters, FBN as one conv, fused counts, and the Finet
paper's Table 2 (FLOPs = MACs at 224x224, Params incl. BN and FBN's per-group gamma/beta).

See docs/finet-profile.md for how Table 2's counting convention was established and for
the remaining differences.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from lightnets.analysis import (
    PTFLOPS_CUSTOM_HOOKS,
    THOP_CUSTOM_OPS,
    Profile,
    format_count,
    profile,
)
from lightnets.errors import UserError
from lightnets.models import finet, resnet
from lightnets.nn.fbn import FBNConv2d

PROFILE_MODULE = sys.modules["lightnets.analysis.complexity"]

# Table 2 of the paper: model -> {G: (FLOPs in millions, Params in millions)}
TABLE2 = {
    "finet_small": {1: (42.6, 2.388), 2: (42.6, 2.392), 4: (42.6, 2.402)},
    "finet_large": {1: (301.8, 4.434), 2: (301.8, 4.448), 4: (301.8, 4.477)},
    "finet_small_se": {1: (43.0, 2.809), 2: (43.0, 2.813), 4: (43.0, 2.827)},
    "finet_large_se": {1: (303.2, 5.812), 2: (303.2, 5.827), 4: (303.2, 5.855)},
}
PARAMS_TOL = 0.015
MACS_TOL = 0.03
# Small Finet with G=4: its 30-input 1x1 convs get uneven groups (8, 8, 7, 7), see
# docs/finet-profile.md.
ROWS = [(name, g) for name in TABLE2 for g in (1, 2, 4)]


@pytest.fixture(scope="module")
def table2_profiles():
    """One profile per Table 2 model, computed on first use and shared by both checks."""
    cache: dict[tuple[str, int], Profile] = {}

    def get(name: str, g: int) -> Profile:
        if (name, g) not in cache:
            model = getattr(finet, name)(num_classes=1000, fbn_groups=g)
            cache[(name, g)] = profile(model, (1, 3, 224, 224))
        return cache[(name, g)]

    return get


@pytest.mark.parametrize("name,g", ROWS)
def test_table2_params(table2_profiles, name, g):
    paper = TABLE2[name][g][1] * 1e6
    ours = table2_profiles(name, g).params
    assert abs(ours / paper - 1) <= PARAMS_TOL, (name, g, ours, paper)


@pytest.mark.parametrize("name,g", ROWS)
def test_table2_flops_are_macs(table2_profiles, name, g):
    paper = TABLE2[name][g][0] * 1e6
    p = table2_profiles(name, g)
    assert abs(p.macs / paper - 1) <= MACS_TOL, (name, g, p.macs, paper)
    assert p.fused_macs == p.macs  # FBN and BN fold away at no cost


def test_table2_fbn_costs_no_macs_and_two_params_per_group(table2_profiles):
    for name in ("finet_large", "finet_large_se"):
        base = table2_profiles(name, 1)
        sum_cout = 2 * (4 * 100 + 8 * 200 + 4 * 400)
        for g in (2, 4):
            p = table2_profiles(name, g)
            assert p.macs == base.macs
            assert p.params - base.params == 2 * (g - 1) * sum_cout
            assert p.fused_params == base.fused_params  # FBN folds into the same conv


@pytest.mark.parametrize(
    "factory,params,gmacs",
    [(resnet.resnet18, 11_689_512, 1.814), (resnet.resnet50, 25_557_032, 4.089)],
)
def test_resnet_macs(factory, params, gmacs):
    p = profile(factory())
    assert p.params == params
    assert abs(p.macs / 1e9 - gmacs) < 0.0005
    fbn = profile(factory(norm="fbn", fbn_groups=2))
    assert fbn.macs == p.macs and fbn.fused_macs == p.macs
    assert fbn.fused_params == p.fused_params


def _tiny(impl: str = "auto") -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        FBNConv2d(8, 16, 1, fbn_groups=2, impl=impl),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


# hand counts for _tiny on a (2, 3, 10, 10) input
TINY_MACS = {"0": 2 * 8 * 10 * 10 * 3 * 9, "3": 2 * 16 * 10 * 10 * 8, "7": 2 * 5 * 16}
TINY_PARAMS = 8 * 3 * 9 + 2 * 8 + 16 * 8 + 2 * 2 * 16 + 16 * 5 + 5
# fused: BN -> bias of 8 on conv 0; FBN's (2, 16) gamma/beta -> bias of 16
TINY_FUSED = 8 * 3 * 9 + 8 + 16 * 8 + 16 + 16 * 5 + 5


@pytest.mark.parametrize("impl", ["auto", "naive", "recompute"])
def test_hand_counted_tiny_model(impl):
    p = profile(_tiny(impl), (2, 3, 10, 10))
    rows = {r.name: r for r in p.table}
    assert {k: rows[k].macs for k in TINY_MACS} == TINY_MACS  # FBN: exactly one conv
    assert p.macs == sum(TINY_MACS.values()) == sum(r.macs for r in p.table)
    assert p.params == TINY_PARAMS == sum(r.params for r in p.table)
    assert rows["3"].type == "FBNConv2d" and rows["3"].output_shape == (2, 16, 10, 10)
    assert rows["1"].macs == rows["2"].macs == 0  # BN, ReLU not counted
    assert (p.fused_params, p.fused_macs) == (TINY_FUSED, p.macs)


def test_analytic_fused_counts_without_deploy_fuse(monkeypatch):
    monkeypatch.setattr(PROFILE_MODULE, "_find_deploy", lambda model: (None, ""))
    p = profile(_tiny(), (2, 3, 10, 10))
    assert p.fused_by == "analytic"
    assert (p.fused_params, p.fused_macs) == (TINY_FUSED, p.macs)
    # a BN that does not follow a conv is not folded; a conv with a bias gains none
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    q = profile(model, (1, 3, 4, 4))
    assert q.params == 6 + 16 + 8 and q.fused_params == 6 + 16
    # Finet: every BN and FBN folds; matches a count by hand of what folding removes and adds
    model = finet.finet_small(fbn_groups=2, num_classes=10)
    r = profile(model, (1, 3, 32, 32))
    norm_channels = 24 + 3 * (4 * 30 + 8 * 60 + 4 * 120) + 1024
    fbn_extra = 2 * 2 * (4 * 30 + 8 * 60 + 4 * 120)  # G=2: 2 more params per FBN output
    assert r.fused_params == r.params - 2 * norm_channels - fbn_extra + norm_channels


def test_deploy_fuse_agrees_with_analytic(monkeypatch):
    pytest.importorskip("lightnets.deploy.folding")
    model = finet.finet_large_se(fbn_groups=4, num_classes=10)
    fused = profile(model, (1, 3, 32, 32))
    assert fused.fused_by == "lightnets.deploy.folding"
    monkeypatch.setattr(PROFILE_MODULE, "_find_deploy", lambda model: (None, ""))
    analytic = profile(model, (1, 3, 32, 32))
    assert (fused.fused_params, fused.fused_macs) == (analytic.fused_params, analytic.fused_macs)


def test_model_state_is_kept():
    model = _tiny()
    model.train()
    model[1].eval()  # a deliberately frozen BN stays frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile(model, (2, 3, 8, 8))
    assert model.training and not model[1].training and model[3].training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no running-stat updates


def test_format():
    p = profile(_tiny(), (2, 3, 10, 10))
    text = str(p)
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "type", "output", "params", "MACs"]
    assert "FBNConv2d" in text and "2x16x10x10" in text
    assert f"{p.params:,}" in text and f"{p.macs:,}" in text and "fused MACs" in text
    at = lines[0].index("type")  # aligned columns: every type starts under its header
    assert all(line[at:].startswith(r.type) for line, r in zip(lines[2:], p.table))
    assert "more layers" in p.format(max_rows=2)


@pytest.mark.parametrize(
    "n,text",
    [
        (0, "0"),
        (999, "999"),
        (1500, "1.5K"),
        (1_234_567, "1.23M"),
        (4.5e9, "4.5G"),
        (999_999, "1M"),
        (11_689_512, "11.69M"),
        (-2500, "-2.5K"),
    ],
)
def test_format_count(n, text):
    assert format_count(n) == text


@pytest.mark.parametrize("size", [(), (1, 0, 4), "abc", (1, 3, 2.5)])
def test_bad_input_size(size):
    with pytest.raises(UserError, match="input_size"):
        profile(nn.Conv2d(3, 3, 1), size)


def test_one_int_is_a_square_rgb_image_and_a_misfit_is_one_error():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    assert profile(conv, 10).input_size == (1, 3, 10, 10)
    assert profile(conv, 10).macs == 4 * 3 * 9 * 8 * 8
    bn = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(UserError, match=r"input_size 3x8x8 does not fit Sequential \(expected"):
        profile(bn, (3, 8, 8))  # BatchNorm2d raises a ValueError, not a RuntimeError


def test_binary_model_is_profiled_packed():
    """A binary model deploys packed: its fused form holds the same numbers, the binary
    weights as bits and BN folded into scale / shift, and the profile says how many bits."""
    from lightnets.models.binarynet import bnn_mnist

    prof = profile(bnn_mnist(), (1, 1, 28, 28))
    convs = 1 * 32 * 9 + 32 * 64 * 9 + 64 * 64 * 9
    fcs = 64 * 64 + 64 * 10  # the 1x1x64 map flattened into 64, then 64 into 10
    assert prof.binary_weights == convs + fcs
    bn = 2 * (32 + 64 + 64 + 64 + 10)
    assert prof.params == convs + fcs + bn == prof.fused_params
    assert prof.fused_by == "lightnets.pack_binary + fuse" and prof.fused_macs == prof.macs
    assert "1 bit each" in prof.format()


class _ListNet(nn.Module):
    """Convs held in a ModuleList / ModuleDict that are never called themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)])
        self.heads = nn.ModuleDict({"out": nn.Sequential(nn.Conv2d(4, 2, 1))})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.heads["out"](x)


def test_containers_that_are_not_called_are_not_counted_twice():
    # 8x8 output pixels: 3*9*4 + 4*4 + 4*2 MACs per pixel
    p = profile(_ListNet(), (1, 3, 8, 8))
    assert p.macs == 64 * (3 * 9 * 4 + 4 * 4 + 4 * 2)
    assert sum(r.macs for r in p.table) == p.macs
    assert all(r.macs == 0 for r in p.table if r.type not in ("Conv2d",))


def test_mixed_real_and_binary_model_is_packed_and_fused():
    """A real first conv + BN (binary nets keep their first layer real) folds like any conv;
    the binary conv's BN folds into the packed layer."""
    from lightnets.nn.binary import BinaryConv2d

    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        BinaryConv2d(4, 6, 3, padding=1, bias=False, input_quantizer="ste_sign"),
        nn.BatchNorm2d(6),
    )
    prof = profile(model, (1, 1, 8, 8))
    real, binary = 4 * 9, 6 * 4 * 9
    assert prof.params == real + 2 * 4 + binary + 2 * 6
    # real conv gains a bias of 4 for its BN's 8; the packed layer keeps scale + shift (12)
    assert prof.fused_params == real + 4 + binary + 2 * 6
    assert prof.binary_weights == binary and prof.fused_by == "lightnets.pack_binary + fuse"


def test_counter_hooks_count_an_fbn_conv_as_its_inference_conv():
    """thop / ptflops find layers by exact type and skip FBNConv2d; their hooks (emulated here:
    a counter attribute and a forward hook, as both libraries attach them) count it as the one
    conv it is at inference, as each counts that conv: C_in*k*k MACs per output value, plus a
    bias add per output value for ptflops (thop 0.1.1's count_convNd counts no bias)."""
    fbn = FBNConv2d(12, 16, 3, stride=2, padding=1, fbn_groups=4).eval()
    conv = nn.Conv2d(12, 16, 3, stride=2, padding=1)  # what fuse makes of it
    x = torch.randn(2, 12, 9, 9)
    macs = conv(x).numel() * 12 * 3 * 3  # thop's count of `conv`: no bias
    expected = macs + conv(x).numel()  # ptflops's: a bias add per output value
    fbn.total_ops = torch.zeros(1, dtype=torch.float64)
    fbn.__flops__ = 0
    handles = [
        fbn.register_forward_hook(THOP_CUSTOM_OPS[FBNConv2d]),
        fbn.register_forward_hook(PTFLOPS_CUSTOM_HOOKS[FBNConv2d]),
    ]
    with torch.no_grad():
        fbn(x)
    for h in handles:
        h.remove()
    assert int(fbn.total_ops.item()) == macs and fbn.__flops__ == expected
    # the MACs part is lightnets.profile's count of the layer
    prof = profile(nn.Sequential(fbn), (2, 12, 9, 9))
    assert prof.macs == macs
