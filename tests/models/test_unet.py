"""res_unet / fused_unet (weight mechanism paper): Table I's parameter counts, output sizes for
any input size, folding and export, argument errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lightnets as ln
from lightnets.errors import UserError
from lightnets.models.unet import Bottleneck
from lightnets.nn import DynamicWeight, GatedFusion, WeightedConcat

PAPER_BASELINE = 5.11e6  # Table I
PAPER_GATE = 0.34e6
SMALL = (4, 8, 8, 8, 8)  # narrow widths: same code paths, fast


def _n_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _conv_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of every conv, from its output size and weight shape (independent of profile)."""
    total = 0

    def hook(mod, inputs, out):
        nonlocal total
        total += out.numel() * mod.weight[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return total


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    out = {k: ln.create_model("res_unet", fusion=k) for k in ln.nn.FUSION_KINDS}
    out["fused"] = ln.create_model("fused_unet")
    return out


def test_registered():
    assert {"res_unet", "fused_unet"} <= set(ln.list_models())


def test_parameter_counts_match_table_1(models):
    base = _n_params(models["concat"])
    assert base == 5_246_370
    assert abs(base / PAPER_BASELINE - 1) < 0.05
    # alpha / beta: constants, no trainable parameter more than the baseline
    for kind in ("alpha", "beta"):
        assert _n_params(models[kind]) == base
        assert _n_params(models[kind], trainable_only=True) == base
    # dynamic weight: one per skip channel, 32 + 64 + 128 + 256
    assert _n_params(models["dynamic"]) - base == 480
    # gating: projections + two per-channel 1x1 gates per skip
    extra = _n_params(models["gate"]) - base
    assert extra == 349_600 and abs(extra / PAPER_GATE - 1) < 0.2


def test_four_skips_of_widths_32_to_256(models):
    widths = [m.weight.numel() for m in models["dynamic"].modules() if isinstance(m, DynamicWeight)]
    assert widths == [256, 128, 64, 32]
    gates = [m for m in models["gate"].modules() if isinstance(m, GatedFusion)]
    assert [(g.skip_channels, g.up_channels) for g in gates] == [
        (256, 512),
        (128, 256),
        (64, 128),
        (32, 64),
    ]
    blocks = [m for m in models["concat"].modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 9  # 5 encoder + 4 decoder
    assert [b.stride for b in models["concat"].encoder] == [1, 2, 2, 2, 2]
    assert not any(isinstance(m, nn.MaxPool2d) for m in models["concat"].modules())


def test_alpha_beta_are_buffers_in_the_state_dict(models):
    sd = models["alpha"].state_dict()
    alphas = {k: v.item() for k, v in sd.items() if k.endswith(".fuse.alpha")}
    assert len(alphas) == 4 and all(v == pytest.approx(0.5) for v in alphas.values())
    assert all(v == 1.0 for k, v in sd.items() if k.endswith(".fuse.beta"))
    assert not any(n.endswith(("alpha", "beta")) for n, _ in models["alpha"].named_parameters())
    # a state dict with other constants restores them (same keys for concat / alpha / beta)
    other = ln.create_model("res_unet", fusion="beta", beta=0.1).state_dict()
    target = ln.create_model("res_unet", fusion="alpha", alpha=0.5)
    target.load_state_dict(other)
    fuses = [m for m in target.modules() if isinstance(m, WeightedConcat)]
    assert all(f.alpha.item() == 1.0 and f.beta.item() == pytest.approx(0.1) for f in fuses)
    fused = ln.create_model("fused_unet", weight=1.0)
    fused.load_state_dict(ln.create_model("fused_unet", weight=0.5).state_dict())
    fuses = [m for m in fused.modules() if isinstance(m, WeightedConcat)]
    assert len(fuses) == 4 and all(f.alpha.item() == 0.5 for f in fuses)


def test_macs_profile_and_fusion_costs(models):
    x = torch.zeros(1, 3, 125, 125)
    base = ln.profile(models["concat"], (1, 3, 125, 125))
    assert base.macs == _conv_macs(models["concat"], x) == 2_074_287_264
    for kind in ("alpha", "beta", "dynamic"):  # elementwise multiplies are not MACs
        assert ln.profile(models[kind], (1, 3, 125, 125)).macs == base.macs
    gate = ln.profile(models["gate"], (1, 3, 125, 125)).macs - base.macs
    # projection 2C*C + two gates C*C per skip pixel; skips at 125, 63, 32, 16
    sizes = {32: 125 * 125, 64: 63 * 63, 128: 32 * 32, 256: 16 * 16}
    assert gate == sum(4 * c * c * hw for c, hw in sizes.items())


@pytest.mark.parametrize("size", [(125, 125), (250, 250), (64, 64), (97, 131)])
def test_output_sizes_res_unet(models, size):
    model = models["concat"].eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 2, *size)


@pytest.mark.parametrize("kind", ["alpha", "dynamic", "gate", "fused"])
def test_output_sizes_other_variants(models, kind):
    model = models[kind].eval()
    with torch.no_grad():
        for size in ((125, 125), (97, 131)):
            assert model(torch.randn(1, 3, *size)).shape == (1, 2, *size)


def test_downsampling_path_of_a_125_crop(models):
    model = models["concat"].eval()
    with torch.no_grad():
        feats = model.encode(torch.zeros(1, 3, 125, 125))
    assert [f.shape[-1] for f in feats] == [125, 63, 32, 16, 8]
    assert [f.shape[1] for f in feats] == [32, 64, 128, 256, 512]


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    h=st.integers(17, 140),
    w=st.integers(17, 140),
    kind=st.sampled_from(["concat", "alpha", "dynamic", "gate", "fused"]),
)
def test_any_size_gives_the_same_size_back(h, w, kind):
    torch.manual_seed(0)
    if kind == "fused":
        model = ln.create_model("fused_unet", widths=SMALL)
    else:
        model = ln.create_model("res_unet", fusion=kind, widths=SMALL, num_classes=3)
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, h, w))
    assert out.shape == (1, model.num_classes, h, w)


