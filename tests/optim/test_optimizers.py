"""build_optimizer / param_groups: groups by layer kind, merged decays, clear refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightnets.errors import UserError
from lightnets.optim import (
    build_optimizer,
    factory,
    list_optimizers,
    param_groups,
    register_optimizer,
)


class TaggedNorm(nn.Module):
    """A custom normalization that only declares itself one."""

    is_norm_layer = True

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))


class FBNLike(nn.Module):
    """A conv holding its normalization's affine as norm_weight / norm_bias (like FBN)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 1, 1))
        self.norm_weight = nn.Parameter(torch.ones(2, 4))
        self.norm_bias = nn.Parameter(torch.zeros(2, 4))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.tagged = TaggedNorm(4)
        self.fbn = FBNLike()
        self.fc = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def ids(params) -> set[int]:
    return {id(p) for p in params}


def expected_sets(net: Net) -> dict[str, set[int]]:
    norm = [
        *net.bn.parameters(),
        *net.gn.parameters(),
        *net.ln.parameters(),
        *net.inorm.parameters(),
        *net.tagged.parameters(),
        net.fbn.norm_weight,
        net.fbn.norm_bias,
    ]
    return {
        "weight": ids([net.conv.weight, net.fbn.weight, net.fc.weight]),
        "norm": ids(norm),
        "bias": ids([net.conv.bias, net.fc.bias]),
    }


def test_three_groups_when_all_decays_differ():
    net = Net()
    groups = param_groups(net, 1e-4, norm_weight_decay=0.0, bias_weight_decay=1e-5)
    assert [g["name"] for g in groups] == ["weight", "norm", "bias"]
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0, 1e-5]
    expected = expected_sets(net)
    for g in groups:
        assert ids(g["params"]) == expected[g["name"]]
        assert len(g["params"]) == len(expected[g["name"]])


def test_equal_decays_merge_and_none_means_weight_decay():
    net = Net()
    expected = expected_sets(net)
    groups = param_groups(net, 1e-4, norm_weight_decay=0.0, bias_weight_decay=0.0)
    assert [(g["name"], g["weight_decay"]) for g in groups] == [
        ("weight", 1e-4),
        ("norm+bias", 0.0),
    ]
    assert ids(groups[1]["params"]) == expected["norm"] | expected["bias"]

    (only,) = param_groups(net, 5e-4)
    assert only["name"] == "weight+norm+bias" and only["weight_decay"] == 5e-4
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert ids(only["params"]) == ids(trainable) and len(only["params"]) == len(trainable)


def test_shared_parameter_appears_once():
    a = nn.Linear(3, 3)
    b = nn.Linear(3, 3)
    b.weight = a.weight  # tied
    net = nn.Sequential(a, nn.BatchNorm1d(3), b)
    groups = param_groups(net, 1e-4, norm_weight_decay=0.0)
    flat = [p for g in groups for p in g["params"]]
    assert len(flat) == len(ids(flat)) == 5  # a.w, a.b, bn.w, bn.b, b.b
    build_optimizer(net, "sgd", 0.1, weight_decay=1e-4, norm_weight_decay=0.0)  # torch accepts


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("sgd", torch.optim.SGD),
        ("SGD", torch.optim.SGD),
        ("Adam", torch.optim.Adam),
        ("adamw", torch.optim.AdamW),
    ],
)
def test_build_by_name(name, cls):
    net = Net()
    opt = build_optimizer(net, name, 0.05, weight_decay=1e-4, norm_weight_decay=0.0)
    assert type(opt) is cls
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert {"sgd", "adam", "adamw"} <= set(list_optimizers())


def test_sgd_options_reach_torch():
    opt = build_optimizer(Net(), "sgd", 0.1, momentum=0.8, nesterov=True)
    group = opt.param_groups[0]
    assert group["momentum"] == 0.8 and group["nesterov"] is True
    opt = build_optimizer(Net(), "adam", 1e-3, betas=(0.8, 0.99), eps=1e-6)
    assert opt.param_groups[0]["betas"] == (0.8, 0.99) and opt.param_groups[0]["eps"] == 1e-6


def test_norm_params_are_not_decayed_by_sgd():
    """One plain SGD step with zero gradients: only decay moves the weights, by lr * wd * w."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    nn.init.normal_(net[1].weight)
    before = [p.detach().clone() for p in net.parameters()]
    opt = build_optimizer(
        net,
        "sgd",
        0.5,
        momentum=0.0,
        weight_decay=0.1,
        norm_weight_decay=0.0,
        bias_weight_decay=0.0,
    )
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    w, b, bn_w, bn_b = (p.detach() for p in net.parameters())
    torch.testing.assert_close(w, before[0] * (1 - 0.5 * 0.1))
    for now, then in zip((b, bn_w, bn_b), before[1:]):
        torch.testing.assert_close(now, then)


def test_plain_parameter_list():
    p = nn.Parameter(torch.zeros(2))
    opt = build_optimizer([p], "adamw", 1e-3, weight_decay=0.01)
    assert opt.param_groups[0]["params"] == [p] and opt.param_groups[0]["weight_decay"] == 0.01
    with pytest.raises(UserError, match="norm_weight_decay"):
        build_optimizer([p], "sgd", 0.1, weight_decay=0.01, norm_weight_decay=0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "adamww"}, r"unknown optimizer 'adamww' \(did you mean 'adamw'\?\).*sgd"),
        ({"lr": 0.0}, "lr=0.0 must be positive"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"weight_decay": -1e-4}, "weight_decay=-0.0001 is negative"),
        ({"norm_weight_decay": -1.0}, "norm_weight_decay=-1.0"),
        ({"bias_weight_decay": -1.0}, "bias_weight_decay=-1.0"),
        ({"momentum": 1.0}, "momentum=1.0 is out of range"),
        ({"momentum": -0.1}, "momentum=-0.1"),
        ({"momentum": 0.0, "nesterov": True}, "nesterov=True needs momentum"),
        ({"name": "adam", "betas": (0.9, 1.0)}, "betas"),
    ],
)
def test_refusals(kwargs, match):
    args = {"name": "sgd", "lr": 0.1} | kwargs
    with pytest.raises(UserError, match=match):
        build_optimizer(Net(), **args)


def test_no_trainable_parameters():
    net = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameters"):
        build_optimizer(net, "sgd", 0.1)


def test_register_optimizer(monkeypatch):
    monkeypatch.setattr(factory.OPTIMIZERS, "_items", dict(factory.OPTIMIZERS))
    seen = {}

    @register_optimizer("MySGD")
    def build(params, lr, *, model, momentum, **options):
        seen.update(model=model, options=options)
        return torch.optim.SGD(params, lr=lr, momentum=momentum)

    net = Net()
    opt = build_optimizer(net, "mysgd", 0.2, weight_decay=1e-4, norm_weight_decay=0.0)
    assert isinstance(opt, torch.optim.SGD) and "mysgd" in list_optimizers()
    assert seen["model"] is net and seen["options"]["norm_weight_decay"] == 0.0
    assert [g["name"] for g in opt.param_groups] == ["weight+bias", "norm"]
    with pytest.raises(ValueError, match="registered twice"):
        register_optimizer("mysgd")(lambda params, lr, **kw: None)
