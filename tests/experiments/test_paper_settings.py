"""`lightnets repro NAME --dry-run` at the papers' scale against the papers' settings.

The tables below are transcribed from the papers (../shared/papers/, sections cited), not from
the library: the dry run of each experiment must show them field by field, and everything it
lists under `deviations` at this scale must be a stated reading or an unstated choice, never a
field that differs (except where the test says which and why).
"""

from __future__ import annotations

import json
import math

import pytest

import lightnets.data.registry as data_registry
from lightnets.cli import main

NO_DATA = "/nonexistent/lightnets-test-data"  # a dry run reads nothing: the path need not exist

KEYS = [
    "run",
    "model",
    "model_args",
    "dataset",
    "processes",
    "batch_per_process",
    "global_batch",
    "lr",
    "weight_decay",
    "epochs",
    "schedule",
    "augment",
    "metric",
    "deviations",
]


@pytest.fixture(autouse=True)
def no_data_reads(monkeypatch):
    """Any attempt to load a dataset during a dry run fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a dry run read data: load_dataset{args}")

    monkeypatch.setattr(data_registry, "load_dataset", refuse)
    monkeypatch.setattr("lightnets.data.load_dataset", refuse)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def dry_run(capsys, *argv: str) -> list[dict]:
    assert main(["repro", *argv, "--dry-run"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines, "the dry run printed no runs"
    for line in lines:
        expected = [k if k != "epochs" or "epochs" in line else "max_steps" for k in KEYS]
        assert list(line) == expected
    return lines


def field_deviations(line: dict) -> list[str]:
    """Deviations that name a field of ours that differs from the paper's."""
    return [d for d in line["deviations"] if " here, the paper's is " in d]


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


# ----------------------------------------------------------------------------- Finet (paper 001)
#: §5.3: "padded with 0 to 36x36 and then randomly cropped to 32x32 pixels. Then randomly
#: horizontal flipping is made. Each channel of the input is normalized into 0 mean and 1 std
#: globally. Large Finet ... stride of Conv1 is set to 1, and omit the MaxPool ... SGD with 0.9
#: momentum, and 5e-4 weight decay. ... one TITAN Xp GPU. The batch size is set to 128.
#: Learning rate is set to 0.1, and decreased 10 times at epoch 100 and 150 ... 200 epochs.
#: For Squeeze-Excite module, we set the number of hidden unit to 200."
FINET_CIFAR = {
    "model": "finet_large_se",
    "processes": 1,
    "batch_per_process": 128,
    "global_batch": 128,
    "lr": 0.1,
    "weight_decay": 5e-4,
    "epochs": 200,
    "schedule": {"name": "multistep", "unit": "epoch", "milestones": [100, 150], "gamma": 0.1},
    "augment": [{"pad_crop": {"padding": 2, "fill": 0.0}}, {"hflip": {"p": 0.5}}, "normalize"],
}
#: Table 5: G in 1, 2, 4, 6, 8 with and without affine (we run 1, 2, 4, 8 by default).
FINET_TABLE5 = {(g, aff) for g in (1, 2, 4, 8) for aff in (True, False)}


@pytest.mark.parametrize("data", ["cifar10", "cifar100"])
def test_fbn_cifar_is_section_5_3(capsys, data):
    lines = dry_run(capsys, "fbn-cifar", "--data", data, "--root", NO_DATA, "--seeds", "1")
    seen = set()
    for line in lines:
        for key, value in FINET_CIFAR.items():
            assert line[key] == value, key
        args = line["model_args"]
        assert args["cifar_stem"] is True and args["num_classes"] == (
            10 if data == "cifar10" else 100
        )
        seen.add((args["fbn_groups"], args["affine"]))
        assert line["dataset"] == data
        assert field_deviations(line) == []
        assert line["deviations"] and all(
            d.startswith(("reading:", "not stated in the paper")) for d in line["deviations"]
        )
    assert seen == FINET_TABLE5


