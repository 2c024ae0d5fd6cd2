"""convert_norm(model, kind) for bn, sync_bn, frozen_bn, gn, ln, in, brn, none on a model written
here: BatchNorm1d/2d/3d as attributes, in Sequentials and nested; checked against the original
model (its eval outputs, its parameters) and torch's own layers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightnets.deploy import convert_norm, fuse
from lightnets.errors import UserError
from lightnets.nn import BatchRenorm, FrozenBatchNorm

torch.set_num_threads(1)


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x))) + x


class Net(nn.Module):
    """Attribute-style 2-d BN, a nested module, Sequentials with 1-d and 3-d BNs, BN after fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.inner = Inner()
        self.video = nn.Sequential(nn.Conv3d(8, 8, (2, 1, 1), bias=False), nn.BatchNorm3d(8))
        self.seq = nn.Sequential(nn.Conv1d(8, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU())
        self.fc = nn.Linear(16, 16)
        self.bn_fc = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.inner(F.relu(self.bn(self.conv(x))))  # (N, 8, H, W)
        clip = torch.stack([x, x.flip(-1), x * 0.5], 2)  # (N, 8, 3, H, W)
        x = x + self.video(clip).mean(2)
        x = self.seq(x.flatten(2)).mean(2)  # (N, 16)
        return self.head(F.relu(self.bn_fc(self.fc(x))))


BN_NAMES = ("bn", "inner.norm", "video.1", "seq.1", "bn_fc")
DIMS = {"bn": 2, "inner.norm": 2, "video.1": 3, "seq.1": 1, "bn_fc": 1}


def _trained(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    model = Net().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(6, 3, 5, 5) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return model


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(seed))


def _norms(model: nn.Module) -> dict[str, nn.Module]:
    return {name: model.get_submodule(name) for name in BN_NAMES}


def test_frozen_bn_freezes_a_trained_model_for_fine_tuning():
    original = _trained()
    model = copy.deepcopy(original).train()
    assert convert_norm(model, "frozen_bn") is model
    for name, m in _norms(model).items():
        assert type(m) is FrozenBatchNorm and m.dims == DIMS[name]
        src = original.get_submodule(name)
        torch.testing.assert_close(m.running_var, src.running_var)
        torch.testing.assert_close(m.weight, src.weight)
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    x = _x()
    expected = original.eval()(x)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)  # in train mode
    assert model.training
    n_bn_params = sum(2 * m.num_features for m in _norms(original).values())
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(p.numel() for p in original.parameters()) - n_bn_params
    fused = fuse(model)  # a frozen BN is a per-channel affine: it folds into its conv / linear
    assert not any(isinstance(m, FrozenBatchNorm) for m in fused.modules())
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)


def test_bn_changes_options_and_unfreezes():
    original = _trained()
    model = convert_norm(copy.deepcopy(original), "bn", momentum=0.01, eps=1e-3)
    for name, m in _norms(model).items():
        src = original.get_submodule(name)
        assert type(m) is type(src) and (m.momentum, m.eps) == (0.01, 1e-3)
        torch.testing.assert_close(m.running_mean, src.running_mean)
        torch.testing.assert_close(m.weight, src.weight)
        assert m.num_batches_tracked == src.num_batches_tracked
    kept = convert_norm(copy.deepcopy(original), "bn")
    torch.testing.assert_close(kept.eval()(_x()), original.eval()(_x()))

    back = convert_norm(convert_norm(copy.deepcopy(original), "frozen_bn"), "bn")
    for name, m in _norms(back).items():
        assert type(m) is type(original.get_submodule(name))  # 1d / 2d / 3d as before
        assert isinstance(m.weight, nn.Parameter) and m.weight.requires_grad
    torch.testing.assert_close(back.eval()(_x()), original.eval()(_x()), rtol=1e-5, atol=1e-5)
    forced = convert_norm(copy.deepcopy(original), "bn", dims=2)
    assert all(type(m) is nn.BatchNorm2d for m in _norms(forced).values())
    sync = convert_norm(copy.deepcopy(original), "sync_bn")
    assert all(type(m) is nn.SyncBatchNorm for m in _norms(sync).values())


