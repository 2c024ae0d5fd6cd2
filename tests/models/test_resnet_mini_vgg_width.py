"""resnet_mini (ResNet for 28x28, norm widths multiples of 64), ResNet's `widths` / `stem_stride`,
and vgg16's `width` and round-up pooling (GN paper studies at CPU scale)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightnets.errors import UserError
from lightnets.models import create_model, list_models
from lightnets.models.resnet import BasicBlock, ResNet, resnet_mini
from lightnets.models.vgg import vgg16

torch.set_num_threads(1)

NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k  # no bias


def _bn(c: int) -> int:
    return 2 * c  # gamma, beta


def _basic_block(cin: int, cout: int) -> int:
    n = _conv(cin, cout, 3) + _bn(cout) + _conv(cout, cout, 3) + _bn(cout)
    if cin != cout:  # stride 2: 1x1 downsample conv + BN
        n += _conv(cin, cout, 1) + _bn(cout)
    return n


def _norm_slots(model: nn.Module) -> list[nn.Module]:
    """The modules in the norm positions: stem bn1, each block's bn1/bn2, downsample.1."""
    slots = [model.bn1]
    for block in model.modules():
        if isinstance(block, BasicBlock):
            slots += [block.bn1, block.bn2]
            if block.downsample is not None and len(block.downsample) > 1:
                slots.append(block.downsample[1])
    return slots


# ----------------------------------------------------------------------------- resnet_mini
def test_resnet_mini_registered_shapes_and_parameter_count():
    assert "resnet_mini" in list_models()
    torch.manual_seed(0)
    model = create_model("resnet_mini").eval()
    # stem 3x3 conv 1->64 + BN; blocks 64->64 (s1), 64->128 (s2), 128->256 (s2); fc 256->10
    expected = (
        _conv(1, 64, 3)
        + _bn(64)
        + _basic_block(64, 64)
        + _basic_block(64, 128)
        + _basic_block(128, 256)
        + 256 * 10
        + 10
    )
    assert expected == 1_226_442
    assert _n_params(model) == expected
    assert model.conv1.weight.shape == (64, 1, 3, 3) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.Identity) and not hasattr(model, "layer4")
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [1, 1, 1]
    assert model.layer1[0].downsample is None
    for layer, cin, cout in ((model.layer2, 64, 128), (model.layer3, 128, 256)):
        ds = layer[0].downsample
        assert ds[0].weight.shape == (cout, cin, 1, 1) and ds[0].stride == (2, 2)
    assert model.fc.in_features == 256 and model.fc.out_features == 10
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert model.forward_features(x).shape == (3, 256, 4, 4)  # 28 -> 14 -> 14 -> 7 -> 4
        assert model(x).shape == (3, 10)


@pytest.mark.parametrize(
    "norm, kwargs",
    [
        ("bn", {}),
        ("gn", {}),
        ("gn", {"num_groups": 64}),
        ("gn", {"channels_per_group": 1}),
        ("ln", {}),
        ("in", {}),
        ("brn", {"r_max": 1.5, "d_max": 0.5}),
        ("frozen_bn", {}),
        ("none", {}),
    ],
)
def test_resnet_mini_every_norm_trains(norm, kwargs):
    torch.manual_seed(0)
    model = resnet_mini(norm=norm, norm_kwargs=kwargs, zero_init_last=True)
    slots = _norm_slots(model)
    if norm == "none":
        assert all(isinstance(m, nn.Identity) for m in slots) and len(slots) == 7
    else:
        assert len(slots) == 9  # stem, two per block, two downsample shortcuts
        widths = [m.num_channels if isinstance(m, nn.GroupNorm) else m.num_features for m in slots]
        assert widths == [64, 64, 64, 128, 128, 128, 256, 256, 256]
    if norm == "gn":
        groups = [m.num_groups for m in slots]
        if "num_groups" in kwargs:
            assert groups == [64] * 9
        elif "channels_per_group" in kwargs:
            assert groups == [m.num_channels for m in slots]
        else:
            assert groups == [32] * 9
    out = model(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10)
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_resnet_mini_norm_widths_are_multiples_of_64():
    model = resnet_mini(norm="bn")
    norms = [m for m in model.modules() if isinstance(m, NORM_TYPES)]
    assert [m.num_features for m in norms] == [64, 64, 64, 128, 128, 128, 256, 256, 256]
    gn = resnet_mini(norm="gn", norm_kwargs={"num_groups": 64})
    assert all(m.num_channels % 64 == 0 for m in gn.modules() if isinstance(m, nn.GroupNorm))


