"""Weight-mechanism experiments (Qi & Zhao, §IV): `lightnets repro wm-table`, `wm-param-stats`
and `wm-fused`.

- wm-table (Table I, Fig. 4; `--bn-init ones`: Table II, Fig. 6): the residual U-Net with plain
  concatenation (baseline), alpha_i = 0.1, alpha_i = 0.5, beta_i = 0.1, dynamic weight and
  gating, each trained with N seeds. Writes the runner's results.* (mIoU), `table1.md` /
  `table2.md` in the paper's layout (mIoU, pixel accuracy and mean accuracy in %, mean ± std
  over seeds, the paper's numbers beside; parameters and MACs of each variant at the paper's
  width and 125x125 input) and the box plot of the N runs' mIoU (`fig4.png` / `fig6.png`).
- wm-param-stats (Fig. 5 / Fig. 7): the same runs as wm-table (the same out dir: finished runs
  are read back, missing ones trained), then per layer, in model order, the mean and variance
  of every conv weight, BN weight and bias (BN biases and conv biases) of the final models,
  averaged over the seeds: `param_stats.json` and `fig5.png` / `fig7.png`.
- wm-fused (Fig. 9): `fused_unet` with weight 0.5 and 1, N seeds, box plot `fig9.png`.

Data: `--data synthetic` (default; generated scenes, recipe `res_unet_synthetic`, CPU minutes,
widths 8/16/32/64 + 128) or `--data buildings --root TILES` (Massachusetts tiles from
`lightnets data tile`, recipe `res_unet_buildings`, the paper's width and 180K iterations).
Every run is evaluated at its last iteration on the test split (the paper's tables are test
results), so the "final" numbers involve no selection on the test set.

One module per experiment (table, param_stats, fused), with what they share: the paper's
numbers and setting (paper; also what its tables' numbers are) and the common options
(setting). Importing this package registers all three.
"""

from __future__ import annotations

from lightnets.experiments.weight_mechanism.fused import fig9_table, fused_spec
from lightnets.experiments.weight_mechanism.paper import (
    PAPER_FIG9_ABOVE,
    PAPER_FIG9_BEST,
    PAPER_SETTING,
    PAPER_TABLE1,
    PAPER_TABLE2,
    WM_VARIANTS,
)
from lightnets.experiments.weight_mechanism.parameter_statistics import layer_stats, param_stats
from lightnets.experiments.weight_mechanism.table import (
    box_plot,
    paper_table,
    paper_width_profile,
    run_metrics,
    table_spec,
)

__all__ = [
    "PAPER_FIG9_ABOVE",
    "PAPER_FIG9_BEST",
    "PAPER_SETTING",
    "PAPER_TABLE1",
    "PAPER_TABLE2",
    "WM_VARIANTS",
    "box_plot",
    "fig9_table",
    "fused_spec",
    "layer_stats",
    "paper_table",
    "paper_width_profile",
    "param_stats",
    "run_metrics",
    "table_spec",
]
