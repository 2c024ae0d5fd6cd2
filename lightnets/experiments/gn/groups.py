"""gn-groups (GN paper Table 3): GN with G in 64..1 groups, and with 64..1 channels per group
(G varies per layer), at 32 images per worker."""

from __future__ import annotations

import argparse

from lightnets.errors import UserError
from lightnets.experiments import register_experiment
from lightnets.experiments.gn.paper import (
    DEFAULT_CPG,
    DEFAULT_GROUPS,
    PAPER_BATCH,
    PAPER_TABLE3_CPG,
    PAPER_TABLE3_GROUPS,
)
from lightnets.experiments.gn.setting import (
    GnSetting,
    add_common_arguments,
    gn_spec,
    list_or_default,
)
from lightnets.experiments.runner import run_experiment
from lightnets.experiments.spec import ExperimentSpec, Variant

__all__ = ["add_groups_arguments", "gn_groups", "groups_spec"]


def add_groups_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `lightnets repro gn-groups`."""
    add_common_arguments(p, "gn-groups", seeds=2)
    p.add_argument("--groups", help="numbers of groups G (default 64,32,16,8,4,2,1; none: skip)")
    p.add_argument(
        "--channels-per-group",
        help="channels per group (default 64,32,16,8,4,2,1; none: skip)",
    )


def _gn_variant(
    name: str,
    label: str,
    norm_kwargs: dict[str, int],
    batch: list[str],
    paper: float | None,
    baseline: str | None,
) -> Variant:
    """A GN variant of Table 3: `norm_kwargs` (num_groups or channels_per_group) for every norm
    layer, `batch` the overrides of the batch per worker."""
    ((key, value),) = norm_kwargs.items()
    return Variant(
        name=name,
        label=label,
        overrides=[
            'model.args.norm="gn"',
            f"model.args.norm_kwargs={{{key} = {value}}}",
            *batch,
        ],
        paper=paper,
        baseline=baseline,
        paper_setting={"model_args": {"norm": "gn", "norm_kwargs": dict(norm_kwargs)}},
    )


def groups_spec(args: argparse.Namespace) -> ExperimentSpec:
    """The runner's ExperimentSpec for parsed `gn-groups` arguments (validates them)."""
    setting = GnSetting(args, "resnet")
    groups = list_or_default(args.groups, "--groups", DEFAULT_GROUPS)
    cpg = list_or_default(args.channels_per_group, "--channels-per-group", DEFAULT_CPG)
    if not groups and not cpg:
        raise UserError("--groups none and --channels-per-group none: expected some variants")
    variants = []
    batch = [setting.batch(PAPER_BATCH)]  # Table 3: 32 images per GPU
    baseline = "G32" if 32 in groups else None
    for g in groups:
        label = f"G = {g}" + (" (LN)" if g == 1 else "")
        paper = PAPER_TABLE3_GROUPS.get(g)
        variants.append(_gn_variant(f"G{g}", label, {"num_groups": g}, batch, paper, baseline))
    for c in cpg:
        label = f"{c} channels/group" + (" (IN)" if c == 1 else "")
        paper = PAPER_TABLE3_CPG.get(c)
        variants.append(
            _gn_variant(f"cpg{c}", label, {"channels_per_group": c}, batch, paper, baseline)
        )
    return gn_spec(
        args,
        setting,
        "gn-groups",
        "gn-groups (Table 3): GN group division",
        variants,
        setting.all_overrides(),
        f"32 images per worker, {setting.rule(args.lr or 0.1)}. Δ columns: the variant "
        "minus G = 32 (the paper's default).",
        groups=groups,
        channels_per_group=cpg,
        lr=args.lr,
    )


@register_experiment(
    "gn-groups",
    "GN paper Table 3: number of groups G and channels per group",
    add_arguments=add_groups_arguments,
    plan=lambda args: groups_spec(args).plan(),
)
def gn_groups(args: argparse.Namespace) -> int:
    """Run gn-groups; writes results.* to the out dir."""
    run_experiment(groups_spec(args))
    return 0
