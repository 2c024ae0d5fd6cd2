"""wm-table (Table I, Fig. 4; `--bn-init ones`: Table II, Fig. 6): the residual U-Net with
plain concatenation (baseline), alpha_i = 0.1, alpha_i = 0.5, beta_i = 0.1, dynamic weight and
gating, each trained with N seeds. Writes the runner's results.* (mIoU), `table1.md` /
`table2.md` in the paper's layout (mIoU, pixel accuracy and mean accuracy in %, mean ± std
over seeds, the paper's numbers beside; parameters and MACs of each variant at the paper's
width and 125x125 input) and the box plot of the N runs' mIoU (`fig4.png` / `fig6.png`)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from lightnets.analysis import format_count, profile
from lightnets.engine.logging import read_rows
from lightnets.experiments import register_experiment
from lightnets.experiments.outdir import is_main_process, write_text
from lightnets.experiments.report import mean_std, new_figure, save_figure
from lightnets.experiments.results import ExperimentResults, Summary, VariantResult, summarize
from lightnets.experiments.runner import run_experiment
from lightnets.experiments.spec import ExperimentSpec, Variant
from lightnets.experiments.weight_mechanism.paper import (
    METRICS,
    PAPER_SETTING,
    PAPER_STATISTIC,
    PAPER_TABLE1,
    PAPER_TABLE2,
    PLAN_METRIC,
    PROFILE_SIZE,
    TABLE_NOTE,
    WM_VARIANTS,
    paper_fusion,
)
from lightnets.experiments.weight_mechanism.setting import (
    WmSetting,
    add_common_arguments,
    model_args_override,
    pick_variants,
)
from lightnets.models import create_model

__all__ = [
    "add_table_arguments",
    "box_plot",
    "metric_summaries",
    "paper_table",
    "paper_width_profile",
    "run_metrics",
    "run_table",
    "table_spec",
    "wm_table",
]


def add_table_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `lightnets repro wm-table` (and wm-param-stats)."""
    add_common_arguments(p, "wm-table", bn_init=True)


def table_spec(
    args: argparse.Namespace, experiment: str = "wm-table", check_root: bool = True
) -> ExperimentSpec:
    """The runner's ExperimentSpec of wm-table (also the runs of wm-param-stats);
    `check_root=False` (a plan) accepts a --root that does not exist yet."""
    setting = WmSetting(args, check_root)
    bn_init = args.bn_init
    names = pick_variants(args.variants, bn_init)
    paper = PAPER_TABLE1 if bn_init == "normal" else PAPER_TABLE2
    variants = []
    for name in names:
        label, margs = WM_VARIANTS[name]
        row = paper.get(name)
        variants.append(
            Variant(
                name=name,
                label=label,
                overrides=[
                    'model.name="res_unet"',
                    model_args_override(setting.widths, {**margs, "bn_weight_init": bn_init}),
                ],
                paper=None if row is None else 100 * row["miou"],
                baseline="baseline" if "baseline" in names and name != "baseline" else None,
                paper_setting={"model_args": {**paper_fusion(margs), "bn_weight_init": bn_init}},
            )
        )
    table = "Table I" if bn_init == "normal" else "Table II"
    notes = [
        setting.note(setting.seeds),
        f"W_BN init: {'N(0, 1)' if bn_init == 'normal' else '1'} ({table}). The paper's column "
        f"is its number on the Massachusetts test tiles ({PAPER_STATISTIC})"
        + (
            "; on synthetic scenes with a smaller model only the direction of differences is "
            "comparable."
            if setting.data == "synthetic"
            else "."
        ),
    ]
    out = args.out or Path("runs") / "repro" / f"wm-table-{setting.data}-{bn_init}"
    # The variants are not part of the settings: each variant's runs are independent (and their
    # configs are checked on resume), so wm-param-stats / --variants may add or use a subset.
    return ExperimentSpec(
        experiment="wm-table",
        title=f"{experiment} ({table}): weight mechanism in the residual U-Net — {setting.data}",
        out=Path(out),
        recipe=setting.recipe,
        variants=variants,
        seeds=list(range(setting.seeds)),
        settings=setting.settings(bn_init=bn_init),
        base_overrides=setting.base(),
        metric="val_miou",
        metric_label="test mIoU (%)",
        paper_label="paper",
        notes=notes,
        overwrite=args.overwrite,
        paper_setting=PAPER_SETTING.updated(
            source=f"Qi & Zhao §IV.A, {table}", notes=(TABLE_NOTE,)
        ),
        plan_metric=PLAN_METRIC,
        processes=setting.processes,
    )


def run_metrics(run_dir: str | Path) -> dict[str, float]:
    """The last evaluated row's val_miou / val_pixel_acc / val_mean_acc of a run (percent)."""
    rows = [r for r in read_rows(run_dir) if isinstance(r.get("val_miou"), (int, float))]
    if not rows:
        return {}
    return {k: float(rows[-1][k]) for k, _ in METRICS if isinstance(rows[-1].get(k), (int, float))}


_PROFILE_CACHE: dict[str, tuple[int, int]] = {}


def paper_width_profile(model_name: str, margs: dict[str, Any]) -> tuple[int, int]:
    """(parameters, MACs) of the model at the paper's width, 1x3x125x125 (cached)."""
    key = json.dumps([model_name, margs], sort_keys=True)
    if key not in _PROFILE_CACHE:
        model = create_model(model_name, **margs)
        prof = profile(model, PROFILE_SIZE)
        _PROFILE_CACHE[key] = (prof.params, prof.macs)
    return _PROFILE_CACHE[key]


