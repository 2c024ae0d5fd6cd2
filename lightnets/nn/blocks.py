"""Building blocks shared by the model families: conv-norm-act and Squeeze-Excite.

Every conv + norm of a model is made from a `lightnets.nn.norm.NormSpec` (a kind with its
options), so that one value says which normalization a model uses, FBN included: a block
asks the spec for its conv and norm (`NormSpec.conv_norm`) and does not need to know whether
they are two modules (Conv2d + BatchNorm2d, GroupNorm, ...) or one (`FBNConv2d`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from lightnets.checks import check_int
from lightnets.nn.fbn import FBNNormSlot
from lightnets.nn.norm import NormSpec


def norm_layer(
    kind: str | NormSpec, channels: int, affine: bool = True, **options: Any
) -> nn.Module:
    """The normalization layer `kind` over `channels` channels, made by `make_norm`.

    kind: a name of `lightnets.nn.norm.LAYER_NORM_KINDS` ("bn": BatchNorm2d, "gn",
    "frozen_bn", ...) or a `NormSpec` carrying a kind and its options; `options` (e.g.
    num_groups=32) are passed on and win over the spec's. Unknown kinds and options are
    UserErrors.
    """
    return NormSpec.of(kind)(channels, dims=2, affine=affine, **options)


class ConvNormAct(nn.Sequential):
    """conv (no bias) -> norm -> optional ReLU, as a Sequential with children conv, norm, act.

    `norm` is a kind or a `NormSpec` (see `lightnets.nn.norm`). With an ``fbn`` norm the conv and
    its norm are one `FBNConv2d` and the children are conv, act. `groups` > 1 (depthwise) convs
    cannot be FBN. `where` names the layer in errors (e.g. "finet_small stage2.0.conv1").
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        norm: str | NormSpec = "bn",
        act: bool = True,
        affine: bool = True,
        where: str = "",
    ) -> None:
        if padding is None:
            padding = kernel_size // 2
        conv, norm_module = NormSpec.of(norm).conv_norm(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            groups=groups,
            where=where,
            affine=affine,
        )
        layers: OrderedDict[str, nn.Module] = OrderedDict(conv=conv)
        if not isinstance(norm_module, FBNNormSlot):
            layers["norm"] = norm_module
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
        self.channels = check_int(channels, "channels", "SqueezeExcite")
        self.hidden = check_int(hidden, "hidden", "SqueezeExcite")
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