@pytest.mark.parametrize("kind", ["concat", "alpha", "beta", "dynamic", "gate", "fused"])
def test_training_step_gradients(kind):
    torch.manual_seed(0)
    if kind == "fused":
        model = ln.create_model("fused_unet", widths=SMALL)
    else:
        model = ln.create_model("res_unet", fusion=kind, widths=SMALL)
    target = torch.randint(0, 2, (2, 33, 29))
    loss = nn.functional.cross_entropy(model.train()(torch.randn(2, 3, 33, 29)), target)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for name, b in model.named_buffers():
        assert b.grad is None, name


def test_bn_weight_init_and_norm_options():
    torch.manual_seed(0)
    ones = ln.create_model("res_unet", bn_weight_init="ones")
    bns = [m for m in ones.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(torch.equal(m.weight.data, torch.ones_like(m.weight)) for m in bns)
    normal = ln.create_model("res_unet")  # Table I: N(0, 1)
    w = torch.cat([m.weight.data for m in normal.modules() if isinstance(m, nn.BatchNorm2d)])
    assert w.numel() > 5000 and abs(w.mean()) < 0.1 and abs(w.std() - 1) < 0.1
    gn = ln.create_model("res_unet", norm="gn", fusion="gate")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())
    assert all(m.num_groups == 32 for m in gn.modules() if isinstance(m, nn.GroupNorm))
    gn8 = ln.create_model(
        "fused_unet", norm="gn", norm_kwargs={"num_groups": 8}, widths=(8, 16, 16)
    )
    assert {m.num_groups for m in gn8.modules() if isinstance(m, nn.GroupNorm)} == {8}
    with torch.no_grad():
        assert gn8.eval()(torch.randn(1, 3, 21, 19)).shape == (1, 2, 21, 19)
    assert ln.create_model("res_unet", in_chans=4, num_classes=5, widths=SMALL)(
        torch.randn(1, 4, 20, 20)
    ).shape == (1, 5, 20, 20)


