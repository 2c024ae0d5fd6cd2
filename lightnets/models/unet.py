"""Residual U-Net and fused U-Net for two-class building segmentation (Qi & Zhao, weight
mechanism, §III.C and §IV.C).

`res_unet` (§III.C, Fig. 2; the figure is not in our text, the choices below are inferred and
checked against Table I in docs/unet-profile.md):

- stem: 3x3 conv in_chans -> 32 + norm + ReLU, full resolution;
- encoder: five levels of widths 32, 64, 128, 256, 512, one residual block each; levels 1-4
  downsample with stride-2 convolutions instead of max-pooling (the block's 3x3 conv and its
  1x1 projection shortcut have stride 2, torchvision's placement), so 125 -> 63 -> 32 -> 16 -> 8
  (out = ceil(in / 2); any size works);
- residual block: the bottleneck block's structure [5] (1x1 -> 3x3 -> 1x1 convs without bias,
  each followed by a norm, ReLU after the first two and after the shortcut add; identity
  shortcut, or a 1x1 conv + norm when the shape changes) with all three convs at the block's
  output width (no 4x channel reduction: see the profile document);
- decoder: four stages, deepest first; each resizes the deeper feature to its skip's exact size
  by bilinear interpolation and fuses it with the skip (`lightnets.nn.fusion`, `fusion=`): the
  four skip concatenations have skip widths 32, 64, 128, 256 and concatenate skip + 2 x skip
  channels, then a residual block brings them back to the skip width;
- head: 1x1 conv (with bias) to `num_classes` (2) logits at the input's resolution.

`fusion`: "concat" (baseline), "alpha" (alpha * skip; `alpha`, default 0.5), "beta"
(beta * decoder feature; `beta`, default 0.1; "alpha" and "beta" take both constants, e.g.
alpha=0.5, beta=0.1), "dynamic" (+480 parameters), "gate" (+349,600;
`gate="spatial"` for one gate channel). `bn_weight_init`: "normal" draws every norm layer's
weight (gamma) from N(0, 1) as in Table I; "ones" sets it to 1 as in Table II. Norm biases are
zero; convs are Kaiming-normal (fan-out). `norm` (with `norm_kwargs`) picks the norm layers,
by the models' convention (`lightnets.models.norm_option`; the U-Nets have no FBN positions):
"bn", "gn" (32 groups fit every width), "frozen_bn", ... `widths` (one per level, the last one
the bottom) exists for small CPU experiments; the paper's model is the default.

`fused_unet` (§IV.C, Fig. 8, which is not in our text): our interpretation is a full-scale
fusion U-Net with `res_unet`'s stem, encoder and blocks, whose every decoder stage takes, besides
the deeper decoder feature, the features of all four skip levels (32 + 64 + 128 + 256 = 480
channels), each resized bilinearly to the stage's size. All of them are series connections (the
decoder feature is computed from each of them), so all are multiplied by the one constant
`weight` (0.5 or 1 in the paper; a buffer), the decoder feature is not. A residual block
brings the 480 + deeper-width channels to the stage's skip width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightnets.checks import check_int, check_positive, is_int
from lightnets.errors import UserError
from lightnets.models.norm_option import plain_norm
from lightnets.models.registry import register_variant
from lightnets.nn.blocks import ConvNormAct, norm_layer
from lightnets.nn.fusion import WeightedConcat, make_fusion, resize_to

__all__ = [
    "BN_WEIGHT_INITS",
    "Bottleneck",
    "FusedUNet",
    "ResUNet",
    "fused_unet",
    "is_norm",
    "res_unet",
]

BN_WEIGHT_INITS = ("normal", "ones")
PAPER_WIDTHS = (32, 64, 128, 256, 512)


class Bottleneck(nn.Module):
    """Residual block with the bottleneck's structure: 1x1 -> 3x3 (stride) -> 1x1, all at
    `out_channels`, each conv followed by a norm, ReLU after the first two and after the add.
    The shortcut is the identity, or (`shortcut`) a 1x1 conv with the stride + norm when the
    channels or the size change."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, norm: Any = "bn"
    ) -> None:
        super().__init__()
        width = out_channels
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = norm_layer(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = norm_layer(norm, width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = norm_layer(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module | None = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                norm_layer(norm, out_channels),
            )
        else:
            self.shortcut = None
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class DecoderStage(nn.Module):
    """fuse(skip, deeper feature) -> residual block."""

    def __init__(self, fuse: nn.Module, block: nn.Module) -> None:
        super().__init__()
        self.fuse = fuse
        self.block = block

    def forward(self, skip: Tensor, x: Tensor) -> Tensor:
        return self.block(self.fuse(skip, x))


class FullScaleStage(nn.Module):
    """Decoder stage of the fused U-Net: every skip level resized to level `level`'s size,
    concatenated, weighted by the constant, concatenated with the deeper feature, then a
    residual block."""

    def __init__(self, level: int, fuse: WeightedConcat, block: nn.Module) -> None:
        super().__init__()
        self.level = level
        self.fuse = fuse
        self.block = block

    def forward(self, skips: Sequence[Tensor], x: Tensor) -> Tensor:
        ref = skips[self.level]
        parts = [s if k == self.level else resize_to(s, ref) for k, s in enumerate(skips)]
        return self.block(self.fuse(torch.cat(parts, 1), x))


def _check_widths(widths: Any, name: str) -> tuple[int, ...]:
    ok = isinstance(widths, Sequence) and not isinstance(widths, str) and len(widths) >= 2
    if not (ok and all(is_int(w) and w >= 1 for w in widths)):
        raise UserError(
            f"{name}: widths={widths!r} is invalid: expected at least two ints >= 1, one per "
            f"level, the last one the bottom (the paper's: {list(PAPER_WIDTHS)})"
        )
    return tuple(widths)


def _check_bn_init(value: Any, name: str) -> str:
    if value not in BN_WEIGHT_INITS:
        raise UserError(
            f"{name}: bn_weight_init={value!r} is invalid: expected one of "
            f"{', '.join(BN_WEIGHT_INITS)} (N(0, 1) as in Table I, or 1 as in Table II)"
        )
    return value


def is_norm(m: nn.Module) -> bool:
    """A normalization layer whose weight `bn_weight_init` sets: torch's BatchNorm / SyncBN /
    InstanceNorm and GroupNorm, and lightnets' layers that declare ``is_norm_layer``."""
    return isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) or bool(
        getattr(m, "is_norm_layer", False)
    )


_is_norm = is_norm  # the old name, still imported by lightnets.experiments.weight_mechanism


class _UNetBase(nn.Module):
    """Stem and encoder shared by both U-Nets, and their initialisation."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        norm: Any,
        norm_kwargs: Any,
        bn_weight_init: str,
        widths: Sequence[int],
        name: str,
    ) -> None:
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes", name)
        in_chans = check_int(in_chans, "in_chans", name)
        self.widths = _check_widths(widths, name)
        self.bn_weight_init = _check_bn_init(bn_weight_init, name)
        self.norm = plain_norm(name, norm, norm_kwargs)
        w = self.widths
        self.stem = ConvNormAct(in_chans, w[0], 3, norm=self.norm)
        self.encoder = nn.ModuleList(
            [Bottleneck(w[0], w[0], 1, self.norm)]
            + [Bottleneck(w[i - 1], w[i], 2, self.norm) for i in range(1, len(w))]
        )
        self.head = nn.Conv2d(w[0], self.num_classes, 1)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif is_norm(m):
                weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
                if isinstance(weight, nn.Parameter):  # not a frozen BN's fixed buffer
                    if self.bn_weight_init == "normal":
                        nn.init.normal_(weight, 0.0, 1.0)
                    else:
                        nn.init.ones_(weight)
                if isinstance(bias, nn.Parameter):
                    nn.init.zeros_(bias)

    def encode(self, x: Tensor) -> list[Tensor]:
        """The encoder's outputs, full resolution first, the bottom last."""
        x = self.stem(x)
        feats = []
        for block in self.encoder:
            x = block(x)
            feats.append(x)
        return feats


class ResUNet(_UNetBase):
    """Residual U-Net of §III.C with a choice of skip fusion; see the module docstring."""

    def __init__(
        self,
        num_classes: int = 2,
        in_chans: int = 3,
        norm: str = "bn",
        norm_kwargs: dict | None = None,
        fusion: str = "concat",
        alpha: float | None = None,
        beta: float | None = None,
        gate: str = "channel",
        bn_weight_init: str = "normal",
        widths: Sequence[int] = PAPER_WIDTHS,
        name: str = "res_unet",
    ) -> None:
        super().__init__(num_classes, in_chans, norm, norm_kwargs, bn_weight_init, widths, name)
        w = self.widths
        self.fusion = fusion
        stages = []
        for level in reversed(range(len(w) - 1)):
            skip, deep = w[level], w[level + 1]
            fuse = make_fusion(fusion, skip, deep, alpha=alpha, beta=beta, gate=gate)
            stages.append(DecoderStage(fuse, Bottleneck(skip + deep, skip, 1, self.norm)))
        self.decoder = nn.ModuleList(stages)
        self._init_weights()

    def forward(self, x: Tensor) -> Tensor:
        feats = self.encode(x)
        x = feats.pop()
        for stage in self.decoder:
            x = stage(feats.pop(), x)
        return self.head(x)


class FusedUNet(_UNetBase):
    """Our interpretation of the fused U-Net of §IV.C; see the module docstring."""

    def __init__(
        self,
        num_classes: int = 2,
        in_chans: int = 3,
        norm: str = "bn",
        norm_kwargs: dict | None = None,
        weight: float = 0.5,
        bn_weight_init: str = "normal",
        widths: Sequence[int] = PAPER_WIDTHS,
        name: str = "fused_unet",
    ) -> None:
        super().__init__(num_classes, in_chans, norm, norm_kwargs, bn_weight_init, widths, name)
        w = self.widths
        weight = check_positive(weight, "weight", name)
        all_skips = sum(w[:-1])
        stages = []
        for level in reversed(range(len(w) - 1)):
            block = Bottleneck(all_skips + w[level + 1], w[level], 1, self.norm)
            stages.append(FullScaleStage(level, WeightedConcat(alpha=weight), block))
        self.decoder = nn.ModuleList(stages)
        self._init_weights()

    def forward(self, x: Tensor) -> Tensor:
        feats = self.encode(x)
        x = feats.pop()
        for stage in self.decoder:
            x = stage(feats, x)
        return self.head(x)


res_unet = register_variant(
    "res_unet",
    ResUNet,
    """Residual U-Net (§III.C): 5,246,370 parameters (paper 5.11M), 2.07 GMACs at 125x125.

    fusion: "concat" | "alpha" (alpha, default 0.5) | "beta" (beta, default 0.1) | "dynamic"
    (+480 parameters) | "gate" (+349,600; gate="channel" | "spatial"). "alpha" and "beta"
    take both constants (the other one defaults to 1).
    """,
)
fused_unet = register_variant(
    "fused_unet",
    FusedUNet,
    """Fused U-Net (§IV.C, our full-scale interpretation of Fig. 8): every decoder stage takes
    all four skip levels, weighted by the constant `weight` (0.5, or 1 for the comparison).""",
)
