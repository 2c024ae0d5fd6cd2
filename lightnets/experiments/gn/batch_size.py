"""gn-batch-size (GN paper Table 2, Figs. 1 and 5): BN, GN, BRN, LN and IN at 32, 16, 8, 4 and
2 images per worker, lr = base x N / 32 (linear scaling rule), equal epochs. Outputs the long
table (results.md), a norm x batch-size pivot like Table 2 (table2.md) and error vs. batch size
like Fig. 1 (fig1.png)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lightnets.errors import UserError
from lightnets.experiments import register_experiment
from lightnets.experiments.gn.paper import (
    BRN_LIMITS,
    BRN_NOTE,
    BRN_RELAX,
    BRN_WARMUP,
    DEFAULT_BATCHES,
    DEFAULT_NORMS,
    NORM_LABELS,
    PAPER_PROCESSES,
    PAPER_REFERENCE_BATCH,
    PAPER_TABLE2,
    paper_norm,
)
from lightnets.experiments.gn.setting import (
    GnSetting,
    add_common_arguments,
    gn_spec,
    list_or_default,
    norm_list,
    norm_overrides,
)
from lightnets.experiments.outdir import is_main_process, write_text
from lightnets.experiments.report import mean_std, new_figure, save_figure
from lightnets.experiments.results import ExperimentResults, Summary
from lightnets.experiments.runner import run_experiment
from lightnets.experiments.spec import ExperimentSpec, Variant

__all__ = [
    "add_batch_size_arguments",
    "batch_size_spec",
    "batch_size_table",
    "gn_batch_size",
    "plot_batch_size",
]


def add_batch_size_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `lightnets repro gn-batch-size`."""
    add_common_arguments(p, "gn-batch-size", seeds=2)
    p.add_argument("--norms", help="norm kinds, comma-separated (default bn,gn,brn,ln,in)")
    p.add_argument("--batch-sizes", help="images per worker, comma-separated (default 32,16,8,4,2)")


def batch_size_spec(args: argparse.Namespace, read_data: bool = True) -> ExperimentSpec:
    """The runner's ExperimentSpec for parsed `gn-batch-size` arguments (validates them).
    `read_data=False` (a plan): BRN's warm-up steps are left out where the size of the
    training set is not known without reading it."""
    setting = GnSetting(args, "resnet")
    norms = norm_list(args.norms, DEFAULT_NORMS, ("bn", "gn", "brn", "ln", "in", "none"))
    batches = list_or_default(args.batch_sizes, "--batch-sizes", DEFAULT_BATCHES)
    if not batches:
        raise UserError("--batch-sizes none: expected at least one batch size")
    base = setting.all_overrides()
    size = setting.train_size(base, read_data) if "brn" in norms else None
    variants = []
    for kind in norms:
        for n in batches:
            workers = PAPER_PROCESSES
            paper = {
                "model_args": paper_norm(kind),
                "batch_per_process": n,
                "global_batch": n * workers,
                "lr": 0.1 * n * workers / PAPER_REFERENCE_BATCH,
            }
            if kind == "brn":
                paper["notes"] = (BRN_NOTE,)
            variants.append(
                Variant(
                    name=f"{kind}-b{n}",
                    label=f"{NORM_LABELS[kind]}, {n}/worker",
                    overrides=[*norm_overrides(kind, setting.steps(size, n)), setting.batch(n)],
                    paper=PAPER_TABLE2.get(kind, {}).get(n),
                    baseline=f"bn-b{n}" if "bn" in norms and kind != "bn" else None,
                    paper_setting=paper,
                )
            )
    lr = args.lr or 0.1
    return gn_spec(
        args,
        setting,
        "gn-batch-size",
        "gn-batch-size (Table 2): validation error vs images per worker",
        variants,
        base,
        f"{setting.rule(lr)}; BRN with "
        f"r_max {BRN_LIMITS['r_max']}, d_max {BRN_LIMITS['d_max']}, plain BN for the first "
        f"{BRN_WARMUP:.0%} of the steps, limits relaxed over the next {BRN_RELAX:.0%}. "
        "Δ columns: this norm minus BN at the same batch size.",
        norms=norms,
        batch_sizes=batches,
        lr=args.lr,
    )


