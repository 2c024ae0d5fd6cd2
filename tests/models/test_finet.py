"""Finet (paper Table 1, Fig. 2): shapes, block structure, FBN placement, SE, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightnets.errors import UserError
from lightnets.models import create_model, list_models
from lightnets.models.finet import (
    FinetBlock,
    finet_large,
    finet_large_se,
    finet_small,
    finet_small_se,
)
from lightnets.nn.blocks import SqueezeExcite
from lightnets.nn.fbn import FBNConv2d

SMALL = (30, 60, 120)
LARGE = (100, 200, 400)
REPEATS = (4, 8, 4)  # 1 stride-2 block + 3 / 7 / 3 (Table 1)


def _count(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def _blocks(model: nn.Module) -> list[FinetBlock]:
    return [m for m in model.modules() if isinstance(m, FinetBlock)]


def test_registered():
    names = set(list_models())
    assert {"finet_small", "finet_large", "finet_small_se", "finet_large_se"} <= names
    model = create_model("finet_large_se", num_classes=10, fbn_groups=4, cifar_stem=True)
    assert model.fc2.out_features == 10 and _count(model, FBNConv2d) == 32
    with pytest.raises(UserError, match="fbn_groups"):
        create_model("finet_small", fbn_group=2)


@pytest.mark.parametrize("factory", [finet_small, finet_large_se])
def test_imagenet_shapes(factory):
    torch.manual_seed(0)
    model = factory(num_classes=1000).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert model.forward_features(x).shape[1:] == (1024, 7, 7)  # Conv5 at 7x7 (Table 1)
        assert model(x).shape == (2, 1000)


@pytest.mark.parametrize("factory,groups", [(finet_small, 2), (finet_large_se, 4)])
def test_cifar_stem_shapes_and_training_step(factory, groups):
    torch.manual_seed(0)
    model = factory(num_classes=10, fbn_groups=groups, cifar_stem=True)
    assert isinstance(model.maxpool, nn.Identity) and model.conv1.conv.stride == (1, 1)
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    assert out.shape == (4, 10)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert model.forward_features(x).shape[1:] == (1024, 4, 4)  # 32 -> 16 -> 8 -> 4


def test_stem_and_stage_resolutions():
    model = finet_small().eval()
    sizes = {}
    hooks = [
        getattr(model, n).register_forward_hook(
            lambda m, i, o, n=n: sizes.__setitem__(n, tuple(o.shape[1:]))
        )
        for n in ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5")
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert sizes == {  # Table 1, small column
        "conv1": (24, 112, 112),
        "maxpool": (24, 56, 56),
        "stage2": (30, 28, 28),
        "stage3": (60, 14, 14),
        "stage4": (120, 7, 7),
        "conv5": (1024, 7, 7),
    }


@pytest.mark.parametrize("factory,widths", [(finet_small, SMALL), (finet_large, LARGE)])
def test_block_structure(factory, widths):
    model = factory()
    stages = model.stages()
    assert [len(s) for s in stages] == list(REPEATS)
    cin = 24
    for stage, width in zip(stages, widths):
        for i, block in enumerate(stage):
            stride = 2 if i == 0 else 1
            assert (block.in_channels, block.out_channels, block.stride) == (cin, width, stride)
            assert block.use_shortcut == (stride == 1)  # no identity in stride-2 blocks
            # 1x1 (C_in -> C) -> 3x3 depthwise (C) -> 1x1 (C -> C): no expansion
            assert block.conv1.conv.weight.shape == (width, cin, 1, 1)
            assert block.dw.conv.weight.shape == (width, 1, 3, 3)
            assert block.dw.conv.stride == (stride, stride) and block.dw.conv.groups == width
            assert not hasattr(block.dw, "act")  # no ReLU after the depthwise conv
            assert block.conv2.conv.weight.shape == (width, width, 1, 1)
            assert block.se is None
            cin = width
    # the BN baseline is a standard network: no FBN, BN after every conv
    assert _count(model, FBNConv2d) == 0
    assert _count(model, nn.BatchNorm2d) == 1 + 3 * 16 + 1
    assert _count(model, nn.Linear) == 2 and model.fc1.out_features == 1024


@pytest.mark.parametrize("groups", [2, 3, 6])
def test_fbn_groups_two_fbn_convs_per_block(groups):
    model = finet_small(fbn_groups=groups)
    fbn = [m for m in model.modules() if isinstance(m, FBNConv2d)]
    assert len(fbn) == 2 * 16
    assert all(m.fbn_groups == groups and m.kernel_size == (1, 1) for m in fbn)
    for block in _blocks(model):
        assert isinstance(block.conv1.conv, FBNConv2d) and isinstance(block.conv2.conv, FBNConv2d)
        assert isinstance(block.dw.norm, nn.BatchNorm2d)  # depthwise keeps BN
    # stem and Conv5 keep BN
    assert isinstance(model.conv1.norm, nn.BatchNorm2d) and isinstance(
        model.conv5.norm, nn.BatchNorm2d
    )
    assert _count(model, nn.BatchNorm2d) == 1 + 16 + 1


def test_fbn_adds_per_group_affine_parameters():
    base = sum(p.numel() for p in finet_large().parameters())
    sum_cout = 2 * (4 * 100 + 8 * 200 + 4 * 400)  # outputs of the 32 FBN convs
    for g in (2, 4):
        n = sum(p.numel() for p in finet_large(fbn_groups=g).parameters())
        assert n - base == 2 * (g - 1) * sum_cout  # gamma, beta per (group, output)
    no_affine = finet_large(fbn_groups=4, affine=False)
    assert sum(p.numel() for p in no_affine.parameters()) == base - 2 * sum_cout
    assert all(m.norm_weight is None for m in no_affine.modules() if isinstance(m, FBNConv2d))


def test_baseline_affine_false_applies_to_fbn_positions():
    model = finet_small(affine=False)
    for block in _blocks(model):
        assert not block.conv1.norm.affine and not block.conv2.norm.affine
        assert block.dw.norm.affine
    assert model.conv1.norm.affine and model.conv5.norm.affine


def test_channels_per_group_varies_g_per_layer():
    model = finet_large(fbn_channels_per_group=20)  # paper Table 6
    first = model.stage2[0]
    assert first.conv1.conv.fbn_groups == 1  # 24 inputs: one group
    assert first.conv2.conv.fbn_groups == 5  # 100 / 20
    assert model.stage3[1].conv1.conv.fbn_groups == 10
    assert model.stage4[1].conv2.conv.fbn_groups == 20
    model = finet_large(fbn_channels_per_group=100)
    assert model.stage2[0].conv1.conv.fbn_groups == 1
    assert model.stage4[0].conv1.conv.fbn_groups == 2  # 200 / 100
    with pytest.raises(UserError, match="fbn_groups=2 and channels_per_group=50.*only one"):
        finet_large(fbn_groups=2, fbn_channels_per_group=50)


def test_uneven_groups_follow_tensor_split_and_too_many_groups_are_refused():
    # Table 2 lists small Finet with G=4: its 30-channel layers split as 8, 8, 7, 7
    assert finet_small(fbn_groups=4).stage2[0].conv2.conv.group_sizes == (8, 8, 7, 7)
    assert finet_large(fbn_groups=3).stage2[0].conv2.conv.group_sizes == (34, 33, 33)
    assert finet_small(fbn_channels_per_group=7).stage2[0].conv2.conv.group_sizes == (8, 8, 7, 7)
    with pytest.raises(
        UserError, match=r"finet_small stage2\.0\.conv1 .*fbn_groups=25 is more than the 24 input"
    ):
        finet_small(fbn_groups=25)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fbn_groups": 0},
        {"fbn_groups": 1.5},
        {"num_classes": 0},
        {"drop_rate": 1.0},
        {"norm": "xx"},
    ],
)
def test_bad_options_are_user_errors(kwargs):
    with pytest.raises(UserError):
        finet_small(**kwargs)


@pytest.mark.parametrize(
    "plain,se,widths", [(finet_small, finet_small_se, SMALL), (finet_large, finet_large_se, LARGE)]
)
def test_squeeze_excite_adds_parameters(plain, se, widths):
    with_se, without = se(), plain()
    modules = [m for m in with_se.modules() if isinstance(m, SqueezeExcite)]
    assert len(modules) == 16 and all(m.hidden == 200 for m in modules)
    assert [m.channels for m in modules] == [w for w, n in zip(widths, REPEATS) for _ in range(n)]
    extra = sum(p.numel() for p in with_se.parameters()) - sum(
        p.numel() for p in without.parameters()
    )
    # per block: fc1 C*200 + 200, fc2 200*C + C
    assert extra == sum(n * (2 * w * 200 + 200 + w) for w, n in zip(widths, REPEATS))


def test_squeeze_excite_gates_channels():
    torch.manual_seed(0)
    se = SqueezeExcite(8, 4)
    x = torch.randn(2, 8, 5, 5)
    gate = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean((2, 3), keepdim=True)))))
    torch.testing.assert_close(se(x), x * gate)


def test_dropout_before_each_fc():
    model = finet_small(drop_rate=0.3)
    assert model.drop1.p == 0.3 and model.drop2.p == 0.3
    torch.manual_seed(0)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.pool(model.forward_features(x)).flatten(1)
        expect = model.fc2(torch.relu(model.fc1(feats)))
        torch.testing.assert_close(model(x), expect)
