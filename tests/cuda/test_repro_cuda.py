"""`lightnets repro` on the device: the runner, its plan, the median statistic and the
post-processing (bop-cifar's test-set evaluation of the best checkpoint) on CUDA, a few steps
each. These are the commands a researcher starts on a GPU; the CPU suite runs them on the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from lightnets.cli import main
from lightnets.engine.checkpoint import load_checkpoint
from tests.data.conftest import write_cifar10

pytestmark = pytest.mark.cuda


def _repro(capsys, device: torch.device, out, *argv: str) -> list[dict]:
    """Run `lightnets repro ARGV` on `device`; the plan lines it printed before training."""
    code = main(
        [
            "repro",
            *argv,
            "--seeds",
            "1",
            "--no-progress",
            "--set",
            f'train.device="{device}"',
            "--set",
            "output.plot=false",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed[-2000:]
    return [json.loads(line) for line in printed.splitlines() if line.startswith('{"run"')]


def _trained_on(run_dir, device: torch.device) -> None:
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["config"]["train"]["device"] == str(device)
    assert ckpt["step"] >= 1


def test_gn_batch_size_on_the_device(capsys, device, tmp_path):
    out = tmp_path / "gn"
    argv = ["gn-batch-size", "--norms", "bn,gn", "--batch-sizes", "4", "--max-steps", "3"]
    plan = _repro(capsys, device, out, *argv)
    assert [p["run"] for p in plan] == ["bn-b4/seed0", "gn-b4/seed0"]
    results = json.loads((out / "results.json").read_text())
    for v in results["variants"]:
        assert v["status"] == "ok" and v["median_of_last"]["n"] == 1
        (run,) = v["runs"]
        assert run["median_last"] == run["final"]  # 4 epochs: the median of the last one
        _trained_on(tmp_path / "gn" / v["name"] / "seed0", device)
    assert (out / "table2.md").is_file() and (out / "plan.jsonl").is_file()


def test_fbn_cifar_on_the_device(capsys, device, tmp_path):
    out = tmp_path / "fbn"
    argv = ["fbn-cifar", "--data", "mnist5k", "--groups", "1,2", "--affine", "yes"]
    plan = _repro(capsys, device, out, *argv, "--max-steps", "3")
    assert [p["model"] for p in plan] == ["finet_small_se"] * 2
    results = json.loads((out / "results.json").read_text())
    assert [v["status"] for v in results["variants"]] == ["ok", "ok"]
    _trained_on(out / "G2-affine" / "seed0", device)


def test_bop_cifar_evaluates_its_best_checkpoint_on_the_device(capsys, device, tmp_path):
    write_cifar10(tmp_path / "cifar", "bin", per_batch=20, n_test=10)  # 100 train, 10 test
    out = tmp_path / "bop"
    plan = _repro(capsys, device, out, "bop-cifar", "--root", str(tmp_path / "cifar"),
                  "--max-steps", "2")  # fmt: skip
    assert plan[0]["dataset"] == "cifar10, val: last 10% of train"
    _trained_on(out / "binarynet-bop" / "seed0", device)
    record = json.loads((out / "test.json").read_text())["runs"][0]
    assert 0.0 <= record["test_acc1"] <= 100.0 and record["checkpoint"] == "best.pt"
    assert "best-validation-loss checkpoint" in (out / "test.md").read_text()