def test_brn_keeps_the_eval_model_and_starts_training_as_bn():
    original = _trained()
    model = convert_norm(copy.deepcopy(original), "brn", r_max=1.5, d_max=0.5, warmup_steps=2)
    for name, m in _norms(model).items():
        assert type(m) is BatchRenorm and (m.r_max, m.d_max, m.warmup_steps) == (1.5, 0.5, 2)
        assert m.dims == DIMS[name] and int(m.num_batches_tracked) == 0
        torch.testing.assert_close(m.running_mean, original.get_submodule(name).running_mean)
    x = _x()
    torch.testing.assert_close(model.eval()(x), original.eval()(x))
    model.train(), original.train()
    torch.testing.assert_close(model(x), original(x))  # warm-up: r = 1, d = 0 is BN
    model.eval(), original.eval()
    fused = fuse(model)  # in eval a BRN is BN on its running statistics: it folds too
    assert not any(isinstance(m, BatchRenorm) for m in fused.modules())
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kind, options, groups",
    [
        ("gn", {"num_groups": 4}, lambda c: 4),
        ("gn", {"channels_per_group": 2}, lambda c: c // 2),
        ("ln", {}, lambda c: 1),
        ("in", {}, lambda c: c),
    ],
)
def test_group_kinds_copy_gamma_beta(kind, options, groups):
    original = _trained()
    model = convert_norm(copy.deepcopy(original), kind, **options)
    for name, m in _norms(model).items():
        src = original.get_submodule(name)
        assert type(m) is nn.GroupNorm and m.num_groups == groups(src.num_features)
        torch.testing.assert_close(m.weight, src.weight)
        torch.testing.assert_close(m.bias, src.bias)
    if kind != "in":  # IN of the (N, 16) features after fc has one value per group
        x = _x()
        y = model.train()(x)
        assert y.shape == (6, 4) and torch.isfinite(y).all()
        # GN does not depend on the batch: sample 0 alone gives the same output
        torch.testing.assert_close(model(x[:1]), y[:1], rtol=1e-5, atol=1e-5)


def test_gn_that_does_not_divide_is_refused_and_changes_nothing():
    model = _trained()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UserError, match=r"num_groups=32 does not divide the channels of 5 layer"):
        convert_norm(model, "gn")
    with pytest.raises(UserError, match=r"num_groups=16 .* 3 layer\(s\): bn \(C=8\).*1, 2, 4, 8"):
        convert_norm(model, "gn", num_groups=16)
    with pytest.raises(UserError, match="only one of them"):
        convert_norm(model, "gn", num_groups=2, channels_per_group=2)
    with pytest.raises(UserError, match="num_groups=0"):
        convert_norm(model, "gn", num_groups=0)
    assert all(isinstance(m, _BatchNorm) for m in _norms(model).values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_none_removes_every_bn():
    model = convert_norm(_trained(), "none")
    assert all(isinstance(m, nn.Identity) for m in _norms(model).values())
    assert model(_x()).shape == (6, 4)


def test_sync_bn_sources_shared_layers_and_a_bare_norm():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(_trained())
    assert all(isinstance(m, nn.SyncBatchNorm) for m in _norms(model).values())
    convert_norm(model, "ln")
    assert all(isinstance(m, nn.GroupNorm) for m in _norms(model).values())

    shared = nn.BatchNorm2d(4)
    seq = nn.Sequential(nn.Conv2d(4, 4, 1), shared, nn.Conv2d(4, 4, 1), shared)
    convert_norm(seq, "frozen_bn")
    assert isinstance(seq[1], FrozenBatchNorm) and seq[1] is seq[3]

    bare = nn.BatchNorm1d(6)
    assert isinstance(convert_norm(bare, "gn", num_groups=3), nn.GroupNorm)


def test_errors():
    model = _trained()
    unknown = r"unknown convert_norm kind 'gnn' \(did you mean 'gn'\?\): expected one of bn, brn"
    with pytest.raises(UserError, match=unknown):
        convert_norm(model, "gnn")
    with pytest.raises(UserError, match=r"kind='brn'\) got unknown option 'rmax'.*r_max"):
        convert_norm(model, "brn", rmax=2)
    with pytest.raises(UserError, match=r"r_max=0.5"):
        convert_norm(model, "brn", r_max=0.5)
    with pytest.raises(UserError, match=r"momentum=3"):
        convert_norm(model, "bn", momentum=3)
    with pytest.raises(UserError, match=r"unknown option 'eps'.*none"):
        convert_norm(model, "frozen_bn", eps=1e-3)
    stats_free = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(UserError, match=r"1 keep\(s\) no running statistics"):
        convert_norm(stats_free, "frozen_bn")
    assert all(isinstance(m, _BatchNorm) for m in _norms(model).values())
