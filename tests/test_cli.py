"""The command line: user errors are one line with exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lightnets.cli import main
from tests.conftest import REPO, TINY, run_cli


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "no_such_recipe"], "unknown recipe 'no_such_recipe'"),
        (["train", "mnist_cnn", "--set", "optim.lr=-1"], "optim.lr=-1.0 is invalid: expected > 0"),
        (["train", "mnist_cnn", "--set", "data.batch_size=0"], "data.batch_size=0"),
        (["train", "mnist_cnn", "--set", "model.name=resnet999"], "unknown model 'resnet999'"),
        (["train", "mnist_cnn", "--set", "model.args.widht=3"], "did you mean 'width'"),
        (
            ["train", "mnist_cnn", "--set", "data.name=cifar10", "--set", "data.root=/nope"],
            "/nope",
        ),
        (["eval", "/no/such/checkpoint.pt"], "does not exist"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, fragment, capsys, tmp_path):
    code = main([*argv, "--out", str(tmp_path / "run")] if argv[0] == "train" else argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert fragment in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_subprocess_error_has_no_traceback(tmp_path):
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "config.toml").write_text("")
    (bad / "last.pt").write_bytes(b"garbage")
    result = run_cli("train", "mnist_cnn", "--out", str(bad), "--resume")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    result = run_cli("train", "mnist_cnn", "--out", str(bad))
    assert result.returncode == 2 and "already exists" in result.stderr


def test_corrupt_checkpoint_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "mnist_cnn",
                *_sets([*TINY, "train.max_steps=2", "schedule.warmup=0"]),
                "--out",
                str(run),
            ]
        )
        == 0
    )
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:100])
    capsys.readouterr()
    assert main(["train", "mnist_cnn", "--out", str(run), "--resume"]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_train_one_epoch_then_eval(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "mnist_cnn", *_sets([*TINY, "train.epochs=1"]), "--out", str(run)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["epoch"] == 1 and summary["val_acc1"] > 70
    assert main(["eval", str(run), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["acc1"] == pytest.approx(summary["val_acc1"], abs=1e-6)
    assert main(["eval", str(run), "--set", "model.args.width=8"]) == 2
    assert "model.* cannot be changed here" in capsys.readouterr().err


def test_help_for_every_command():
    for command in ["train", "eval", "demo"]:
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "usage: lightnets" in result.stdout


def test_train_list_names_every_shipped_recipe(capsys):
    from lightnets.engine.config import list_recipes

    assert main(["train", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list_recipes()
    assert any(line.split()[1:4] == ["finet_small", "on", "mnist5k"] for line in lines)
    # each description is a whole sentence (or a long one's lead clause), never cut mid-way
    assert all(line.rstrip().endswith((".", ")")) for line in lines), lines
    assert main(["train"]) == 2
    assert "expected a recipe name" in capsys.readouterr().err


def test_demo_short(tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "params" in out and "onnxruntime check passed" in out
    # one epoch learns (the warm-up shrinks with it), and fusion and ONNX change no prediction
    line = next(x for x in out.splitlines() if x.strip().startswith("test accuracy"))
    trained, fused, onnx = (float(w.rstrip("%")) for w in line.split() if w.endswith("%"))
    # folding rounds differently: allow one flipped prediction in 1000 on another platform
    assert abs(fused - trained) <= 0.1 and abs(onnx - trained) <= 0.1 and trained > 25.0
    assert "norm layers left after fusion: 0" in out
    assert (tmp_path / "d" / "curves.png").is_file()


def test_under_torchrun_other_ranks_name_themselves_in_a_user_error(monkeypatch, capsys):
    """A rank may fail alone (a path missing on one node): each says why, with its rank."""
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "no_such_recipe"]) == 2
    assert capsys.readouterr().err.startswith("lightnets train [rank 1]: error: unknown recipe")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "no_such_recipe"]) == 2
    assert capsys.readouterr().err.startswith("lightnets train: error: unknown recipe")


def test_import_needs_no_torchvision_or_timm(tmp_path):
    """They cannot load next to the CPU build here; users without them must lose nothing.
    Stand-ins that fail on import are put first on the path, so any import of them shows."""
    for name in ("torchvision", "timm"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} imported')\n")
    code = "import lightnets, lightnets.models, lightnets.deploy, lightnets.data, lightnets.cli"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
