"""VGG-16 (Simonyan & Zisserman), configuration D, with any normalization after each conv: the
model of the GN paper's Fig. 6 (no normalization vs. BN vs. GN).

Layout and parameter names are torchvision's: `features` is one Sequential of 13
(3x3 conv, padding 1, with bias) [+ norm] + ReLU layers, 64-64-M-128-128-M-256x3-M-512x3-M-512x3-M
(M: 2x2 max-pool, stride 2, rounding up so odd sizes work: 28x28 MNIST goes 28-14-7-4-2-1;
identical to torchvision's for 32x32 and 224x224); `avgpool`; `classifier`. With
norm="none" the state_dict keys and the 138,357,544 parameters equal torchvision's ``vgg16``;
with norm="bn" its ``vgg16_bn`` (138,365,992): the convs keep their bias as torchvision's do.

- ImageNet head (default): AdaptiveAvgPool2d(7) -> Linear(512*7*7, 4096) -> ReLU -> Dropout ->
  Linear(4096, 4096) -> ReLU -> Dropout -> Linear(4096, num_classes).
- `cifar_stem=True` (for 32x32 inputs, whose features are 1x1 after the five pools): the head is
  AdaptiveAvgPool2d(1) -> Linear(512, num_classes), the usual CIFAR VGG.

`norm`: any kind of `lightnets.nn.make_norm` (bn, sync_bn, frozen_bn, gn, ln, in, brn, none),
with `norm_kwargs` passed on (GN's default G = 32 divides every VGG width); the models'
convention (`lightnets.models.norm_option`; VGG has no FBN positions). Initialization is
torchvision's: Kaiming-normal (fan_out, ReLU) convs with zero bias, norm gamma 1 and beta 0,
N(0, 0.01) linear weights with zero bias.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightnets.checks import check_int, check_number, check_positive
from lightnets.models.norm_option import plain_norm
from lightnets.models.registry import register_variant

VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"
)  # fmt: skip


class VGG(nn.Module):
    """VGG from a configuration of conv widths and "M" (max-pool); see the module docstring."""

    def __init__(
        self,
        config: tuple[int | str, ...] = VGG16_CONFIG,
        num_classes: int = 1000,
        in_chans: int = 3,
        norm: str = "bn",
        norm_kwargs: dict | None = None,
        cifar_stem: bool = False,
        drop_rate: float = 0.5,
        name: str = "vgg",
        width: float = 1.0,
    ) -> None:
        super().__init__()
        check_int(num_classes, "num_classes", name)
        check_int(in_chans, "in_chans", name)
        spec = plain_norm(name, norm, norm_kwargs)
        drop_rate = check_number(
            drop_rate, "drop_rate", name, minimum=0, maximum=1, open_maximum=True
        )
        width = check_positive(width, "width", name)
        self.num_classes = num_classes
        config = tuple(c if c == "M" else max(1, round(int(c) * width)) for c in config)
        layers: list[nn.Module] = []
        cin = in_chans
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
                continue
            layers.append(nn.Conv2d(cin, int(item), 3, padding=1))
            norm_module = spec(int(item))
            if not isinstance(norm_module, nn.Identity):  # keys as torchvision's vgg16(_bn)
                layers.append(norm_module)
            layers.append(nn.ReLU(inplace=True))
            cin = int(item)
        self.features = nn.Sequential(*layers)
        if cifar_stem:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Linear(cin, num_classes))
        else:
            self.avgpool = nn.AdaptiveAvgPool2d(7)
            self.classifier = nn.Sequential(
                nn.Linear(cin * 7 * 7, 4096),
                nn.ReLU(inplace=True),
                nn.Dropout(drop_rate),
                nn.Linear(4096, 4096),
                nn.ReLU(inplace=True),
                nn.Dropout(drop_rate),
                nn.Linear(4096, num_classes),
            )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
            elif isinstance(getattr(m, "weight", None), nn.Parameter) and m is not self:
                nn.init.ones_(m.weight)  # norm gamma
                if isinstance(getattr(m, "bias", None), nn.Parameter):
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x)).flatten(1)
        return self.classifier(x)


vgg16 = register_variant(
    "vgg16",
    VGG,
    """VGG-16 (13 convs + 3 FC): 138.36M parameters with norm="none", 15.5 GMACs at 224x224.

    `width` multiplies every conv's channels (0.25: 16-16-M-...-128, for CPU-scale studies;
    keep a multiple of 1/64 with GN's default 32 groups, or pass norm_kwargs).
    """,
    fixed={"config": VGG16_CONFIG},
)
