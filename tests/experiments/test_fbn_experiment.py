"""`lightnets repro fbn-cifar` at toy scale: results files, resume / skip, refusals, variants."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from lightnets.commands.repro import add_repro_arguments, repro_command
from lightnets.errors import UserError
from lightnets.experiments import get_experiment, list_experiments
from lightnets.experiments.fbn import (
    PAPER_TABLE5,
    PAPER_TABLE6,
    PAPER_TABLE7,
    build_spec,
    build_variants,
    scaled_milestones,
)
from lightnets.experiments.results import summarize
from lightnets.experiments.runner import run_experiment

torch.set_num_threads(1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightnets repro")
    add_repro_arguments(parser)
    return parser


def _args(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(list(argv))


def _toy(out, *extra: str) -> list[str]:
    """fbn-cifar on the bundled MNIST subset, 1 seed, G in {1, 2}, 3 steps of batch 32."""
    return [
        "fbn-cifar",
        "--data",
        "mnist5k",
        "--seeds",
        "1",
        "--groups",
        "1,2",
        "--affine",
        "yes",
        "--max-steps",
        "3",
        "--batch-size",
        "32",
        "--set",
        "output.plot=false",
        "--set",
        "train.checkpoint_every=1",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def test_toy_run_results_resume_skip_and_refusal(tmp_path, capsys, monkeypatch):
    from lightnets.engine.trainer import Trainer

    out = tmp_path / "exp"
    # 1) killed in the middle of the second variant's run (after its first checkpoint)
    original = Trainer.train_step

    def interrupted(self, x, y):
        if self.run_dir.parent.name == "G2-affine" and self.step == 1:
            raise KeyboardInterrupt
        return original(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        repro_command(_args(*_toy(out)))
    monkeypatch.setattr(Trainer, "train_step", original)
    assert (out / "G1-affine" / "seed0" / "last.pt").is_file()
    assert (out / "G2-affine" / "seed0" / "last.pt").is_file()
    assert not (out / "results.md").exists()
    capsys.readouterr()

    # 2) the same command again: G=1 is skipped, G=2 resumed from its checkpoint
    assert repro_command(_args(*_toy(out))) == 0
    printed = capsys.readouterr().out
    assert "G1-affine seed0: skip (finished)" in printed
    assert "G2-affine seed0: resume from epoch 0 step 1" in printed
    for name in ("results.md", "results.json", "results.csv", "results.png", "experiment.json"):
        assert (out / name).is_file(), name
    table = (out / "results.md").read_text()
    assert "paper (CIFAR-10)" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["BN (G=1), affine", "FBN G=2, affine"]
    assert "92.584" in rows[0] and "93.082" in rows[1]  # the paper's Table 5 CIFAR-10 values
    assert table.strip() in printed  # the table is printed too
    data = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in data["variants"]] == ["G1-affine", "G2-affine"]
    for v in data["variants"]:
        assert v["status"] == "ok" and v["final"]["n"] == 1 and v["final"]["std"] == 0.0
        run = v["runs"][0]
        assert run["step"] == 3 and 0.0 <= run["final"] <= 100.0
        assert run["best"] >= run["final"]
    g2 = data["variants"][1]["runs"][0]
    assert g2["status"] == "resumed"
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("variant,label,status,n,final_mean")
    assert len(csv_lines) == 3

    # 3) again: nothing is trained (checkpoints untouched), same numbers
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/last.pt")}
    assert repro_command(_args(*_toy(out))) == 0
    printed = capsys.readouterr().out
    assert printed.count("skip (finished)") == 2 and "start (" not in printed
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/last.pt")} == mtimes
    again = json.loads((out / "results.json").read_text())
    assert [v["final"] for v in again["variants"]] == [v["final"] for v in data["variants"]]

    # 4) other arguments into the same dir: refused, nothing changed, unless --overwrite
    with pytest.raises(UserError, match="other arguments .*max_steps: 3 -> 4"):
        repro_command(_args(*_toy(out), "--max-steps", "4"))
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/last.pt")} == mtimes
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no experiment.json"):
        repro_command(_args(*_toy(other)))
    assert (other / "notes.txt").read_text() == "mine"


def test_unbuildable_variant_is_na_not_a_crash(tmp_path, capsys):
    """A G that the model cannot use is reported as n/a with its reason (no training)."""
    # more groups than any layer of finet_small has input channels (24/30/60/120)
    args = _args(*_toy(tmp_path / "exp"), "--groups", "1000")
    spec = build_spec(args)
    results = run_experiment(spec)
    assert results.variants[0].status == "n/a"
    assert results.variants[0].reason
    table = (tmp_path / "exp" / "results.md").read_text()
    assert "| FBN G=1000, affine | n/a (" in table
    assert (tmp_path / "exp" / "results.png").is_file()
    assert not list((tmp_path / "exp").glob("G1000-affine/seed0/*.pt"))


def test_table5_variants_and_paper_values():
    variants = build_variants("table5", "cifar100", groups=[1, 2, 4, 6, 8], affine="both")
    names = [v.name for v in variants]
    assert names == [f"G{g}-affine" for g in (1, 2, 4, 6, 8)] + [
        f"G{g}-noaffine" for g in (1, 2, 4, 6, 8)
    ]
    assert [v.paper for v in variants] == [
        75.624,
        76.752,
        76.856,
        76.716,
        77.202,
        74.216,
        74.382,
        74.486,
        74.772,
        74.734,
    ]
    assert variants[6].overrides == ["model.args.fbn_groups=2", "model.args.affine=false"]
    assert variants[6].baseline == "G1-noaffine"
    assert [v.paper for v in build_variants("table5", "cifar10", affine="no")] == [
        91.958,
        93.162,
        92.478,
        93.430,
    ]
    assert PAPER_TABLE5["cifar10"][True] == {
        1: 92.584,
        2: 93.082,
        4: 93.532,
        6: 93.286,
        8: 93.674,
    }


def test_table6_variants():
    variants = build_variants("table6", "cifar10", channels_per_group=[20, 50, 100])
    assert [v.name for v in variants] == ["cpg20", "cpg50", "cpg100"]
    assert [v.paper for v in variants] == [93.470, 93.606, 93.122]
    assert variants[1].overrides == [
        "model.args.fbn_groups=1",
        "model.args.fbn_channels_per_group=50",
        "model.args.affine=true",
    ]
    assert [v.paper for v in build_variants("table6", "cifar100")] == [76.926, 76.850, 75.674]
    assert PAPER_TABLE6["cifar100"] == {20: 76.926, 50: 76.850, 100: 75.674}


def test_table7_variants():
    r18 = build_variants("table7", "cifar10", model="resnet18")
    assert [v.name for v in r18] == ["resnet18-G1", "resnet18-G2", "resnet18-G4"]
    assert [v.paper for v in r18] == [94.512, 95.012, 94.962]
    assert r18[0].overrides == ["model.args.norm=bn", "model.args.fbn_groups=1"]
    assert r18[2].overrides == ["model.args.norm=fbn", "model.args.fbn_groups=4"]
    assert all(v.baseline == "resnet18-G1" for v in r18)
    r50 = build_variants("table7", "cifar100", model="resnet50")
    assert [v.paper for v in r50] == [77.796, 78.122, None]  # the paper has no ResNet50 G=4
    assert PAPER_TABLE7["cifar100"]["resnet18"] == {1: 76.866, 2: 77.754, 4: 77.726}
    assert PAPER_TABLE7["cifar10"]["resnet50"] == {1: 94.644, 2: 95.040}


def test_build_spec_studies_and_recipes(tmp_path):
    spec = build_spec(_args("fbn-cifar", "--data", "cifar100", "--root", str(tmp_path)))
    assert spec.recipe == "finet_cifar" and spec.paper_label == "paper"
    assert len(spec.variants) == 8 and spec.seeds == [0, 1, 2]
    assert "model.name=finet_large_se" in spec.base_overrides  # §5.3's SE hidden size
    assert not any(o.startswith("train.epochs") for o in spec.base_overrides)  # 200: the recipe
    assert str(spec.out).endswith("fbn-cifar-cifar100")
    spec = build_spec(
        _args("fbn-cifar", "--root", str(tmp_path), "--model", "resnet50", "--seeds", "1")
    )
    assert spec.recipe == "resnet_fbn_cifar" and [v.name for v in spec.variants] == [
        "resnet50-G1",
        "resnet50-G2",
        "resnet50-G4",
    ]
    spec = build_spec(_args("fbn-cifar", "--data", "mnist5k", "--channels-per-group", "20,50"))
    assert [v.name for v in spec.variants] == ["cpg20", "cpg50"]
    assert "model.name=finet_small_se" in spec.base_overrides
    assert "train.epochs=10" in spec.base_overrides
    assert "schedule.milestones=[5, 8]" in spec.base_overrides
    assert spec.paper_label == "paper (CIFAR-10)"
    # every run's config loads (the recipe plus the study's and the variant's overrides)
    from lightnets.engine.config import load_config

    for v in spec.variants:
        config = load_config(spec.recipe, [*spec.base_overrides, *v.overrides])
        assert config.model.args["fbn_channels_per_group"] in (20, 50)
        assert config.data.root is None and config.train.epochs == 10


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--data", "cifar10"], "needs --root"),
        (["--data", "mnist5k", "--root", "/x"], "expected no --root"),
        (["--data", "mnist5k", "--groups", "1,x"], "--groups '1,x'"),
        (["--data", "mnist5k", "--model", "resnet18", "--channels-per-group", "20"], "Table 6"),
        (["--data", "mnist5k", "--groups", "2", "--channels-per-group", "20"], "one of them"),
        (["--data", "mnist5k", "--model", "resnet18", "--affine", "no"], "Table 7"),
        (["--data", "mnist5k", "--seeds", "0"], "--seeds 0"),
    ],
)
def test_bad_arguments_are_user_errors(argv, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        build_spec(_args("fbn-cifar", *argv))


def test_scaled_milestones_and_summary():
    assert scaled_milestones(200) == [100, 150]
    assert scaled_milestones(6) == [3, 5]
    assert scaled_milestones(10) == [5, 8]
    assert scaled_milestones(20) == [10, 15]
    assert scaled_milestones(1) == [1]  # a 1-epoch run keeps its lr (multistep needs a milestone)
    s = summarize([1.0, 2.0, 4.0])
    assert s.n == 3 and s.mean == pytest.approx(7 / 3)
    assert s.std == pytest.approx(torch.tensor([1.0, 2.0, 4.0]).std(unbiased=True).item())
    assert summarize([5.0]).std == 0.0 and summarize([]).mean is None


def test_registry_and_help(capsys):
    assert "fbn-cifar" in [e.name for e in list_experiments()]
    with pytest.raises(UserError, match="did you mean 'fbn-cifar'"):
        get_experiment("fbn-cifr")
    with pytest.raises(SystemExit):
        _parser().parse_args(["fbn-cifar", "--help"])
    text = capsys.readouterr().out
    for option in ("--groups", "--affine", "--channels-per-group", "--model", "--seeds", "--out"):
        assert option in text
    assert repro_command(_args("--list")) == 0
    assert "fbn-cifar" in capsys.readouterr().out


def test_through_lightnets_main(capsys):
    """The command as wired into the `lightnets` CLI: listing, and a user error (exit 2)."""
    from lightnets.cli import main

    assert main(["repro", "--list"]) == 0
    assert "fbn-cifar" in capsys.readouterr().out
    assert main(["repro", "fbn-cifar", "--data", "cifar10"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs --root" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("extra", "named"),
    [([], "Table 5, Finet-large (SE)"), (["--model", "resnet18"], "Table 7, ResNet-18")],
)
def test_small_scale_note_names_the_papers_model(extra, named):
    from lightnets.experiments.fbn import build_spec

    spec = build_spec(_args("fbn-cifar", "--data", "mnist5k", *extra))
    assert any(f"({named}, 200 epochs)" in note for note in spec.notes)


def test_missing_data_fails_before_the_out_dir_exists(tmp_path, capsys):
    """A wrong --root is one line, after the plan, and leaves no out dir behind that would
    refuse the corrected command ("other arguments")."""
    from lightnets.cli import main

    out = tmp_path / "out"
    argv = ["repro", "fbn-cifar", "--root", str(tmp_path / "nope"), "--seeds", "1"]
    assert main([*argv, "--groups", "1", "--affine", "yes", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith('{"run": "G1-affine/seed0"')  # the plan came first
    assert "is not a directory" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert not out.exists()
