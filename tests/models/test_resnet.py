"""ResNet-18/50: torchvision's parameter counts and names, CIFAR stem, FBN placement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightnets.errors import UserError
from lightnets.models import list_models
from lightnets.models.resnet import BasicBlock, Bottleneck, resnet18, resnet50
from lightnets.nn.fbn import FBNConv2d


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registered():
    assert {"resnet18", "resnet50"} <= set(list_models())


@pytest.mark.parametrize(
    "factory,params,keys",
    [(resnet18, 11_689_512, 122), (resnet50, 25_557_032, 320)],  # torchvision's values
)
def test_torchvision_parameter_count_and_state_dict(factory, params, keys):
    model = factory()
    assert _n_params(model) == params
    assert len(model.state_dict()) == keys


def test_torchvision_names():
    sd18 = resnet18().state_dict()
    for key in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv1.weight",
        "layer1.1.bn2.bias",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.num_batches_tracked",
        "layer4.1.conv2.weight",
        "fc.weight",
        "fc.bias",
    ):
        assert key in sd18, key
    assert sd18["conv1.weight"].shape == (64, 3, 7, 7)
    sd50 = resnet50().state_dict()
    assert sd50["layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert sd50["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd50["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd50["fc.weight"].shape == (1000, 2048)
    model = resnet50()
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)


@pytest.mark.parametrize("factory", [resnet18, resnet50])
def test_imagenet_and_cifar_shapes(factory):
    torch.manual_seed(0)
    model = factory(num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 7)
        assert model.forward_features(torch.randn(1, 3, 224, 224)).shape[2:] == (7, 7)
    cifar = factory(num_classes=10, cifar_stem=True, in_chans=1).eval()
    assert cifar.conv1.weight.shape == (64, 1, 3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    with torch.no_grad():
        x = torch.randn(2, 1, 32, 32)
        assert cifar.forward_features(x).shape[2:] == (4, 4)  # 32 -> 32 -> 16 -> 8 -> 4
        assert cifar(x).shape == (2, 10)


@pytest.mark.parametrize("factory,n_fbn", [(resnet18, 8 * 2 + 3), (resnet50, 16 * 3 + 3 + 1)])
def test_fbn_replaces_every_non_stem_conv_bn_pair(factory, n_fbn):
    bn = factory()
    fbn = factory(norm="fbn", fbn_groups=2)
    assert sum(isinstance(m, FBNConv2d) for m in fbn.modules()) == n_fbn
    assert all(m.fbn_groups == 2 for m in fbn.modules() if isinstance(m, FBNConv2d))
    # the stem stays a plain conv + BN; only the stem BN is left
    assert type(fbn.conv1) is nn.Conv2d and isinstance(fbn.bn1, nn.BatchNorm2d)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fbn.modules()) == 1
    assert sum(isinstance(m, nn.Conv2d) for m in fbn.modules()) == 1
    # same conv weights; each FBN conv has G=2 gammas/betas per output instead of 1
    bn_norm = sum(
        p.numel() for m in bn.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()
    )
    assert _n_params(fbn) - _n_params(bn) == bn_norm - 2 * 64
    ds = fbn.layer2[0].downsample
    assert isinstance(ds[0], FBNConv2d) and ds[0].stride == (2, 2) and ds[0].kernel_size == (1, 1)


def test_fbn_training_step_cifar():
    torch.manual_seed(0)
    model = resnet18(num_classes=10, norm="fbn", fbn_groups=4, cifar_stem=True)
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10)
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("norm", ["bn", "fbn"])
@pytest.mark.parametrize("factory", [resnet18, resnet50])
def test_zero_init_last(factory, norm):
    model = factory(norm=norm, zero_init_last=True)
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) in (8, 16)
    for b in blocks:
        last = b.last_norm()
        scale = last.norm_weight if norm == "fbn" else last.weight
        assert torch.count_nonzero(scale) == 0
        first = b.conv1.norm_weight if norm == "fbn" else b.bn1.weight
        assert torch.all(first == 1)
    plain = factory(norm=norm)
    assert all(
        torch.all((b.last_norm().norm_weight if norm == "fbn" else b.last_norm().weight) == 1)
        for b in plain.modules()
        if isinstance(b, (BasicBlock, Bottleneck))
    )


def test_refusals():
    with pytest.raises(UserError, match=r"resnet18 layer1\.0\.conv1 \(64->64\).*fbn_groups=65 is"):
        resnet18(norm="fbn", fbn_groups=65)
    with pytest.raises(UserError, match=r"fbn_groups=True is invalid"):
        resnet18(fbn_groups=True)
    with pytest.raises(UserError, match="norm 'gnx'"):
        resnet50(norm="gnx")
    with pytest.raises(UserError):
        resnet18(num_classes=0)
