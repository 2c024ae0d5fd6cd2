"""convert_norm(model, "fbn", ...): G = 1 changes nothing; G > 1 keeps the eval output, trains,
and fuses back to plain convs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightnets.deploy import convert_norm, fuse
from lightnets.errors import UserError
from lightnets.nn import FBNConv2d


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)  # a conv bias before BN
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.dw(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def _model(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    model = TinyResNet()
    model.train()
    with torch.no_grad():  # statistics and affine parameters away from their initial values
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return model


def _fbns(model: nn.Module) -> list[FBNConv2d]:
    return [m for m in model.modules() if isinstance(m, FBNConv2d)]


def test_one_group_changes_nothing_in_train_and_eval():
    original = _model()
    converted = convert_norm(copy.deepcopy(original), "fbn", fbn_groups=1)
    assert len(_fbns(converted)) == 6  # stem, 2 x 2 block convs, downsample; not depthwise
    assert isinstance(converted.dw[1], nn.BatchNorm2d) and isinstance(converted.bn, nn.Identity)
    for step in range(3):
        x = torch.randn(6, 3, 8, 8) + step
        torch.testing.assert_close(converted(x), original(x), rtol=1e-5, atol=1e-5)
    for name, buf in original.named_buffers():
        if name.endswith("running_mean") and name.startswith("layer1.bn1"):
            fbn = converted.layer1.conv1
            torch.testing.assert_close(fbn.running_mean[0], buf)
    original.eval()
    converted.eval()
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(converted(x), original(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("option", [{"fbn_groups": 4}, {"channels_per_group": 4}])
def test_groups_keep_the_eval_output_train_and_fuse(option):
    original = _model(1).eval()
    if "fbn_groups" in option:
        with pytest.warns(UserWarning, match=r"conv \(C_in=3"):  # the stem's 3 channels
            converted = convert_norm(copy.deepcopy(original), "fbn", **option)
        assert isinstance(converted.conv, nn.Conv2d) and isinstance(converted.bn, nn.BatchNorm2d)
    else:  # 3 < 4 channels: one group of 3, G = max(1, 3 // 4), as the models and the layer
        converted = convert_norm(copy.deepcopy(original), "fbn", **option)
        assert converted.conv.fbn_groups == 1
    assert converted.layer2.conv2.fbn_groups == 4  # 16 // 4
    assert converted.layer1.conv1.fbn_groups == (4 if "fbn_groups" in option else 2)  # 8 // 4
    x = torch.randn(4, 3, 8, 8)
    # the running statistics were shared out so that the eval output is unchanged
    torch.testing.assert_close(converted(x), original(x), rtol=1e-5, atol=1e-5)

    converted.train()
    torch.manual_seed(0)
    data, labels = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    params = list(converted.parameters())
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(converted(data), labels)
        converted.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= 0.1 * p.grad
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses

    converted.eval()
    fused = fuse(converted)
    assert not _fbns(fused) and not any(isinstance(m, _BatchNorm) for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), converted(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 4])
def test_conv_bias_and_affine_mapping(groups, bias, affine):
    torch.manual_seed(groups)
    original = nn.Sequential(
        nn.Conv2d(8, 4, 3, padding=1, bias=bias), nn.BatchNorm2d(4, affine=affine)
    )
    with torch.no_grad():
        original(torch.randn(8, 8, 5, 5) * 3 + 1)
        if bias:
            original[0].bias.normal_(0, 3)
        if affine:
            original[1].weight.uniform_(0.5, 1.5)
            original[1].bias.normal_()
    converted = convert_norm(copy.deepcopy(original), "fbn", fbn_groups=groups, impl="naive")
    assert isinstance(converted[0], FBNConv2d) and converted[0].affine == affine
    x = torch.randn(4, 8, 5, 5)
    original.eval()
    converted.eval()
    torch.testing.assert_close(converted(x), original(x), rtol=1e-5, atol=1e-5)
    if groups == 1:  # training too: the batch mean cancels the conv bias exactly
        original.train()
        converted.train()
        torch.testing.assert_close(converted(x), original(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            converted[0].running_mean[0] + (original[0].bias if bias else 0),
            original[1].running_mean,
        )


def test_returns_the_model_modified_in_place():
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    assert convert_norm(model, "fbn", fbn_groups=2) is model
    assert isinstance(model[0], FBNConv2d) and isinstance(model[1], nn.Identity)
    sync = nn.Sequential(nn.Conv2d(4, 4, 1), nn.SyncBatchNorm(4))
    assert convert_norm(sync, "fbn", fbn_groups=2, impl="cov")[0].sync_stats


def test_uneven_groups_keep_the_eval_output():
    original = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)).train()
    original(torch.randn(8, 6, 5, 5))  # non-trivial running statistics
    original.eval()
    converted = convert_norm(copy.deepcopy(original), "fbn", fbn_groups=4)
    assert converted[0].group_sizes == (2, 2, 1, 1)
    x = torch.randn(3, 6, 5, 5)
    torch.testing.assert_close(converted(x), original(x), rtol=1e-5, atol=1e-5)


def test_channels_per_group_rounds_as_the_layer_does():
    """convert_norm's c means what FBNConv2d's and the models' c mean: G = max(1, C_in // c)
    per conv; a c that does not divide C_in gives groups of c channels or one more."""
    model = nn.Sequential(
        nn.Conv2d(30, 8, 1, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
    ).eval()
    converted = convert_norm(copy.deepcopy(model), "fbn", channels_per_group=7)
    assert converted[0].fbn_groups == 4 and converted[0].group_sizes == (8, 8, 7, 7)
    assert converted[2].fbn_groups == 1  # 8 // 7
    x = torch.randn(2, 30, 3, 3)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)


def test_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
    model.append(nn.BatchNorm2d(4))
    unknown = r"unknown convert_norm kind 'fnb' \(did you mean 'fbn'\?\): expected one of .*fbn"
    with pytest.raises(UserError, match=unknown):
        convert_norm(model, "fnb")
    with pytest.raises(UserError, match=r"unknown option 'group'.*fbn_groups"):
        convert_norm(model, "fbn", group=2)
    with pytest.raises(UserError, match=r"exactly one of fbn_groups=G or channels_per_group"):
        convert_norm(model, "fbn")
    with pytest.raises(UserError, match=r"0 \(C_in=3, G=4\).*strict=True"):
        convert_norm(model, "fbn", fbn_groups=4, strict=True)
    with pytest.raises(UserError, match=r"impl='fast'"):
        convert_norm(model, "fbn", fbn_groups=1, impl="fast")
    # nothing changed by the failed calls, the convertible second pair included
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[3], nn.BatchNorm2d)


def test_an_rgb_stem_is_explained_once_not_reported_as_a_failure():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
    )
    with pytest.warns(UserWarning) as record:
        convert_norm(model, "fbn", fbn_groups=4)
    assert len(record) == 1
    message = str(record[0].message)
    assert "1 conv(s) with fewer input channels than G=4 keep their BN: 0 (C_in=3)" in message
    assert "left" not in message.split(":")[0]
    assert isinstance(model[3], FBNConv2d) and isinstance(model[1], nn.BatchNorm2d)


def test_grouped_convs_that_fbn_would_apply_to_are_named_depthwise_ones_are_not():
    """FBNConv2d has no conv groups: a grouped conv of several input channels a group (RegNet's
    16) keeps its BN with a warning naming it (before: an info-level log only); a depthwise
    conv (one input channel a group: nothing to split) is no news."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False),
        nn.BatchNorm2d(16),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
        nn.BatchNorm2d(16),
    )
    with pytest.warns(UserWarning) as record:
        convert_norm(copy.deepcopy(model), "fbn", fbn_groups=2)
    assert len(record) == 1
    message = str(record[0].message)
    assert "1 grouped conv(s), which FBNConv2d does not support" in message
    assert "2 (groups=4)" in message and "4 (" not in message
    with pytest.raises(UserError, match=r"1 grouped conv\(s\).*strict=True"):
        convert_norm(model, "fbn", fbn_groups=2, strict=True)
    assert isinstance(model[0], nn.Conv2d)  # strict: nothing changed
