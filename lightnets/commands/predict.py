"""`lightnets predict CHECKPOINT IMAGE`: a segmentation run's building mask for one image.

The model is rebuilt from the checkpoint (a .pt file or a run dir: last.pt, best.pt with
--best); it must come from a segmentation run (train.task = "segmentation"). The image is read
with Pillow (any size, any mode Pillow reads; converted to RGB, or to L for a one-channel
model) and transformed as the run evaluated: uint8 -> [0, 1], then the run's eval_augment
(normalize with the run's dataset mean / std; `--mean` / `--std` replace them, e.g. when the
run's dataset is no longer on disk).

Sliding-window inference (`sliding_window_logits`): windows of `--tile` pixels (default: the
run's training crop, data.image_size, else 250) with `--overlap` pixels shared between
neighbours (default tile / 4); the last window of a row / column is aligned to the image's
edge, logits of overlapping windows are averaged. When the image is larger than the tile in a
dimension, it is first padded by reflection with overlap / 2 pixels on both sides of that
dimension, so edge pixels get context like seam pixels do (the padding is cut off afterwards).
A dimension that fits in one window is neither tiled nor padded: an image no larger than the
tile is one forward pass of the whole image.

Writes `OUT_mask.png` (8-bit: 255 where the predicted class is 1 = building, 0 elsewhere) and
`OUT_overlay.png` (the image with building pixels tinted cyan, outlined in yellow), OUT
defaulting to the image's path without its suffix, each atomically (a failed write, a full
disk, is one line and leaves no half file); existing outputs are refused without --overwrite.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from lightnets.commands import load_checkpoint_model, resolve_checkpoint_path
from lightnets.data import build_batch_augment, load_dataset
from lightnets.data.images import open_image
from lightnets.engine.config import load_config
from lightnets.engine.datasets import dataset_attr
from lightnets.errors import UserError
from lightnets.files import atomic_path, storage_errors

__all__ = [
    "add_predict_arguments",
    "overlay",
    "predict_command",
    "sliding_window_logits",
    "sliding_window_mask",
    "window_starts",
]

DEFAULT_TILE = 250
OVERLAY_ALPHA = 0.45
#: the overlay's building tint and outline: cyan and yellow stand apart from red / brown roofs,
#: green vegetation and grey roads (the synthetic scenes' roofs are red)
OVERLAY_FILL = (0, 200, 255)
OVERLAY_EDGE = (255, 255, 0)
#: rows of the overlay blended at a time (bounded memory on large scenes)
OVERLAY_ROWS = 1024


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `lightnets predict`."""
    p.add_argument("checkpoint", type=Path, help="a .pt checkpoint or a run dir (uses last.pt)")
    p.add_argument("image", type=Path, help="an image Pillow can read (PNG, TIFF, JPEG, ...)")
    p.add_argument(
        "--out",
        type=Path,
        help="output prefix: writes OUT_mask.png and OUT_overlay.png (default: the image's "
        "path without its suffix)",
    )
    p.add_argument("--best", action="store_true", help="with a run dir: use best.pt")
    p.add_argument(
        "--tile", type=int, help="window size in pixels (default: the run's crop, else 250)"
    )
    p.add_argument(
        "--overlap", type=int, help="pixels shared by neighbouring windows (default tile / 4)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--mean", help="per-channel mean on the [0, 1] scale, e.g. 0.44,0.45,0.36")
    p.add_argument("--std", help="per-channel std on the [0, 1] scale")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument(
        "--quiet", action="store_true", help="no progress bar (shown for scenes of many windows)"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        help="read images of up to this many pixels, refuse larger ones (default: Pillow's "
        "decompression-bomb guard, which refuses images over 2 x 89,478,485 pixels); raise it "
        "for a large scene you trust",
    )


