"""export(): the written file computes what the model computes, with no normalization left.

The reference is always the original model in eval mode (torch's own BN / the FBN layer),
run here, and the file is run here too (onnxruntime / torch.jit.load), independently of the
check export() does itself.
"""

from __future__ import annotations

import copy
import importlib
import os
import stat
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lightnets.deploy.export import ExportCheckError, export
from lightnets.errors import UserError
from lightnets.models.registry import create_model

# the module, even where lightnets.deploy re-exports the function under the same name
export_module = importlib.import_module("lightnets.deploy.export")

NORM_OPS = {"BatchNormalization", "InstanceNormalization", "LayerNormalization"}


def _with_statistics(model: nn.Module, size: tuple[int, ...], steps: int = 2) -> nn.Module:
    """A few train-mode forwards so running statistics are far from their initial 0 / 1."""
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(3 * torch.randn((4, *size[1:]), generator=g) + 1)
    return model


def _ort(path, x: torch.Tensor) -> torch.Tensor:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        return ref(x)


def _assert_onnx_matches(model, path, size, batch=3):
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ops = {node.op_type for node in graph.graph.node}
    assert not ops & NORM_OPS, ops
    assert "Conv" in ops or "Gemm" in ops or "MatMul" in ops
    x = torch.randn((batch, *size[1:]), generator=torch.Generator().manual_seed(7))
    out, ref = _ort(path, x), _eval_out(model, x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_fbn_finet_onnx(tmp_path):
    torch.manual_seed(0)
    size = (1, 1, 28, 28)
    model = create_model("finet_small", num_classes=10, in_chans=1, cifar_stem=True, fbn_groups=2)
    _with_statistics(model, size)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "finet.onnx"

    result = export(model, path, size)

    assert model.training  # flags restored, weights untouched
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert result.path == str(path) and path.is_file()
    assert result.format == "onnx" and result.fused and result.checked
    assert result.file_size == path.stat().st_size
    assert result.opset is not None and result.opset >= 13
    assert result.params < result.params_unfused  # FBN / BN parameters folded away
    assert result.max_abs_diff_fused <= 1e-4 and result.max_abs_diff_unfused <= 1e-4
    _assert_onnx_matches(model, path, size)  # batch 3: the batch axis is dynamic
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_resnet18_onnx(tmp_path):
    torch.manual_seed(0)
    size = (1, 3, 16, 16)
    model = _with_statistics(create_model("resnet18", num_classes=7, cifar_stem=True), size)
    path = tmp_path / "resnet.onnx"
    result = export(model, path, size)
    assert result.max_abs_diff_unfused <= 1e-4
    _assert_onnx_matches(model, path, size, batch=2)


@pytest.mark.parametrize("exporter", ["legacy", "auto"])
def test_linear_bn1d_onnx(tmp_path, exporter):
    torch.manual_seed(0)
    size = (1, 3, 4, 4)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(48, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(32, 5, bias=False),
        nn.BatchNorm1d(5),
    )
    _with_statistics(model, size)
    path = tmp_path / "mlp.onnx"
    result = export(model, path, size, exporter=exporter)
    assert result.exporter == ("legacy" if exporter == "legacy" else "dynamo")
    _assert_onnx_matches(model, path, size)


def test_torchscript_round_trip(tmp_path):
    torch.manual_seed(0)
    size = (1, 1, 12, 12)
    model = _with_statistics(create_model("mnist_cnn", width=4), size)
    path = tmp_path / "model.pt"
    result = export(model, path, size)  # format from the suffix
    assert result.format == "torchscript" and result.opset is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = torch.jit.load(str(path))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())
    x = torch.randn(5, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), _eval_out(model, x), atol=1e-4, rtol=1e-4)


def test_no_fuse(tmp_path):
    """fuse=False exports the model as it is (the ONNX exporter may still fold BN itself)."""
    size = (1, 1, 16, 16)  # 4x4 before the adaptive pool to 4x4: the legacy exporter takes it
    model = _with_statistics(create_model("mnist_cnn", width=4), size)
    result = export(model, tmp_path / "raw.onnx", size, fuse=False, exporter="legacy")
    assert not result.fused and result.params == result.params_unfused
    assert result.max_abs_diff_unfused <= 1e-4
    x = torch.randn(2, *size[1:])
    torch.testing.assert_close(
        _ort(tmp_path / "raw.onnx", x), _eval_out(model, x), atol=1e-4, rtol=1e-4
    )


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "model.ts"
    path.write_bytes(b"keep me")
    model = create_model("mnist_cnn", width=4)
    with pytest.raises(UserError, match=str(path).replace("\\", "\\\\") + ".*already exists"):
        export(model, path, (1, 1, 12, 12))
    assert path.read_bytes() == b"keep me"
    result = export(model, path, (1, 1, 12, 12), overwrite=True)
    assert path.read_bytes() != b"keep me" and result.file_size > 0