def test_fbn_cifar_table7_resnet_batch_64(capsys):
    """§5.3: "The batch size is set to 64 since training ResNet with FBN consumes a lot of GPU
    memories"; Table 7: ResNet18 with G = 1 (BN), 2, 4."""
    lines = dry_run(capsys, "fbn-cifar", "--root", NO_DATA, "--model", "resnet18", "--seeds", "1")
    assert [(x["model_args"]["norm"], x["model_args"]["fbn_groups"]) for x in lines] == [
        ("bn", 1),
        ("fbn", 2),
        ("fbn", 4),
    ]
    for line in lines:
        assert line["model"] == "resnet18" and line["batch_per_process"] == 64
        assert (line["lr"], line["epochs"]) == (0.1, 200)
        assert line["augment"] == FINET_CIFAR["augment"]
        assert field_deviations(line) == []


# ----------------------------------------------------------------------------- GN (paper 002)
#: §4.1: "we use 8 GPUs to train all models, and the batch mean and variance of BN are computed
#: within each GPU ... weight decay of 0.0001 for all weight layers, including gamma and beta
#: ... 100 epochs ... decrease the learning rate by 10x at 30, 60, and 90 epochs ... we report
#: the median error rate of the final 5 epochs"; "a learning rate of 0.1 for the batch size of
#: 32, and 0.1N/32 for a batch size of N" (per GPU); "rmax = 1.5 and dmax = 0.5" for BR; GN
#: with G = 32 by default (Table 3); gamma of each residual block's last norm initialized to 0.
GN_COMMON = {
    "model": "resnet50",
    "dataset": "folder",
    "weight_decay": 1e-4,
    "epochs": 100,
    "schedule": {"name": "multistep", "unit": "epoch", "milestones": [30, 60, 90], "gamma": 0.1},
    "metric": "median top-1 error (%) of the last 5 epochs on the val split",
}
GN_NORM_ARGS = {
    "bn": {},
    "gn": {"num_groups": 32},
    "ln": {},
    "in": {},
}
GN_AUGMENT_OPS = ["random_resized_crop", "hflip", "normalize"]  # [58]'s crop + flip


def _ops(augment: list) -> list[str]:
    return [op if isinstance(op, str) else next(iter(op)) for op in augment]


def test_gn_batch_size_is_table_2_on_8_gpus(capsys):
    lines = dry_run(
        capsys, "gn-batch-size", "--data", "folder", "--root", NO_DATA, "--processes", "8",
        "--seeds", "1",
    )  # fmt: skip
    runs = set()
    for line in lines:
        for key, value in GN_COMMON.items():
            assert line[key] == value, key
        args = line["model_args"]
        kind, n = args["norm"], line["batch_per_process"]
        runs.add((kind, n))
        assert args["zero_init_last"] is True
        if kind == "brn":
            assert (args["norm_kwargs"]["r_max"], args["norm_kwargs"]["d_max"]) == (1.5, 0.5)
        else:
            assert args["norm_kwargs"] == GN_NORM_ARGS[kind]
        assert line["processes"] == 8 and line["global_batch"] == 8 * n
        assert close(line["lr"], 0.1 * n / 32)
        assert _ops(line["augment"]) == GN_AUGMENT_OPS
        crop = line["augment"][0]["random_resized_crop"]
        assert crop["size"] == [224, 224] and crop["scale"] == [0.08, 1.0]
        assert field_deviations(line) == []
    assert runs == {(k, n) for k in ("bn", "gn", "brn", "ln", "in") for n in (32, 16, 8, 4, 2)}


def test_gn_groups_is_table_3_and_lists_the_single_process(capsys):
    """Table 3 at 32 images per GPU; started without --processes the plan is for one process,
    and says so: processes, global batch and lr (the paper's rule at 32 images) differ."""
    lines = dry_run(capsys, "gn-groups", "--data", "folder", "--root", NO_DATA, "--seeds", "1")
    kwargs = [line["model_args"]["norm_kwargs"] for line in lines]
    assert kwargs == [{"num_groups": g} for g in (64, 32, 16, 8, 4, 2, 1)] + [
        {"channels_per_group": c} for c in (64, 32, 16, 8, 4, 2, 1)
    ]
    for line in lines:
        for key, value in GN_COMMON.items():
            assert line[key] == value, key
        assert line["model_args"]["norm"] == "gn" and line["batch_per_process"] == 32
        assert (line["processes"], line["global_batch"]) == (1, 32)
        assert close(line["lr"], 0.1 * 32 / 256)
        fields = [d.split(":")[0] for d in field_deviations(line)]
        assert fields == ["processes", "global_batch", "lr"]
    eight = dry_run(
        capsys, "gn-groups", "--data", "folder", "--root", NO_DATA, "--seeds", "1",
        "--processes", "8",
    )  # fmt: skip
    assert all(field_deviations(line) == [] and close(line["lr"], 0.1) for line in eight)


