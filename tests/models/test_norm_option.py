"""`norm=` / `norm_kwargs=` of resnet18, resnet50 and finet, and `zero_init_last` (GN paper §4.1:
every residual block starts as the identity, for every norm kind with a trainable gamma)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightnets.errors import UserError
from lightnets.models.finet import FinetBlock, finet_small
from lightnets.models.resnet import BasicBlock, Bottleneck, resnet18, resnet50
from lightnets.nn import BatchRenorm, FBNConv2d, FrozenBatchNorm

torch.set_num_threads(1)

KINDS = {
    "bn": nn.BatchNorm2d,
    "sync_bn": nn.SyncBatchNorm,
    "frozen_bn": FrozenBatchNorm,
    "gn": nn.GroupNorm,
    "ln": nn.GroupNorm,
    "in": nn.GroupNorm,
    "brn": BatchRenorm,
    "none": nn.Identity,
}
RESNET18_NORMS = 1 + 8 * 2 + 3  # stem, two per block, three downsample shortcuts


def _norm_slots(model: nn.Module) -> list[nn.Module]:
    """The modules in the norm positions (stem bn1, blocks' bn*, downsample.1)."""
    slots = [model.bn1]
    for block in model.modules():
        if isinstance(block, (BasicBlock, Bottleneck)):
            slots += [m for name, m in block.named_children() if name.startswith("bn")]
            if block.downsample is not None and len(block.downsample) > 1:
                slots.append(block.downsample[1])
    return slots


@pytest.mark.parametrize("norm", [*KINDS, "fbn"])
def test_every_norm_kind_builds_and_trains_resnet18(norm):
    torch.manual_seed(0)
    kw = {"fbn_groups": 2} if norm == "fbn" else {}
    model = resnet18(num_classes=10, cifar_stem=True, norm=norm, **kw)
    slots = _norm_slots(model)
    if norm == "fbn":
        assert sum(isinstance(m, FBNConv2d) for m in model.modules()) == RESNET18_NORMS - 1
    else:
        n = RESNET18_NORMS - (3 if norm == "none" else 0)  # "none": downsample is the conv only
        assert len(slots) == n and all(type(m) is KINDS[norm] for m in slots)
    if norm in ("gn", "ln", "in"):
        groups = {"gn": lambda c: 32, "ln": lambda c: 1, "in": lambda c: c}[norm]
        assert all(m.num_groups == groups(m.num_channels) for m in slots)
    out = model(torch.randn(2, 3, 16, 16))  # layer4 is 2x2: IN has 4 values per channel
    assert out.shape == (2, 10)
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 16, 16))).all()


