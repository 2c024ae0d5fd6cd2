"""Building blocks shared by the model families: norm factory, conv-norm-act, Squeeze-Excite.

Every normalization layer that is not an FBN goes through `norm_layer(kind, channels)`, so that
swapping in a wider factory (GN, frozen BN, ...) is a one-line change here. FBN layers are made
by `fbn_conv`, which imports `lightnets.nn.fbn` lazily: a BN-only model never needs it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from lightnets.errors import UserError


def norm_layer(kind: Any, channels: int, affine: bool = True, **options: Any) -> nn.Module:
    """The normalization layer `kind` over `channels` channels, made by `make_norm`.

    kind: a name of `lightnets.nn.norm.NORM_KINDS` ("bn": BatchNorm2d, "gn", "frozen_bn", ...)
    or a `NormSpec` carrying a kind and its options; `options` (e.g. num_groups=32) are passed
    on and win over the spec's. Unknown kinds and options are UserErrors.
    """
    from lightnets.nn.norm import NormSpec, make_norm

    if isinstance(kind, NormSpec):
        return kind(channels, dims=2, affine=affine, **options)
    return make_norm(kind, channels, dims=2, affine=affine, **options)


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
    layer's inputs gives groups whose sizes differ by one (`lightnets.nn.fbn.group_sizes`); a G
    larger than the layer's inputs is refused with a UserError naming the layer.
    """
    if channels_per_group is not None:
        if isinstance(channels_per_group, bool) or not isinstance(channels_per_group, int):
            raise UserError(f"fbn_channels_per_group must be an int, got {channels_per_group!r}")
        if channels_per_group < 1:
            raise UserError(f"fbn_channels_per_group must be >= 1, got {channels_per_group}")
        return max(1, in_channels // channels_per_group)
    if isinstance(fbn_groups, bool) or not isinstance(fbn_groups, int) or fbn_groups < 1:
        raise UserError(f"fbn_groups must be an int >= 1, got {fbn_groups!r}")
    if fbn_groups > in_channels:
        raise UserError(
            f"fbn_groups={fbn_groups} is more than the {in_channels} input channels of "
            f"{where}: expected at most {in_channels} groups (one channel each)"
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
