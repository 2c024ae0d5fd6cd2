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

Options: `fbn_groups=1` with no `fbn_channels_per_group` is the BN baseline, built with plain
nn.Conv2d + norm layers (a standard network). Otherwise the block's 1x1 convs are FBNConv2d
with G = fbn_groups, or G = floor(C_in / fbn_channels_per_group), at least 1, per layer (Table 6;
the 24-input first block gets G = 1 for 20, 50 or 100 channels per group). A G that does not
divide a layer's inputs splits them into groups whose sizes differ by at most one, e.g. the
small model's 30-channel layers with G = 4 get groups of 8, 8, 7, 7 (Table 2 lists that
configuration; the paper does not say how it split 30 channels into 4 groups); a G larger than
a layer's inputs is a UserError. `affine` switches the affine
transform of the normalization in the FBN positions (Table 5; in the baseline it applies to the
BN that stands in those positions). `norm` is the kind of the non-FBN norm layers, made by
`lightnets.nn.blocks.norm_layer` (`lightnets.nn.make_norm`: bn, sync_bn, frozen_bn, gn, ln, in,
brn, none), with `norm_kwargs` passed to each (e.g. {"num_groups": 2}: GN's default G = 32
does not divide Finet's 24/30/100-channel layers). The FBN convs stay FBN whatever `norm` is;
with fbn_groups=1 (the baseline) every norm layer, those in the FBN positions included, is
`norm`. `zero_init_last=True` zeroes the gamma of the last norm (conv2's, or its FBN
`norm_weight`) of every block with a shortcut, so those blocks start as the identity (GN paper
§4.1); kinds without a trainable gamma (frozen_bn, none) are left as they are.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn

from lightnets.errors import UserError
from lightnets.models.registry import register_model
from lightnets.nn.blocks import ConvNormAct, SqueezeExcite, fbn_groups_for
from lightnets.nn.norm import NormSpec

SMALL_WIDTHS = (30, 60, 120)
LARGE_WIDTHS = (100, 200, 400)
DEPTHS = (4, 8, 4)  # blocks per stage: 1 stride-2 block + 3 / 7 / 3 stride-1 blocks
STEM_CHANNELS = 24
HEAD_CHANNELS = 1024
SE_HIDDEN = 200


class FinetBlock(nn.Module):
    """1x1 conv+FBN+ReLU -> 3x3 depthwise+BN -> 1x1 conv+FBN+ReLU -> [SE] -> [+ identity].

    `fbn_groups` is a pair (G of conv1, G of conv2); None for a plain conv + norm.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        fbn_groups: tuple[int | None, int | None] = (None, None),
        se_hidden: int | None = None,
        norm: str = "bn",
        affine: bool = True,
        fbn_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.conv1 = ConvNormAct(
            in_channels,
            out_channels,
            1,
            norm=norm,
            affine=affine,
            fbn_groups=fbn_groups[0],
            fbn_impl=fbn_impl,
        )
        self.dw = ConvNormAct(
            out_channels, out_channels, 3, stride, groups=out_channels, norm=norm, act=False
        )
        self.conv2 = ConvNormAct(
            out_channels,
            out_channels,
            1,
            norm=norm,
            affine=affine,
            fbn_groups=fbn_groups[1],
            fbn_impl=fbn_impl,
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
        _check_int(num_classes, "num_classes", name)
        _check_int(in_chans, "in_chans", name)
        _check_int(fbn_groups, "fbn_groups", name)
        if fbn_channels_per_group is not None and fbn_groups != 1:
            raise UserError(
                f"{name}: give fbn_groups or fbn_channels_per_group, not both "
                f"(got {fbn_groups} and {fbn_channels_per_group})"
            )
        if not 0.0 <= float(drop_rate) < 1.0:
            raise UserError(f"{name}: drop_rate must be in [0, 1), got {drop_rate!r}")
        if len(widths) != len(depths):
            raise ValueError("widths and depths must have the same length")
        use_fbn = fbn_groups != 1 or fbn_channels_per_group is not None
        if norm_kwargs is not None and not isinstance(norm_kwargs, dict):
            raise UserError(
                f"{name}: norm_kwargs={norm_kwargs!r} is invalid: expected a table (dict) of "
                "options for the norm layers, e.g. {num_groups = 2}"
            )
        if norm_kwargs:
            norm = NormSpec(norm, dict(norm_kwargs))

        def groups_of(cin: int, where: str) -> int | None:
            if not use_fbn:
                return None
            return fbn_groups_for(cin, fbn_groups, fbn_channels_per_group, f"{name} {where}")

        self.num_classes = num_classes
        self.conv1 = ConvNormAct(in_chans, STEM_CHANNELS, 3, 1 if cifar_stem else 2, norm=norm)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
        cin = STEM_CHANNELS
        for s, (width, depth) in enumerate(zip(widths, depths), start=2):
            blocks = []
            for i in range(depth):
                where = f"stage{s}.{i}"
                g1 = groups_of(cin, f"{where}.conv1 (1x1 conv {cin}->{width})")
                g2 = groups_of(width, f"{where}.conv2 (1x1 conv {width}->{width})")
                blocks.append(
                    FinetBlock(
                        cin,
                        width,
                        stride=2 if i == 0 else 1,
                        fbn_groups=(g1, g2),
                        se_hidden=se_hidden,
                        norm=norm,
                        affine=affine,
                        fbn_impl=fbn_impl,
                    )
                )
                cin = width
            self.add_module(f"stage{s}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.conv5 = ConvNormAct(cin, HEAD_CHANNELS, 1, norm=norm)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop1 = nn.Dropout(drop_rate)
        self.fc1 = nn.Linear(HEAD_CHANNELS, HEAD_CHANNELS)
        self.act = nn.ReLU(inplace=True)
        self.drop2 = nn.Dropout(drop_rate)
        self.fc2 = nn.Linear(HEAD_CHANNELS, num_classes)
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool = False) -> None:
        fbn_mod = sys.modules.get("lightnets.nn.fbn")
        fbn_cls = getattr(fbn_mod, "FBNConv2d", None) if fbn_mod is not None else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d) or (fbn_cls is not None and isinstance(m, fbn_cls)):
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


def _check_int(value: object, what: str, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name}: {what} must be an int >= 1, got {value!r}")


@register_model
def finet_small(
    num_classes: int = 1000,
    in_chans: int = 3,
    fbn_groups: int = 1,
    fbn_channels_per_group: int | None = None,
    affine: bool = True,
    fbn_impl: str = "auto",
    cifar_stem: bool = False,
    norm: str = "bn",
    drop_rate: float = 0.2,
    norm_kwargs: dict | None = None,
    zero_init_last: bool = False,
) -> nn.Module:
    """Small Finet (widths 30/60/120): 42.6M FLOPs, 2.39M parameters in the paper."""
    return Finet(
        SMALL_WIDTHS,
        num_classes=num_classes,
        in_chans=in_chans,
        fbn_groups=fbn_groups,
        fbn_channels_per_group=fbn_channels_per_group,
        affine=affine,
        fbn_impl=fbn_impl,
        cifar_stem=cifar_stem,
        norm=norm,
        drop_rate=drop_rate,
        norm_kwargs=norm_kwargs,
        zero_init_last=zero_init_last,
        name="finet_small",
    )


@register_model
def finet_large(
    num_classes: int = 1000,
    in_chans: int = 3,
    fbn_groups: int = 1,
    fbn_channels_per_group: int | None = None,
    affine: bool = True,
    fbn_impl: str = "auto",
    cifar_stem: bool = False,
    norm: str = "bn",
    drop_rate: float = 0.2,
    norm_kwargs: dict | None = None,
    zero_init_last: bool = False,
) -> nn.Module:
    """Large Finet (widths 100/200/400): 301.8M FLOPs, 4.43M parameters in the paper."""
    return Finet(
        LARGE_WIDTHS,
        num_classes=num_classes,
        in_chans=in_chans,
        fbn_groups=fbn_groups,
        fbn_channels_per_group=fbn_channels_per_group,
        affine=affine,
        fbn_impl=fbn_impl,
        cifar_stem=cifar_stem,
        norm=norm,
        drop_rate=drop_rate,
        norm_kwargs=norm_kwargs,
        zero_init_last=zero_init_last,
        name="finet_large",
    )


@register_model
def finet_small_se(
    num_classes: int = 1000,
    in_chans: int = 3,
    fbn_groups: int = 1,
    fbn_channels_per_group: int | None = None,
    affine: bool = True,
    fbn_impl: str = "auto",
    cifar_stem: bool = False,
    norm: str = "bn",
    drop_rate: float = 0.2,
    norm_kwargs: dict | None = None,
    zero_init_last: bool = False,
) -> nn.Module:
    """Small Finet with Squeeze-Excite (200 hidden units) in every block."""
    return Finet(
        SMALL_WIDTHS,
        num_classes=num_classes,
        in_chans=in_chans,
        se_hidden=SE_HIDDEN,
        fbn_groups=fbn_groups,
        fbn_channels_per_group=fbn_channels_per_group,
        affine=affine,
        fbn_impl=fbn_impl,
        cifar_stem=cifar_stem,
        norm=norm,
        drop_rate=drop_rate,
        norm_kwargs=norm_kwargs,
        zero_init_last=zero_init_last,
        name="finet_small_se",
    )


@register_model
def finet_large_se(
    num_classes: int = 1000,
    in_chans: int = 3,
    fbn_groups: int = 1,
    fbn_channels_per_group: int | None = None,
    affine: bool = True,
    fbn_impl: str = "auto",
    cifar_stem: bool = False,
    norm: str = "bn",
    drop_rate: float = 0.2,
    norm_kwargs: dict | None = None,
    zero_init_last: bool = False,
) -> nn.Module:
    """Large Finet with Squeeze-Excite (200 hidden units) in every block."""
    return Finet(
        LARGE_WIDTHS,
        num_classes=num_classes,
        in_chans=in_chans,
        se_hidden=SE_HIDDEN,
        fbn_groups=fbn_groups,
        fbn_channels_per_group=fbn_channels_per_group,
        affine=affine,
        fbn_impl=fbn_impl,
        cifar_stem=cifar_stem,
        norm=norm,
        drop_rate=drop_rate,
        norm_kwargs=norm_kwargs,
        zero_init_last=zero_init_last,
        name="finet_large_se",
    )
