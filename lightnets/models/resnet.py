"""ResNet-18 / ResNet-50 (He et al.), torchvision's architecture and parameter names, with BN or
FBN (Finet paper, Table 7).

The layout is torchvision's ResNet v1.5 (stride of a Bottleneck in its 3x3 conv): stem
`conv1` (7x7/2) + `bn1` + `relu` + `maxpool` (3x3/2), `layer1`..`layer4`, `avgpool`, `fc`;
blocks with `conv1`/`bn1`, `conv2`/`bn2` (`conv3`/`bn3`), `downsample` = Sequential(1x1 conv
stride s, BN) when the shape changes. With the default options the state_dict keys and
parameter counts equal torchvision's (11,689,512 and 25,557,032 at 1000 classes).
`cifar_stem=True`: a 3x3 stride-1 stem conv and no max-pool, for 32x32 inputs.

Norm options follow the models' convention (`lightnets.models.norm_option`). FBN (`norm="fbn"`,
or `fbn_groups` other than 1): every conv + BN pair except the stem (whose input is the image)
becomes one `FBNConv2d` with `fbn_groups` groups: in a BasicBlock conv1 (3x3) and conv2 (3x3);
in a Bottleneck conv1 (1x1), conv2 (3x3) and conv3 (1x1); and the 1x1 `downsample.0` conv of
every block that has one. The pair's BN slot (`bn1`, `bn2`, ...) is then an `FBNNormSlot` (an
nn.Identity) and `downsample` is Sequential(FBNConv2d). Any other `norm` is a plain norm layer
made by `lightnets.nn.make_norm`: "bn", "sync_bn", "frozen_bn", "gn", "ln", "in", "brn" or
"none", with `norm_kwargs` passed to every one of them (e.g. {"num_groups": 32} for GN,
{"r_max": 1.5, "d_max": 0.5} for BRN); the stem always uses that (BN for "fbn", norm_kwargs
included). The norm modules keep torchvision's names (bn1, ...) whatever their kind; with
"none" they are nn.Identity.

`zero_init_last=True` zeroes the scale of the last norm of each residual block (bn2 /
bn3, or the FBN conv's `norm_weight`), so every block starts as the identity (GN paper §4.1,
after Goyal et al.): for every kind with a trainable gamma. A frozen BN's gamma is a fixed
buffer and "none" has none: those blocks are left as they are.

The registered variants (resnet18, resnet50, resnet_mini) are `ResNet` with a fixed block type
and depths, registered by `register_variant`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightnets.checks import check_int
from lightnets.models.norm_option import ModelNorms, model_norms
from lightnets.models.registry import register_variant
from lightnets.nn.fbn import FBNConv2d


def _conv_norm(
    norms: ModelNorms, cin: int, cout: int, k: int, stride: int, padding: int, where: str
) -> tuple[nn.Module, nn.Module]:
    """A conv + norm pair of a residual block: one of the FBN positions."""
    return norms.fbn_positions.conv_norm(
        cin, cout, k, stride, padding, where=f"{where} ({cin}->{cout})"
    )


#: torchvision's stage widths
WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """Two 3x3 conv + norm layers and a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int, norms: ModelNorms, where: str
    ) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_norm(norms, inplanes, planes, 3, stride, 1, f"{where}.conv1")
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_norm(norms, planes, planes, 3, 1, 1, f"{where}.conv2")
        self.downsample = _downsample(inplanes, planes, stride, norms, where)
        self.stride = stride

    def last_norm(self) -> nn.Module:
        return self.conv2 if isinstance(self.bn2, nn.Identity) else self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, v1.5), 1x1 expand x4, and a shortcut."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int, norms: ModelNorms, where: str
    ) -> None:
        super().__init__()
        width = planes
        out = planes * self.expansion
        self.conv1, self.bn1 = _conv_norm(norms, inplanes, width, 1, 1, 0, f"{where}.conv1")
        self.conv2, self.bn2 = _conv_norm(norms, width, width, 3, stride, 1, f"{where}.conv2")
        self.conv3, self.bn3 = _conv_norm(norms, width, out, 1, 1, 0, f"{where}.conv3")
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, out, stride, norms, where)
        self.stride = stride

    def last_norm(self) -> nn.Module:
        return self.conv3 if isinstance(self.bn3, nn.Identity) else self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(
    inplanes: int, out: int, stride: int, norms: ModelNorms, where: str
) -> nn.Module | None:
    if stride == 1 and inplanes == out:
        return None
    conv, norm = _conv_norm(norms, inplanes, out, 1, stride, 0, f"{where}.downsample.0")
    if isinstance(norm, nn.Identity):
        return nn.Sequential(conv)
    return nn.Sequential(conv, norm)


