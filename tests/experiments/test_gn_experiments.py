"""`lightnets repro gn-batch-size`, `gn-groups` and `gn-feature-dist` (GN paper Sec. 4.1) at toy
scale: results files, variants and their overrides, the feature-percentile callback, resume,
refusals."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightnets.commands.repro import add_repro_arguments, repro_command
from lightnets.engine.config import load_config
from lightnets.errors import UserError
from lightnets.experiments import list_experiments
from lightnets.experiments.gn import (
    PERCENTILE_FILE,
    FeaturePercentiles,
    batch_size_spec,
    feature_dist_spec,
    groups_spec,
    scaled_milestones,
)
from lightnets.experiments.options import int_list, toml_string
from lightnets.experiments.plan import resolve_run
from lightnets.models import create_model

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

torch.set_num_threads(1)

PCT = ("1", "20", "80", "99")
MNIST_TRAIN = 4000  # images in the bundled MNIST subset's train split

# The paper's Table 2 (ResNet-50 ImageNet val error, %), LN / IN at 32 from Table 1 and BRN at 4
# from the text: [norm][images per worker]; every other cell has no paper number.
TABLE2 = {
    "bn": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7},
    "gn": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1},
    "brn": {4: 26.3},
    "ln": {32: 25.3},
    "in": {32: 28.4},
}
TABLE3_G = {64: 24.6, 32: 24.1, 16: 24.6, 8: 24.4, 4: 24.6, 2: 24.7, 1: 25.3}
TABLE3_CPG = {64: 24.4, 32: 24.5, 16: 24.2, 8: 24.3, 4: 24.8, 2: 25.6, 1: 28.4}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightnets repro")
    add_repro_arguments(parser)
    return parser


def _args(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(list(argv))


def _common(out: Path) -> list[str]:
    return ["--seeds", "1", "--set", "output.plot=false", "--no-progress", "--out", str(out)]


def _rows(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _run_config(run_dir) -> dict:
    return tomllib.loads((Path(run_dir) / "config.toml").read_text())


def _check_results_files(out: Path, *extra: str) -> dict:
    """All results files exist; results.json's values are errors: 100 - the run's val_acc1."""
    for name in ("results.md", "results.json", "results.csv", "results.png", "experiment.json"):
        assert (out / name).is_file(), name
    for name in extra:
        assert (out / name).is_file(), name
    for png in ["results.png", *(n for n in extra if n.endswith(".png"))]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    data = json.loads((out / "results.json").read_text())
    for v in data["variants"]:
        if v["status"] != "ok":
            continue
        for run in v["runs"]:
            rows = _rows(run["run_dir"])
            accs = [r["val_acc1"] for r in rows if "val_acc1" in r]
            assert run["final"] == 100.0 - rows[-1]["val_acc1"]
            assert run["best"] == 100.0 - max(accs)  # the lowest error over evaluated epochs
        assert v["final"]["values"] == [r["final"] for r in v["runs"]]
    table = (out / "results.md").read_text()
    assert "ours: 100 − val_acc1" in table and "the lowest value" in table
    return data


def _table_rows(text: str) -> dict[str, list[str]]:
    """A markdown table as {first cell: the other cells}, in order."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.split("|")[1:-1]]
            rows[cells[0]] = cells[1:]
    return rows


# ----------------------------------------------------------------------------- toy runs
def test_registered():
    names = [e.name for e in list_experiments()]
    assert {"gn-batch-size", "gn-groups", "gn-feature-dist"} <= set(names)


