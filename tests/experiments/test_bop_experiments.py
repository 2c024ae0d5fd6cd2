"""`lightnets repro bop-approx`, `bop-lr`, `bop-hparams` and `bop-cifar` ([Re] Bop paper) at toy
scale: results files, the runs' configs, the three evaluations of Table 1 against an independent
forward pass, the per-step flip curves, the CIFAR test accuracy of the best checkpoint, resume
and refusals."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightnets.commands.repro import add_repro_arguments, repro_command
from lightnets.data import load_dataset
from lightnets.engine.checkpoint import load_checkpoint
from lightnets.errors import UserError
from lightnets.experiments import list_experiments
from lightnets.experiments.bop import PAPER_TABLE1, gaussian_smooth
from lightnets.models import create_model
from lightnets.nn.binary import BinaryConv2d, BinaryLinear
from tests.data.conftest import write_cifar10

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

torch.set_num_threads(1)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lightnets repro")
    add_repro_arguments(parser)
    return parser.parse_args(list(argv))


def _common(out: Path) -> list[str]:
    return ["--seeds", "1", "--set", "output.plot=false", "--no-progress", "--out", str(out)]


def _rows(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _config(run_dir) -> dict:
    return tomllib.loads((Path(run_dir) / "config.toml").read_text())


def _files(out: Path, *extra: str) -> dict:
    for name in ("results.md", "results.json", "results.csv", "results.png", *extra):
        assert (out / name).is_file(), name
    for png in ["results.png", *(n for n in extra if n.endswith(".png"))]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    return json.loads((out / "results.json").read_text())


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < 0, -1.0, 1.0)


@torch.no_grad()
def _reference_forward(model, x: torch.Tensor, real: bool) -> torch.Tensor:
    """bnn_mnist by hand: sign inputs (but the first layer's), binary or real weights, eval BN."""
    for module in [*model.features, *model.classifier]:
        if isinstance(module, (BinaryConv2d, BinaryLinear)):
            w = module.weight if real else _sign(module.weight)
            inp = x if module.input_quantizer is None else _sign(x)
            if isinstance(module, BinaryConv2d):
                x = F.conv2d(inp, w, padding=module.padding)
            else:
                x = F.linear(inp, w)
        elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            x = F.batch_norm(
                x,
                module.running_mean,
                module.running_var,
                module.weight,
                module.bias,
                False,
                0.0,
                module.eps,
            )
        else:
            x = module(x)
    return x


def _accuracy(run_dir: Path, real: bool) -> float:
    test = load_dataset("mnist5k", split="test")
    model = create_model("bnn_mnist", **_config(run_dir)["model"]["args"])
    model.load_state_dict(load_checkpoint(run_dir / "last.pt")["model"])
    x = torch.stack([test[i][0] for i in range(len(test))]).float() / 255 * 2 - 1  # scale_pm1
    y = torch.tensor([int(test[i][1]) for i in range(len(test))])
    pred = torch.cat([_reference_forward(model.eval(), b, real).argmax(1) for b in x.split(64)])
    return float((pred == y).float().mean() * 100)


def test_registered():
    names = {e.name for e in list_experiments()}
    assert {"bop-approx", "bop-lr", "bop-hparams", "bop-cifar"} <= names


# ----------------------------------------------------------------------------- bop-approx
def test_approx_toy_run_matches_an_independent_forward(tmp_path, capsys):
    out = tmp_path / "approx"
    argv = ["bop-approx", "--epochs", "1", "--retrain-epochs", "1", "--max-steps", "3"]
    assert repro_command(_args(*argv, *_common(out))) == 0
    data = _files(out, "table1.md")
    by_name = {v["name"]: v for v in data["variants"]}
    assert list(by_name) == ["binary", "real", "real-retrained"]
    train, retrain = out / "seed0" / "train", out / "seed0" / "retrain"
    binary = by_name["binary"]["runs"][0]["final"]
    real = by_name["real"]["runs"][0]["final"]
    retrained = by_name["real-retrained"]["runs"][0]["final"]
    # Binary: the trainer's own last evaluation, and a forward pass written out by hand
    assert binary == _rows(train)[-1]["val_acc1"]
    assert binary == pytest.approx(_accuracy(train, real=False), abs=0.11)
    # Real: the same weights used as they are (no sign), sign activations kept
    assert real == pytest.approx(_accuracy(train, real=True), abs=0.11)
    assert retrained == _rows(retrain)[-1]["val_acc1"]
    assert retrained == pytest.approx(_accuracy(retrain, real=True), abs=0.11)
    # the retraining changed only BatchNorm: binary layers' weights as phase 1 left them
    before = load_checkpoint(train / "last.pt")["model"]
    after = load_checkpoint(retrain / "last.pt")["model"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    binary_keys = {f"features.{i}.weight" for i in (0, 3, 6)} | {
        f"classifier.{i}.weight" for i in (1, 3)
    }
    assert changed and not changed & binary_keys
    assert {k.rsplit(".", 1)[1] for k in changed} <= {
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    assert _rows(retrain)[-1]["step"] == 3 and _config(retrain)["optim"]["name"] == "adam"
    # paper column in %, Table 1 with mean and variance as fractions
    assert [v["paper"] for v in data["variants"]] == pytest.approx(
        [PAPER_TABLE1[n][0] * 100 for n in by_name]
    )
    table1 = (out / "table1.md").read_text()
    assert f"| Binary | {binary / 100:.4f} | 0.00e+00 | 1 | 0.9663 | 3.20e-04 |" in table1
    assert "| Real Retrained |" in table1 and "1.81e-06" in table1
    # re-running continues nothing and reports the same
    capsys.readouterr()
    assert repro_command(_args(*argv, *_common(out))) == 0
    printed = capsys.readouterr().out
    assert "train: skip (finished)" in printed and "retrain BN: skip (finished)" in printed
    again = json.loads((out / "results.json").read_text())
    assert [v["final"] for v in again["variants"]] == [v["final"] for v in data["variants"]]
    with pytest.raises(UserError, match="other arguments.*retrain_epochs"):
        repro_command(_args(*argv[:-4], "--retrain-epochs", "2", "--max-steps", "3", *_common(out)))


# ----------------------------------------------------------------------------- bop-lr
def test_lr_toy_run(tmp_path):
    out = tmp_path / "lr"
    assert repro_command(_args("bop-lr", "--max-steps", "2", *_common(out))) == 0
    data = _files(out, "fig1.png")
    expected = {
        "glorot-sgd-0.01": ("sgd", 0.01, "glorot_uniform", None),
        "glorot-sgd-1": ("sgd", 1.0, "glorot_uniform", None),
        "glorot0.01-sgd-0.01": ("sgd", 0.01, "glorot_uniform", 0.01),
        "uniform-sgd-0.01": ("sgd", 0.01, "uniform", None),
        "uniform-adam-0.01": ("adam", 0.01, "uniform", None),
    }
    assert [v["name"] for v in data["variants"]] == list(expected)
    for v in data["variants"]:
        assert v["status"] == "ok"
        config = _config(v["runs"][0]["run_dir"])
        name, lr, init, scale = expected[v["name"]]
        assert (config["optim"]["name"], config["optim"]["lr"]) == (name, lr)
        assert config["optim"]["momentum"] == 0.0  # Keras' SGD
        assert config["model"]["args"]["latent_init"] == init
        assert config["model"]["args"].get("init_scale", 1.0) == (scale or 1.0)
        assert config["model"]["args"]["clip_weights"] is True
    by_name = {v["name"]: v for v in data["variants"]}
    three, two = by_name["glorot0.01-sgd-0.01"], by_name["glorot-sgd-1"]
    assert three["delta_vs_baseline"] == pytest.approx(
        three["final"]["mean"] - two["final"]["mean"]
    )


# ----------------------------------------------------------------------------- bop-hparams
def test_hparams_toy_run(tmp_path):
    out = tmp_path / "hp"
    assert repro_command(_args("bop-hparams", "--max-steps", "2", *_common(out))) == 0
    data = _files(out, "fig2.png")
    pairs = [(1e-2, 1e-6), (1e-3, 1e-6), (1e-4, 1e-6), (1e-3, 0.0), (1e-3, 1e-5)]
    assert [v["name"] for v in data["variants"]] == [
        "gamma1e-2-tau1e-6",
        "gamma1e-3-tau1e-6",
        "gamma1e-4-tau1e-6",
        "gamma1e-3-tau0",
        "gamma1e-3-tau1e-5",
    ]
    for v, (gamma, tau) in zip(data["variants"], pairs):
        run_dir = v["runs"][0]["run_dir"]
        config = _config(run_dir)
        assert config["model"]["args"]["mode"] == "bop" and config["optim"]["binary"] == "bop"
        assert (config["optim"]["bop_gamma"], config["optim"]["bop_threshold"]) == (gamma, tau)
        (row,) = _rows(run_dir)
        assert len(row["log_flip_ratio_steps"]) == 2 and row["bop_gamma"] == gamma
        assert row["log_flip_ratio"] == pytest.approx(
            sum(row["log_flip_ratio_steps"]) / 2, abs=1e-4
        )
        assert row["log_flip_ratio"] >= math.log(1e-9) - 1e-9


def test_hparams_on_cifar_follows_section_3_3_unless_constant_gamma(tmp_path):
    """Sec. 3.2: "identical to ... section 3.3 except for the number of epochs": by default
    each run's gamma decays x0.1 every 100 epochs and it stops after 10 flip-free epochs;
    --constant-gamma (ours) turns both off so whole runs at one gamma are compared."""
    from lightnets.engine.config import load_config
    from lightnets.experiments.bop import hparams_spec

    args = _args("bop-hparams", "--data", "cifar10", "--root", str(tmp_path), *_common(tmp_path))
    spec, _, _ = hparams_spec(args)
    config = load_config(spec.recipe, [*spec.base_overrides, *spec.variants[0].overrides])
    assert (config.binary_schedule.name, config.binary_schedule.step_size) == ("step", 100)
    assert config.binary_schedule.gamma == 0.1
    assert config.train.stop_after_flipless_epochs == 10
    assert any("Sec. 3.3's procedure" in note for note in spec.notes)
    args = _args(
        "bop-hparams",
        "--data",
        "cifar10",
        "--root",
        str(tmp_path),
        "--constant-gamma",
        *_common(tmp_path / "c"),
    )
    spec, _, _ = hparams_spec(args)
    config = load_config(spec.recipe, [*spec.base_overrides, *spec.variants[0].overrides])
    assert config.binary_schedule.name == "constant"
    assert config.train.stop_after_flipless_epochs is None
    assert any("--constant-gamma, ours" in note for note in spec.notes)
    with pytest.raises(UserError, match="--constant-gamma is for --data cifar10"):
        hparams_spec(_args("bop-hparams", "--constant-gamma"))
    user = _args(
        "bop-hparams",
        "--data",
        "cifar10",
        "--root",
        str(tmp_path),
        "--constant-gamma",
        "--set",
        "train.stop_after_flipless_epochs=3",
        "--out",
        str(tmp_path),
    )  # --set wins
    spec, _, _ = hparams_spec(user)
    assert load_config(spec.recipe, spec.base_overrides).train.stop_after_flipless_epochs == 3


def test_gaussian_smooth_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    g = torch.Generator().manual_seed(0)
    values = torch.randn(200, generator=g).tolist()
    for sigma in (0.7, 3.0, 25.0):
        ours = gaussian_smooth(values, sigma)
        ref = ndimage.gaussian_filter1d(values, sigma, mode="nearest", truncate=4.0)
        assert ours == pytest.approx(ref.tolist(), abs=1e-12)
    assert gaussian_smooth([2.0] * 10, 3.0) == pytest.approx([2.0] * 10)


# ----------------------------------------------------------------------------- bop-cifar
def test_cifar_toy_run_reports_the_best_checkpoints_test_accuracy(tmp_path):
    files = write_cifar10(
        tmp_path / "cifar", "bin", per_batch=14, n_test=6
    )  # 1 step of 50 per epoch
    out = tmp_path / "cifar-out"
    argv = ["bop-cifar", "--root", str(tmp_path / "cifar"), "--max-steps", "2", "--epochs", "2"]
    assert repro_command(_args(*argv, *_common(out))) == 0
    _files(out, "test.md", "test.json")
    run_dir = out / "binarynet-bop" / "seed0"
    config = _config(run_dir)
    assert config["model"] == {"name": "binarynet_cifar", "args": {"mode": "bop"}}
    assert config["data"]["val_fraction"] == 0.1 and config["data"]["batch_size"] == 50
    assert config["train"]["best_metric"] == "val_loss"
    assert config["train"]["stop_after_flipless_epochs"] == 10
    rows = _rows(run_dir)
    assert len(rows) == 2 and all("flips" in r and "val_loss" in r for r in rows)
    best = min(rows, key=lambda r: r["val_loss"])
    ckpt = load_checkpoint(run_dir / "best.pt")
    assert ckpt["epoch"] == best["epoch"]
    # the test accuracy of best.pt, computed here by hand: pixels / 127.5 - 1, eval mode
    model = create_model("binarynet_cifar", **ckpt["model_args"]).eval()
    model.load_state_dict(ckpt["model"])
    x = torch.from_numpy(files.test_x).float() / 255 * 2 - 1
    with torch.no_grad():
        pred = model(x).argmax(1)
    acc = float((pred == torch.from_numpy(files.test_y)).float().mean() * 100)
    record = json.loads((out / "test.json").read_text())["runs"][0]
    assert record["test_acc1"] == pytest.approx(acc) and record["epoch"] == best["epoch"]
    table = (out / "test.md").read_text()
    assert f"| BinaryNet + Bop | {acc:.2f} (1) | {best['epoch']} | 88.67 |" in table
    assert "| 91.3 |" in table


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["bop-approx", "--root", "x"], "mnist5k is bundled"),
        (["bop-lr", "--data", "mnist"], "--data mnist needs --root"),
        (["bop-cifar"], "--data cifar10 needs --root"),
        (["bop-hparams", "--gammas", "abc"], "--gammas 'abc': expected comma-separated"),
        (["bop-hparams", "--gammas", "2"], r"expected values in \(0, 1\]"),
        (["bop-hparams", "--gammas", "none", "--thresholds", "none"], "expected some variants"),
        (["bop-approx", "--seeds", "0"], "--seeds 0: expected at least 1"),
        (["bop-approx", "--retrain-epochs", "0"], "--retrain-epochs 0: expected at least 1"),
        (["bop-lr", "--set", "optim.lrr=1"], "unknown config key optim.lrr"),
    ],
)
def test_bad_input_is_refused(tmp_path, argv, match):
    with pytest.raises(UserError, match=match):
        repro_command(_args(*argv, "--out", str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()  # refused before anything was written
