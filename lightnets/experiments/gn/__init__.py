"""Group Normalization experiments (Wu & He, Sec. 4.1): `lightnets repro gn-batch-size`,
`gn-groups` and `gn-feature-dist`.

- gn-batch-size (Table 2, Figs. 1 and 5): BN, GN, BRN, LN and IN at 32, 16, 8, 4 and 2 images
  per worker, lr = base x N / 32 (linear scaling rule), equal epochs. Outputs the long table
  (results.md), a norm x batch-size pivot like Table 2 (table2.md) and error vs. batch size
  like Fig. 1 (fig1.png).
- gn-groups (Table 3): GN with G in 64..1 groups, and with 64..1 channels per group (G varies
  per layer), at 32 images per worker.
- gn-feature-dist (Fig. 6): VGG-16 with no norm / BN / GN; the 1, 20, 80, 99 percentiles of
  the last conv's responses (before norm and ReLU) on a fixed probe batch, recorded during
  training and plotted (fig6.png), with the validation errors.

Data: the bundled MNIST subset by default (`--data mnist5k`, a CPU runs each in minutes):
`resnet_mini` (ResNet for 28x28, every norm width a multiple of 64) with recipe `gn_mnist`,
or VGG-16 at a quarter of the width. Real scale: `--data cifar10|cifar100 --root PATH` (recipe
`resnet_gn_cifar`, ResNet-18) or `--data folder --root PATH` (ImageNet layout, recipe
`resnet50_gn_imagenet`: the paper's own setting). The lr decays at 30/60/90% of training as
the paper's epochs 30/60/90 of 100. The paper's numbers are ResNet-50 (VGG-16) ImageNet
validation errors; at another scale they are shown for reference only.

Reported: the paper's statistic, the median top-1 error of the final 5 epochs (of 100), and
the last and best epoch's. Runs of fewer epochs take the median over the same share of
training, the last round(5% of the epochs) epochs and at least one (the final epoch's error at
the CPU scale's 4 epochs).

One module per experiment (batch_size, groups, feature_dist), with what they share: the
paper's numbers, setting and schedule (paper; also where its tables' numbers come from) and
the common options, batch and lr rule (setting). Importing this package registers all three.
"""

from __future__ import annotations

from lightnets.experiments.gn.batch_size import batch_size_spec, batch_size_table
from lightnets.experiments.gn.feature_dist import (
    PERCENTILE_FILE,
    PERCENTILES,
    FeaturePercentiles,
    feature_dist_spec,
)
from lightnets.experiments.gn.groups import groups_spec
from lightnets.experiments.gn.paper import (
    PAPER_FIG6,
    PAPER_SETTING,
    PAPER_TABLE2,
    PAPER_TABLE3_CPG,
    PAPER_TABLE3_GROUPS,
    median_epochs,
    scaled_milestones,
)

__all__ = [
    "PAPER_FIG6",
    "PAPER_SETTING",
    "PAPER_TABLE2",
    "PAPER_TABLE3_CPG",
    "PAPER_TABLE3_GROUPS",
    "PERCENTILES",
    "PERCENTILE_FILE",
    "FeaturePercentiles",
    "batch_size_spec",
    "batch_size_table",
    "feature_dist_spec",
    "groups_spec",
    "median_epochs",
    "scaled_milestones",
]
