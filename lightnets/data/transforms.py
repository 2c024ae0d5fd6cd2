"""Per-sample transforms for datasets whose images differ in size (image folders).

They turn a decoded PIL image into a fixed-size uint8 (C, H, W) tensor so samples can be
batched; everything else (flips, normalization) happens on whole batches on the device.
Implemented with Pillow and torch because torchvision is not available here; the semantics
follow torchvision's (PyTorch ImageNet example): bilinear, antialiased resizing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from lightnets.errors import UserError


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 (C, H, W) tensor of a PIL image (RGB gives C=3, L gives C=1)."""
    arr = np.array(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _pair(size: int | tuple[int, int] | list[int], what: str) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise UserError(f"{what}={size!r}: expected a positive int or (height, width)")
    return size  # type: ignore[return-value]


class RandomResizedCrop:
    """Crop a random area fraction `scale` with aspect ratio in `ratio`, resize to `size`.

    Same sampling as torchvision's RandomResizedCrop: 10 tries of (area, log-uniform aspect),
    then a center crop clamped to the ratio range. Random numbers come from `generator`, or
    from torch's global RNG when None (seeded per DataLoader worker by torch).
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        generator: torch.Generator | None = None,
    ) -> None:
        self.size = _pair(size, "size")
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise UserError(
                f"RandomResizedCrop scale={scale!r} ratio={ratio!r}: expected 0 < min <= max "
                "(scale at most 1)"
            )
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.generator = generator

    def params(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop box."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        g = self.generator
        for _ in range(10):
            target = area * torch.empty(1).uniform_(*self.scale, generator=g).item()
            aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=g).item())
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=g).item())
                left = int(torch.randint(0, width - w + 1, (1,), generator=g).item())
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image) -> torch.Tensor:
        top, left, h, w = self.params(*img.size)
        box = (left, top, left + w, top + h)
        out = img.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR, box=box)
        return pil_to_tensor(out)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class ResizeCenterCrop:
    """Resize the shorter side to `resize` (keeping the aspect ratio), then center-crop `crop`.

    The standard ImageNet evaluation transform (256 -> 224).
    """

    def __init__(self, resize: int = 256, crop: int | tuple[int, int] = 224) -> None:
        self.resize = int(resize)
        self.size = _pair(crop, "crop")
        if max(self.size) > self.resize:
            raise UserError(
                f"ResizeCenterCrop(resize={resize}, crop={crop}): expected crop <= resize"
            )

    def __call__(self, img: Image.Image) -> torch.Tensor:
        width, height = img.size
        if width <= height:
            new_w, new_h = self.resize, int(self.resize * height / width)
        else:
            new_w, new_h = int(self.resize * width / height), self.resize
        if (new_w, new_h) != (width, height):
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        ch, cw = self.size
        top = int(round((new_h - ch) / 2.0))
        left = int(round((new_w - cw) / 2.0))
        return pil_to_tensor(img.crop((left, top, left + cw, top + ch)))

    def __repr__(self) -> str:
        return f"ResizeCenterCrop(resize={self.resize}, crop={self.size})"
