"""pack_binary / save_packed / load_packed: bits, packed inference, files, export.

References are independent of the code under test: a Python loop for the bit layout, the
binary layers' own eval forward (torch's conv / linear on sign(weight)) for packed inference,
onnxruntime for exported files.
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings

import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import lightnets as ln
from lightnets.deploy.pack import FORMAT, load_packed, pack_binary, save_packed
from lightnets.errors import UserError
from lightnets.nn import BinaryConv2d, BinaryLinear
from lightnets.nn.packed import (
    PackedBinaryConv2d,
    PackedBinaryLinear,
    is_packed_layer,
    pack_signs,
    unpack_signs,
)

# ----------------------------------------------------------------------------- helpers


def _sign(w: torch.Tensor) -> torch.Tensor:
    return torch.where(w < 0, -1.0, 1.0).to(w.dtype)


def _reference_bytes(w: torch.Tensor) -> list[int]:
    """Bit i of byte j = input channel 8 j + i (1 for w >= 0), bytes in (out, *k, j) order."""
    out, cin = w.shape[:2]
    kernel = list(w.shape[2:])
    w2 = w.reshape(out, cin, -1)
    nbytes = (cin + 7) // 8
    result = []
    for o in range(out):
        for k in range(w2.shape[2] if kernel else 1):
            for j in range(nbytes):
                byte = 0
                for i in range(8):
                    c = 8 * j + i
                    if c < cin and float(w2[o, c, k]) >= 0:
                        byte |= 1 << i
                result.append(byte)
    return result


def _calibrate(model: nn.Module, size: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Running statistics from a batch, then moved off exact batch values (as an EMA is) and
    affine parameters of mixed sign, so that folding is really tested. Returns model.eval()."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = None
        m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.randn((8, *size[1:]), generator=g))
        for m in norms:
            n = m.num_features
            m.running_mean.add_(torch.rand(n, generator=g) - 0.5)
            m.running_var.mul_(torch.rand(n, generator=g) + 0.5)
            if m.weight.requires_grad:  # binarynet original: gamma fixed at 1
                m.weight.copy_(torch.randn(n, generator=g))
            m.bias.copy_(0.5 * torch.randn(n, generator=g))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()


def _eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        return ref(x)


def _assert_folded_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """BN folded: one rounding of a z + b instead of torch's eval-BN arithmetic (a few ulps)."""
    scale = float(ref.abs().max())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * scale)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def _count(model: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


MODELS = [
    ("bnn_mnist", {"mode": "latent"}, (1, 1, 28, 28)),
    ("bnn_mnist", {"mode": "bop"}, (1, 1, 28, 28)),
    ("binarynet_cifar", {"mode": "latent", "original": False}, (1, 3, 32, 32)),
    ("binarynet_cifar", {"mode": "bop", "original": False}, (1, 3, 32, 32)),
    ("binarynet_cifar", {"mode": "latent", "original": True}, (1, 3, 32, 32)),
    ("binarynet_cifar", {"mode": "bop", "original": True}, (1, 3, 32, 32)),
]


def _model(name: str, kwargs: dict, size: tuple[int, ...], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _calibrate(ln.create_model(name, **kwargs), size, seed)


# ----------------------------------------------------------------------------- bits


def test_bit_order_by_hand():
    # channels 0..9 of one (out, kh, kw): + - - + + + - + | - +   (sign(0) = +1)
    w = torch.tensor([1.0, -1, -2, 0, 3, 0.5, -0.1, 2, -1, 4]).reshape(1, 10, 1, 1)
    bits = pack_signs(w)
    assert bits.dtype == torch.uint8 and bits.shape == (1, 1, 1, 2)
    assert bits.flatten().tolist() == [0b10111001, 0b00000010]
    torch.testing.assert_close(unpack_signs(bits, 10), _sign(w), rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 5),
    cin=st.integers(1, 41),
    kernel=st.sampled_from([(), (1, 1), (3, 3), (1, 3), (2, 1)]),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_round_trip(out, cin, kernel, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn((out, cin, *kernel), generator=g)
    w[torch.rand(w.shape, generator=g) < 0.1] = 0.0  # sign(0) = +1
    bits = pack_signs(w)
    assert bits.dtype == torch.uint8
    assert bits.shape == (out, *kernel, (cin + 7) // 8)
    assert bits.flatten().tolist() == _reference_bytes(w)  # padding bits are 0
    back = unpack_signs(bits, cin, torch.float64)
    assert back.dtype == torch.float64 and back.is_contiguous()
    assert torch.equal(back, _sign(w.double()))


def test_unpack_rejects_wrong_shapes():
    bits = pack_signs(torch.randn(4, 12))
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_signs(bits, 17)
    with pytest.raises(ValueError, match="uint8"):
        unpack_signs(bits.int(), 12)


# ----------------------------------------------------------------------------- layers


CONV_CASES = [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "stride": 2, "bias": True},
    {"kernel_size": (1, 3), "padding": "same", "dilation": 2},
    {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    {"kernel_size": 1, "bias": True},
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("mode", ["latent", "bop"])
@pytest.mark.parametrize("input_quantizer", ["ste_sign", None, "approx_sign", "stochastic_sign"])
def test_packed_conv_equals_binary_conv(case, mode, input_quantizer):
    torch.manual_seed(0)
    layer = BinaryConv2d(13, 11, input_quantizer=input_quantizer, mode=mode, **case)
    x = torch.randn(2, 13, 9, 10)
    packed = PackedBinaryConv2d.from_binary(layer)
    with torch.no_grad():
        ref = _eval_out(layer, x)
        out = packed(x)
        again = packed(x)  # from the cache
    assert torch.equal(out, ref) and torch.equal(again, ref)
    assert not list(packed.parameters()) and packed.weight_bits.dtype == torch.uint8
    assert packed.weight_bits.shape == (11, *layer.kernel_size, 2)


def test_packed_grouped_conv_and_linear():
    torch.manual_seed(1)
    conv = BinaryConv2d(12, 6, 3, groups=3, input_quantizer="ste_sign")
    lin = BinaryLinear(21, 5, bias=True, input_quantizer="ste_sign", mode="bop")
    x, v = torch.randn(2, 12, 6, 6), torch.randn(3, 21)
    with torch.no_grad():
        assert torch.equal(PackedBinaryConv2d.from_binary(conv)(x), _eval_out(conv, x))
        assert torch.equal(PackedBinaryLinear.from_binary(lin)(v), _eval_out(lin, v))
    assert PackedBinaryLinear.from_binary(lin).weight_bits.shape == (5, 3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_packed_layer_dtypes(dtype):
    torch.manual_seed(2)
    layer = BinaryConv2d(9, 4, 3, padding=1, input_quantizer="ste_sign", bias=True).to(dtype)
    x = torch.randn(2, 9, 5, 5, dtype=dtype)
    packed = PackedBinaryConv2d.from_binary(layer)
    with torch.no_grad():
        out = packed(x)
    assert out.dtype == dtype and torch.equal(out, _eval_out(layer, x))


def test_weight_cache_follows_the_bits():
    torch.manual_seed(3)
    a = BinaryLinear(10, 4, input_quantizer="ste_sign")
    b = BinaryLinear(10, 4, input_quantizer="ste_sign")
    packed = PackedBinaryLinear.from_binary(a)
    x = torch.randn(5, 10)
    with torch.no_grad():
        assert torch.equal(packed(x), _eval_out(a, x))
        cached = packed._cache[1]
        packed(x)
        assert packed._cache[1] is cached
        packed.load_state_dict(PackedBinaryLinear.from_binary(b).state_dict())
        assert torch.equal(packed(x), _eval_out(b, x))
        packed.weight_bits.copy_(PackedBinaryLinear.from_binary(a).weight_bits)  # in place
        assert torch.equal(packed(x), _eval_out(a, x))
        assert copy.deepcopy(packed)._cache is None
        packed.cache_weights = False
        packed.clear_cache()
        assert torch.equal(packed(x), _eval_out(a, x)) and packed._cache is None
    real_input = PackedBinaryLinear.from_binary(BinaryLinear(10, 4))  # input_quantizer=None
    with torch.inference_mode():
        real_input(x)
    x.requires_grad_(True)
    real_input(x).sum().backward()  # the cache made in inference mode is an ordinary tensor
    assert x.grad is not None


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("name, kwargs, size", MODELS, ids=lambda v: str(v))
def test_packed_models_match_the_eval_model(name, kwargs, size):
    model = _model(name, kwargs, size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    x = torch.randn((6, *size[1:]), generator=torch.Generator().manual_seed(5))
    ref = _eval_out(model, x)
    n_binary = _count(model, (BinaryConv2d, BinaryLinear))
    n_norms = _count(model, _BatchNorm)

    exact = pack_binary(model, fold_bn=False)
    folded = pack_binary(model)
    with torch.no_grad():
        out_exact, out_folded = exact(x), folded(x)

    # BN kept: bit-identical logits; BN folded into scale/shift: a few ulps, same predictions
    assert torch.equal(out_exact, ref)
    _assert_folded_close(out_folded, ref)
    assert _count(exact, _BatchNorm) == n_norms
    assert _count(folded, _BatchNorm) == 0  # every BN follows a binary layer (or its pool)
    for packed in (exact, folded):
        assert not packed.training
        assert _count(packed, (BinaryConv2d, BinaryLinear)) == 0
        assert sum(is_packed_layer(m) for m in packed.modules()) == n_binary
    assert all(m.affine for m in folded.modules() if is_packed_layer(m))
    # the model itself is untouched
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_max_pool_between_conv_and_bn_folds_only_positive_scales():
    name, kwargs, size = MODELS[5]  # binarynet_cifar original: conv - pool - BN
    model = _model(name, kwargs, size)
    pooled_bn = model.features[4]
    assert isinstance(model.features[3], nn.MaxPool2d) and isinstance(pooled_bn, nn.BatchNorm2d)
    with torch.no_grad():
        pooled_bn.weight[3] = -0.5  # max(a z + b) = a min(z) + b there: not foldable
    x = torch.randn((4, *size[1:]), generator=torch.Generator().manual_seed(6))
    ref = _eval_out(model, x)
    packed = pack_binary(model)
    assert isinstance(packed.features[4], nn.BatchNorm2d)  # kept
    assert not packed.features[2].affine
    assert _count(packed, _BatchNorm) == 1
    with torch.no_grad():
        _assert_folded_close(packed(x), ref)


class _Residualish(nn.Module):
    """Data flow fx can read: conv1 -> bn1 (foldable); conv2's output also feeds the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = BinaryConv2d(4, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = BinaryConv2d(6, 6, 3, padding=1, input_quantizer="ste_sign")
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        z = self.conv2(y)
        return self.bn2(z) + z


def test_folding_follows_the_data_flow():
    torch.manual_seed(7)
    model = _calibrate(_Residualish(), (1, 4, 6, 6))
    x = torch.randn(3, 4, 6, 6)
    ref = _eval_out(model, x)
    packed = pack_binary(model)
    assert isinstance(packed.bn1, nn.Identity) and packed.conv1.affine
    assert isinstance(packed.bn2, nn.BatchNorm2d) and not packed.conv2.affine
    with torch.no_grad():
        _assert_folded_close(packed(x), ref)


def test_pack_a_single_layer_and_repack():
    torch.manual_seed(8)
    layer = BinaryConv2d(3, 4, 3, mode="bop")
    packed = pack_binary(layer)
    assert isinstance(packed, PackedBinaryConv2d)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(packed(x), _eval_out(layer, x))
        assert torch.equal(pack_binary(packed)(x), packed(x))  # already packed: a copy


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: BinaryConv2d(3, 4, 3, kernel_quantizer=None), "kernel_quantizer is None"),
        (lambda: BinaryLinear(3, 4, kernel_quantizer=torch.tanh), "'tanh'"),
    ],
)
def test_non_sign_kernel_quantizer_is_refused(make, match):
    with pytest.raises(UserError, match=match):
        pack_binary(nn.Sequential(make(), nn.BatchNorm1d(4)))


def test_bop_weight_that_is_not_binary_is_refused():
    layer = BinaryLinear(3, 4, mode="bop")
    with torch.no_grad():
        layer.weight[0, 0] = 0.5
    with pytest.raises(UserError, match="other than \\+1/-1"):
        pack_binary(layer)


def test_real_model_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(UserError, match="no binary layers.*lightnets.fuse"):
        pack_binary(model)
    with pytest.raises(UserError, match="no binary or packed layers"):
        save_packed(model, "unused.pt")


def test_fuse_keeps_bn_after_binary_layers_and_says_why():
    name, kwargs, size = MODELS[4]
    model = _model(name, kwargs, size)
    x = torch.randn((2, *size[1:]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = ln.fuse(model)
    text = " ".join(str(w.message) for w in caught)
    assert "follow a binary layer" in text and "pack_binary" in text
    assert "not fed only by a conv/linear" not in text
    assert _count(fused, _BatchNorm) == _count(model, _BatchNorm)
    for a, b in zip(model.modules(), fused.modules()):
        if isinstance(a, (BinaryConv2d, BinaryLinear)):
            assert torch.equal(a.weight, b.weight) and b.bias is None
    with torch.no_grad():
        assert torch.equal(fused(x), _eval_out(model, x))


# ----------------------------------------------------------------------------- files


def test_binarynet_file_is_at_most_a_twentieth_of_float32(tmp_path):
    name, kwargs, size = MODELS[3]  # binarynet_cifar, the paper's text, bop: 14.0M weights
    model = _model(name, kwargs, size)
    float_path, packed_path = tmp_path / "float.pt", tmp_path / "packed.pt"
    torch.save(model.state_dict(), float_path)
    packed = pack_binary(model)
    assert save_packed(packed, packed_path) == packed_path
    float_size, packed_size = float_path.stat().st_size, packed_path.stat().st_size
    print(f"binarynet_cifar: float32 {float_size} B, packed {packed_size} B")
    assert packed_size * 20 <= float_size
    assert packed_size < 2_000_000 < 56_000_000 < float_size

    # plain containers only: readable by the weights-only loader, the spec is JSON
    raw = torch.load(packed_path, weights_only=True)
    assert raw["format"] == FORMAT and raw["version"] == 1
    spec = json.loads(raw["spec"])
    assert spec["model"] == {"name": "binarynet_cifar", "args": kwargs}

    loaded = load_packed(packed_path)
    assert not loaded.training
    x = torch.randn((3, *size[1:]))
    with torch.no_grad():
        assert torch.equal(loaded(x), packed(x))


def test_round_trip_with_kept_bn_and_binary_input(tmp_path):
    name, kwargs, size = MODELS[5]
    model = _model(name, kwargs, size)
    with torch.no_grad():
        model.features[4].weight[0] = -1.0  # this BN stays (see the max-pool test)
    path = tmp_path / "sub" / "model.lnpk"
    save_packed(model, path)  # packs a binary model itself
    loaded = load_packed(path, cache_weights=False)
    assert isinstance(loaded.features[4], nn.BatchNorm2d)
    assert not any(m.cache_weights for m in loaded.modules() if is_packed_layer(m))
    x = torch.randn((2, *size[1:]))
    with torch.no_grad():
        assert torch.equal(loaded(x), pack_binary(model)(x))
    assert not list(tmp_path.glob("sub/.*.tmp"))  # atomic write leaves no temp file


def test_round_trip_single_layer_and_explicit_model_name(tmp_path):
    torch.manual_seed(9)
    layer = BinaryLinear(20, 3, bias=True, input_quantizer="approx_sign")
    save_packed(layer, tmp_path / "layer.pt")
    x = torch.randn(4, 20)
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "layer.pt")(x), _eval_out(layer, x))

    # a model built without create_model: name it
    from lightnets.models.binarynet import bnn_mnist

    model = _calibrate(bnn_mnist(mode="bop"), (1, 1, 28, 28))
    with pytest.raises(UserError, match="pass model_name= and model_args="):
        save_packed(model, tmp_path / "m.pt")
    save_packed(model, tmp_path / "m.pt", model_name="bnn_mnist", model_args={"mode": "bop"})
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "m.pt")(x), pack_binary(model)(x))


def test_a_model_changed_after_create_model_is_refused(tmp_path):
    model = ln.create_model("bnn_mnist")
    # a BN without statistics is kept (not folded), and its state differs from the registry's
    model.classifier[2] = nn.BatchNorm1d(64, track_running_stats=False)
    with pytest.raises(UserError, match="differs from what create_model"):
        save_packed(model, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_packed(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file at all" * 10)
    with pytest.raises(UserError, match="corrupt, truncated"):
        load_packed(junk)
    good = tmp_path / "good.pt"
    save_packed(ln.create_model("bnn_mnist"), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="corrupt, truncated"):
        load_packed(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "lightnets-checkpoint", "model": {}}, foreign)
    with pytest.raises(UserError, match="not a packed lightnets model"):
        load_packed(foreign)
    raw = torch.load(good, weights_only=True)
    raw["spec"] = "{not json"
    torch.save(raw, tmp_path / "badspec.pt")
    with pytest.raises(UserError, match="damaged"):
        load_packed(tmp_path / "badspec.pt")
    raw = torch.load(good, weights_only=True)
    raw["state"]["features.0.weight_bits"] = raw["state"]["features.0.weight_bits"].float()
    torch.save(raw, tmp_path / "badbits.pt")
    with pytest.raises(UserError, match="expected uint8"):
        load_packed(tmp_path / "badbits.pt")
    with pytest.raises(UserError, match=r"safetensors file.*expected a path ending in \.pt"):
        save_packed(ln.create_model("bnn_mnist"), tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


# ----------------------------------------------------------------------------- export


def _ort(path, x: torch.Tensor) -> torch.Tensor:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("what", ["binary", "packed"])
def test_export_onnx_keeps_bits(tmp_path, what):
    name, kwargs, size = MODELS[0]
    model = _model(name, kwargs, size)
    given_model = model if what == "binary" else pack_binary(model)
    path = tmp_path / "bnn.onnx"
    result = ln.export(given_model, path, size)
    assert result.binary_weights == 60_320 and result.fused

    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ops = {n.op_type for n in graph.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    bits = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.UINT8]
    assert sum(len(i.raw_data) for i in bits) == sum(
        m.weight_bits.numel() for m in pack_binary(model).modules() if is_packed_layer(m)
    )
    floats = sum(
        len(i.raw_data) for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
    )
    assert floats < 4 * 2_000  # scale / shift vectors only, no float32 weights
    float_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert result.file_size * 4 < float_bytes

    x = torch.randn((5, *size[1:]), generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(_ort(path, x), _eval_out(model, x), atol=1e-4, rtol=1e-4)


def test_export_binarynet_onnx_and_torchscript(tmp_path):
    name, kwargs, size = MODELS[5]
    model = _model(name, kwargs, size)
    x = torch.randn((2, *size[1:]), generator=torch.Generator().manual_seed(12))
    ref = _eval_out(model, x)
    result = ln.export(model, tmp_path / "bn.onnx", size)
    n_binary = sum(m.weight.numel() for m in model.modules() if isinstance(m, BinaryConv2d))
    n_binary += sum(m.weight.numel() for m in model.modules() if isinstance(m, BinaryLinear))
    assert result.binary_weights == n_binary > 10_000_000
    torch.testing.assert_close(_ort(tmp_path / "bn.onnx", x), ref, atol=1e-4, rtol=1e-4)
    assert result.file_size * 20 < 4 * result.binary_weights
    packed = pack_binary(model)
    ts = ln.export(packed, tmp_path / "bn.ts", size, fuse=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load
        loaded = torch.jit.load(str(tmp_path / "bn.ts"))
    with torch.no_grad():
        assert torch.equal(loaded(x), packed(x))  # the traced graph unpacks the same bits
        _assert_folded_close(loaded(x), ref)
    assert ts.file_size * 20 < 4 * ts.binary_weights


@pytest.fixture(scope="module")
def binary_run_dir(tmp_path_factory):
    """A run dir of bnn_mnist (latent mode, the recipe's SGD) written by the trainer."""
    from lightnets.engine import Trainer
    from lightnets.engine.config import load_config

    path = tmp_path_factory.mktemp("run") / "bnn"
    overrides = [
        "model.name=bnn_mnist",
        "train.max_steps=2",
        "schedule.warmup=0",
        "train.progress=false",
        "output.plot=false",
    ]
    Trainer(load_config("mnist_cnn", overrides), path).fit()
    return path


def test_cli_export_of_a_binary_run(binary_run_dir, capsys):
    from lightnets.commands import load_checkpoint_model
    from lightnets.commands.export import add_export_arguments, export_command

    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    assert export_command(parser.parse_args([str(binary_run_dir)])) == 0
    out = capsys.readouterr().out
    assert "60,320 weights stored as bits" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["model"] == "bnn_mnist" and result["binary_weights"] == 60_320
    assert result["input_size"] == [1, 1, 28, 28]
    assert result["max_abs_diff_unfused"] <= 1e-4

    model, _ = load_checkpoint_model(binary_run_dir / "last.pt")
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(
        _ort(binary_run_dir / "model.onnx", x), _eval_out(model, x), atol=1e-4, rtol=1e-4
    )
    # and the packed file of the same run
    save_packed(model, binary_run_dir / "model.packed.pt")
    with torch.no_grad():
        loaded = load_packed(binary_run_dir / "model.packed.pt")
        _assert_folded_close(loaded(x), _eval_out(model, x))