def _randomize_norm_stats(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name,kwargs", [("res_unet", {"fusion": "gate"}), ("fused_unet", {})])
def test_fuse_folds_every_bn(name, kwargs):
    torch.manual_seed(0)
    model = _randomize_norm_stats(ln.create_model(name, bn_weight_init="ones", **kwargs)).double()
    fused = ln.fuse(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert _n_params(fused) < _n_params(model)
    x = torch.randn(1, 3, 61, 75, dtype=torch.float64)
    with torch.no_grad():
        assert (fused(x) - model(x)).abs().max() < 1e-5


def test_export_onnx_checked_by_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _randomize_norm_stats(ln.create_model("res_unet", fusion="gate", bn_weight_init="ones"))
    result = ln.export(model, tmp_path / "res_unet.onnx", input_size=(1, 3, 125, 125))
    assert result.checked and result.fused and result.max_abs_diff_unfused is not None
    fused = _randomize_norm_stats(ln.create_model("fused_unet", bn_weight_init="ones"))
    result = ln.export(
        fused, tmp_path / "fused_unet.onnx", input_size=(1, 3, 125, 125), exporter="legacy"
    )
    assert result.checked and result.format == "onnx"


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_onnx_with_dynamic_height_and_width(tmp_path, exporter):
    """export(dynamic_size=True) leaves H and W symbolic: the resize reads the skip's size at
    run time, so one file predicts on any image size, odd ones included."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = ln.create_model("res_unet", fusion="gate", widths=SMALL).eval()
    path = tmp_path / "dyn.onnx"
    ln.export(model, path, (1, 3, 64, 64), dynamic_size=True, exporter=exporter)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in ((2, 3, 97, 131), (1, 3, 17, 140), (1, 3, 250, 250)):
        x = torch.randn(size)
        out = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        with torch.no_grad():
            ref = model(x)
        assert out.shape == (size[0], 2, *size[2:])
        assert (out - ref).abs().max() <= 1e-4 * (1 + ref.abs().max())


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("res_unet", {"fusion": "cat"}, r"fusion 'cat' is unknown.*did you mean 'concat'"),
        ("res_unet", {"alpha": 0.5}, "takes no alpha.*expected fusion='alpha'"),
        ("res_unet", {"fusion": "alpha", "alpha": 0}, "alpha=0 is invalid"),
        ("res_unet", {"fusion": "beta", "beta": -1.0}, "beta=-1.0 is invalid"),
        (
            "res_unet",
            {"bn_weight_init": "zeros"},
            "bn_weight_init='zeros' is invalid: expected one of normal, ones",
        ),
        ("res_unet", {"widths": [32]}, r"widths=\[32\] is invalid: expected at least two ints"),
        ("res_unet", {"widths": [32, 0]}, "widths"),
        ("res_unet", {"num_classes": 0}, "num_classes=0 is invalid"),
        ("res_unet", {"in_chans": 1.5}, "in_chans=1.5 is invalid"),
        ("res_unet", {"norm": "batch"}, "norm 'batch' is unknown: expected one of bn"),
        ("res_unet", {"norm_kwargs": 3}, "norm_kwargs=3 is invalid"),
        ("res_unet", {"norm": "gn", "widths": [48, 40]}, "not divisible by G=32"),
        ("res_unet", {"weight": 0.5}, "model 'res_unet' has no option 'weight'"),
        (
            "fused_unet",
            {"weight": 0},
            "fused_unet: weight=0 is invalid: expected a finite number > 0",
        ),
        ("fused_unet", {"weight": "half"}, "weight='half' is invalid"),
        ("fused_unet", {"fusion": "alpha"}, "model 'fused_unet' has no option 'fusion'"),
    ],
)
def test_bad_arguments_are_user_errors(name, kwargs, match):
    with pytest.raises(UserError, match=match):
        ln.create_model(name, **kwargs)