def test_batch_size_toy_run(tmp_path, capsys):
    out = tmp_path / "bs"
    argv = ["gn-batch-size", "--max-steps", "2", "--norms", "bn,gn,brn", "--batch-sizes", "32,2"]
    assert repro_command(_args(*argv, *_common(out))) == 0
    printed = capsys.readouterr().out
    data = _check_results_files(out, "table2.md", "fig1.png")
    names = [v["name"] for v in data["variants"]]
    assert names == ["bn-b32", "bn-b2", "gn-b32", "gn-b2", "brn-b32", "brn-b2"]
    final = {}
    for v in data["variants"]:
        assert v["status"] == "ok" and v["final"]["n"] == 1
        run = v["runs"][0]
        assert run["step"] == 2 and 0.0 <= run["final"] <= 100.0
        final[v["name"]] = v["final"]["mean"]
        kind, n = v["name"].split("-b")
        n = int(n)
        config = _run_config(run["run_dir"])
        assert config["model"]["name"] == "resnet_mini"
        assert config["model"]["args"]["norm"] == kind
        # N images per process, whatever the recipe's batch_size was (config.toml: none)
        assert config["data"]["batch_per_process"] == n
        assert config["data"].get("batch_size", "none") == "none"
        # lr 0.1 x N / 32 (one of the paper's workers), not yet decayed (milestones [2, 3])
        assert _rows(run["run_dir"])[0]["lr"] == pytest.approx(0.1 * n / 32)
        # 4 epochs: the median is taken over the last epoch (5% of them, at least one)
        assert run["median_last"] == run["final"]
    # the plan was printed before training and kept beside the results
    plan = [json.loads(line) for line in (out / "plan.jsonl").read_text().splitlines()]
    assert [p["run"] for p in plan] == [f"{name}/seed0" for name in names]
    assert all(json.dumps(p, ensure_ascii=False) in printed for p in plan)
    assert {p["metric"] for p in plan} == {
        "median top-1 error (%) of the last 1 epoch on the test split"
    }

    pivot = (out / "table2.md").read_text()
    rows = _table_rows(pivot)
    assert list(rows) == ["norm", "BN", "GN", "BRN", "BN − GN"]
    assert rows["norm"] == ["32 img/worker", "2 img/worker"]
    for kind, label in (("bn", "BN"), ("gn", "GN"), ("brn", "BRN")):
        for cell, n in zip(rows[label], (32, 2)):
            ours = f"{final[f'{kind}-b{n}']:.2f}"  # one seed: no spread
            paper = TABLE2[kind].get(n)
            assert cell == ours + ("" if paper is None else f" ({paper:.1f})")
    assert rows["BN − GN"] == [
        f"{final['bn-b32'] - final['gn-b32']:+.2f} (-0.5)",
        f"{final['bn-b2'] - final['gn-b2']:+.2f} (+10.6)",
    ]
    assert pivot.strip() in printed
    long_rows = _table_rows((out / "results.md").read_text())
    assert long_rows["BN, 2/worker"][3] == "34.700" and long_rows["BRN, 2/worker"][3] == "—"


def test_groups_toy_run_with_an_unbuildable_g(tmp_path):
    out = tmp_path / "groups"
    argv = ["gn-groups", "--max-steps", "2", "--groups", "32,3", "--channels-per-group", "2"]
    assert repro_command(_args(*argv, *_common(out))) == 0
    data = _check_results_files(out)
    by_name = {v["name"]: v for v in data["variants"]}
    assert list(by_name) == ["G32", "G3", "cpg2"]
    assert by_name["G32"]["status"] == "ok" and by_name["cpg2"]["status"] == "ok"
    # G = 3 divides none of resnet_mini's 64..256 channels: n/a with its reason, no training
    assert by_name["G3"]["status"] == "n/a" and by_name["G3"]["reason"]
    assert not list((out / "G3").glob("seed0/*.pt"))
    assert "| G = 3 | n/a (" in (out / "results.md").read_text()
    assert by_name["cpg2"]["paper"] == 25.6 and by_name["cpg2"]["baseline"] == "G32"
    config = _run_config(by_name["cpg2"]["runs"][0]["run_dir"])
    assert config["model"]["args"]["norm_kwargs"] == {"channels_per_group": 2}
    assert config["data"]["batch_per_process"] == 32


def _fd_argv(out: Path) -> list[str]:
    """gn-feature-dist: no norm and GN, 4 steps, a percentile record every 2 steps."""
    return [
        "gn-feature-dist",
        "--max-steps",
        "4",
        "--records",
        "2",
        "--probe-images",
        "16",
        "--norms",
        "none,gn",
        "--set",
        "train.checkpoint_every=1",
        *_common(out),
    ]


def _records(out: Path) -> dict[str, list[dict]]:
    found = {}
    for name in ("none", "gn"):
        stored = json.loads((out / name / "seed0" / PERCENTILE_FILE).read_text())
        assert stored["percentiles"] == [1, 20, 80, 99]
        found[name] = stored["records"]
    return found


