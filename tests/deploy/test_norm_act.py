"""Norm layers with a built-in activation (the pattern of timm's BatchNormAct2d, written here
by hand: no timm needed): fuse folds them and keeps the activation, convert_norm converts the
norm and keeps the activation, and a norm subclass that is something else is named, never
silently replaced."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightnets as ln
from lightnets.deploy.normact import split_norm_act
from lightnets.errors import UserError
from lightnets.nn import FBNConv2d
from lightnets.nn.norm import FrozenBatchNorm

torch.set_num_threads(1)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's layout: BN, then `drop`, then `act`, all inside one BatchNorm2d subclass."""

    def __init__(self, channels: int, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self.momentum,
            self.eps,
        )
        return self.act(self.drop(x))


class GroupNormAct(nn.GroupNorm):
    def __init__(self, groups: int, channels: int) -> None:
        super().__init__(groups, channels)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class ActFirstBN(nn.BatchNorm2d):
    """A BN subclass that is *not* norm-then-children: the activation comes first."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.act(x))


class Net(nn.Module):
    def __init__(self, odd: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(24, nn.SiLU)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False)
        self.bn3 = ActFirstBN(24) if odd else BatchNormAct2d(24, nn.Hardswish)
        self.conv3 = nn.Conv2d(24, 32, 1, bias=False)
        self.gn = GroupNormAct(4, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        x = self.gn(self.conv3(self.bn3(self.dw(x))))
        return self.head(x.mean((2, 3)))


def _primed(model: nn.Module) -> nn.Module:
    """Random affine, and running statistics from a few train-mode batches (not 0 / 1)."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 12, 12) * 2 + 1)
    return model.eval()


X = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert (a - b).abs().max() <= rel * b.abs().max(), float((a - b).abs().max())


def test_fuse_folds_norm_act_layers_and_keeps_their_activation():
    model = _primed(Net())
    ref = model(X)
    with torch.no_grad():
        fused = ln.fuse(model)
        out = fused(X)
    _close(out, ref)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    # the activations are still there, after the folded (now identity) norms
    assert isinstance(fused.bn2.act, nn.SiLU) and isinstance(fused.bn3.act, nn.Hardswish)
    assert isinstance(fused.bn1.norm, nn.Identity) and fused.conv1.bias is not None
    assert isinstance(fused.gn.norm, nn.GroupNorm)  # GN is per sample: it stays
    assert type(model.bn1) is BatchNormAct2d  # the model itself is untouched
    # the fused parameter count: BN parameters gone, one bias per folded conv
    profile = ln.profile(model, (1, 3, 12, 12))
    assert profile.fused_params == sum(p.numel() for p in fused.parameters())


@pytest.mark.parametrize("kind", ["frozen_bn", "bn", "brn"])
def test_convert_norm_keeps_the_activation_and_the_eval_output(kind):
    model = _primed(Net())
    ref = model(X)
    ln.convert_norm(model, kind)
    with torch.no_grad():
        _close(model.eval()(X), ref)
    assert isinstance(model.bn2, nn.Sequential) and isinstance(model.bn2.act, nn.SiLU)
    assert not any(type(m) is BatchNormAct2d for m in model.modules())
    if kind == "frozen_bn":
        assert isinstance(model.bn1.norm, FrozenBatchNorm)


def test_convert_norm_gn_and_none_keep_the_activation():
    model = _primed(Net())
    ln.convert_norm(model, "gn", num_groups=8)
    assert isinstance(model.bn2.norm, nn.GroupNorm) and model.bn2.norm.num_groups == 8
    assert isinstance(model.bn2.act, nn.SiLU)
    none = _primed(Net())
    ln.convert_norm(none, "none")
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(none.bn1(x), torch.relu(x))  # identity, then the ReLU


def test_convert_norm_fbn_pairs_convs_with_norm_act_layers():
    model = _primed(Net())
    ref = model(X)
    fused_params = sum(p.numel() for p in ln.fuse(model).parameters())
    ln.convert_norm(model, "fbn", fbn_groups=2)
    # every non-depthwise conv + BN pair became an FBN conv; the activations stay
    assert isinstance(model.conv1, FBNConv2d) and isinstance(model.conv2, FBNConv2d)
    # a norm layer the conversion did not touch stays the layer it was
    assert isinstance(model.dw, nn.Conv2d) and type(model.bn3) is BatchNormAct2d
    assert isinstance(model.bn2.norm, nn.Identity) and isinstance(model.bn2.act, nn.SiLU)
    with torch.no_grad():
        _close(model.eval()(X), ref)
    # it trains a step and fuses back to the original's fused parameter count
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = model(X).square().mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert sum(p.numel() for p in ln.fuse(model).parameters()) == fused_params


def test_a_norm_subclass_that_is_something_else_is_named_not_replaced():
    model = _primed(Net(odd=True))
    ref = model(X)
    with pytest.warns(UserWarning, match=r"fuse: left 1 norm layer\(s\) .*: bn3 \(its forward"):
        fused = ln.fuse(model)
    with torch.no_grad():
        _close(fused(X), ref)
    assert type(fused.bn3) is ActFirstBN
    with pytest.warns(UserWarning, match=r"convert_norm\(kind='frozen_bn'\) left 1 .*bn3"):
        ln.convert_norm(model, "frozen_bn")
    assert type(model.bn3) is ActFirstBN and isinstance(model.bn1.norm, FrozenBatchNorm)
    with torch.no_grad():
        _close(model(X), ref)


