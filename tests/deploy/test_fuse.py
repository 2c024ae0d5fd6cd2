"""fuse(model): no BN / FBN left, same eval outputs as the model, the model untouched."""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import lightnets as ln
from lightnets.deploy import fuse
from lightnets.errors import UserError
from lightnets.nn import FBNConv2d


def _randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics and affine parameters far from the identity, so folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if isinstance(m, _BatchNorm) and m.affine:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (_BatchNorm, FBNConv2d))]


def _check_fused(model: nn.Module, x: torch.Tensor, left: int = 0) -> nn.Module:
    """fuse(model) equals model in eval; `left` norms may remain; the model is untouched."""
    training = model.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_norms = len(_norms(model))
    fused = fuse(model)
    assert model.training == training and len(_norms(model)) == n_norms
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not fused.training
    assert len(_norms(fused)) == left, fused
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(x), rtol=1e-5, atol=1e-5)
    return fused


def test_sequential_conv_bn_relu():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, bias=True), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Conv2d(8, 4, 1),
        nn.BatchNorm2d(4, affine=False),
    )
    _randomize_norms(model)
    fused = _check_fused(model, torch.randn(2, 3, 9, 9))
    assert model.training  # fuse worked on an eval copy of a training model
    assert isinstance(fused[1], nn.Identity) and fused[0].bias is not None


def test_conv1d_conv3d_depthwise_and_linear():
    model1d = nn.Sequential(
        nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6), nn.Flatten(), nn.Linear(6 * 5, 3)
    )
    model1d.append(nn.BatchNorm1d(3))
    _check_fused(_randomize_norms(model1d), torch.randn(5, 4, 7))
    model3d = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1, bias=False), nn.BatchNorm3d(3))
    _check_fused(_randomize_norms(model3d), torch.randn(2, 2, 4, 4, 4))
    depthwise = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 16, 3, padding=1, groups=4),
        nn.BatchNorm2d(16),
    )
    _check_fused(_randomize_norms(depthwise), torch.randn(2, 8, 6, 6))


class Block(nn.Module):
    """Attribute style: only the data flow of forward says which conv feeds which BN."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn2 = nn.BatchNorm2d(c)  # registered out of order on purpose
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


def test_attribute_style_model_via_fx():
    model = nn.Sequential(nn.Conv2d(3, 6, 1), Block(6), Block(6))
    _check_fused(_randomize_norms(model), torch.randn(2, 3, 5, 5))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace the top level."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.block = Block(6)  # traceable on its own
        self.conv = nn.Conv2d(6, 6, 1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        x = self.block(self.stem(x))
        if x.sum() > 0:  # a Python branch on a value
            x = x * 2
        return self.bn(self.conv(x))


def test_untraceable_model_falls_back_to_children_and_sequentials():
    model = _randomize_norms(Untraceable())
    with pytest.raises(Exception):  # noqa: B017 - the premise of the test
        torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 5, 5)
    with pytest.warns(UserWarning, match=r"left 1 BatchNorm layer\(s\) unfolded: bn"):
        fused = _check_fused(model, x, left=1)
    assert isinstance(fused.stem[1], nn.Identity)
    assert isinstance(fused.block.bn1, nn.Identity) and isinstance(fused.block.bn2, nn.Identity)
    assert isinstance(fused.bn, nn.BatchNorm2d)  # its conv is only known to the untraced forward
    with pytest.warns(UserWarning, match="make that forward traceable or put each conv"):
        ln.fuse(model)  # the warning says how to get it folded


class _OnlyAttributes(nn.Module):
    """Untraceable, and its one conv -> BN pair is held as attributes: nothing can be paired."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.c(x)
        return self.b(y) if y.sum() > 0 else self.b(-y)


def test_convert_norm_fbn_refuses_a_model_where_it_finds_no_pair():
    """Converting nothing while BNs are there is not a silent success."""
    with pytest.raises(UserError, match=r"found no Conv2d -> BatchNorm2d pair.*\(b\)"):
        ln.convert_norm(_OnlyAttributes(), "fbn", fbn_groups=3)
    model = _randomize_norms(Untraceable())  # some pairs found: the rest is a warning
    with pytest.warns(UserWarning, match=r"1 BatchNorm2d layer\(s\) that follow no Conv2d .*: bn"):
        ln.convert_norm(model, "fbn", fbn_groups=3)
    with pytest.raises(UserError, match="its BNs follow BinaryConv2d layers, which FBN does not"):
        ln.convert_norm(ln.create_model("bnn_mnist"), "fbn", fbn_groups=2)


def test_a_model_that_cannot_be_copied_is_one_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    model.lock = threading.Lock()
    with pytest.raises(UserError, match=r"fuse: cannot copy Sequential \(TypeError.*deepcopy"):
        ln.fuse(model)


class Branching(nn.Module):
    """A conv output used twice, and a conv module called twice: neither may be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.shared = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        z = self.conv(x)
        y = self.bn(z) + z
        return self.bn2(self.shared(y)) + self.shared(x)


def test_only_a_conv_that_feeds_only_the_bn_is_folded():
    with pytest.warns(UserWarning, match="left 2 BatchNorm"):
        _check_fused(_randomize_norms(Branching()), torch.randn(2, 4, 3, 3), left=2)


def test_bn_without_running_stats_is_left_with_a_warning():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.warns(UserWarning, match="no running statistics"):
        fused = fuse(model)
    assert isinstance(fused[1], nn.BatchNorm2d)


def test_fbn_models_become_plain_convs():
    torch.manual_seed(0)
    model = nn.Sequential(
        FBNConv2d(8, 8, 1, fbn_groups=4, impl="cov"),
        nn.ReLU(),
        FBNConv2d(8, 6, 3, padding=1, stride=2, fbn_groups=2),
        nn.ReLU(),
        FBNConv2d(6, 6, 1, channels_per_group=1, affine=False, impl="naive"),
        nn.BatchNorm2d(6),  # an FBN followed by a BN folds twice
    )
    _randomize_norms(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FBNConv2d) and m.affine:
                m.norm_weight.uniform_(0.5, 1.5)
                m.norm_bias.normal_()
        for _ in range(3):  # non-trivial running statistics
            model(torch.randn(8, 8, 6, 6) * 3 + 1)
    fused = _check_fused(model, torch.randn(2, 8, 6, 6))
    assert [type(m) for m in fused] == [
        nn.Conv2d,
        nn.ReLU,
        nn.Conv2d,
        nn.ReLU,
        nn.Conv2d,
        nn.Identity,
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        single = fuse(FBNConv2d(4, 4, 1, fbn_groups=2))  # the model itself is an FBN layer
    assert type(single) is nn.Conv2d
