"""vgg16: torchvision's layout and parameter counts (138,357,544 without normalization), any norm
after each conv, and the CIFAR head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightnets.errors import UserError
from lightnets.models import create_model, list_models
from lightnets.models.vgg import vgg16

torch.set_num_threads(1)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "norm, params", [("none", 138_357_544), ("bn", 138_365_992), ("gn", 138_365_992)]
)
def test_imagenet_parameter_count_and_torchvision_keys(norm, params):
    assert "vgg16" in list_models()
    with torch.device("meta"):  # 138M parameters without allocating them
        model = create_model("vgg16", norm=norm)
        assert _n_params(model) == params  # torchvision vgg16 / vgg16_bn
        assert model(torch.empty(2, 3, 224, 224)).shape == (2, 1000)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128] + [256] * 3 + [512] * 6
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 5
    keys = set(model.state_dict())
    last_conv = "features.28" if norm == "none" else "features.40"  # as torchvision's
    assert {f"{last_conv}.weight", "classifier.0.weight", "classifier.6.bias"} <= keys
    assert model.classifier[0].in_features == 512 * 7 * 7
    norms = [m for m in model.features if not isinstance(m, (nn.Conv2d, nn.ReLU, nn.MaxPool2d))]
    if norm == "none":
        assert norms == []
    else:
        cls = nn.BatchNorm2d if norm == "bn" else nn.GroupNorm
        assert len(norms) == 13 and all(type(m) is cls for m in norms)
    if norm == "gn":
        assert all(m.num_groups == 32 for m in norms)


@pytest.mark.parametrize("norm", ["none", "bn", "gn", "frozen_bn"])
def test_cifar_head_trains(norm):
    torch.manual_seed(0)
    model = vgg16(num_classes=10, norm=norm, cifar_stem=True)
    assert isinstance(model.classifier, nn.Sequential) and len(model.classifier) == 1
    assert model.classifier[0].in_features == 512
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_options():
    model = vgg16(
        num_classes=7, in_chans=1, norm="gn", norm_kwargs={"num_groups": 8}, cifar_stem=True
    )
    assert model.features[0].in_channels == 1 and model.classifier[0].out_features == 7
    assert model.features[1].num_groups == 8
    with pytest.raises(UserError, match="norm 'gm"):
        vgg16(norm="gm")
    with pytest.raises(UserError, match="norm_kwargs"):
        vgg16(norm_kwargs=[1])
    with pytest.raises(UserError, match="unknown option 'num_groups'"):
        vgg16(norm="none", norm_kwargs={"num_groups": 2})
    with pytest.raises(UserError, match="num_classes"):
        vgg16(num_classes=0)
