"""`lightnets export` and `lightnets profile`.

The first tests call the command functions through a parser built from their own
add_*_arguments; the `main([...])` tests at the end need the commands registered in
lightnets/cli.py (COMMANDS["export"], COMMANDS["profile"]).
"""

from __future__ import annotations

import argparse
import json

import onnx
import onnxruntime as ort
import pytest
import torch

from lightnets.commands import parse_input_size, parse_kwargs, parse_literal
from lightnets.commands.export import add_export_arguments, export_command
from lightnets.commands.profile import add_profile_arguments, profile_command
from lightnets.errors import UserError

TRAIN = [
    "model.args.width=8",
    "train.max_steps=2",
    "schedule.warmup=0",
    "train.progress=false",
    "output.plot=false",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real run dir written by the trainer: config.toml, last.pt, best.pt."""
    from lightnets.engine import Trainer
    from lightnets.engine.config import load_config

    path = tmp_path_factory.mktemp("run") / "mnist"
    Trainer(load_config("mnist_cnn", TRAIN), path).fit()
    return path


def _run(add, fn, argv):
    parser = argparse.ArgumentParser()
    add(parser)
    return fn(parser.parse_args(argv))


def _export(argv):
    return _run(add_export_arguments, export_command, argv)


def _profile(argv):
    return _run(add_profile_arguments, profile_command, argv)


# ------------------------------------------------------------------------- helpers
@pytest.mark.parametrize(
    "text, value",
    [("4", 4), ("0.5", 0.5), ("true", True), ("false", False), ('"bn"', "bn"), ("gn", "gn")],
)
def test_parse_literal(text, value):
    out = parse_literal(text)
    assert out == value and type(out) is type(value)


def test_parse_kwargs_and_input():
    assert parse_kwargs(["fbn_groups=4", "cifar_stem=true", "norm=gn"]) == {
        "fbn_groups": 4,
        "cifar_stem": True,
        "norm": "gn",
    }
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_kwargs(["fbn_groups"])
    assert parse_input_size("224") == (1, 3, 224, 224)
    assert parse_input_size("32,48", in_chans=1) == (1, 1, 32, 48)
    assert parse_input_size("2,3,64,64") == (2, 3, 64, 64)
    assert parse_input_size("1x3x8x8") == (1, 3, 8, 8)
    assert parse_input_size(None) is None
    for bad in ("abc", "0", "3,-1", ""):
        with pytest.raises(UserError, match="--input"):
            parse_input_size(bad)


# ------------------------------------------------------------------------- export
def test_export_run_dir_onnx(run_dir, capsys):
    assert _export([str(run_dir)]) == 0
    out = capsys.readouterr().out
    path = run_dir / "model.onnx"
    assert path.is_file()
    assert "onnxruntime" in out and "ok" in out and "after fusion" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["path"] == str(path) and result["format"] == "onnx"
    assert result["input_size"] == [1, 1, 28, 28]  # from the run's dataset (MNIST, 1 channel)
    assert result["max_abs_diff_fused"] <= 1e-4 and result["max_abs_diff_unfused"] <= 1e-4
    assert result["params"] < result["params_unfused"]
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops

    # the file computes what the trained model computes
    from lightnets.engine.checkpoint import load_checkpoint
    from lightnets.models.registry import create_model

    ckpt = load_checkpoint(run_dir / "last.pt")
    model = create_model(ckpt["model_name"], **ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    x = torch.randn(2, 1, 28, 28)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model.eval()(x), atol=1e-4, rtol=1e-4)

    with pytest.raises(UserError, match="already exists.*--overwrite"):
        _export([str(run_dir)])


def test_export_torchscript_best_and_input(run_dir, capsys, tmp_path):
    out_path = tmp_path / "net.ts"
    code = _export([str(run_dir), "--best", "--out", str(out_path), "--input", "32"])
    assert code == 0 and out_path.is_file()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["format"] == "torchscript" and result["input_size"] == [1, 1, 32, 32]
    assert result["checkpoint"].endswith("best.pt")


def test_export_user_errors(run_dir, tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        _export([str(bad)])
    with pytest.raises(UserError, match="does not exist"):
        _export([str(tmp_path / "missing.pt")])
    with pytest.raises(UserError, match="looks like a torchscript file"):
        _export([str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.pt")])
    with pytest.raises(UserError, match="cannot tell the format"):
        _export([str(run_dir), "--out", str(tmp_path / "m.bin")])
    with pytest.raises(UserError, match="does not fit the model"):
        _export([str(run_dir), "--out", str(tmp_path / "m.ts"), "--input", "1,3,28,28"])


# ------------------------------------------------------------------------- profile
def test_profile_finet_small_table(capsys):
    assert _profile(["finet_small", "--input", "224", "--table"]) == 0
    out = capsys.readouterr().out
    assert "finet_small" in out and "1x3x224x224" in out
    assert "params" in out and "2.39M" in out
    assert "M MACs training-time" in out and "M MACs fused" in out
    lines = out.splitlines()
    assert any(line.startswith("layer") and "MACs" in line for line in lines)  # table header
    assert any(line.startswith("stage2.0.") for line in lines)  # a row per layer


def test_profile_set_and_json(capsys):
    argv = ["finet_small", "--input", "32", "--set", "fbn_groups=2", "--set", "cifar_stem=true"]
    assert _profile([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_args"] == {"fbn_groups": 2, "cifar_stem": True}
    assert out["input_size"] == [1, 3, 32, 32]
    assert out["fused_params"] < out["params"] and out["fused_macs"] == out["macs"] > 0


def test_profile_checkpoint(run_dir, capsys):
    assert _profile([str(run_dir / "last.pt")]) == 0
    out = capsys.readouterr().out
    assert "mnist_cnn" in out and "1x1x28x28" in out and "MACs" in out


def test_profile_user_errors():
    with pytest.raises(UserError, match="unknown model 'finet_tiny'"):
        _profile(["finet_tiny"])
    with pytest.raises(UserError, match="has no option 'fbn_group'"):
        _profile(["finet_small", "--set", "fbn_group=2"])
    with pytest.raises(UserError, match="does not exist"):
        _profile(["no/such/run.pt"])


# ------------------------------------------- through lightnets.cli.main (needs the wiring)
def test_main_export_and_corrupt_checkpoint(run_dir, tmp_path, capsys):
    from lightnets.cli import main

    out_path = tmp_path / "cli.onnx"
    assert main(["export", str(run_dir), "--out", str(out_path), "--format", "onnx"]) == 0
    assert out_path.is_file()
    assert "onnxruntime" in capsys.readouterr().out

    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00garbage")
    assert main(["export", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read checkpoint" in err and str(bad) in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_main_export_lce_without_tensorflow_names_the_extra(run_dir, tmp_path, capsys):
    from lightnets.cli import main
    from lightnets.deploy.lce import lce_available

    if lce_available():
        pytest.skip("the LCE stack is installed here (the LCE lane tests this command)")
    out_path = tmp_path / "m.tflite"
    assert main(["export", str(run_dir), "--out", str(out_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs TensorFlow" in err and "lightnets[lce]" in err and "Traceback" not in err
    assert not out_path.exists()


def test_main_profile(capsys):
    from lightnets.cli import main

    assert main(["profile", "finet_small", "--input", "224", "--table"]) == 0
    out = capsys.readouterr().out
    assert "M MACs" in out and "layer" in out

    assert main(["profile", "no_such_model"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown model 'no_such_model'" in err and len(err.splitlines()) == 1