# ----------------------------------------------------------------------------- sliding window
def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of `window` covering 0..size, `stride` apart, the last one
    aligned to the end (window <= size)."""
    if window >= size:
        return [0]
    starts = list(range(0, size - window, stride))
    starts.append(size - window)
    return sorted(set(starts))


def _pad_for(size: int, tile: int, overlap: int) -> int:
    return min(overlap // 2, size - 1) if size > tile else 0


@torch.no_grad()
def sliding_window_logits(
    model: nn.Module,
    x: torch.Tensor,
    tile: int | Sequence[int],
    overlap: int = 0,
    batch_size: int = 8,
) -> torch.Tensor:
    """Logits (1, K, H, W) of `model` for one normalized image `x` (1, C, H, W), by windows of
    `tile` (an int or (h, w)) overlapping by `overlap` pixels, averaged where they overlap
    (see the module docstring for the reflection padding at the edges)."""
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image (1, C, H, W), got shape {tuple(x.shape)}")
    th, tw = (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))
    h, w = x.shape[-2:]
    ph, pw = _pad_for(h, th, overlap), _pad_for(w, tw, overlap)
    if ph or pw:
        x = torch.nn.functional.pad(x, (pw, pw, ph, ph), mode="reflect")
    hh, ww = x.shape[-2:]
    wh, wwid = min(th, hh), min(tw, ww)
    ys = window_starts(hh, wh, max(1, wh - overlap))
    xs = window_starts(ww, wwid, max(1, wwid - overlap))
    boxes = [(y, xx) for y in ys for xx in xs]
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, hh, ww, dtype=x.dtype, device=x.device)
    for i in range(0, len(boxes), max(1, batch_size)):
        chunk = boxes[i : i + batch_size]
        batch = torch.cat([x[..., y : y + wh, xx : xx + wwid] for y, xx in chunk])
        out = model(batch).float()
        if total is None:
            total = torch.zeros(1, out.shape[1], hh, ww, dtype=out.dtype, device=x.device)
        for (y, xx), logits in zip(chunk, out):
            total[0, :, y : y + wh, xx : xx + wwid] += logits
            count[..., y : y + wh, xx : xx + wwid] += 1
    assert total is not None
    logits = total / count
    return logits[..., ph : ph + h, pw : pw + w]


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Source indices of reflection-padded positions (torch's "reflect": no edge repeat)."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index.remainder(period)
    return torch.where(index < size, index, period - index)


@torch.no_grad()
def sliding_window_mask(
    model: nn.Module,
    image: torch.Tensor,
    transform: nn.Module,
    tile: int | Sequence[int],
    overlap: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """The predicted class (H, W) uint8 of one uint8 image (1, C, H, W): the argmax of
    `sliding_window_logits(model, transform(image), ...)`, computed in bounded memory.

    Windows are cut from the uint8 image and transformed a batch at a time (the whole image is
    never converted to float; the transform runs where its own buffers are, e.g. the CPU, and
    its output moves to the model's device), and the averaged logits live in a band of
    window-height rows:
    once the windows of a row start below a pixel row, no later window covers it, so it is
    final and goes into the mask. Memory: the image, the mask, a band of K x (tile + stride) x W
    logits and one batch of windows, whatever the scene's size. `progress` shows a bar over the
    rows of windows (stderr).
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image (1, C, H, W), got shape {tuple(image.shape)}")
    th, tw = (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))
    h, w = image.shape[-2:]
    ph, pw = _pad_for(h, th, overlap), _pad_for(w, tw, overlap)
    hh, ww = h + 2 * ph, w + 2 * pw
    wh, wwid = min(th, hh), min(tw, ww)
    ys = window_starts(hh, wh, max(1, wh - overlap))
    xs = window_starts(ww, wwid, max(1, wwid - overlap))
    cols = {x0: _reflect(torch.arange(x0 - pw, x0 - pw + wwid), w) for x0 in xs}
    model_device, transform_device = _device_of(model), _device_of(transform)
    mask = torch.zeros(h, w, dtype=torch.uint8)
    band_top, band = 0, None  # logits sum and count of padded rows band_top..
    count = None
    bar = tqdm(
        total=len(ys),
        desc="predict",
        unit="row",
        disable=not progress,
        file=sys.stderr,
        leave=False,
    )

    def flush(until: int) -> None:
        """Rows band_top..until-1 (padded coordinates) are final: into the mask."""
        nonlocal band_top, band, count
        n = until - band_top
        if n <= 0 or band is None:
            return
        rows = torch.arange(band_top, until)
        keep = (rows >= ph) & (rows < ph + h)
        if keep.any():
            pred = (band[:, :n] / count[:n]).argmax(0)[:, pw : pw + w].to(torch.uint8)
            mask[rows[keep] - ph] = pred[keep]
        band, count = band[:, n:], count[n:]
        band_top = until

    for y0 in ys:
        flush(y0)
        rows = _reflect(torch.arange(y0 - ph, y0 - ph + wh), h)
        strip = image[:, :, rows]  # (1, C, wh, W) uint8
        needed = y0 + wh - band_top
        for i in range(0, len(xs), max(1, batch_size)):
            chunk = xs[i : i + batch_size]
            crops = torch.cat([strip[..., cols[x0]] for x0 in chunk])
            crops = transform(crops.to(transform_device)).to(model_device)
            out = model(crops).float().cpu()
            if band is None:
                band = torch.zeros(out.shape[1], 0, ww)
                count = torch.zeros(0, ww)
            if band.shape[1] < needed:  # grow the band downwards to this row of windows
                grow = needed - band.shape[1]
                band = torch.cat([band, band.new_zeros(band.shape[0], grow, ww)], 1)
                count = torch.cat([count, count.new_zeros(grow, ww)], 0)
            top = y0 - band_top
            for x0, logits in zip(chunk, out):
                band[:, top : top + wh, x0 : x0 + wwid] += logits
                count[top : top + wh, x0 : x0 + wwid] += 1
        bar.update(1)
    flush(hh)
    bar.close()
    return mask


