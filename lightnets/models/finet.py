"""Finet (Luo et al., "Finet: Using Fine-grained Batch Normalization to Train Light-weight
Neural Networks"): ShuffleNetV2-like network whose 1x1 convs are normalized with FBN.

Architecture (paper Table 1), with the choices the paper leaves open and how they were settled.
Each choice was checked against the paper's Table 2 parameter counts (see
docs/finet-profile.md): the BN, G=2 and G=4 rows of the large model are reproduced to
0.01%, which pins down every layer width below.

- Stem (Conv1): 3x3 conv, stride 2, padding 1, 24 channels + BN + ReLU; then 3x3 max-pool,
  stride 2, padding 1 (ShuffleNetV2's stem). `cifar_stem=True`: stride 1 and no max-pool
  (paper Sec. 5.3).
- Stages 2-4: widths 30/60/120 (small) or 100/200/400 (large); 1 stride-2 block followed by
  3, 7, 3 stride-1 blocks.
- Block (Fig. 2): 1x1 conv + FBN + ReLU -> 3x3 depthwise conv (stride 2 in a stage's first
  block) + BN, no activation -> 1x1 conv + FBN + ReLU -> optional Squeeze-Excite -> + identity.
  * Internal width = the block's output width: no expansion layer. The paper's "inverted
    bottleneck" is FBN's G-fold wider partial sums at training time, not a wider conv. With
    any expansion, or a middle width equal to the input width, Table 2's counts are off by
    3.7% or more.
  * The stride-2 block changes the width in its first 1x1 conv (C_in -> C_out, at the input
    resolution); it has no shortcut ("we do not use identity map in the block where the
    stride of depthwise convolution is 2") and no ShuffleNetV2 channel split, concat or
    shuffle. Stride-1 blocks add the identity after the last ReLU (and after SE).
  * FBN is used in the block's two 1x1 convs only ("we use FBN in the 1x1 pointwise
    convolution instead of BN"); the stem, depthwise and Conv5 keep BN. An FBN Conv5 would add
    2*(G-1)*1024 parameters that Table 2 does not show.
  * Squeeze-Excite: on the block output (C_out channels), 200 hidden units (paper Sec. 5.1),
    ReLU then sigmoid gate, 1x1 convs with bias.
- Conv5: 1x1 conv to 1024 + BN + ReLU; global average pool; dropout; FC1 1024 + ReLU;
  dropout; FC2 classifier (dropout 0.2 "in the last two fully connected layers").

Options follow the models' convention (`lightnets.models.norm_option`). `fbn_groups=1` with no
`fbn_channels_per_group` and a norm other than "fbn" is the BN baseline, built with plain
nn.Conv2d + norm layers (a standard network). Otherwise the block's 1x1 convs are FBNConv2d
with G = fbn_groups, or G = max(1, C_in // fbn_channels_per_group) per layer (Table 6; the
24-input first block gets G = 1 for 20, 50 or 100 channels per group), the layer's rule
(`lightnets.nn.fbn.fbn_group_count`). A G that does not divide a layer's inputs splits them
into groups whose sizes differ by at most one, e.g. the small model's 30-channel layers with
G = 4 get groups of 8, 8, 7, 7 (Table 2 lists that configuration; the paper does not say how it
split 30 channels into 4 groups); a G larger than a layer's inputs is a UserError naming the
layer. `affine` switches the affine transform of the normalization in the FBN positions
(Table 5; in the baseline it applies to the norm that stands in those positions). `norm` is the
kind of the other norm layers (bn, sync_bn, frozen_bn, gn, ln, in, brn, none; BN for "fbn"),
with `norm_kwargs` passed to each (e.g. {"num_groups": 2}: GN's default G = 32 does not divide
Finet's 24/30/100-channel layers); with the baseline every norm layer, those in the FBN
positions included, is `norm`. `zero_init_last=True` zeroes the gamma of the last norm (conv2's,
or its FBN `norm_weight`) of every block with a shortcut, so those blocks start as the identity
(GN paper §4.1); kinds without a trainable gamma (frozen_bn, none) are left as they are.

The registered variants (`VARIANTS`: finet_small, finet_large and their Squeeze-Excite
versions) are `Finet` with fixed widths and SE, registered by `register_variant`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightnets.checks import check_int, check_number
from lightnets.models.norm_option import model_norms
from lightnets.models.registry import register_variant
from lightnets.nn.blocks import ConvNormAct, SqueezeExcite
from lightnets.nn.fbn import FBNConv2d
from lightnets.nn.norm import NormSpec

SMALL_WIDTHS = (30, 60, 120)
LARGE_WIDTHS = (100, 200, 400)
DEPTHS = (4, 8, 4)  # blocks per stage: 1 stride-2 block + 3 / 7 / 3 stride-1 blocks
STEM_CHANNELS = 24
HEAD_CHANNELS = 1024
SE_HIDDEN = 200


class FinetBlock(nn.Module):
    """1x1 conv+FBN+ReLU -> 3x3 depthwise+BN -> 1x1 conv+FBN+ReLU -> [SE] -> [+ identity].

    `pointwise_norm` is the norm of the two 1x1 convs (the FBN positions: an fbn `NormSpec`, or
    a plain kind), `norm` that of the depthwise conv; `affine` applies to the pointwise norms.
    `where` names the block in errors.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        norm: str | NormSpec = "bn",
        pointwise_norm: str | NormSpec | None = None,
        se_hidden: int | None = None,
        affine: bool = True,
        where: str = "FinetBlock",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        pointwise = norm if pointwise_norm is None else pointwise_norm
        self.conv1 = ConvNormAct(
            in_channels,
            out_channels,
            1,
            norm=pointwise,
            affine=affine,
            where=f"{where}.conv1 (1x1 conv {in_channels}->{out_channels})",
        )
        self.dw = ConvNormAct(
            out_channels, out_channels, 3, stride, groups=out_channels, norm=norm, act=False
        )
        self.conv2 = ConvNormAct(
            out_channels,
            out_channels,
            1,
            norm=pointwise,
            affine=affine,
            where=f"{where}.conv2 (1x1 conv {out_channels}->{out_channels})",
        )
        self.se = SqueezeExcite(out_channels, se_hidden) if se_hidden else None
        self.use_shortcut = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.dw(self.conv1(x)))
        if self.se is not None:
            out = self.se(out)
        if self.use_shortcut:
            out = out + x
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, "
            f"shortcut={self.use_shortcut}"
        )