def _cell(summary: Summary, paper: float | None) -> str:
    ours = "—" if not summary.n else mean_std(summary)
    return ours + ("" if paper is None else f" ({paper:.1f})")


def batch_size_table(results: ExperimentResults) -> str:
    """Table 2 as a pivot: one row per norm, one column per batch size; paper in parentheses."""
    spec = results.spec
    norms = list(dict.fromkeys(v.variant.name.split("-b")[0] for v in results.variants))
    batches = list(dict.fromkeys(int(v.variant.name.split("-b")[1]) for v in results.variants))
    head = ["norm"] + [f"{n} img/worker" for n in batches]
    k = spec.median_of_last or 1
    what = f"median of the last {k} epochs" if k > 1 else "the final epoch's"
    lines = [
        f"## gn-batch-size: top-1 error (%), ours ({what}, mean ± std over seeds) and "
        f"({spec.paper_label}: median of the last 5 epochs)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for kind in norms:
        cells = [NORM_LABELS[kind]]
        for n in batches:
            vr = results.by_name(f"{kind}-b{n}")
            cells.append(_cell(vr.headline, vr.variant.paper) if vr else "—")
        lines.append("| " + " | ".join(cells) + " |")
    if "bn" in norms and "gn" in norms:
        cells = ["BN − GN"]
        for n in batches:
            bn, gn = results.by_name(f"bn-b{n}"), results.by_name(f"gn-b{n}")
            ours = bn.headline.mean - gn.headline.mean if bn.headline.n and gn.headline.n else None
            pb, pg = PAPER_TABLE2["bn"].get(n), PAPER_TABLE2["gn"].get(n)
            text = "—" if ours is None else f"{ours:+.2f}"
            if pb is not None and pg is not None:
                text += f" ({pb - pg:+.1f})"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_batch_size(results: ExperimentResults, path: Path) -> None:
    """Fig. 1: error vs images per worker, ours (left, mean ± std) and the paper's (right)."""
    norms = list(dict.fromkeys(v.variant.name.split("-b")[0] for v in results.variants))
    batches = sorted({int(v.variant.name.split("-b")[1]) for v in results.variants}, reverse=True)
    fig = new_figure((10, 4.2))
    ours_ax, paper_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for kind in norms:
        xs, ys, es = [], [], []
        for n in batches:
            vr = results.by_name(f"{kind}-b{n}")
            if vr is not None and vr.headline.n:
                xs.append(n), ys.append(vr.headline.mean), es.append(vr.headline.std)
        if xs:
            ours_ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=NORM_LABELS[kind])
        paper = PAPER_TABLE2.get(kind, {})
        px = [n for n in batches if n in paper]
        if px:
            style = "o-" if len(px) > 1 else "o"
            paper_ax.plot(px, [paper[n] for n in px], style, label=NORM_LABELS[kind])
    for ax, title in (
        (ours_ax, f"ours: {results.spec.title.split('— ')[-1]}"),
        (paper_ax, f"{results.spec.paper_label}: ResNet-50"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches)
        ax.set_xticklabels([str(n) for n in batches])
        ax.invert_xaxis()
        ax.set_xlabel("images per worker")
        ax.set_ylabel("top-1 error (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


@register_experiment(
    "gn-batch-size",
    "GN paper Table 2 / Fig. 1: BN, GN, BRN, LN, IN at 32..2 images per worker",
    add_arguments=add_batch_size_arguments,
    plan=lambda args: batch_size_spec(args, read_data=False).plan(),
)
def gn_batch_size(args: argparse.Namespace) -> int:
    """Run gn-batch-size; writes results.*, table2.md and fig1.png to the out dir."""
    results = run_experiment(batch_size_spec(args))
    if not is_main_process():
        return 0
    table = batch_size_table(results)
    write_text(results.spec.out / "table2.md", table + "\n")
    plot_batch_size(results, results.spec.out / "fig1.png")
    print()
    print(table)
    print(f"pivot: {results.spec.out}/table2.md, plot: {results.spec.out}/fig1.png")
    return 0
