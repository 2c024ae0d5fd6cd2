"""Batch augmentation on the training device, built from a list of ops (kornia).

A recipe lists the ops in order, each by name or with its parameters:
`augment = [{pad_crop = {padding = 2}}, "hflip", "normalize"]` (OP_PARAMS has every op's
parameters and defaults; `describe_augment` writes a list out with all of them).

Datasets hand out uint8 batches; this module converts them to float in [0, 1], applies the
random geometric ops the recipe names, and normalizes, all on whole batches on the device.
A segmentation mask passed alongside gets exactly the same geometric ops (nearest
resampling; pixels padded in get `mask_fill`, default -100 = cross_entropy's ignore_index).
`random_scale` + `random_crop` is the segmentation recipe of paper 003 (scale each image by a
factor in [0.5, 2], crop 125x125 from it, padding where it is smaller).

Randomness comes from torch's global generator of the device the module lives on (kornia
samples its parameters there: the CPU generator on CPU, the CUDA generator after
`.to("cuda")`), so seeding torch and saving/restoring its RNG states reproduces a run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightnets.errors import UserError, did_you_mean
from lightnets.optional import require

#: Op names build_batch_augment understands, in no particular order.
AUGMENT_OPS = (
    "random_resized_crop",
    "pad_crop",
    "random_scale",
    "random_crop",
    "hflip",
    "normalize",
    "scale_pm1",
    "none",
)
#: Ops that are random and dropped for evaluation (train=False).
RANDOM_OPS = frozenset({"random_resized_crop", "pad_crop", "random_scale", "random_crop", "hflip"})
#: Random ops done by a kornia.augmentation module (the others are done here with kornia's
#: warp_affine or plain indexing).
_KORNIA_OPS = frozenset({"random_resized_crop", "pad_crop", "hflip"})
#: Each op's parameters and their defaults; a recipe sets them per op, e.g.
#: `augment = [{pad_crop = {padding = 2}}, "hflip", "normalize"]`.
OP_PARAMS: dict[str, dict[str, Any]] = {
    "random_resized_crop": {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3)},
    "pad_crop": {"padding": 4, "fill": 0.0},  # pixels of padding a side, their value in [0, 1]
    "random_scale": {"scale_range": (0.5, 2.0)},  # the per-image factor, drawn uniformly
    "random_crop": {"fill": 0.0},  # image value where the crop overhangs the image
    "hflip": {"p": 0.5},
    "normalize": {},
    "scale_pm1": {},
    "none": {},
}
#: Keyword options of build_batch_augment (defaults for every op that has the parameter, as
#: before per-op parameters existed) -> (op, parameter) they set; mask_fill is the mask value
#: of padded pixels (cross_entropy's ignore_index), shared by every op.
AUGMENT_OPTIONS: dict[str, Any] = {
    "padding": 4,
    "scale": (0.08, 1.0),
    "ratio": (3 / 4, 4 / 3),
    "flip_p": 0.5,
    "scale_range": (0.5, 2.0),
    "fill": 0.0,
    "mask_fill": -100,
}
_OPTION_TARGETS: dict[str, tuple[tuple[str, str], ...]] = {
    "padding": (("pad_crop", "padding"),),
    "scale": (("random_resized_crop", "scale"),),
    "ratio": (("random_resized_crop", "ratio"),),
    "flip_p": (("hflip", "p"),),
    "scale_range": (("random_scale", "scale_range"),),
    "fill": (("pad_crop", "fill"), ("random_crop", "fill")),
}


@dataclass(frozen=True)
class AugmentOp:
    """One augmentation op and its parameters (every parameter of the op, defaults filled in)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str | dict[str, dict[str, Any]]:
        """The op as a recipe would write it: its name, or {name: {param: value}}."""
        if not self.params:
            return self.name
        return {
            self.name: {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}
        }