def test_a_failed_conversion_leaves_the_model_as_it_was():
    model = _primed(Net())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UserError, match="num_groups=7 does not divide"):
        ln.convert_norm(model, "gn", num_groups=7)
    assert type(model.bn1) is BatchNormAct2d and type(model.bn2) is BatchNormAct2d
    assert model.state_dict().keys() == before.keys()


def test_split_report_and_a_model_that_is_one_layer():
    layer = BatchNormAct2d(8)
    split, report = split_norm_act(layer)
    assert isinstance(split, nn.Sequential) and report.split == ["BatchNormAct2d"]
    model = Net()
    _, report = split_norm_act(model)
    assert report.split == ["bn1", "bn2", "bn3", "gn"] and not report.unsplit
    assert list(model.bn1.state_dict()) == [
        "norm.weight",
        "norm.bias",
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
    ]


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm's SyncBatchNormAct (what timm's convert_sync_batchnorm makes of BatchNormAct2d):
    a SyncBatchNorm subclass, so none of BatchNorm1d/2d/3d, with its own drop and act."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class BareBN(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm of no torch class lightnets can rebuild it as, with a forward of its own."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def _sync_net(norm: type[nn.Module] = SyncBatchNormAct) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), norm(8), nn.Conv2d(8, 4, 1), nn.Flatten()
    )


def test_sync_batch_norm_act_keeps_its_activation_in_convert_norm_and_folds_in_fuse():
    """Before: SyncBatchNormAct was no norm-act candidate (not a BatchNorm1d/2d/3d), so
    convert_norm swapped it for a plain norm (the ReLU gone, the output wrong, no warning) and
    fuse left it unfolded without a word."""
    model = _primed(_sync_net())
    ref = model(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = ln.fuse(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert isinstance(fused[1].act, nn.ReLU)
    with torch.no_grad():
        _close(fused(X), ref)
    for kind in ("frozen_bn", "bn", "sync_bn"):
        converted = ln.convert_norm(copy.deepcopy(model), kind)
        assert isinstance(converted[1].act, nn.ReLU), kind
        with torch.no_grad():
            _close(converted.eval()(X), ref)


def test_a_bn_subclass_that_cannot_be_rebuilt_is_named_never_converted():
    model = _primed(_sync_net(BareBN))
    ref = model(X)
    with pytest.warns(UserWarning, match=r"convert_norm\(kind='frozen_bn'\) left 1 .*: 1 \(it "):
        ln.convert_norm(model, "frozen_bn")
    assert type(model[1]) is BareBN
    with pytest.warns(UserWarning, match=r"fuse: left 1 norm layer\(s\) .*: 1 \(it derives"):
        fused = ln.fuse(model)
    with torch.no_grad():
        _close(fused(X), ref)


class VisionFrozenBN(nn.Module):
    """torchvision's FrozenBatchNorm2d: buffers, not parameters, and its own forward."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.eps = 1e-5
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0)):
            self.register_buffer(name, torch.full((channels,), value))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var + self.eps).rsqrt().reshape(
            1, -1, 1, 1
        )
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift


class FrozenBatchNormAct2d(VisionFrozenBN):
    """timm's FrozenBatchNormAct2d (from freeze_batch_norm_2d): the frozen map, drop, act."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class OddFrozen(VisionFrozenBN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def _frozen_net(norm1: type[nn.Module], norm2: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), norm1(8), nn.Conv2d(8, 6, 3, bias=False), norm2(6)
    ).eval()
    with torch.no_grad():
        for m in (model[1], model[3]):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_frozen_batch_norms_written_elsewhere_are_folded_by_fuse():
    """torchvision's FrozenBatchNorm2d and timm's FrozenBatchNormAct2d are per-channel affine
    maps: fuse folds them (before: left in place, with no warning), the activation kept."""
    model = _frozen_net(VisionFrozenBN, FrozenBatchNormAct2d)
    ref = model(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = ln.fuse(model)
    assert not any(isinstance(m, (VisionFrozenBN, FrozenBatchNorm)) for m in fused.modules())
    assert isinstance(fused[3].act, nn.SiLU)
    assert len(list(fused.parameters())) == 4  # two convs, each with its (folded) bias
    with torch.no_grad():
        _close(fused(X), ref)
    converted = ln.convert_norm(copy.deepcopy(model), "gn", num_groups=2)
    assert isinstance(converted[1], nn.GroupNorm) and isinstance(converted[3].norm, nn.GroupNorm)


def test_a_frozen_looking_layer_that_computes_something_else_is_named():
    model = _frozen_net(VisionFrozenBN, OddFrozen)
    ref = model(X)
    with pytest.warns(UserWarning, match=r"fuse: left 1 norm layer\(s\) .*: 3 \(its forward"):
        fused = ln.fuse(model)
    assert type(fused[3]) is OddFrozen and isinstance(fused[1], nn.Identity)
    with torch.no_grad():
        _close(fused(X), ref)