def _pct(summary: Summary) -> str:
    return "—" if not summary.n else mean_std(summary)


def _paper_pct(row: dict[str, Any] | None, key: str) -> str:
    return "—" if row is None or row.get(key) is None else f"{100 * row[key]:.2f}"


def metric_summaries(vr: VariantResult) -> dict[str, Summary]:
    """Per metric key: summarize() of the ok runs' last values."""
    per = [run_metrics(r.run_dir) for r in vr.runs if r.ok]
    return {k: summarize([m[k] for m in per if k in m]) for k, _ in METRICS}


def paper_table(results: ExperimentResults, bn_init: str) -> str:
    """Table I / II layout: ours (mean ± std over seeds, %) with the paper's numbers beside."""
    paper = PAPER_TABLE1 if bn_init == "normal" else PAPER_TABLE2
    table = "Table I" if bn_init == "normal" else "Table II"
    head = ["W_BN init", "model", "# params (ours)", "paper", "MACs (ours)", "paper GFLOPs"]
    for _, label in METRICS:
        head += [f"{label} (ours)", "paper"]
    data = results.spec.title.split("— ")[-1]
    lines = [
        f"## {table}: residual U-Net with the weight mechanism ({data})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    base_params = None
    for i, vr in enumerate(results.variants):
        margs = {**WM_VARIANTS[vr.variant.name][1], "bn_weight_init": bn_init}
        params, macs = paper_width_profile("res_unet", margs)
        if vr.variant.name == "baseline":
            base_params = params
        row = paper.get(vr.variant.name)
        shown_params = f"{params:,}"
        if base_params is not None and vr.variant.name != "baseline":
            shown_params += f" ({params - base_params:+,})"
        cells = [
            ("N(0, 1)" if bn_init == "normal" else "1") if i == 0 else "",
            vr.variant.label,
            shown_params,
            "—" if row is None or "params" not in row else row["params"],
            format_count(macs),
            "—" if row is None or "gflops" not in row else f"{row['gflops']:.2f}",
        ]
        sums = metric_summaries(vr)
        for key, _ in METRICS:
            cells += [_pct(sums[key]), _paper_pct(row, key.removeprefix("val_"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "ours: at the last iteration on the test split, mean ± std over "
        f"{len(results.spec.seeds)} seed(s) (ddof=1), in %. Parameters (BN included; alpha / "
        "beta are buffers, not parameters) and MACs (convolutions, `lightnets.profile`) are "
        "of the model at the paper's width (32..512) for a 1x3x125x125 input, whatever width "
        "the runs used. The paper's GFLOPs match 2 x MACs at 125x125 for the gating increment "
        "(see docs/unet-profile.md); its baseline count is 26% higher than ours.",
    ]
    if bn_init == "ones":
        lines.append("Table II gives no parameter / GFLOPs columns and no dynamic / gating rows.")
    return "\n".join(lines)


def box_plot(
    results: ExperimentResults, path: Path, title: str, paper_best: dict[str, float] | None = None
) -> None:
    """Box plot of every run's final mIoU per variant; the paper's mean (or best) as a marker."""
    variants = results.variants
    fig = new_figure((max(6.0, 1.2 * len(variants) + 3.0), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    data = [[r.final for r in vr.runs if r.ok] or [math.nan] for vr in variants]
    xs = list(range(1, len(variants) + 1))
    ax.boxplot(data, positions=xs, widths=0.5)
    for x, values in zip(xs, data):
        ax.scatter([x] * len(values), values, s=12, color="#4c72b0", zorder=3)
    marks = [
        (x, (paper_best or {}).get(vr.variant.name, vr.variant.paper))
        for x, vr in zip(xs, variants)
    ]
    marks = [(x, v) for x, v in marks if v is not None]
    if marks:
        what = "paper: best of 10 runs" if paper_best else "paper (statistic of 10 runs not stated)"
        ax.scatter(*zip(*marks), marker="D", color="#c44e52", zorder=4, label=what)
        ax.legend(fontsize=8)
    ax.set_xticks(xs)
    ax.set_xticklabels([vr.variant.label for vr in variants], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test mIoU (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def run_table(args: argparse.Namespace, experiment: str) -> ExperimentResults:
    """Run wm-table's runs (for wm-table or wm-param-stats), then table1/2.md and the box plot."""
    results = run_experiment(table_spec(args, experiment))
    if not is_main_process():
        return results
    out = results.spec.out
    name = "table1.md" if args.bn_init == "normal" else "table2.md"
    fig = "fig4.png" if args.bn_init == "normal" else "fig6.png"
    text = paper_table(results, args.bn_init)
    write_text(out / name, text + "\n")
    box_plot(results, out / fig, f"mIoU of {len(results.spec.seeds)} run(s) per variant")
    print()
    print(text)
    print(f"table: {out}/{name}, box plot: {out}/{fig}")
    return results


@register_experiment(
    "wm-table",
    "Weight mechanism Table I/II, Fig. 4/6: res_unet baseline / alpha / beta / dynamic / gate",
    add_arguments=add_table_arguments,
    plan=lambda args: table_spec(args, check_root=False).plan(),
)
def wm_table(args: argparse.Namespace) -> int:
    """Run wm-table; writes results.*, table1.md (table2.md) and fig4.png (fig6.png)."""
    run_table(args, "wm-table")
    return 0