def test_gn_feature_dist_is_figure_6(capsys):
    """Fig. 6: VGG-16 with no norm, BN or GN right after each conv, 32 images/GPU; the paper
    gives no VGG learning rate, so the plan names ours as a choice, not as the paper's."""
    lines = dry_run(
        capsys, "gn-feature-dist", "--data", "folder", "--root", NO_DATA, "--processes", "8"
    )
    assert [line["model_args"]["norm"] for line in lines] == ["none", "bn", "gn"]
    for line in lines:
        assert line["model"] == "vgg16" and line["model_args"]["cifar_stem"] is False
        assert (line["processes"], line["batch_per_process"], line["global_batch"]) == (8, 32, 256)
        for key in ("dataset", "weight_decay", "epochs", "schedule", "metric"):
            assert line[key] == GN_COMMON[key], key
        assert field_deviations(line) == []
        assert any("VGG-16's learning rate" in d for d in line["deviations"])
    assert lines[2]["model_args"]["norm_kwargs"] == {"num_groups": 32}


# ----------------------------------------------------------------------------- Bop (paper 004)
#: [Re] §3.3: "The last 10% of the training data was used for validation ... 4x4 padding,
#: taking a random 32x32 crop, applying a random horizontal flip with probability 0.50 and
#: normalizing between [-1,1] ... threshold tau=1e-8 and adaptivity rate gamma=1e-4 for 500
#: epochs. The adaptivity rate was decayed with 0.1 every 100 epochs. The training was halted
#: early when no weight flips had occurred in 10 consecutive epochs. The batch normalization
#: layers were optimized with Adam with default parameters learning rate = 0.001 ... The
#: weights with the lowest validation loss were used to compute the test accuracy."
BOP_CIFAR = {
    "model": "binarynet_cifar",
    "dataset": "cifar10, val: last 10% of train",
    "processes": 1,
    "lr": 0.001,
    "weight_decay": 0.0,
    "augment": [{"pad_crop": {"padding": 4, "fill": 0.0}}, {"hflip": {"p": 0.5}}, "scale_pm1"],
}
BOP_SCHEDULE = {"name": "step", "unit": "epoch", "step_size": 100, "gamma": 0.1, "keys": ["gamma"]}


def test_bop_cifar_is_section_3_3(capsys):
    (line,) = dry_run(capsys, "bop-cifar", "--root", NO_DATA)
    for key, value in BOP_CIFAR.items():
        assert line[key] == value, key
    assert line["model_args"]["mode"] == "bop" and line["epochs"] == 500
    binary = line["schedule"]["binary"]
    assert (binary["optimizer"], binary["gamma"], binary["threshold"]) == ("bop", 1e-4, 1e-8)
    assert binary["schedule"] == BOP_SCHEDULE and binary["stop_after_flipless_epochs"] == 10
    assert line["schedule"]["name"] == "constant"  # Adam's lr for BatchNorm
    assert "lowest validation loss" in line["metric"] and "test" in line["metric"]
    assert field_deviations(line) == []
    assert any("batch size" in d for d in line["deviations"])  # not in the [Re] text


