"""Norm layers with a built-in activation (the pattern of timm's BatchNormAct2d, written here
by hand: no timm needed): fuse folds them and keeps the activation, convert_norm converts the
norm and keeps the activation, and a norm subclass that is something else is named, never
silently replaced."""

from __future__ import annotations

import copy

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