class Finet(nn.Module):
    """Finet for `widths` per stage (Table 1); see the module docstring for the layout."""

    def __init__(
        self,
        widths: Sequence[int],
        depths: Sequence[int] = DEPTHS,
        num_classes: int = 1000,
        in_chans: int = 3,
        se_hidden: int | None = None,
        fbn_groups: int = 1,
        fbn_channels_per_group: int | None = None,
        affine: bool = True,
        fbn_impl: str = "auto",
        cifar_stem: bool = False,
        norm: str = "bn",
        drop_rate: float = 0.2,
        norm_kwargs: dict | None = None,
        zero_init_last: bool = False,
        name: str = "finet",
    ) -> None:
        super().__init__()
        check_int(num_classes, "num_classes", name)
        check_int(in_chans, "in_chans", name)
        drop_rate = check_number(
            drop_rate, "drop_rate", name, minimum=0, maximum=1, open_maximum=True
        )
        if len(widths) != len(depths):
            raise ValueError("widths and depths must have the same length")
        norms = model_norms(
            name,
            norm,
            norm_kwargs,
            fbn_groups=fbn_groups,
            fbn_channels_per_group=fbn_channels_per_group,
            fbn_impl=fbn_impl,
        )
        self.num_classes = num_classes
        self.conv1 = ConvNormAct(
            in_chans, STEM_CHANNELS, 3, 1 if cifar_stem else 2, norm=norms.plain, where=name
        )
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
        cin = STEM_CHANNELS
        for s, (width, depth) in enumerate(zip(widths, depths), start=2):
            blocks = []
            for i in range(depth):
                blocks.append(
                    FinetBlock(
                        cin,
                        width,
                        stride=2 if i == 0 else 1,
                        norm=norms.plain,
                        pointwise_norm=norms.fbn_positions,
                        se_hidden=se_hidden,
                        affine=affine,
                        where=f"{name} stage{s}.{i}",
                    )
                )
                cin = width
            self.add_module(f"stage{s}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.conv5 = ConvNormAct(cin, HEAD_CHANNELS, 1, norm=norms.plain, where=name)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop1 = nn.Dropout(drop_rate)
        self.fc1 = nn.Linear(HEAD_CHANNELS, HEAD_CHANNELS)
        self.act = nn.ReLU(inplace=True)
        self.drop2 = nn.Dropout(drop_rate)
        self.fc2 = nn.Linear(HEAD_CHANNELS, num_classes)
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool = False) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, FBNConv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for block in self.modules():
                if isinstance(block, FinetBlock) and block.use_shortcut:
                    last = getattr(block.conv2, "norm", None)
                    scale = getattr(block.conv2.conv, "norm_weight", None)
                    if last is not None:
                        scale = getattr(last, "weight", None)
                    if isinstance(scale, nn.Parameter):  # not a frozen BN's fixed buffer
                        nn.init.zeros_(scale)

    def stages(self) -> list[nn.Sequential]:
        """The block stages, stage2 first."""
        return [getattr(self, f"stage{s}") for s in range(2, 2 + self.num_stages)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        for stage in self.stages():
            x = stage(x)
        return self.conv5(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.forward_features(x)).flatten(1)
        x = self.act(self.fc1(self.drop1(x)))
        return self.fc2(self.drop2(x))


#: The registered Finet variants: (widths per stage, Squeeze-Excite hidden units, docstring).
VARIANTS: dict[str, tuple[tuple[int, ...], int | None, str]] = {
    "finet_small": (
        SMALL_WIDTHS,
        None,
        "Small Finet (widths 30/60/120): 42.6M FLOPs, 2.39M parameters in the paper.",
    ),
    "finet_large": (
        LARGE_WIDTHS,
        None,
        "Large Finet (widths 100/200/400): 301.8M FLOPs, 4.43M parameters in the paper.",
    ),
    "finet_small_se": (
        SMALL_WIDTHS,
        SE_HIDDEN,
        "Small Finet with Squeeze-Excite (200 hidden units) in every block.",
    ),
    "finet_large_se": (
        LARGE_WIDTHS,
        SE_HIDDEN,
        "Large Finet with Squeeze-Excite (200 hidden units) in every block.",
    ),
}


def _variant(name: str):
    widths, se_hidden, doc = VARIANTS[name]
    fixed = {"widths": widths, "depths": DEPTHS, "se_hidden": se_hidden}
    return register_variant(name, Finet, doc, fixed=fixed)


finet_small = _variant("finet_small")
finet_large = _variant("finet_large")
finet_small_se = _variant("finet_small_se")
finet_large_se = _variant("finet_large_se")
