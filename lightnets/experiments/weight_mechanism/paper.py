"""What the weight-mechanism paper (Qi & Zhao, §IV) reports and how it trained: Tables I and
II, the Fig. 9 statistics, its variants, widths and runs, and its training setting
(`PAPER_SETTING`) that the plans compare ours with.

The paper's numbers: "each model is trained and tested 10 times independently" (Fig. 4 shows
the spread of the 10 test results), and Tables I and II give one number per model; the paper
does not say which statistic of the 10 runs that is (mean, median, best or one run), so the
tables and plots here call it "the paper's number" and nothing more.
"""

from __future__ import annotations

from typing import Any

from lightnets.experiments.plan import PaperSetting

__all__ = [
    "CPU_SEEDS",
    "CPU_WIDTHS",
    "DATA_CHOICES",
    "FIG9_LEVEL",
    "FUSED_VARIANTS",
    "METRICS",
    "PAPER_FIG9_ABOVE",
    "PAPER_FIG9_BEST",
    "PAPER_RUNS",
    "PAPER_SETTING",
    "PAPER_STATISTIC",
    "PAPER_TABLE1",
    "PAPER_TABLE2",
    "PAPER_WIDTHS",
    "PLAN_METRIC",
    "PROFILE_SIZE",
    "RECIPES",
    "TABLE_NOTE",
    "WM_VARIANTS",
    "paper_fusion",
]

#: Table I (W_BN ~ N(0, 1)): params, GFLOPs, mIoU, pixel acc., mean acc. (fractions as printed).
PAPER_TABLE1: dict[str, dict[str, Any]] = {
    "baseline": {"params": "5.11M", "gflops": 5.62, "miou": 0.7865, "pixel_acc": 0.9265, "mean_acc": 0.8630},  # noqa: E501
    "alpha0.1": {"params": "+4", "gflops": 5.62, "miou": 0.7941, "pixel_acc": 0.9296, "mean_acc": 0.8680},  # noqa: E501
    "alpha0.5": {"params": "+4", "gflops": 5.62, "miou": 0.7945, "pixel_acc": 0.9297, "mean_acc": 0.8687},  # noqa: E501
    "beta0.1": {"params": "+4", "gflops": 5.62, "miou": 0.7747, "pixel_acc": 0.9241, "mean_acc": 0.8436},  # noqa: E501
    "dynamic": {"params": "+480", "gflops": 5.63, "miou": 0.7847, "pixel_acc": 0.9273, "mean_acc": 0.8539},  # noqa: E501
    "gate": {"params": "+0.34M", "gflops": 6.18, "miou": 0.7881, "pixel_acc": 0.9268, "mean_acc": 0.8661},  # noqa: E501
}  # fmt: skip
#: Table II (W_BN = 1): no params / GFLOPs columns, no dynamic-weight or gating rows.
PAPER_TABLE2: dict[str, dict[str, Any]] = {
    "baseline": {"miou": 0.7820, "pixel_acc": 0.9255, "mean_acc": 0.8561},
    "alpha0.1": {"miou": 0.7846, "pixel_acc": 0.9279, "mean_acc": 0.8506},
    "alpha0.5": {"miou": 0.7900, "pixel_acc": 0.9285, "mean_acc": 0.8621},
    "beta0.1": {"miou": 0.7716, "pixel_acc": 0.9218, "mean_acc": 0.8468},
}
#: Fig. 9 (text of §IV.C): the best of 10 runs, mIoU (%), and how many of the 10 exceed 79.5%.
PAPER_FIG9_BEST = {"w0.5": 80.15, "w1": 80.03}
PAPER_FIG9_ABOVE = {"w0.5": 5, "w1": 1}
FIG9_LEVEL = 79.5

#: name -> (label, res_unet arguments)
WM_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("Baseline", {"fusion": "concat"}),
    "alpha0.1": ("alpha_i = 0.1", {"fusion": "alpha", "alpha": 0.1}),
    "alpha0.5": ("alpha_i = 0.5", {"fusion": "alpha", "alpha": 0.5}),
    "beta0.1": ("beta_i = 0.1", {"fusion": "beta", "beta": 0.1}),
    "dynamic": ("Dynamic weight", {"fusion": "dynamic"}),
    "gate": ("Gating mechanism", {"fusion": "gate"}),
}
FUSED_VARIANTS: dict[str, tuple[str, float]] = {
    "w0.5": ("weight 0.5", 0.5),
    "w1": ("weight 1", 1.0),
}
DATA_CHOICES = ("synthetic", "buildings")
RECIPES = {"synthetic": "res_unet_synthetic", "buildings": "res_unet_buildings"}
CPU_WIDTHS = (8, 16, 32, 64, 128)
PAPER_WIDTHS = (32, 64, 128, 256, 512)
PROFILE_SIZE = (1, 3, 125, 125)
#: "Each model is trained and tested 10 times independently" (Fig. 4, Fig. 9)
PAPER_RUNS = 10
#: seeds per variant at the CPU scale
CPU_SEEDS = 3
METRICS = (("val_miou", "mIoU"), ("val_pixel_acc", "Pixel acc."), ("val_mean_acc", "Mean acc."))
#: What the paper's tables hold, as far as the paper says.
PAPER_STATISTIC = (
    "one number per model from 10 independent runs; which statistic (mean, median, best or one "
    "run) the paper does not say"
)
PLAN_METRIC = "mIoU, pixel accuracy and mean accuracy (%) on the test split"
#: §IV.A's training settings (residual U-Net, Fig. 2; Massachusetts Buildings tiles).
PAPER_SETTING = PaperSetting(
    source="Qi & Zhao §IV.A",
    model="res_unet",
    model_args={"widths": list(PAPER_WIDTHS), "bn_weight_init": "normal"},
    dataset="buildings",
    global_batch=16,  # "180K training iterations with batch size of 16"
    lr=0.001,
    weight_decay=5e-4,
    max_steps=180_000,
    schedule={"name": "poly", "unit": "step", "power": 0.9, "min_factor": 0.0},
    augment=[
        {"random_scale": {"scale_range": [0.5, 2.0]}},
        # "random cropping (from 250x250 to 125x125)"
        {"random_crop": {"size": [125, 125], "fill": 0.0}},
        {"hflip": {"p": 0.5}},
        "normalize",
    ],
    metric=PLAN_METRIC,
    runs=PAPER_RUNS,  # "Each model is trained and tested 10 times independently"
    config={"optim.name": "sgd", "optim.momentum": 0.9, "data.val_split": "test"},
    notes=(
        "not stated in the paper: the input normalization (ours: per-channel mean and std of "
        "the training tiles) and the horizontal flip's probability (ours: 0.5)",
        "reading: one GPU and the whole batch of 16 per run (the paper names 'a GTX 1080Ti GPU "
        "and a GTX 2080Ti GPU' for all its models)",
    ),
)
TABLE_NOTE = (
    f"the paper's number: {PAPER_STATISTIC}; ours: each run's last iteration, mean ± std over seeds"
)


def paper_fusion(margs: dict[str, Any]) -> dict[str, Any]:
    """The paper's model arguments of a variant: its fusion and constant (alpha_i / beta_i)."""
    return {k: v for k, v in margs.items() if k in ("fusion", "alpha", "beta")}