class ResNet(nn.Module):
    """ResNet with `block` and `layers` blocks per stage; see the module docstring."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        norm: str = "bn",
        fbn_groups: int = 1,
        fbn_impl: str = "auto",
        cifar_stem: bool = False,
        zero_init_last: bool = False,
        norm_kwargs: dict | None = None,
        name: str = "resnet",
        widths: Sequence[int] = WIDTHS,
        stem_stride: int | None = None,
    ) -> None:
        super().__init__()
        check_int(num_classes, "num_classes", name)
        check_int(in_chans, "in_chans", name)
        norms = model_norms(name, norm, norm_kwargs, fbn_groups=fbn_groups, fbn_impl=fbn_impl)
        self.num_classes = num_classes
        if len(widths) != len(layers):
            raise ValueError(f"{name}: {len(layers)} stages need {len(layers)} widths")
        self.num_stages = len(layers)
        stem = widths[0]
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_chans, stem, 3, stem_stride or 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem, 7, stem_stride or 2, 3, bias=False)
        self.bn1 = norms.plain(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
        inplanes = stem
        for i, (planes, n) in enumerate(zip(widths, layers), start=1):
            blocks = []
            for j in range(n):
                stride = 2 if (j == 0 and i > 1) else 1
                blocks.append(block(inplanes, planes, stride, norms, f"{name} layer{i}.{j}"))
                inplanes = planes * block.expansion
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, FBNConv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    last = m.last_norm()  # an FBN conv scales with norm_weight
                    if type(last) is nn.Conv2d:  # norm="none": no gamma (the conv stays)
                        continue
                    attr = "norm_weight" if hasattr(last, "norm_weight") else "weight"
                    scale = getattr(last, attr, None)
                    if isinstance(scale, nn.Parameter):  # not a frozen BN's fixed buffer
                        nn.init.zeros_(scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x)).flatten(1)
        return self.fc(x)


resnet18 = register_variant(
    "resnet18",
    ResNet,
    "ResNet-18 (BasicBlock, [2, 2, 2, 2]): 11.69M parameters, 1.81 GMACs at 224x224.",
    fixed={"block": BasicBlock, "layers": (2, 2, 2, 2), "widths": WIDTHS, "stem_stride": None},
)
resnet50 = register_variant(
    "resnet50",
    ResNet,
    "ResNet-50 (Bottleneck, [3, 4, 6, 3]): 25.56M parameters, 4.09 GMACs at 224x224.",
    fixed={"block": Bottleneck, "layers": (3, 4, 6, 3), "widths": WIDTHS, "stem_stride": None},
)
resnet_mini = register_variant(
    "resnet_mini",
    ResNet,
    """A ResNet sized for 28x28 on a CPU, for the GN studies on the bundled MNIST subset.

    3x3 stride-2 stem to 64 channels (28 -> 14, no max-pool), then three stages of one
    BasicBlock each at widths 64/128/256 (14, 7, 4 pixels): 1.2M parameters, 41M MACs at 28x28.
    Every norm layer has a multiple of 64 channels, so GN's Table 3 divisions (G and channels
    per group in 64..1) all exist, as in ResNet-50.
    """,
    fixed={
        "block": BasicBlock,
        "layers": (1, 1, 1),
        "widths": (64, 128, 256),
        "stem_stride": 2,
        "cifar_stem": True,
    },
    defaults={"num_classes": 10, "in_chans": 1},
)
