"""Structural reparameterization hooks (timm / RepVGG / MobileOne / DBB conventions), written
here by hand so no timm is needed: fuse (and so profile and export) calls them first, then
folds what is left; attributes named like a hook that are no hook are left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import lightnets as ln
from lightnets.deploy.fuse import reparameterize_
from lightnets.errors import UserError

torch.set_num_threads(1)


def _conv_bn(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


def _kernel_bias(branch: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A branch as a 3x3 kernel and bias (torch's own conv+BN folding for conv branches)."""
    if isinstance(branch, nn.BatchNorm2d):  # identity branch: a 3x3 identity kernel, then BN
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[range(channels), range(channels), 1, 1] = 1.0
        fused = fuse_conv_bn_eval(conv.eval(), branch.eval())
    else:
        fused = fuse_conv_bn_eval(branch[0].eval(), branch[1].eval())
    pad = (3 - fused.weight.shape[-1]) // 2
    return F.pad(fused.weight, (pad,) * 4), fused.bias


class Branches(nn.Module):
    """RepVGG's training-time block: 3x3 conv+BN + 1x1 conv+BN + BN identity, ReLU; `_merge`
    turns the three branches into one 3x3 conv (the subclasses name the hook)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.branch3 = _conv_bn(channels, channels, 3)
        self.branch1 = _conv_bn(channels, channels, 1)
        self.identity = nn.BatchNorm2d(channels)
        self.merged: nn.Conv2d | None = None

    def forward(self, x):
        if self.merged is not None:
            return F.relu(self.merged(x))
        return F.relu(self.branch3(x) + self.branch1(x) + self.identity(x))

    @torch.no_grad()
    def _merge(self) -> None:
        parts = [
            _kernel_bias(b, self.channels) for b in (self.branch3, self.branch1, self.identity)
        ]
        conv = nn.Conv2d(self.channels, self.channels, 3, padding=1)
        conv.weight.copy_(sum(k for k, _ in parts))
        conv.bias.copy_(sum(b for _, b in parts))
        self.merged = conv
        del self.branch3, self.branch1, self.identity


class RepBlock(Branches):
    """MobileOne's (and timm's) spelling of the hook."""

    def reparameterize(self) -> None:
        self._merge()


class DeployBlock(Branches):
    """RepVGG's and DBB's spelling of the hook."""

    def switch_to_deploy(self) -> None:
        self._merge()


class ConvNorm(nn.Sequential):
    """timm's levit / efficientvit style: `fuse()` returns the module that replaces it."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))

    def fuse(self) -> nn.Module:
        return fuse_conv_bn_eval(self[0].eval(), self[1].eval())


class Stage(nn.Module):
    """A module with an *attribute* called fuse (a layer, as lightnets' U-Net stages have):
    no hook, must not be called."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fuse = nn.Conv2d(channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn(self.fuse(x))


class RepNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvNorm(3, 8)
        self.block1 = RepBlock(8)
        self.block2 = DeployBlock(8)
        self.stage = Stage(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stage(self.block2(self.block1(self.stem(x))))
        return self.head(x.mean((2, 3)))


def _primed() -> nn.Module:
    torch.manual_seed(0)
    model = RepNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(6, 3, 10, 10) * 1.5 + 0.5)
    return model.eval()


X = torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(2))


def test_fuse_runs_the_models_hooks_then_folds_the_rest():
    model = _primed()
    with torch.no_grad():
        ref = model(X)
        fused = ln.fuse(model)
        out = fused(X)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    # stem: fuse() replaced it by one conv; each block is one merged conv; the stage's conv
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and isinstance(fused.stem, nn.Conv2d)
    assert fused.block1.merged is not None and fused.block2.merged is not None
    assert isinstance(fused.stage.fuse, nn.Conv2d)  # an attribute, not a hook: untouched
    assert model.block1.merged is None  # the model itself keeps its branches


def test_hooks_are_called_top_down_once_each():
    model = _primed()
    called = reparameterize_(model)
    assert called == ["stem.fuse", "block1.reparameterize", "block2.switch_to_deploy"]


def test_profile_and_export_see_the_reparameterized_model(tmp_path):
    model = _primed()
    profile = ln.profile(model, (1, 3, 10, 10))
    fused = ln.fuse(model)
    assert profile.fused_params == sum(p.numel() for p in fused.parameters())
    assert profile.fused_macs < profile.macs  # three branches became one conv
    pytest.importorskip("onnxruntime")
    ln.export(model, tmp_path / "rep.onnx", input_size=(1, 3, 10, 10))
    assert (tmp_path / "rep.onnx").stat().st_size > 0


def test_a_failing_hook_is_one_error_naming_it():
    class Broken(RepBlock):
        def reparameterize(self) -> None:
            raise RuntimeError("kernel sizes differ")

    model = nn.Sequential(Broken(4))
    with pytest.raises(UserError, match=r"fuse: 0.reparameterize\(\) failed \(RuntimeError: "):
        ln.fuse(model)

    class Wrong(nn.Module):
        def fuse(self):
            return 3

    with pytest.raises(UserError, match=r"fuse: 0.fuse\(\) returned int"):
        ln.fuse(nn.Sequential(Wrong()))
