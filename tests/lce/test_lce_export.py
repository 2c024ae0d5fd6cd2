"""The LCE lane (`make lce-test`): export to Larq Compute Engine, checked in its interpreter.

Skipped without TensorFlow / larq / larq-compute-engine (`pip install "lightnets[lce]"`).
Conversions take seconds each, so the models are small and each is converted once.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("larq_compute_engine", reason='needs pip install "lightnets[lce]"')

import lightnets as ln  # noqa: E402
from lightnets.deploy import larq_model, lce  # noqa: E402
from lightnets.deploy.export import ExportCheckError  # noqa: E402
from lightnets.errors import UserError  # noqa: E402
from lightnets.nn import BinaryConv2d, BinaryLinear  # noqa: E402


def _statistics(model: nn.Module, size, steps: int = 3) -> nn.Module:
    """Running statistics from a few train-mode forwards (moving averages, not integers)."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(16, *size[1:]))
    return model.eval()


class UserNet(nn.Module):
    """A user's BNN: stride-1 'same' and valid binary convs, max and average pooling, a flatten
    of a 2x2 map (the column permutation), a real linear head, a magnitude-aware kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = BinaryConv2d(3, 16, 3, padding=1, input_quantizer=None, mode="bop")
        self.bn0 = nn.BatchNorm2d(16)
        self.conv1 = BinaryConv2d(16, 24, 3, padding=1, input_quantizer="ste_sign", mode="bop")
        self.pool1 = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(24)
        self.conv2 = BinaryConv2d(
            24, 32, 3, input_quantizer="swish_sign", kernel_quantizer="magnitude_aware_sign"
        )
        self.bn2 = nn.BatchNorm2d(32)
        self.pool2 = nn.AvgPool2d(2)
        self.fc1 = BinaryLinear(32 * 2 * 2, 20, input_quantizer="ste_sign", mode="bop")
        self.bn3 = nn.BatchNorm1d(20)
        self.head = nn.Linear(20, 5)

    def forward(self, x):
        x = self.bn0(self.stem(x))
        x = self.bn1(self.pool1(self.conv1(x)))
        x = self.pool2(self.bn2(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.head(torch.relu(self.bn3(self.fc1(x))))


@pytest.fixture(scope="module")
def user_net():
    torch.manual_seed(0)
    return _statistics(UserNet(), (1, 3, 14, 14))


def test_user_model_exports_with_binary_convs_and_matches(user_net, tmp_path):
    result = ln.export(user_net, tmp_path / "user.tflite", (1, 3, 14, 14))
    assert result.format == "lce" and result.checked
    ops = result.ops
    # conv1, conv2 and fc1 (as a 1x1 conv) are binary; the stem (real input) is a float conv
    assert ops["LceBconv2d"] == 3 and ops["CONV_2D"] >= 1
    x = torch.randn(6, 3, 14, 14)
    got = lce.LceModel((tmp_path / "user.tflite").read_bytes())(x)
    with torch.no_grad():
        ref = user_net(x)
    assert lce.tie_margins(user_net, x).min() > lce.NEAR_TIE  # these inputs are clear
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert result.max_abs_diff_fused <= 1e-4 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("mode", ["bop", "latent"])
def test_bnn_mnist_has_a_binary_conv_for_every_binary_input(mode, tmp_path):
    torch.manual_seed(1)
    model = _statistics(ln.create_model("bnn_mnist", mode=mode), (1, 1, 28, 28))
    result = ln.export(model, tmp_path / "m.tflite", (1, 1, 28, 28))
    # 3 convs and 2 linears: the first takes the real image (CONV_2D), the other 4 are binary
    assert result.ops["LceBconv2d"] == 4 and result.ops["CONV_2D"] == 1
    assert result.ops["LceBMaxPool2d"] == 3  # max-pools of binarized maps run on bits
    assert result.binary_weights == 60_320
    assert result.file_size < 20_000  # bits, not float32 weights (that is 240 kB)


def test_interpreter_kernels_agree(user_net):
    flatbuffer = lce.convert(user_net, (1, 3, 14, 14))
    x = torch.randn(4, 3, 14, 14)
    default = lce.LceModel(flatbuffer, use_indirect_bgemm=False)(x)
    indirect = lce.LceModel(flatbuffer, use_indirect_bgemm=True)(x)
    torch.testing.assert_close(default, indirect, rtol=1e-5, atol=1e-5)


def test_exact_ties_are_left_out_of_the_check_and_counted(tmp_path):
    """Integer running means put BN thresholds on integers the binary sum attains: exact ties,
    which LCE's fused threshold resolves its own way; the check draws inputs without them."""
    torch.manual_seed(2)
    model = nn.Sequential(
        BinaryConv2d(1, 8, 3, input_quantizer=None, mode="bop"),
        nn.BatchNorm2d(8),
        BinaryConv2d(8, 8, 3, input_quantizer="ste_sign", mode="bop"),
        nn.BatchNorm2d(8),
        BinaryConv2d(8, 4, 3, input_quantizer="ste_sign", mode="bop"),
        nn.Flatten(),
    ).eval()
    with torch.no_grad():  # channel 0 at 0, which the sum of 72 signs (even) can hit: a tie
        model[3].running_mean.copy_(torch.arange(8.0) + 0.5)
        model[3].running_mean[0] = 0.0
    result = ln.export(model, tmp_path / "ties.tflite", (1, 1, 7, 7))
    assert result.near_ties_skipped > 0
    assert result.near_ties_in_check == 0


def test_a_wrong_translation_is_an_export_check_error(user_net, tmp_path, monkeypatch):
    """The check is not vacuous: corrupt the flatten order and the export refuses."""
    monkeypatch.setattr(larq_model, "flatten_order", lambda c, h, w: None)
    with pytest.raises(ExportCheckError, match="does not match the PyTorch model"):
        ln.export(user_net, tmp_path / "bad.tflite", (1, 3, 14, 14))
    assert not (tmp_path / "bad.tflite").exists()


@pytest.mark.parametrize(
    "layer, match",
    [
        (BinaryConv2d(4, 4, 3, stride=2, padding=1, input_quantizer="ste_sign"), "'same'"),
        (BinaryConv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode"),
        (nn.GELU(), "GELU has no LCE translation"),
        (nn.MaxPool2d(3, padding=1), "pools without padding"),
    ],
)
def test_what_lce_cannot_express_is_refused_by_name(layer, match, tmp_path):
    model = nn.Sequential(BinaryConv2d(1, 4, 1, mode="bop"), nn.BatchNorm2d(4), layer).eval()
    with pytest.raises(UserError, match=match):
        ln.export(model, tmp_path / "x.tflite", (1, 1, 8, 8))


def test_cli_export_lce_and_test_split_accuracy(tmp_path, capsys):
    """bnn_mnist trained with Bop for a few steps: the file's test accuracy on the bundled
    subset equals the PyTorch model's, prediction for prediction."""
    from lightnets.cli import main
    from lightnets.engine import Trainer
    from lightnets.engine.config import load_config

    run = tmp_path / "bnn"
    overrides = ["train.max_steps=30", "train.progress=false", "output.plot=false"]
    Trainer(load_config("bnn_mnist_bop", overrides), run).fit()
    assert main(["export", str(run), "--format", "lce", "--check-split", "test"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["format"] == "lce" and (run / "model.tflite").is_file()
    check = report["split_check"]
    assert check["images"] == 1000
    assert check["accuracy_file"] == check["accuracy_model"]
    assert check["predictions_differ"] == 0
    assert "LceBconv2d 4" in out