def test_norm_kwargs_reach_every_norm_layer():
    model = resnet18(norm="gn", norm_kwargs={"num_groups": 8}, cifar_stem=True)
    assert all(m.num_groups == 8 for m in _norm_slots(model))
    model = resnet50(norm="gn", norm_kwargs={"channels_per_group": 16})
    assert all(m.num_groups == m.num_channels // 16 for m in _norm_slots(model))
    brn = resnet18(norm="brn", norm_kwargs={"r_max": 1.5, "d_max": 0.5, "warmup_steps": 0})
    assert all((m.r_max, m.d_max, m.warmup_steps) == (1.5, 0.5, 0) for m in _norm_slots(brn))
    fbn = resnet18(norm="fbn", fbn_groups=2, norm_kwargs={"momentum": 0.01})  # the stem BN
    assert fbn.bn1.momentum == 0.01
    with pytest.raises(UserError, match=r"C=64 channels are not divisible by G=48"):
        resnet18(norm="gn", norm_kwargs={"num_groups": 48})
    with pytest.raises(UserError, match="unknown option 'groups'.*did you mean 'num_groups'"):
        resnet18(norm="gn", norm_kwargs={"groups": 8})
    with pytest.raises(UserError, match="norm_kwargs"):
        resnet50(norm="gn", norm_kwargs=32)
    with pytest.raises(UserError, match="norm 'gnx'.*did you mean 'gn'"):
        resnet18(norm="gnx")


def _check_blocks_are_identity(model: nn.Module, x: torch.Tensor) -> int:
    """Every residual block maps its input x to relu(shortcut(x)); returns the number checked."""
    inputs: dict[nn.Module, torch.Tensor] = {}
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck, FinetBlock))]

    def keep(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        inputs[module] = (args[0], output)

    hooks = [b.register_forward_hook(keep) for b in blocks]
    with torch.no_grad():
        model(x)
        for h in hooks:
            h.remove()
        checked = 0
        for b in blocks:
            inp, out = inputs[b]
            if isinstance(b, FinetBlock):
                if not b.use_shortcut:
                    continue
                expected = inp  # Finet adds the identity after the last ReLU
            else:
                shortcut = inp if b.downsample is None else b.downsample(inp)
                expected = torch.relu(shortcut)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
            checked += 1
    return checked


@pytest.mark.parametrize("norm", ["bn", "sync_bn", "gn", "ln", "in", "brn", "fbn"])
def test_zero_init_last_makes_every_resnet_block_an_identity(norm):
    torch.manual_seed(0)
    kw = {"fbn_groups": 2} if norm == "fbn" else {}
    model = resnet18(num_classes=10, cifar_stem=True, norm=norm, zero_init_last=True, **kw)
    x = torch.randn(2, 3, 16, 16)
    for training in (True, False):
        model.train(training)
        assert _check_blocks_are_identity(model, x) == 8


@pytest.mark.parametrize("norm", ["gn", "brn"])
def test_zero_init_last_bottleneck(norm):
    torch.manual_seed(0)
    model = resnet50(num_classes=10, cifar_stem=True, norm=norm, zero_init_last=True)
    assert _check_blocks_are_identity(model.train(), torch.randn(2, 3, 8, 8)) == 16
    for b in model.modules():
        if isinstance(b, Bottleneck):
            assert torch.all(b.bn1.weight == 1) and torch.count_nonzero(b.bn3.weight) == 0


def test_zero_init_last_leaves_kinds_without_a_trainable_gamma():
    frozen = resnet18(norm="frozen_bn", zero_init_last=True)
    none = resnet18(norm="none", zero_init_last=True)
    f_blocks = [m for m in frozen.modules() if isinstance(m, BasicBlock)]
    n_blocks = [m for m in none.modules() if isinstance(m, BasicBlock)]
    assert len(f_blocks) == len(n_blocks) == 8
    for f, n in zip(f_blocks, n_blocks):
        assert torch.all(f.bn2.weight == 1)  # a fixed buffer: zero would never train
        assert isinstance(n.bn2, nn.Identity) and torch.count_nonzero(n.conv2.weight) > 0


def test_finet_norm_follows_norm_and_fbn_layers_stay_fbn():
    torch.manual_seed(0)
    model = finet_small(num_classes=10, cifar_stem=True, norm="gn", norm_kwargs={"num_groups": 2})
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    assert norms and all(isinstance(m, nn.GroupNorm) and m.num_groups == 2 for m in norms)
    fbn = finet_small(num_classes=10, cifar_stem=True, fbn_groups=2, norm="ln")
    block = fbn.stage2[1]
    assert isinstance(block.conv1.conv, FBNConv2d) and isinstance(block.conv2.conv, FBNConv2d)
    assert isinstance(block.dw.norm, nn.GroupNorm) and block.dw.norm.num_groups == 1
    assert isinstance(fbn.conv1.norm, nn.GroupNorm) and isinstance(fbn.conv5.norm, nn.GroupNorm)
    out = fbn(torch.randn(2, 3, 16, 16))
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in fbn.parameters())
    with pytest.raises(UserError, match="C=30 channels are not divisible by G=4"):
        finet_small(norm="gn", norm_kwargs={"num_groups": 4})


@pytest.mark.parametrize(
    "kw", [{"norm": "bn"}, {"fbn_groups": 2}, {"norm": "gn", "norm_kwargs": {"num_groups": 2}}]
)
def test_finet_zero_init_last(kw):
    torch.manual_seed(0)
    model = finet_small(num_classes=10, cifar_stem=True, zero_init_last=True, **kw)
    assert _check_blocks_are_identity(model.train(), torch.randn(2, 3, 16, 16)) == 13


