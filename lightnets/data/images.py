"""Reading image files as 8-bit pixels: one policy for every reader of lightnets (the folder
dataset, the building tiles, `lightnets data tile`, `lightnets predict`).

- 8-bit images (modes 1, L, LA, P, RGB, RGBA, CMYK, YCbCr, ...) are converted as Pillow does.
- 16-bit and 32-bit images (modes I;16*, I, F: 16-bit PNGs and TIFFs, 12-bit-in-16 aerial
  tiles) are refused with one line saying how to convert them. Pillow's convert() clips such
  values to 255 instead of rescaling them, so a 4000-valued tile would load all white and
  then be dropped as no-data: silently wrong. No rescaling rule is right for every sensor (full
  16-bit range, 12 bits, per-band stretches), so the conversion is the user's, made once.
- An image over the pixel limit is one line naming the limit. With `max_pixels` (`lightnets
  predict --max-pixels`) the limit is exact: more pixels than that are refused. Without it,
  Pillow's decompression-bomb guard applies as Pillow has it: images over twice
  `Image.MAX_IMAGE_PIXELS` (2 x 89,478,485 by default) are refused (Pillow only warns between
  once and twice it).
- Any other failure to decode is one line naming the file.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lightnets.errors import UserError

__all__ = ["HIGH_DEPTH_MODES", "is_high_depth", "open_image", "pixel_limit"]

#: Pillow modes with more than 8 bits a channel
HIGH_DEPTH_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N", "I;32", "I;32L", "I;32B")


def is_high_depth(mode: str) -> bool:
    return mode in HIGH_DEPTH_MODES or mode.startswith(("I;16", "I;32"))


@contextlib.contextmanager
def pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Pillow's decompression-bomb limit raised to `max_pixels` for the block (None: keep)."""
    saved = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def open_image(
    path: str | Path, mode: str = "RGB", what: str = "image", max_pixels: int | None = None
) -> Image.Image:
    """The decoded image at `path`, converted to 8-bit `mode` (RGB, L, ...), or one UserError
    (see the module docstring). `what` names the file's role in messages."""
    path = Path(path)
    try:
        with pixel_limit(max_pixels), warnings.catch_warnings():
            if max_pixels is not None:  # the exact check below replaces Pillow's warning
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                pixels = img.width * img.height
                if max_pixels is not None and pixels > max_pixels:
                    raise UserError(
                        f"{what} {path} has {img.width} x {img.height} = {pixels:,} pixels, "
                        f"more than the limit of {max_pixels:,}: expected a smaller image, or a "
                        "higher limit (--max-pixels N) if you trust the file"
                    )
                if is_high_depth(img.mode):
                    raise UserError(
                        f"{what} {path} has {img.mode!r} pixels (more than 8 bits a channel), "
                        "which would be clipped at 255: expected an 8-bit image; convert it "
                        "first with the scaling your sensor needs (e.g. value * 255 / 4095 for "
                        "12-bit data)"
                    )
                img.load()
                return img.convert(mode)
    except UserError:
        raise
    except Image.DecompressionBombError as err:
        if max_pixels is not None:  # Pillow's own check, at twice the limit: before ours
            over = f"more than the limit of {max_pixels:,} (over twice it)"
        else:
            over = (
                f"more than Pillow's decompression-bomb limit: it refuses images over 2 x "
                f"Image.MAX_IMAGE_PIXELS = {2 * Image.MAX_IMAGE_PIXELS:,} pixels ({err})"
            )
        raise UserError(
            f"{what} {path} has {over}: expected a smaller image, or a higher limit "
            "(--max-pixels N) if you trust the file"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(
            f"cannot read {what} {path} ({type(err).__name__}: {str(err)[:160]}): expected an "
            "image file Pillow reads (PNG, JPEG, TIFF, ...)"
        ) from None
