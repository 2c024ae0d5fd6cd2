"""fuse, convert_norm and export of models trained on the device.

The reference is independent of the fold under test: a float64 CPU copy of the trained model
with every FBNConv2d switched to ``impl="naive"``, whose eval mode stays literal (grouped conv,
then BN on the running statistics, then the sum over groups), and torch's own BatchNorm.
Bound: 1e-4 relative to the largest output, float32 with TF32 off (folding changes where the
rounding happens, a few 1e-7 per layer; a wrong fold is off by O(1)).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightnets as ln
from lightnets.nn import FBNConv2d
from tests.cuda.support import ieee_float32, rel_err

pytestmark = pytest.mark.cuda

BOUND = 1e-4
NORM_OPS = {"BatchNormalization", "InstanceNormalization", "LayerNormalization"}


@pytest.fixture(autouse=True)
def _ieee_float32():
    with ieee_float32():
        yield


def _train(model: nn.Module, device: torch.device, shape: tuple[int, ...], steps: int = 3):
    """A few SGD steps on the device (random data), so running statistics and weights move."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device)
        y = torch.randint(0, 10, (shape[0],), generator=g).to(device)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _naive_reference(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model).cpu().double().eval()
    for m in ref.modules():
        if isinstance(m, FBNConv2d):
            m.impl = "naive"
    return ref


def _on_device(module: nn.Module, device: torch.device) -> bool:
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.device.type == device.type for t in tensors)


def _eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was)


@pytest.fixture(scope="module")
def trained_finet(device):
    """Finet-small with FBN (G=4) in its 1x1 convs, BN in its depthwise convs, 3 steps on the
    device."""
    with ieee_float32():
        torch.manual_seed(0)
        model = ln.create_model("finet_small", num_classes=10, fbn_groups=4, cifar_stem=True)
        return _train(model.to(device), device, (16, 3, 32, 32))


def _inputs(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def test_fuse_of_device_model_equals_naive_eval(device, trained_finet):
    model = trained_finet
    fbns = [m for m in model.modules() if isinstance(m, FBNConv2d)]
    assert fbns and all(m.fbn_groups == 4 and int(m.num_batches_tracked) == 3 for m in fbns)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = _inputs(5, (3, 32, 32), seed=2)
    ref = _naive_reference(model)(x.double())

    fused = ln.fuse(model)
    assert not fused.training and _on_device(fused, device)
    left = [type(m).__name__ for m in fused.modules() if isinstance(m, (FBNConv2d, nn.BatchNorm2d))]
    assert not left, left
    with torch.no_grad():
        out_fused = fused(x.to(device))
    out_eval = _eval_out(model, x.to(device))
    assert rel_err(out_eval, ref) <= BOUND
    assert rel_err(out_fused, ref) <= BOUND
    assert rel_err(out_fused, out_eval) <= BOUND
    assert model.training  # fuse copies; the model is untouched
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_convert_norm_on_device_keeps_eval_then_trains_and_fuses(device):
    torch.manual_seed(0)
    model = _train(ln.create_model("mnist_cnn", width=16).to(device), device, (16, 1, 28, 28))
    x = _inputs(6, (1, 28, 28), seed=3)
    before = _eval_out(model, x.to(device))  # torch's Conv2d + BatchNorm2d
    # the first conv has C_in = 1 < G: it keeps its BN (and says so)
    with pytest.warns(UserWarning, match="keep their BN"):
        ln.convert_norm(model, "fbn", fbn_groups=4)
    fbns = [m for m in model.modules() if isinstance(m, FBNConv2d)]
    assert len(fbns) == 1 and fbns[0].fbn_groups == 4 and fbns[0].in_channels == 16
    assert _on_device(model, device)
    # converted from BN statistics, the eval output is the BN model's
    assert rel_err(_eval_out(model, x.to(device)), before) <= BOUND

    _train(model, device, (16, 1, 28, 28))
    assert int(fbns[0].num_batches_tracked) == 6
    ref = _naive_reference(model)(x.double())
    fused = ln.fuse(model)
    assert _on_device(fused, device)
    assert not any(isinstance(m, (FBNConv2d, nn.BatchNorm2d)) for m in fused.modules())
    with torch.no_grad():
        assert rel_err(fused(x.to(device)), ref) <= BOUND
    assert rel_err(_eval_out(model, x.to(device)), ref) <= BOUND


@pytest.mark.parametrize(
    "kind,options", [("gn", {"num_groups": 4}), ("brn", {}), ("frozen_bn", {})]
)
def test_convert_norm_other_kinds_stay_on_device(device, kind, options):
    """The new layers are created on the model's device and dtype and a train step runs."""
    torch.manual_seed(0)
    model = ln.create_model("mnist_cnn", width=16).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ln.convert_norm(model, kind, **options)
    assert _on_device(model, device)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    _train(model, device, (8, 1, 28, 28), steps=1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_export_onnx_from_device_model(device, trained_finet, tmp_path):
    """export() works from a device model: it exports a float32 CPU copy (documented in
    lightnets.deploy.export.export), leaves the model on the device untouched, and the file
    computes what the model computes."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = trained_finet
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "finet.onnx"

    result = ln.export(model, path, input_size=(1, 3, 32, 32))

    assert result.checked and result.fused and path.is_file()
    assert result.max_abs_diff_unfused is not None and result.max_abs_diff_unfused < 1e-3
    assert model.training and _on_device(model, device)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ops = {node.op_type for node in graph.graph.node}
    assert "Conv" in ops and not ops & NORM_OPS, ops

    x = _inputs(3, (3, 32, 32), seed=4)  # another batch size: the batch axis is dynamic
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    ref = _naive_reference(model)(x.double())
    assert rel_err(out, ref) <= BOUND
    assert rel_err(out, _eval_out(model, x.to(device))) <= BOUND