@pytest.fixture(scope="module")
def feature_dist_run(tmp_path_factory):
    """An uninterrupted toy gn-feature-dist run: its out dir."""
    out = tmp_path_factory.mktemp("fd") / "straight"
    assert repro_command(_args(*_fd_argv(out))) == 0
    return out


def test_feature_dist_toy_run(feature_dist_run):
    out = feature_dist_run
    data = _check_results_files(out, "fig6.png")
    assert [v["name"] for v in data["variants"]] == ["none", "gn"]
    assert all(v["status"] == "ok" for v in data["variants"])
    assert [v["paper"] for v in data["variants"]] == [29.2, 27.6]
    for name, records in _records(out).items():
        assert [r["step"] for r in records] == [0, 2, 4], name  # every 4 // 2 steps, and step 0
        for r in records:
            assert set(r) == {"step", *PCT}
            assert r["1"] <= r["20"] <= r["80"] <= r["99"]
            assert all(math.isfinite(r[p]) for p in PCT)
        # the conv's own responses (before norm and ReLU): both signs
        assert records[0]["1"] < 0 < records[0]["99"], name
    config = _run_config(data["variants"][1]["runs"][0]["run_dir"])
    assert config["model"]["name"] == "vgg16"
    assert config["model"]["args"] == {
        "width": 0.25,
        "cifar_stem": True,
        "norm": "gn",
        "norm_kwargs": {"num_groups": 8},
    }
    assert config["optim"]["lr"] == 0.02