def _device_of(module: nn.Module) -> torch.device:
    """Where a module computes: its first parameter's or buffer's device (the CPU when it
    holds none)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def overlay(rgb: np.ndarray, building: np.ndarray) -> np.ndarray:
    """The image (H, W, 3) uint8 with building pixels tinted cyan and their outline (building
    pixels with a background 4-neighbour) in yellow; blended a band of rows at a time."""
    out = np.array(rgb, dtype=np.uint8, copy=True)
    fill = np.array(OVERLAY_FILL, dtype=np.float32)
    h = building.shape[0]
    for top in range(0, h, OVERLAY_ROWS):
        bottom = min(h, top + OVERLAY_ROWS)
        halo = building[max(0, top - 1) : min(h, bottom + 1)]
        padded = np.pad(halo, 1, mode="edge")
        inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])[
            (top > 0) : (top > 0) + (bottom - top)
        ]
        mask = building[top:bottom]
        band = out[top:bottom].astype(np.float32)
        band[mask] = (1 - OVERLAY_ALPHA) * band[mask] + OVERLAY_ALPHA * fill
        band[mask & ~inner] = OVERLAY_EDGE
        out[top:bottom] = band.round().clip(0, 255).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------- command
def _floats(text: str | None, option: str, channels: int) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * channels
    if len(values) != channels or not all(math.isfinite(v) for v in values):
        raise UserError(
            f"{option} {text!r}: expected {channels} comma-separated numbers on the [0, 1] scale"
        )
    return values


def _pixels(image) -> torch.Tensor:
    """The (H, W, C) uint8 pixels of a PIL image as a tensor, one copy of the image (numpy's
    view of Pillow's bytes, read-only: the tensor is only read, never written)."""
    array = np.asarray(image)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        data = torch.from_numpy(array)
    return data if data.ndim == 3 else data[..., None]


def _read_image(
    path: Path, channels: int, max_pixels: int | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """(uint8 tensor (1, C, H, W), the (H, W, 3) uint8 RGB pixels for the overlay); the
    reading policy of `lightnets.data.images` (16-bit refused, not clipped; a bomb-sized image
    is one line). For an RGB model both share one copy of the image's pixels."""

    if not path.is_file():
        raise UserError(f"image {path} does not exist: expected an image file")
    if channels not in (1, 3):
        raise UserError(f"the model takes {channels} input channels: expected 1 or 3")
    image = open_image(path, "RGB", max_pixels=max_pixels)
    rgb = _pixels(image)
    x = rgb if channels == 3 else _pixels(image.convert("L"))
    return x.permute(2, 0, 1).unsqueeze(0), rgb.numpy()


def _run_normalization(config, args, channels: int, where: str):
    """(mean, std) from --mean/--std, else the run's dataset (opened, not downloaded)."""
    mean = _floats(args.mean, "--mean", channels)
    std = _floats(args.std, "--std", channels)
    if std is not None and any(v <= 0 for v in std):
        raise UserError(f"--std {args.std!r}: expected positive numbers")
    needs = any(op == "normalize" for op in config.data.eval_augment)
    if not needs or (mean is not None and std is not None):
        return mean, std

    try:
        dataset = load_dataset(
            config.data.name,
            root=config.data.root,
            split=config.data.val_split or config.data.train_split,
            **config.data.args,
        )
    except Exception as err:  # moved / missing data: the user can give the statistics
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot read the normalization of {where}: its dataset {config.data.name!r} "
            f"could not be opened ({first[:160]}); pass --mean and --std"
        ) from None
    mean = mean or dataset_attr(dataset, "mean", None)
    std = std or dataset_attr(dataset, "std", None)
    return mean, std


def _outputs(args) -> tuple[Path, Path]:
    prefix = args.out if args.out is not None else args.image.with_suffix("")
    mask, overlay = Path(f"{prefix}_mask.png"), Path(f"{prefix}_overlay.png")
    existing = [str(p) for p in (mask, overlay) if p.exists()]
    if existing and not args.overwrite:
        raise UserError(
            f"{' and '.join(existing)} already exist(s): pass --overwrite to replace, or --out"
        )
    mask.parent.mkdir(parents=True, exist_ok=True)
    return mask, overlay


def _save_png(image, path: Path) -> None:
    """Write `image` as PNG atomically: a killed or failed write (a full disk: one
    StorageError) leaves no half file and the previous one, if any, as it was."""

    with storage_errors(path), atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def predict_command(args: argparse.Namespace) -> int:
    """Run `lightnets predict`; returns the exit code."""
    for option in ("tile", "batch_size", "max_pixels"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UserError(f"--{option.replace('_', '-')} {value}: expected at least 1")
    ckpt_path = resolve_checkpoint_path(args.checkpoint, args.best)
    if not args.image.is_file():  # before loading the model: the cheap error first
        raise UserError(f"image {args.image} does not exist: expected an image file")
    model, ckpt = load_checkpoint_model(ckpt_path)
    where = str(ckpt.get("path", ckpt_path))
    if not isinstance(ckpt.get("config"), dict):
        raise UserError(
            f"checkpoint {where} holds no run config: expected one of `lightnets train`"
        )
    config = load_config(ckpt["config"])
    if config.train.task != "segmentation":
        raise UserError(
            f"checkpoint {where} is from a {config.train.task} run (model "
            f"{ckpt.get('model_name')!r}): expected a segmentation run, e.g. of recipe "
            "res_unet_synthetic or res_unet_buildings"
        )
    channels = int((ckpt.get("model_args") or {}).get("in_chans") or 3)
    size = config.data.image_size
    if args.tile is not None:
        tile: int | tuple[int, int] = args.tile
    elif size:
        tile = (int(size[0]), int(size[-1])) if not isinstance(size, int) else int(size)
    else:
        tile = DEFAULT_TILE
    smallest = tile if isinstance(tile, int) else min(tile)
    overlap = args.overlap if args.overlap is not None else smallest // 4
    if not 0 <= overlap < smallest:
        raise UserError(f"--overlap {overlap}: expected 0 <= overlap < the tile ({smallest})")
    mask_path, overlay_path = _outputs(args)
    x, rgb = _read_image(args.image, channels, args.max_pixels)
    mean, std = _run_normalization(config, args, channels, where)
    transform = build_batch_augment(config.data.eval_augment, mean=mean, std=std, train=False)
    model.eval()
    large = x.shape[-2] * x.shape[-1] > 4 * (tile if isinstance(tile, int) else math.prod(tile))
    pred = sliding_window_mask(
        model, x, transform, tile, overlap, args.batch_size, progress=large and not args.quiet
    )
    building = (pred == 1).numpy()
    _save_png(Image.fromarray(building.astype(np.uint8) * 255, mode="L"), mask_path)
    _save_png(Image.fromarray(overlay(rgb, building), mode="RGB"), overlay_path)
    print(
        json.dumps(
            {
                "checkpoint": where,
                "image": str(args.image),
                "size": [int(x.shape[-2]), int(x.shape[-1])],
                "tile": list(tile) if isinstance(tile, tuple) else tile,
                "overlap": overlap,
                "building_fraction": float(building.mean()),
                "mask": str(mask_path),
                "overlay": str(overlay_path),
            }
        )
    )
    return 0