def test_bop_hparams_on_cifar_is_section_3_2(capsys):
    """[Re] §3.2: tau = 1e-6 with gamma in {1e-2, 1e-3, 1e-4} and gamma = 1e-3 with tau in
    {0, 1e-5, 1e-6}; "identical to what is described in section 3.3 except for the number of
    epochs" (which the paper does not give)."""
    lines = dry_run(capsys, "bop-hparams", "--data", "cifar10", "--root", NO_DATA, "--seeds", "1")
    pairs = [
        (line["schedule"]["binary"]["gamma"], line["schedule"]["binary"]["threshold"])
        for line in lines
    ]
    assert pairs == [(1e-2, 1e-6), (1e-3, 1e-6), (1e-4, 1e-6), (1e-3, 0.0), (1e-3, 1e-5)]
    for line in lines:
        for key, value in BOP_CIFAR.items():
            assert line[key] == value, key
        assert line["schedule"]["binary"]["schedule"] == BOP_SCHEDULE
        assert line["schedule"]["binary"]["stop_after_flipless_epochs"] == 10
        assert field_deviations(line) == []
        assert any("number of epochs" in d for d in line["deviations"])
    ours = dry_run(
        capsys, "bop-hparams", "--data", "cifar10", "--root", NO_DATA, "--seeds", "1",
        "--constant-gamma",
    )  # fmt: skip
    fields = {d.split(":")[0] for line in ours for d in field_deviations(line)}
    assert fields == {"schedule.binary.schedule", "schedule.binary.stop_after_flipless_epochs"}


# ----------------------------------------------------------------------------- paper 003
#: §IV.A: "random cropping (from 250x250 to 125x125), random scaling in the range of [0.5, 2],
#: and random horizontal flipping ... cross entropy. SGD-Momentum optimizer with the base
#: learning rate of 0.001, the momentum of 0.9 and the weight decay of 0.0005 ... poly ...
#: power=0.9. 180K training iterations with batch size of 16"; Table I: baseline, alpha_i = 0.1,
#: alpha_i = 0.5, beta_i = 0.1, dynamic weight, gating; widths 32..512 (Fig. 2).
WM_TABLE1 = [
    {"fusion": "concat"},
    {"fusion": "alpha", "alpha": 0.1},
    {"fusion": "alpha", "alpha": 0.5},
    {"fusion": "beta", "beta": 0.1},
    {"fusion": "dynamic"},
    {"fusion": "gate"},
]


def test_wm_table_is_section_4a(capsys):
    lines = dry_run(capsys, "wm-table", "--data", "buildings", "--root", NO_DATA)
    # Fig. 4: "Each model is trained and tested 10 times independently": 10 seeds by default
    assert len(lines) == 10 * len(WM_TABLE1)
    for line, fusion in zip(lines[::10], WM_TABLE1):
        args = line["model_args"]
        assert {k: args[k] for k in fusion} == fusion
        assert args["widths"] == [32, 64, 128, 256, 512] and args["bn_weight_init"] == "normal"
        assert (line["model"], line["dataset"]) == ("res_unet", "buildings")
        assert (line["batch_per_process"], line["lr"], line["weight_decay"]) == (16, 0.001, 5e-4)
        assert line["max_steps"] == 180_000
        assert line["schedule"] == {"name": "poly", "unit": "step", "power": 0.9, "min_factor": 0.0}
        assert _ops(line["augment"])[:3] == ["random_scale", "random_crop", "hflip"]
        assert line["augment"][0]["random_scale"]["scale_range"] == [0.5, 2.0]
        assert line["augment"][1]["random_crop"]["size"] == [125, 125]
        assert field_deviations(line) == []
        # the paper never says which statistic of its 10 runs its tables hold
        assert any("which statistic" in d for d in line["deviations"])
        assert not any("mean of 10" in d for d in line["deviations"])


# ----------------------------------------------------------------------------- CPU scale
@pytest.mark.parametrize(
    "argv",
    [
        ["fbn-cifar", "--data", "mnist5k"],
        ["gn-batch-size"],
        ["gn-groups"],
        ["gn-feature-dist"],
        ["bop-approx"],
        ["bop-lr"],
        ["bop-hparams"],
        ["wm-table"],
        ["wm-param-stats"],
        ["wm-fused"],
    ],
)
def test_cpu_scale_plans_list_their_differences(capsys, monkeypatch, argv):
    """Every experiment plans at its CPU scale too, and the plan lists the dataset (and so on)
    that differs from the paper's; planning reads no data even for the bundled sets."""
    lines = dry_run(capsys, *argv, "--seeds", "1")
    for line in lines:
        assert any(d.startswith("dataset:") for d in field_deviations(line)), line["run"]