def test_group_norm_error_lists_the_groups_that_fit_the_whole_model():
    """G=4 fits Finet-small's 24-channel layer but not its 30-channel ones: the error gives the
    G that divide every norm layer's channels (found on the model itself), and they work."""
    from lightnets.models import create_model

    with pytest.raises(UserError, match=r"model 'finet_small' with norm='gn'.*C=30.*G in 1, 2$"):
        create_model("finet_small", norm="gn", norm_kwargs={"num_groups": 4})
    model = create_model("finet_small", norm="gn", norm_kwargs={"num_groups": 2})
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


# ------------------------------------------------------------- one convention for every model


def _fbn_groups_by_name(model: nn.Module) -> dict[str, int]:
    return {n: m.fbn_groups for n, m in model.named_modules() if isinstance(m, FBNConv2d)}


@pytest.mark.parametrize("factory", [finet_small, resnet18])
def test_fbn_options_mean_fbn_in_every_model_with_fbn_positions(factory):
    """norm="fbn" and an FBN option that asks for groups build the same model, in Finet as in
    ResNet; norm="fbn" alone gives one-group FBN convs at the same places."""
    by_kind = factory(norm="fbn", fbn_groups=2)
    by_option = factory(fbn_groups=2)
    groups = _fbn_groups_by_name(by_kind)
    assert groups and set(groups.values()) == {2} and _fbn_groups_by_name(by_option) == groups
    assert by_kind.state_dict().keys() == by_option.state_dict().keys()
    assert _fbn_groups_by_name(factory(norm="fbn")) == dict.fromkeys(groups, 1)
    assert not _fbn_groups_by_name(factory())  # the baseline: plain convs and BNs


def test_other_norm_layers_follow_norm_when_fbn_is_on():
    """With an FBN option and another norm, the FBN positions are FBN and every other norm
    position is `norm` (ResNet: the stem; Finet: stem, depthwise convs, conv5)."""
    model = resnet18(norm="gn", norm_kwargs={"num_groups": 8}, fbn_groups=2)
    assert isinstance(model.bn1, nn.GroupNorm) and model.bn1.num_groups == 8
    assert len(_fbn_groups_by_name(model)) == RESNET18_NORMS - 1
    assert isinstance(resnet18(norm="fbn").bn1, nn.BatchNorm2d)  # BN outside FBN positions


def test_channels_per_group_means_the_same_in_models_layers_and_convert():
    """Finet's fbn_channels_per_group, FBNConv2d's channels_per_group and convert_norm's give
    each conv G = max(1, C_in // c) (computed here by hand)."""
    from lightnets.deploy import convert_norm

    for c in (7, 20, 50):
        built = finet_small(fbn_channels_per_group=c)
        converted = convert_norm(finet_small(), "fbn", channels_per_group=c)
        for name, fbn in built.named_modules():
            if isinstance(fbn, FBNConv2d):
                assert fbn.fbn_groups == max(1, fbn.in_channels // c), name
                assert converted.get_submodule(name).fbn_groups == fbn.fbn_groups, name


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vgg16", {"width": 0.25}),
        ("res_unet", {"widths": [8, 16]}),
        ("fused_unet", {"widths": [8, 16]}),
        ("mnist_cnn", {}),
    ],
)
def test_models_without_fbn_positions_refuse_fbn_and_name_convert_norm(name, kwargs):
    from lightnets.models import create_model

    with pytest.raises(UserError, match=rf"^{name}: norm='fbn' is invalid: .*convert_norm"):
        create_model(name, norm="fbn", **kwargs)
    for kind in ("gn", "ln", "none"):  # and take every other kind of the convention
        norm_kwargs = {"num_groups": 4} if kind == "gn" and name != "mnist_cnn" else None
        extra = {"norm_kwargs": norm_kwargs} if name != "mnist_cnn" else {}
        assert create_model(name, norm=kind, **extra, **kwargs) is not None


def test_norm_kwargs_with_fbn_are_the_bn_options_and_say_so():
    with pytest.raises(
        UserError,
        match=r"resnet18: norm 'bn' got unknown option 'fbn_groups'.*"
        r"norm_kwargs are the options of the BN layers",
    ):
        resnet18(norm="fbn", norm_kwargs={"fbn_groups": 2})