@pytest.mark.parametrize("name", ["model.txt", "model"])
def test_unknown_suffix(tmp_path, name):
    with pytest.raises(UserError, match=r"suffix.*expected \.onnx"):
        export(create_model("mnist_cnn", width=4), tmp_path / name, (1, 1, 12, 12))
    assert not list(tmp_path.iterdir())


def test_bad_arguments(tmp_path):
    model = create_model("mnist_cnn", width=4)
    with pytest.raises(UserError, match="format 'tflite'"):
        export(model, tmp_path / "m.onnx", (1, 1, 12, 12), format="tflite")
    with pytest.raises(UserError, match="input_size"):
        export(model, tmp_path / "m.onnx", (1, 0, 12))
    with pytest.raises(UserError, match="does not fit the model"):
        export(model, tmp_path / "m.pt", (1, 3, 12, 12))  # mnist_cnn takes 1 channel
    with pytest.raises(UserError, match="dynamic_size=True needs spatial axes"):
        export(create_model("bnn_mnist"), tmp_path / "m.onnx", (1, 10), dynamic_size=True)
    assert not list(tmp_path.iterdir())


def test_file_is_readable_like_any_new_file(tmp_path):
    """The atomic write's temp file must not keep mkstemp's private 0600: a deployed model is
    read by other users and services (mode 0666 minus the umask, like open() would give)."""
    old = os.umask(0o022)
    try:
        path = tmp_path / "m.onnx"
        export(create_model("mnist_cnn", width=4), path, (1, 1, 12, 12))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temp file left


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_dynamic_size_classifier(tmp_path, fmt):
    """With dynamic_size a classifier with global pooling takes any image size from the file."""
    torch.manual_seed(0)
    model = _with_statistics(create_model("resnet_mini", in_chans=1), (1, 1, 16, 16))
    path = tmp_path / ("m.onnx" if fmt == "onnx" else "m.ts")
    result = export(model, path, (1, 1, 16, 16), dynamic_size=True)
    assert result.dynamic_size and result.checked
    x = torch.randn(3, 1, 23, 31)
    with torch.no_grad():
        ref = model.eval()(x)
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [type(n) for n in session.get_inputs()[0].shape] == [str, int, str, str]
        out = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    else:
        out = torch.jit.load(str(path))(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_mismatch_is_an_error_and_writes_nothing(tmp_path, monkeypatch):
    real = export_module.run_file

    def off_by_a_bit(path, fmt, inputs):
        return [out + 1e-2 for out in real(path, fmt, inputs)]

    monkeypatch.setattr(export_module, "run_file", off_by_a_bit)
    path = tmp_path / "m.pt"
    model = create_model("mnist_cnn", width=4)
    with pytest.raises(ExportCheckError, match="does not match"):
        export(model, path, (1, 1, 12, 12))
    assert not list(tmp_path.iterdir())
    result = export(model, path, (1, 1, 12, 12), check=False)  # unchecked: written as is
    assert not result.checked and result.max_abs_diff_fused is None and path.is_file()


def test_ort_numpy_dtype(tmp_path):
    """The ONNX input is float32 and the batch axis is symbolic."""
    path = tmp_path / "m.onnx"
    export(create_model("mnist_cnn", width=4), path, (1, 1, 16, 16), exporter="legacy")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.type == "tensor(float)"
    assert not isinstance(inp.shape[0], int) and inp.shape[1:] == [1, 16, 16]
    out = session.run(None, {inp.name: np.zeros((4, 1, 16, 16), np.float32)})[0]
    assert out.shape == (4, 10)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_dynamic_size_output_axes_are_not_named_as_the_input(tmp_path, exporter):
    """A strided model's output map is not the input's size: its axes must not claim to be."""
    model = nn.Sequential(nn.Conv2d(3, 2, 3, stride=2, padding=1), nn.BatchNorm2d(2)).eval()
    path = tmp_path / "m.onnx"
    export(model, path, (1, 3, 16, 16), dynamic_size=True, exporter=exporter)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names_in = session.get_inputs()[0].shape[2:]
    names_out = session.get_outputs()[0].shape[2:]
    assert all(isinstance(n, str) for n in names_in + names_out)
    assert not set(names_in) & set(names_out)
    out = session.run(None, {"input": np.zeros((1, 3, 21, 30), np.float32)})[0]
    assert out.shape == (1, 2, 11, 15)
