"""Structural reparameterization hooks (timm / RepVGG / MobileOne / DBB conventions), written
here by hand so no timm is needed: fuse (and so profile and export) calls them first, then
folds what is left; attributes named like a hook that are no hook are left alone."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import lightnets as ln
from lightnets.deploy.folding import reparameterize_

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


def _primed(net: type[nn.Module] | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = (net or RepNet)()
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


def test_a_failing_hook_is_named_and_its_module_kept_as_it_was():
    """A hook that fails (or a fuse() that returns no module) leaves its module untouched (it
    ran on a copy): a warning names it, the rest is folded, the output is unchanged."""

    class Broken(RepBlock):
        def reparameterize(self) -> None:
            self.branch3 = None  # half-done work must not reach the fused model
            raise RuntimeError("kernel sizes differ")

    class Wrong(ConvNorm):
        def fuse(self):
            return 3

    torch.manual_seed(0)
    model = nn.Sequential(Wrong(3, 4), Broken(4)).eval()
    with torch.no_grad():
        ref = model(X)
    with pytest.warns(UserWarning, match=r"2 reparameterization hook\(s\) failed") as rec:
        fused = ln.fuse(model)
    message = str(rec[0].message)
    assert "0.fuse() (TypeError: returned int" in message
    assert "1.reparameterize() (RuntimeError: kernel sizes differ)" in message
    assert fused[1].merged is None and fused[1].branch3 is not None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused[0].modules())  # folded anyway
    with torch.no_grad():
        assert (fused(X) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_fbn_converted_branches_still_merge_through_the_models_hook():
    """convert_norm('fbn') turns each branch's conv + BN into an FBN conv; at fuse time the
    hook is shown conv + BN again, so the block still becomes one conv, and the trained FBN
    model fuses to the original's fused parameter count."""
    model = _primed()
    fused_params = sum(p.numel() for p in ln.fuse(model).parameters())
    ln.convert_norm(model, "fbn", fbn_groups=2)
    assert isinstance(model.block1.branch3[0], ln.nn.FBNConv2d)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model(X).square().mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        ref = model(X)
        fused = ln.fuse(model)
        out = fused(X)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert fused.block1.merged is not None and fused.block2.merged is not None
    assert sum(p.numel() for p in fused.parameters()) == fused_params


class _IdentityNorm(nn.BatchNorm2d):
    """timm's identity branch: a BatchNormAct2d with apply_act=False (drop and act are
    nn.Identity), a BatchNorm2d subclass with a forward of its own."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class TimmRepBlock(Branches):
    """timm's MobileOne / RepVGG hook: `_fuse_bn_tensor` asserts the identity branch is an
    nn.BatchNorm2d and reads the conv branches' BN attributes."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.identity = _IdentityNorm(channels)

    def reparameterize(self) -> None:
        assert isinstance(self.identity, nn.BatchNorm2d)
        self._merge()


class TimmRepNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.block1 = TimmRepBlock(8)
        self.block2 = TimmRepBlock(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.block2(self.block1(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("kind", ["frozen_bn", "bn", "brn", "sync_bn"])
def test_converted_norms_still_merge_through_the_models_hook(kind):
    """After convert_norm to a kind with fixed eval statistics, the identity branch is a
    FrozenBatchNorm / BatchRenorm / SyncBatchNorm or a NormAct of one: the hook is shown the
    BatchNorm2d it asserts, so the branches still merge (before: the hook failed, the fused
    model kept every branch)."""
    model = _primed(TimmRepNet)
    with torch.no_grad():
        ref = model(X)
    plain = ln.fuse(model)
    ln.convert_norm(model, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = ln.fuse(model)
    assert fused.block1.merged is not None and fused.block2.merged is not None
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 3
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters())
    with torch.no_grad():
        assert (fused(X) - ref).abs().max() <= 1e-5 * ref.abs().max()


class EagerConvNorm(ConvNorm):
    """A hook that calls torch's fuse_conv_bn_eval on its modules as they are (no .eval()):
    it refuses modules in training mode ("Fusion only for eval!")."""

    def fuse(self) -> nn.Module:
        return fuse_conv_bn_eval(self[0], self[1])


def test_fbn_convs_shown_to_hooks_are_in_eval_mode_and_the_fused_model_is_all_eval():
    torch.manual_seed(0)
    model = nn.Sequential(EagerConvNorm(3, 8), RepBlock(8), nn.Conv2d(8, 4, 1)).eval()
    ln.convert_norm(model, "fbn", fbn_groups=2)
    model.train()  # fuse returns an eval copy whatever the model's mode
    with torch.no_grad():
        ref = model.eval()(X)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # before: "0.fuse() (AssertionError: Fusion only ...)"
        fused = ln.fuse(model)
    assert isinstance(fused[0], nn.Conv2d) and fused[1].merged is not None
    assert not any(m.training for m in fused.modules())
    assert model.training  # the model keeps its own mode
    with torch.no_grad():
        assert (fused(X) - ref).abs().max() <= 1e-5 * ref.abs().max()


class InPlaceFuse(ConvNorm):
    """ultralytics' RepVGGDW style: `fuse()` merges in place and returns None."""

    def fuse(self) -> None:
        merged = fuse_conv_bn_eval(self[0].eval(), self[1].eval())
        self[0] = merged
        self[1] = nn.Identity()


def test_a_fuse_hook_that_works_in_place_and_returns_none_is_kept():
    torch.manual_seed(0)
    model = nn.Sequential(InPlaceFuse(3, 8), nn.ReLU()).eval()
    with torch.no_grad():
        ref = model(X)
    assert reparameterize_(model) == ["0.fuse"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # before: "returned NoneType, not an nn.Module"
        fused = ln.fuse(nn.Sequential(InPlaceFuse(3, 8), nn.ReLU()).eval())
    assert isinstance(fused[0][1], nn.Identity) and fused[0][0].bias is not None
    with torch.no_grad():
        assert (model(X) - ref).abs().max() <= 1e-5 * ref.abs().max()
