"""Building blocks shared by the model families: norm factory, conv-norm-act, Squeeze-Excite.

Every normalization layer that is not an FBN goes through `norm_layer(kind, channels)`, so that
swapping in a wider factory (GN, frozen BN, ...) is a one-line change here. FBN layers are made
by `fbn_conv`, which imports `lightnets.nn.fbn` lazily: a BN-only model never needs it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from lightnets.errors import UserError

NORM_KINDS = ("bn",)


def norm_layer(kind: str, channels: int, affine: bool = True) -> nn.Module:
    """The normalization layer `kind` over `channels` channels ("bn": BatchNorm2d)."""
    if kind == "bn":
        return nn.BatchNorm2d(channels, affine=affine)
    raise UserError(f"norm {kind!r} is unknown: expected one of {', '.join(NORM_KINDS)}")


def fbn_groups_for(
    in_channels: int,
    fbn_groups: int = 1,
    channels_per_group: int | None = None,
    where: str = "layer",
) -> int:
    """Number of FBN groups G for a conv with `in_channels` inputs.

    With `channels_per_group` = c (paper Table 6) G = floor(in_channels / c), at least 1: the
    groups hold c inputs each, or more where the layer's inputs are not a multiple of c (the
    24-input first layer of Finet gets G = 1 for c = 20, 50, 100). A G that does not divide the
    layer's inputs is refused with a UserError naming the layer; the architecture is never
    changed to make it fit.
    """
    if channels_per_group is not None:
        if isinstance(channels_per_group, bool) or not isinstance(channels_per_group, int):
            raise UserError(f"fbn_channels_per_group must be an int, got {channels_per_group!r}")
        if channels_per_group < 1:
            raise UserError(f"fbn_channels_per_group must be >= 1, got {channels_per_group}")
        groups = max(1, in_channels // channels_per_group)
        if in_channels % groups:
            raise UserError(
                f"fbn_channels_per_group={channels_per_group} gives G={groups} groups for the "
                f"{in_channels} input channels of {where}, which G does not divide: expected a "
                f"group size c with floor({in_channels}/c) dividing {in_channels}"
            )
        return groups
    if isinstance(fbn_groups, bool) or not isinstance(fbn_groups, int) or fbn_groups < 1:
        raise UserError(f"fbn_groups must be an int >= 1, got {fbn_groups!r}")
    if in_channels % fbn_groups:
        raise UserError(
            f"fbn_groups={fbn_groups} does not divide the {in_channels} input channels of "
            f"{where}: expected fbn_groups to divide {in_channels}"
        )
    return fbn_groups


def fbn_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    fbn_groups: int = 1,
    affine: bool = True,
    impl: str = "auto",
) -> nn.Module:
    """An `FBNConv2d` (conv + fine-grained BN in one module, no conv bias)."""
    from lightnets.nn.fbn import FBNConv2d

    return FBNConv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        fbn_groups=fbn_groups,
        affine=affine,
        impl=impl,
    )


class ConvNormAct(nn.Sequential):
    """conv (no bias) -> norm -> optional ReLU, as a Sequential with children conv, norm, act.

    With `fbn_groups` set (not None) the conv and its norm are one `FBNConv2d` with that many
    groups (G = 1 included), and the children are conv, act. `groups` > 1 (depthwise) convs
    cannot be FBN.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        norm: str = "bn",
        act: bool = True,
        affine: bool = True,
        fbn_groups: int | None = None,
        fbn_impl: str = "auto",
    ) -> None:
        if padding is None:
            padding = kernel_size // 2
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if fbn_groups is not None:
            if groups != 1:
                raise ValueError("an FBN conv cannot be a grouped (depthwise) conv")
            layers["conv"] = fbn_conv(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                fbn_groups=fbn_groups,
                affine=affine,
                impl=fbn_impl,
            )
        else:
            layers["conv"] = nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
            )
            layers["norm"] = norm_layer(norm, out_channels, affine=affine)
        if act:
            layers["act"] = nn.ReLU(inplace=True)
        super().__init__(layers)
        self.in_channels = in_channels
        self.out_channels = out_channels


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation (Hu et al.): x * sigmoid(fc2(relu(fc1(avgpool(x))))).

    fc1/fc2 are 1x1 convs with bias (channels -> hidden -> channels), so the module costs
    2 * channels * hidden + hidden + channels parameters. Finet uses hidden = 200.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        if channels < 1 or hidden < 1:
            raise ValueError(f"SqueezeExcite needs channels, hidden >= 1, got {channels}, {hidden}")
        self.channels = channels
        self.hidden = hidden
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))
        return x * s

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}"