def test_feature_dist_resume_continues_the_records_exactly(
    feature_dist_run, tmp_path, capsys, monkeypatch
):
    from lightnets.engine.checkpoint import load_checkpoint
    from lightnets.engine.trainer import Trainer

    out = tmp_path / "killed"
    original = Trainer.train_step

    def interrupted(self, x, y):
        if self.run_dir.parent.name == "gn" and self.step == 3:
            raise KeyboardInterrupt
        return original(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        repro_command(_args(*_fd_argv(out)))
    monkeypatch.setattr(Trainer, "train_step", original)
    ckpt = load_checkpoint(out / "gn" / "seed0" / "last.pt")
    assert ckpt["step"] == 3
    assert [r["step"] for r in ckpt["callbacks"][0]["records"]] == [0, 2]
    assert not (out / "results.md").exists()
    capsys.readouterr()

    assert repro_command(_args(*_fd_argv(out))) == 0
    printed = capsys.readouterr().out
    assert "none seed0: skip (finished)" in printed
    assert "gn seed0: resume from epoch 0 step 3" in printed
    # the same records as the uninterrupted run, to the last bit (not restarted at step 3)
    assert _records(out) == _records(feature_dist_run)
    resumed = json.loads((out / "results.json").read_text())
    straight = json.loads((feature_dist_run / "results.json").read_text())
    assert [v["final"] for v in resumed["variants"]] == [v["final"] for v in straight["variants"]]
    assert resumed["variants"][1]["runs"][0]["status"] == "resumed"


# ----------------------------------------------------------------------------- variants
def test_batch_size_variants_paper_values_and_baselines():
    spec = batch_size_spec(_args("gn-batch-size"))
    norms, batches = ("bn", "gn", "brn", "ln", "in"), (32, 16, 8, 4, 2)
    assert [v.name for v in spec.variants] == [f"{k}-b{n}" for k in norms for n in batches]
    for v in spec.variants:
        kind, n = v.name.split("-b")
        assert v.paper == TABLE2[kind].get(int(n))
        assert v.baseline == (None if kind == "bn" else f"bn-b{n}")
    by_name = {v.name: v for v in spec.variants}
    assert by_name["bn-b2"].paper == 34.7 and by_name["gn-b2"].paper == 24.1
    assert by_name["brn-b4"].paper == 26.3 and by_name["brn-b32"].paper is None
    assert by_name["ln-b32"].paper == 25.3 and by_name["ln-b2"].paper is None
    assert by_name["in-b32"].paper == 28.4 and by_name["in-b16"].paper is None
    assert spec.recipe == "gn_mnist" and spec.as_error and spec.seeds == [0, 1]
    assert spec.out == Path("runs") / "repro" / "gn-batch-size-mnist5k"
    assert spec.paper_label == "paper (ImageNet)"
    assert {"train.epochs=4", "schedule.milestones=[2, 3]"} <= set(spec.base_overrides)
    assert spec.settings == {
        "data": "mnist5k",
        "root": None,
        "epochs": 4,
        "max_steps": None,
        "set": [],
        "norms": list(norms),
        "batch_sizes": list(batches),
        "lr": None,
    }
    for v in spec.variants:
        config = load_config(spec.recipe, [*spec.base_overrides, *v.overrides])
        kind, n = v.name.split("-b")
        n = int(n)
        assert config.data.per_process_batch(1) == n and config.model.args["norm"] == kind
        assert resolve_run(config, 1)["lr"] == pytest.approx(0.1 * n / 32)
        if kind == "brn":  # plain BN for 5% of the steps, limits relaxed over the next 25%
            total = 4 * (MNIST_TRAIN // n)
            assert config.model.args["norm_kwargs"] == {
                "r_max": 1.5,
                "d_max": 0.5,
                "warmup_steps": int(0.05 * total),
                "relax_steps": int(0.25 * total),
            }
        else:
            assert config.model.args["norm_kwargs"] == ({"num_groups": 32} if kind == "gn" else {})
    brn2 = load_config(spec.recipe, [*spec.base_overrides, *by_name["brn-b2"].overrides])
    assert brn2.model.args["norm_kwargs"]["warmup_steps"] == 400  # 5% of 4 x 2000 steps
    assert brn2.model.args["norm_kwargs"]["relax_steps"] == 2000


@pytest.mark.parametrize(
    "argv, expected",
    [
        # max_steps below the epochs' steps: the warm-up is a fraction of max_steps
        (["--max-steps", "3", "--batch-sizes", "32,2"], {32: (0, 0), 2: (0, 0)}),
        # 1 epoch of 125 (batch 32) or 62 (batch 64) steps, at most 100
        (
            ["--epochs", "1", "--max-steps", "100", "--batch-sizes", "32,64"],
            {32: (5, 25), 64: (3, 15)},
        ),
        (["--epochs", "2", "--batch-sizes", "8"], {8: (50, 250)}),
    ],
)
def test_brn_warmup_in_steps(argv, expected):
    spec = batch_size_spec(_args("gn-batch-size", "--norms", "brn", *argv))
    assert [v.name for v in spec.variants] == [f"brn-b{n}" for n in expected]
    for v in spec.variants:
        n = int(v.name.split("-b")[1])
        warmup, relax = expected[n]
        kwargs = f"{{r_max = 1.5, d_max = 0.5, warmup_steps = {warmup}, relax_steps = {relax}}}"
        assert v.overrides == [
            'model.args.norm="brn"',
            f"model.args.norm_kwargs={kwargs}",
            f"data.batch_per_process={n}",
        ]
        assert v.baseline is None  # no BN among the norms


def test_batch_size_options_and_paper_scale_settings(tmp_path):
    spec = batch_size_spec(
        _args("gn-batch-size", "--norms", "gn, ln,gn", "--batch-sizes", "8,8,4", "--lr", "0.05")
    )
    assert [v.name for v in spec.variants] == ["gn-b8", "gn-b4", "ln-b8", "ln-b4"]
    assert "optim.lr=0.05" in spec.base_overrides
    # CIFAR at the paper's scale: recipe resnet_gn_cifar, 100 epochs, lr / 10 at 30, 60, 90;
    # the root is quoted for TOML (a quote and a backslash in it survive)
    root = tmp_path / 'my "data"\\set'
    argv = ["gn-batch-size", "--data", "cifar100", "--root", str(root), "--norms", "bn,gn"]
    spec = batch_size_spec(_args(*argv))
    assert spec.recipe == "resnet_gn_cifar" and spec.paper_label == "paper (ImageNet)"
    assert "data.name=cifar100" in spec.base_overrides
    assert {"train.epochs=100", "schedule.milestones=[30, 60, 90]"} <= set(spec.base_overrides)
    assert spec.settings["root"] == str(root.resolve())
    config = load_config(spec.recipe, [*spec.base_overrides, *spec.variants[0].overrides])
    assert config.data.root == str(root.resolve()) and config.data.name == "cifar100"
    assert config.train.epochs == 100 and config.schedule.milestones == [30, 60, 90]
    spec = batch_size_spec(
        _args("gn-batch-size", "--data", "folder", "--root", str(tmp_path), "--norms", "gn")
    )
    assert spec.recipe == "resnet50_gn_imagenet" and spec.paper_label == "paper"
    assert str(spec.out).endswith("gn-batch-size-folder")
    # the paper's rule at its scale: lr 0.1 x N x W / 256 (W = 1 without --processes)
    config = load_config(spec.recipe, [*spec.base_overrides, *spec.variants[0].overrides])
    assert resolve_run(config, 1)["lr"] == pytest.approx(0.1 * 32 / 256)
    assert resolve_run(config, 8)["lr"] == pytest.approx(0.1)


def test_groups_variants_and_paper_values():
    spec = groups_spec(_args("gn-groups"))
    gs = (64, 32, 16, 8, 4, 2, 1)
    assert [v.name for v in spec.variants] == [f"G{g}" for g in gs] + [f"cpg{c}" for c in gs]
    assert [v.paper for v in spec.variants] == [TABLE3_G[g] for g in gs] + [
        TABLE3_CPG[c] for c in gs
    ]
    by_name = {v.name: v for v in spec.variants}
    assert by_name["G1"].paper == 25.3 and by_name["G1"].label == "G = 1 (LN)"
    assert by_name["cpg2"].paper == 25.6 and by_name["cpg1"].paper == 28.4
    assert by_name["cpg1"].label == "1 channels/group (IN)"
    assert all(v.baseline == "G32" for v in spec.variants)
    assert by_name["G8"].overrides == [
        'model.args.norm="gn"',
        "model.args.norm_kwargs={num_groups = 8}",
        "data.batch_per_process=32",  # Table 3: 32 images per GPU
    ]
    assert spec.as_error and spec.recipe == "gn_mnist"
    # every division of Table 3 exists in resnet_mini (its norm widths are multiples of 64)
    for v in spec.variants:
        config = load_config(spec.recipe, [*spec.base_overrides, *v.overrides])
        if v.name.startswith("G"):
            key, value = "num_groups", int(v.name[1:])
        else:
            key, value = "channels_per_group", int(v.name[3:])
        assert config.model.args["norm_kwargs"] == {key: value}
        model = create_model(config.model.name, **config.model.args)
        norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
        assert len(norms) == 1 + 3 * 2 + 2  # stem, two per block, two downsample shortcuts
        for m in norms:
            groups = value if key == "num_groups" else m.num_channels // value
            assert m.num_groups == groups, (v.name, m.num_channels)

    only_cpg = groups_spec(_args("gn-groups", "--groups", "none", "--channels-per-group", "4,2"))
    assert [v.name for v in only_cpg.variants] == ["cpg4", "cpg2"]
    assert all(v.baseline is None for v in only_cpg.variants)  # no G = 32 to compare with
    only_g = groups_spec(_args("gn-groups", "--groups", "1", "--channels-per-group", "None"))
    assert [v.name for v in only_g.variants] == ["G1"]


def test_feature_dist_spec_and_its_callbacks():
    from lightnets.engine.trainer import build_datasets

    spec = feature_dist_spec(_args("gn-feature-dist"))
    assert [v.name for v in spec.variants] == ["none", "bn", "gn"]
    assert [v.paper for v in spec.variants] == [29.2, 28.0, 27.6]
    assert [v.baseline for v in spec.variants] == ["bn", None, "bn"]
    assert spec.seeds == [0] and spec.as_error
    base = spec.base_overrides
    assert 'model.name="vgg16"' in base and "model.args={width = 0.25, cifar_stem = true}" in base
    assert {"optim.lr=0.02", "train.epochs=4", "schedule.milestones=[2, 3]"} <= set(base)
    for v in spec.variants:
        config = load_config(spec.recipe, [*base, *v.overrides])
        assert config.model.name == "vgg16" and config.model.args["norm"] == v.name
        assert config.model.args["norm_kwargs"] == ({"num_groups": 8} if v.name == "gn" else {})
        assert "zero_init_last" not in config.model.args  # the recipe's ResNet args are replaced
    cb = spec.callbacks("bn", 0)[0]
    assert isinstance(cb, FeaturePercentiles) and cb.records == []
    assert cb.every == (4 * (MNIST_TRAIN // 32)) // 60  # 60 records over 500 steps
    # the probe: the first 256 training images, un-augmented, shared by every run
    train, _ = build_datasets(load_config(spec.recipe, base))
    assert torch.equal(cb.probe, torch.stack([train[i][0] for i in range(256)]))
    other = spec.callbacks("gn", 0)[0]
    assert other is not cb and other.probe is cb.probe
    spec = feature_dist_spec(
        _args("gn-feature-dist", "--lr", "0.05", "--max-steps", "10", "--records", "3")
    )
    assert "optim.lr=0.05" in spec.base_overrides and "optim.lr=0.02" not in spec.base_overrides
    assert spec.callbacks("none", 0)[0].every == 3  # 10 steps // 3 records


@pytest.mark.parametrize(
    "epochs, expected",
    [(100, [30, 60, 90]), (3, [1, 2]), (10, [3, 6, 9]), (1, []), (2, [1]), (4, [2, 3])],
)
def test_scaled_milestones(epochs, expected):
    assert scaled_milestones(epochs) == expected


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 2000))
def test_scaled_milestones_property(epochs):
    marks = scaled_milestones(epochs)
    assert all(0 < m < epochs for m in marks) and len(marks) <= 3
    assert all(a < b for a, b in zip(marks, marks[1:]))
    assert (len(marks) > 0) == (epochs > 1)
    if epochs % 10 == 0:
        assert marks == [3 * epochs // 10, 6 * epochs // 10, 9 * epochs // 10]


def test_one_epoch_still_gets_a_valid_schedule(tmp_path):
    """A 1-epoch run has no decay inside it; multistep still gets a milestone (at the end)."""
    from lightnets.engine.trainer import Trainer

    spec = groups_spec(_args("gn-groups", "--epochs", "1", "--groups", "32", "--no-progress"))
    assert "schedule.milestones=[1]" in spec.base_overrides
    config = load_config(spec.recipe, [*spec.base_overrides, *spec.variants[0].overrides])
    trainer = Trainer(config, tmp_path / "run")  # builds the schedule (refused before the fix)
    assert trainer.epochs == 1 and trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def test_int_list_and_toml_string():
    assert int_list(None, "--x") is None
    assert int_list("4, 2,2,1", "--x") == [4, 2, 1]
    for bad in ("", "0", "2,-1", "1,x", "1.5"):
        with pytest.raises(UserError, match="--x"):
            int_list(bad, "--x")
    assert toml_string('a"b\\c') == '"a\\"b\\\\c"'


@settings(max_examples=50, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=30))
def test_toml_string_round_trip(text):
    assert tomllib.loads(f"v = {toml_string(text)}")["v"] == text


# ----------------------------------------------------------------------------- the callback
class _Stub:
    """What FeaturePercentiles reads from a Trainer."""

    def __init__(self, model: nn.Module, run_dir: Path, step: int = 0, eval_augment=None):
        self.model, self.run_dir, self.step, self.eval_augment = model, run_dir, step, eval_augment


def _vgg(norm: str) -> nn.Module:
    torch.manual_seed(0)
    kw = {"norm_kwargs": {"num_groups": 8}} if norm == "gn" else {}  # 16..128 channels
    return create_model(
        "vgg16", width=0.25, cifar_stem=True, in_chans=1, num_classes=10, norm=norm, **kw
    )


def _reference(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Percentiles of the last conv's output, by running `features` up to it in eval mode."""
    last = max(i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d))
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model.features[: last + 1](x)
    model.train(was)
    q = torch.tensor([0.01, 0.20, 0.80, 0.99])
    return torch.quantile(out.flatten(), q).tolist()


@pytest.mark.parametrize("norm", ["none", "bn", "gn"])
@pytest.mark.parametrize("training", [True, False])
def test_percentiles_match_a_reference(norm, training, tmp_path):
    model = _vgg(norm).train(training)
    probe = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = FeaturePercentiles(probe, every=1)
    cb.record(_Stub(model, tmp_path, step=7))
    assert model.training is training  # restored
    after = model.state_dict()  # BN running statistics (and everything else) untouched
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(cb.records) == 1 and cb.records[0]["step"] == 7
    got = [cb.records[0][p] for p in PCT]
    assert got == pytest.approx(_reference(model, probe), rel=1e-6, abs=1e-7)
    assert got[0] < 0 < got[-1]  # before the ReLU: not clipped at 0
    # the trainer's eval augmentation is applied to the probe
    cb.record(_Stub(model, tmp_path, step=8, eval_augment=lambda x: 2 * x - 0.5))
    got = [cb.records[1][p] for p in PCT]
    assert got == pytest.approx(_reference(model, 2 * probe - 0.5), rel=1e-6, abs=1e-7)


def test_percentile_hooks_file_and_state(tmp_path):
    model = _vgg("bn")
    probe = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    cb = FeaturePercentiles(probe, every=2)
    stub = _Stub(model, tmp_path)
    cb.on_train_start(stub)
    cb.on_train_start(stub)  # records exist (e.g. resumed): no second step-0 record
    for step in (1, 2, 3, 4):
        stub.step = step
        cb.on_step_end(stub, {})
    assert [r["step"] for r in cb.records] == [0, 2, 4]
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed
    cb.on_epoch_end(stub, {})
    stored = json.loads((tmp_path / PERCENTILE_FILE).read_text())
    assert stored == {"percentiles": [1, 20, 80, 99], "records": cb.records}
    # state round trip, through torch.save / a weights-only load as in a checkpoint
    path = tmp_path / "state.pt"
    torch.save(cb.state_dict(), path)
    fresh = FeaturePercentiles(probe, every=2)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.records == cb.records
    fresh.on_train_start(stub)
    assert fresh.records == cb.records
    fresh.load_state_dict({})
    assert fresh.records == []
    assert FeaturePercentiles(probe, every=0).every == 1


def test_percentiles_need_a_conv(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    cb = FeaturePercentiles(torch.zeros(1, 1, 2, 2), every=1)
    with pytest.raises(UserError, match="Conv2d"):
        cb.record(_Stub(model, tmp_path))


# ----------------------------------------------------------------------------- bad input
ALL = ("gn-batch-size", "gn-groups", "gn-feature-dist")
SPECS = {
    "gn-batch-size": batch_size_spec,
    "gn-groups": groups_spec,
    "gn-feature-dist": feature_dist_spec,
}


@pytest.mark.parametrize(
    "experiment, argv, fragment",
    [
        *((e, ["--data", "mnist5k", "--root", "/x"], "expected no --root") for e in ALL),
        *((e, ["--data", "cifar10"], "needs --root") for e in ALL),
        *((e, ["--seeds", "0"], "--seeds 0") for e in ALL),
        *((e, ["--epochs", "0"], "--epochs 0") for e in ALL),
        *((e, ["--max-steps", "0"], "--max-steps 0") for e in ALL),
        *((e, ["--lr=-1"], "--lr -1") for e in ALL),
        ("gn-batch-size", ["--lr", "nan"], "positive learning rate"),
        ("gn-batch-size", ["--norms", "bn,xx"], "bn, gn, brn, ln, in, none"),
        ("gn-batch-size", ["--norms", ","], "--norms ','"),
        ("gn-batch-size", ["--batch-sizes", "0"], "--batch-sizes '0'"),
        ("gn-batch-size", ["--batch-sizes", "2,x"], "--batch-sizes '2,x'"),
        ("gn-batch-size", ["--batch-sizes", "none"], "at least one batch size"),
        ("gn-groups", ["--groups", "none", "--channels-per-group", "none"], "expected some"),
        ("gn-groups", ["--groups", "0"], "--groups '0'"),
        ("gn-groups", ["--channels-per-group", "-2"], "--channels-per-group '-2'"),
        ("gn-feature-dist", ["--norms", "fbn"], "none, bn, gn, ln, in, brn"),
        ("gn-feature-dist", ["--probe-images", "0"], "--probe-images"),
        ("gn-feature-dist", ["--records", "0"], "--records"),
    ],
)
def test_bad_arguments_are_user_errors(experiment, argv, fragment, tmp_path):
    import re

    with pytest.raises(UserError, match=re.escape(fragment)):
        SPECS[experiment](_args(experiment, *argv, "--out", str(tmp_path / "never")))
    assert not (tmp_path / "never").exists()


def test_through_lightnets_main(capsys, tmp_path):
    """As wired into the `lightnets` CLI: a user error is exit code 2 and one line."""
    from lightnets.cli import main

    out = tmp_path / "never"
    assert main(["repro", "gn-batch-size", "--norms", "bn,xx", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "'bn,xx'" in err and "bn, gn, brn, ln, in, none" in err and len(err.splitlines()) == 1
    assert main(["repro", "gn-groups", "--data", "cifar10"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs --root" in err and len(err.splitlines()) == 1
    assert not out.exists()