def test_resnet_widths_and_stem_stride():
    torch.manual_seed(0)
    model = ResNet(
        BasicBlock,
        (1, 2),
        num_classes=3,
        in_chans=2,
        cifar_stem=True,
        widths=(8, 16),
        stem_stride=2,
    ).eval()
    assert model.conv1.weight.shape == (8, 2, 3, 3) and model.conv1.stride == (2, 2)
    assert model.bn1.num_features == 8 and model.fc.in_features == 16
    assert len(model.layer2) == 2 and not hasattr(model, "layer3")
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 2, 16, 16)).shape == (1, 16, 4, 4)
        assert model(torch.randn(2, 2, 16, 16)).shape == (2, 3)
    plain = ResNet(BasicBlock, (1, 1), cifar_stem=True, widths=(8, 16))
    assert plain.conv1.stride == (1, 1)  # the stems' default strides are kept
    imagenet = ResNet(BasicBlock, (1, 1), widths=(8, 16))
    assert imagenet.conv1.stride == (2, 2) and imagenet.conv1.kernel_size == (7, 7)
    with pytest.raises(ValueError, match="2 stages need 2 widths"):
        ResNet(BasicBlock, (1, 1), widths=(8, 16, 32))


# ----------------------------------------------------------------------------- vgg16 width
def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.features if isinstance(m, nn.Conv2d)]


def test_vgg16_quarter_width():
    model = vgg16(width=0.25, cifar_stem=True, in_chans=1, num_classes=10, norm="bn")
    convs = _convs(model)
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64, 64] + [128] * 6
    assert [c.in_channels for c in convs] == [1, 16, 16, 32, 32, 64, 64, 64] + [128] * 5
    norms = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    assert [m.num_features for m in norms] == [c.out_channels for c in convs]
    assert model.classifier[0].in_features == 128
    half = vgg16(width=0.5, norm="none", cifar_stem=True)
    assert [c.out_channels for c in _convs(half)] == [32, 32, 64, 64] + [128] * 3 + [256] * 6
    tiny = vgg16(width=0.001, norm="none", cifar_stem=True)
    assert all(c.out_channels == 1 for c in _convs(tiny))  # at least one channel


def test_vgg16_width_one_is_unchanged():
    with torch.device("meta"):
        default, explicit = vgg16(norm="none"), vgg16(norm="none", width=1.0)
    assert _n_params(explicit) == 138_357_544
    shapes = {k: v.shape for k, v in default.state_dict().items()}
    assert {k: v.shape for k, v in explicit.state_dict().items()} == shapes


@pytest.mark.parametrize("size, pooled", [(28, [14, 7, 4, 2, 1]), (32, [16, 8, 4, 2, 1])])
def test_vgg16_pooling_rounds_up(size, pooled):
    torch.manual_seed(0)
    model = vgg16(
        width=0.25,
        cifar_stem=True,
        in_chans=1,
        num_classes=10,
        norm="gn",
        norm_kwargs={"num_groups": 8},
    ).eval()
    sizes = []
    for m in model.features:
        if isinstance(m, nn.MaxPool2d):
            assert m.ceil_mode
            m.register_forward_hook(lambda mod, inp, out: sizes.append(tuple(out.shape[2:])))
    with torch.no_grad():
        x = torch.randn(2, 1, size, size)
        assert model.forward_features(x).shape == (2, 128, 1, 1)
        assert sizes == [(s, s) for s in pooled]
        assert model(x).shape == (2, 10)


def test_vgg16_pooling_unchanged_at_224():
    """Rounding up changes nothing where every size is even (224 -> 7, as torchvision)."""
    with torch.device("meta"):
        model = vgg16(norm="none")
        assert model.forward_features(torch.empty(1, 3, 224, 224)).shape == (1, 512, 7, 7)


@pytest.mark.parametrize("width", [0, -0.5, float("nan")])
def test_vgg16_width_must_be_positive(width):
    with pytest.raises(
        UserError, match=r"vgg16: width=.* is invalid: expected a finite number > 0"
    ):
        vgg16(width=width)