def _unknown_op(op: str) -> UserError:
    return UserError(
        f"unknown augmentation {op!r}{did_you_mean(op, AUGMENT_OPS)}: expected any of "
        f"{', '.join(AUGMENT_OPS)}"
    )


def _pair(op: str, key: str, value: Any) -> tuple[float, float]:
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )
    if not ok:
        raise UserError(f"augmentation {op}: {key}={value!r} is invalid: expected [min, max]")
    return (float(value[0]), float(value[1]))


def _checked_params(op: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The op's parameters: defaults updated with `given`, each checked."""
    valid = OP_PARAMS[op]
    for key in given:
        if key not in valid:
            names = list(valid)
            raise UserError(
                f"augmentation {op!r} has no parameter {key!r}{did_you_mean(key, names)}: "
                + (f"expected any of {', '.join(names)}" if names else "it takes none")
            )
    params = {**valid, **given}
    for key, value in params.items():
        if key == "padding":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(
                    f"augmentation {op}: padding={value!r} is invalid: expected padding >= 0 "
                    "(an int: pixels a side)"
                )
        elif key in ("p", "fill"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"augmentation {op}: {key}={value!r} is invalid: expected a number")
            params[key] = float(value)
            if key == "p" and not 0.0 <= value <= 1.0:
                raise UserError(f"augmentation {op}: p={value!r} is invalid: expected 0 <= p <= 1")
        else:  # scale, ratio, scale_range: (min, max)
            lo, hi = _pair(op, key, value)
            top = 1.0 if key == "scale" else math.inf
            if not 0 < lo <= hi <= top:
                bound = " <= 1" if key == "scale" else ""
                raise UserError(
                    f"augmentation {op}: {key}={value!r} is invalid: expected (min, max) with "
                    f"0 < min <= max{bound}"
                )
            params[key] = (lo, hi)
    return params


def parse_augment(
    spec: str | Sequence[str | Mapping[str, Any] | AugmentOp] | None, **options: Any
) -> list[AugmentOp]:
    """Ops with their parameters from a recipe's `augment` value.

    `spec`: a comma/plus-separated string ("pad_crop,hflip"), or a list whose items are op
    names or one-key tables {op: {param: value}} (`{pad_crop = {padding = 2}}` in TOML).
    `options` (build_batch_augment's keyword options: padding, flip_p, ...) set the default of
    that parameter for every op that has it; a per-op value wins. "none" is dropped.
    """
    unknown = [k for k in options if k not in AUGMENT_OPTIONS]
    if unknown:
        valid = list(AUGMENT_OPTIONS)
        raise UserError(
            f"unknown augmentation option {unknown[0]!r}{did_you_mean(unknown[0], valid)}: "
            f"expected any of {', '.join(valid)}"
        )
    if spec is None:
        return []
    if isinstance(spec, str):
        spec = spec.replace("+", ",").split(",")
    defaults: dict[str, dict[str, Any]] = {}
    for option, value in options.items():
        for op, key in _OPTION_TARGETS.get(option, ()):
            defaults.setdefault(op, {})[key] = value
    ops = []
    for item in spec:
        if isinstance(item, AugmentOp):
            name, given = item.name, dict(item.params)
        elif isinstance(item, Mapping):
            if len(item) != 1:
                raise UserError(
                    f"augmentation {dict(item)!r}: expected one op per table, e.g. "
                    "{pad_crop = {padding = 2}}"
                )
            ((name, given),) = item.items()
            name = str(name).strip()
            if given is None:
                given = {}
            if not isinstance(given, Mapping):
                raise UserError(
                    f"augmentation {name!r}: parameters {given!r} are invalid: expected a table, "
                    f"e.g. {{{name} = {{...}}}}"
                )
        else:
            name, given = str(item).strip(), {}
            if not name:
                continue
        if name not in AUGMENT_OPS:
            raise _unknown_op(name)
        if name == "none":
            continue
        ops.append(AugmentOp(name, _checked_params(name, {**defaults.get(name, {}), **given})))
    return ops


def describe_augment(spec: Any) -> list[str | dict[str, dict[str, Any]]]:
    """`spec` resolved and written out with every parameter (for summaries and dry runs)."""
    return [op.describe() for op in parse_augment(spec)]


def _size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    size = tuple(int(s) for s in image_size)
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise UserError(f"image_size={image_size!r}: expected an int or [height, width]")
    return size  # type: ignore[return-value]


class BatchAugment(nn.Module):
    """uint8/float batch (N, C, H, W) -> augmented, normalized float batch.

    `forward(x)` returns the batch; `forward(x, mask)` returns `(batch, mask)` with the same
    geometric ops applied to the mask ((N, H, W) or (N, 1, H, W)), which comes back as int64.
    Float input is taken to be on the [0, 1] scale already.
    """

    def __init__(
        self,
        ops: str | Sequence[str | Mapping[str, Any] | AugmentOp],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        image_size: int | Sequence[int] | None = None,
        **opts: Any,
    ) -> None:
        super().__init__()
        #: the ops in order, with their parameters
        self.op_list = parse_augment(ops, **opts)
        #: the op names in order
        self.ops = [op.name for op in self.op_list]
        self.mask_fill = float(opts.get("mask_fill", AUGMENT_OPTIONS["mask_fill"]))
        self.image_size = _size(image_size)
        for i, op in enumerate(self.ops):
            if op == "random_scale" and self.ops[i + 1 : i + 2] != ["random_crop"]:
                raise UserError(
                    f"augmentation 'random_scale' is followed by "
                    f"{(self.ops[i + 1 : i + 2] or ['nothing'])[0]!r}: expected 'random_crop' "
                    "right after it (the crop brings the scaled images of a batch back to one "
                    "size), e.g. random_scale,random_crop,hflip"
                )
        if "normalize" in self.ops:
            if mean is None or std is None:
                raise UserError(
                    "augmentation 'normalize' needs the per-channel mean and std, but the dataset "
                    "gives none: expected mean= and std= (on the [0, 1] scale)"
                )
            m = torch.tensor([float(v) for v in mean]).view(1, -1, 1, 1)
            s = torch.tensor([float(v) for v in std]).view(1, -1, 1, 1)
            if m.numel() != s.numel() or (s <= 0).any():
                raise UserError(
                    f"normalize mean={tuple(mean)} std={tuple(std)}: expected as many values in "
                    "each (one per channel) and std > 0"
                )
            self.register_buffer("mean", m, persistent=False)
            self.register_buffer("std", s, persistent=False)
        # kornia modules per geometric op; size-dependent ones are built on first use when
        # image_size is not given (the size of the incoming batch is used then)
        self.geometric = nn.ModuleDict()
        for i, op in enumerate(self.op_list):
            if op.name in _KORNIA_OPS and (op.name == "hflip" or self.image_size is not None):
                self.geometric[str(i)] = self._kornia_op(op, self.image_size)

    def _kornia_op(self, op: AugmentOp, size: tuple[int, int] | None) -> nn.Module:
        K = require("kornia.augmentation", "augment", f"the {op.name!r} augmentation")
        p = op.params
        if op.name == "hflip":
            aug = K.RandomHorizontalFlip(p=p["p"])
        elif op.name == "pad_crop":
            aug = K.RandomCrop(size, padding=p["padding"], fill=p["fill"])
        else:
            aug = K.RandomResizedCrop(size, scale=p["scale"], ratio=p["ratio"])
        return K.AugmentationSequential(aug, data_keys=["input"])

    def _geometric_op(self, i: int, op: AugmentOp, x: torch.Tensor) -> nn.Module:
        key = (
            str(i)
            if op.name == "hflip" or self.image_size is not None
            else f"{i}_{x.shape[-2]}x{x.shape[-1]}"
        )
        if key not in self.geometric:
            self.geometric[key] = self._kornia_op(op, (x.shape[-2], x.shape[-1])).to(x.device)
        return self.geometric[key]

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 4:
            raise ValueError(f"expected a batch (N, C, H, W), got shape {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        elif not x.is_floating_point():
            raise ValueError(f"expected a uint8 or float batch, got {x.dtype}")
        m = None
        if mask is not None and any(op in RANDOM_OPS for op in self.ops):
            m = mask.reshape(mask.shape[0], 1, *mask.shape[-2:]).float()
            m = m - self.mask_fill  # padding fills 0: shift so it lands on mask_fill
        scales = None
        for i, op in enumerate(self.op_list):
            if op.name == "random_scale":
                lo, hi = op.params["scale_range"]
                scales = lo + (hi - lo) * torch.rand(x.shape[0], device=x.device)
            elif op.name == "random_crop":
                x, m = self._scale_crop(x, m, scales, op.params["fill"])
                scales = None
            elif op.name in RANDOM_OPS:
                aug = self._geometric_op(i, op, x)
                if m is None:
                    x = aug(x)
                else:
                    x, m = aug(x, m, data_keys=["input", "mask"])
            elif op.name == "normalize":
                if self.mean.shape[1] != x.shape[1]:
                    raise UserError(
                        f"normalize has {self.mean.shape[1]} mean/std values but the batch has "
                        f"{x.shape[1]} channels: expected one value per channel"
                    )
                x = (x - self.mean) / self.std
            elif op.name == "scale_pm1":
                x = x * 2.0 - 1.0
        if mask is None:
            return x
        if m is None:
            return x, mask
        m = (m + self.mask_fill).round().long()
        return x, m[:, 0] if mask.ndim == 3 else m

    def _scale_crop(
        self, x: torch.Tensor, m: torch.Tensor | None, scales: torch.Tensor | None, fill: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale image i by scales[i] (None: 1) and crop image_size at a random place from it.

        The scaled image is round(H * s) x round(W * s), resampled as F.interpolate does it
        (bilinear for the image, nearest-exact for the mask); the crop's offset is uniform
        over the places where the crop lies inside the scaled image, and where the scaled
        image is smaller than the crop it lands at a uniform place inside the crop, the rest
        being padding (image `fill`, mask `mask_fill`). Without scaling the crop copies pixels
        exactly.
        """
        n, _, h, w = x.shape
        ch, cw = self.image_size or (h, w)
        device = x.device
        if scales is None:
            hs = torch.full((n,), h, device=device, dtype=torch.long)
            ws = torch.full((n,), w, device=device, dtype=torch.long)
        else:
            hs = torch.round(h * scales).long().clamp_(min=1)
            ws = torch.round(w * scales).long().clamp_(min=1)
        top = _uniform_offset(hs - ch, device)
        left = _uniform_offset(ws - cw, device)
        if scales is None:
            x = _crop_windows(x, top, left, ch, cw, fill)
            return x, None if m is None else _crop_windows(m, top, left, ch, cw, 0.0)
        warp_affine = require(
            "kornia.geometry.transform", "augment", "the 'random_resized_crop' augmentation"
        ).warp_affine
        # source pixel index -> output pixel index: out = s * (src + 0.5) - 0.5 - offset
        sy, sx = hs.float() / h, ws.float() / w
        matrix = torch.zeros(n, 2, 3, device=device)
        matrix[:, 0, 0], matrix[:, 0, 2] = sx, 0.5 * sx - 0.5 - left.float()
        matrix[:, 1, 1], matrix[:, 1, 2] = sy, 0.5 * sy - 0.5 - top.float()
        # border mode: the scaled image's edge pixels are interpolated like F.interpolate's
        # (clamped); what lies outside the scaled image is then set to the fill values
        rows = torch.arange(ch, device=device)[None, :] + top[:, None]  # (n, ch) in scaled px
        cols = torch.arange(cw, device=device)[None, :] + left[:, None]
        inside = ((rows >= 0) & (rows < hs[:, None]))[:, None, :, None] & (
            (cols >= 0) & (cols < ws[:, None])
        )[:, None, None, :]
        x = warp_affine(
            x, matrix, (ch, cw), mode="bilinear", padding_mode="border", align_corners=True
        )
        x = torch.where(inside, x, torch.full_like(x, fill))
        if m is not None:  # m is shifted so that 0 means mask_fill
            # sample 1/1000 px further on: ties (x.5) round up, as F.interpolate's nearest-exact
            nudged = matrix.clone()
            nudged[:, 0, 2] -= 1e-3 * sx
            nudged[:, 1, 2] -= 1e-3 * sy
            m = warp_affine(
                m, nudged, (ch, cw), mode="nearest", padding_mode="border", align_corners=True
            )
            m = torch.where(inside, m, torch.zeros_like(m))
        return x, m

    def extra_repr(self) -> str:
        size = f", image_size={self.image_size}" if self.image_size else ""
        return f"ops={[op.describe() for op in self.op_list]}{size}"


def _uniform_offset(slack: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Integer offsets uniform over [min(0, slack), max(0, slack)], one per sample."""
    lo, hi = slack.clamp(max=0), slack.clamp(min=0)
    draw = torch.rand(slack.shape[0], device=device)
    return torch.minimum(lo + (draw * (hi - lo + 1).float()).long(), hi)


def _crop_windows(
    t: torch.Tensor, top: torch.Tensor, left: torch.Tensor, ch: int, cw: int, fill: float
) -> torch.Tensor:
    """Window (top[i], left[i], ch, cw) of each t[i], padded with `fill` outside the image."""
    n, _, h, w = t.shape
    ph, pw = max(0, ch - h), max(0, cw - w)
    if ph or pw:
        t = F.pad(t, (pw, pw, ph, ph), value=fill)
        top, left = top + ph, left + pw
    rows = top[:, None] + torch.arange(ch, device=t.device)  # (n, ch)
    cols = left[:, None] + torch.arange(cw, device=t.device)  # (n, cw)
    batch = torch.arange(n, device=t.device)[:, None, None]
    out = t.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (n, ch, cw, C)
    return out.permute(0, 3, 1, 2).contiguous()


def build_batch_augment(
    names: str | Sequence[str | Mapping[str, Any] | AugmentOp] | None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    image_size: int | Sequence[int] | None = None,
    *,
    train: bool = True,
    **opts: Any,
) -> BatchAugment:
    """Batch augmentation from ops, e.g. ["pad_crop", "hflip", "normalize"] or
    [{"pad_crop": {"padding": 2}}, "hflip", "normalize"].

    Ops run in the given order after the uint8 -> [0, 1] conversion (parameters per op, see
    OP_PARAMS): `random_resized_crop` (to image_size; scale, ratio), `pad_crop` (pad by
    `padding` pixels of value `fill`, random crop back to image_size: the CIFAR recipes),
    `random_scale` (scale each image by a factor drawn uniformly from scale_range; must be
    followed by `random_crop`), `random_crop` (a random image_size window, padded with fill /
    mask_fill where the image is smaller: with random_scale before it, paper 003's
    segmentation recipe), `hflip` (probability p), `normalize` ((x - mean) / std),
    `scale_pm1` (x * 2 - 1, i.e. pixel / 127.5 - 1: the BinaryNet recipe), `none`. image_size
    defaults to the size of the incoming batch. Keyword `opts` (padding, flip_p, scale, ratio,
    scale_range, fill, mask_fill) are defaults for every op with that parameter.
    `train=False` drops the random ops, leaving the evaluation transform (convert +
    normalize/scale).
    """
    ops = parse_augment(names, **{k: v for k, v in opts.items() if k != "mask_fill"})
    if not train:
        ops = [op for op in ops if op.name not in RANDOM_OPS]
    mask = {"mask_fill": opts["mask_fill"]} if "mask_fill" in opts else {}
    return BatchAugment(ops, mean=mean, std=std, image_size=image_size, **mask)
