"""Synthetic aerial building scenes (`synthetic_buildings`): the offline default for segmentation.

Each scene is textured ground (smoothed noise on a grass/soil colour), a few roads (long grey
bands), some trees (dark-green discs), and rectangular roofs of varied colour, optionally
rotated, with a two-tone (gable) shading; every roof casts a darker shadow offset towards one
side (the same sun direction for the whole scene). Two classes: 1 = roof pixels exactly
(shadows, trees and roads are background), 0 = everything else. Roofs cover 10-25% of a
scene, like the Massachusetts Buildings tiles.

Scene `i` of a split is a pure function of (seed, split, i, size): its numpy Generator is
seeded from those, so any item can be regenerated in any order, in any process. Generation
is vectorized numpy (a 250x250 scene takes a few milliseconds), so scenes are made on access;
`cache=True` keeps them in memory after the first access.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lightnets.data.base import check_split
from lightnets.data.registry import register_dataset
from lightnets.errors import UserError

SPLITS = ("train", "val", "test")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
#: Scenes per split when `length` is not given.
DEFAULT_LENGTHS = {"train": 200, "val": 50, "test": 50}
CLASSES = ["background", "building"]
#: Per-channel mean and std on the [0, 1] scale, measured on the 200 default training scenes
#: (seed 0, size 250); other seeds and sizes are within about 0.02 of these.
SYNTHETIC_MEAN = (0.4413, 0.4474, 0.3618)
SYNTHETIC_STD = (0.1521, 0.1222, 0.1332)

_GROUND = np.array(  # grass, dry grass, soil, dark park, pale lot
    [(88, 112, 70), (128, 124, 92), (140, 122, 100), (64, 88, 58), (150, 148, 128)],
    dtype=np.float32,
)
_ROOFS = np.array(  # dark, mid and light grey, red-brown, tan, white, blue-grey, green-grey
    [
        (70, 70, 76),
        (118, 118, 124),
        (172, 172, 168),
        (138, 82, 66),
        (166, 140, 110),
        (214, 214, 208),
        (96, 106, 122),
        (104, 116, 100),
    ],
    dtype=np.float32,
)
_TREE = np.array((52, 78, 44), dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) noise: `cells` x `cells` random values, bilinearly upsampled."""
    cells = max(2, int(cells))
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _box(cy: float, cx: float, h: float, w: float, angle: float, grow: float, size: int):
    """Box (y0, y1, x0, x1) around a rotated rectangle grown by `grow`, clipped to the scene."""
    c, s = abs(math.cos(angle)), abs(math.sin(angle))
    ey = (h / 2 + grow) * c + (w / 2 + grow) * s
    ex = (w / 2 + grow) * c + (h / 2 + grow) * s
    y0, y1 = max(0, int(math.floor(cy - ey))), min(size, int(math.ceil(cy + ey)) + 1)
    x0, x1 = max(0, int(math.floor(cx - ex))), min(size, int(math.ceil(cx + ex)) + 1)
    return y0, y1, x0, x1


def _rect_masks(box, cy: float, cx: float, h: float, w: float, angle: float, grow: float):
    """(inside, grown, half) over `box`: the rectangle rotated by `angle` around its center, the
    same grown by `grow` pixels on every side, and one side of its ridge (the center line
    along its longer side, where a gable roof folds)."""
    y0, y1, x0, x1 = box
    c, s = math.cos(angle), math.sin(angle)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + (0.5 - cy)
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + (0.5 - cx)
    u = dx * c + dy * s  # along the width
    v = dy * c - dx * s  # along the height
    half = v > 0 if w >= h else u > 0
    u, v = np.abs(u), np.abs(v)
    inside = (u < w / 2) & (v < h / 2)
    grown = (u < w / 2 + grow) & (v < h / 2 + grow)
    return inside, grown, half


def render_scene(
    rng: np.random.Generator, size: int = 250, layers: bool = False
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """One scene: (image uint8 (3, size, size), mask bool (size, size): True on roofs).

    With `layers=True` also a dict of bool maps "road", "tree" and "shadow" (pixels darkened
    by a shadow, roofs excluded), for tests and for looking at what was drawn.
    """
    s = size / 250.0  # every length below is in pixels of a 250x250 tile at ~1 m/px
    yy = np.arange(size, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(size, dtype=np.float32)[None, :] + 0.5

    # ground: one base colour, large and medium smoothed noise, a little pixel noise
    base = _GROUND[rng.integers(len(_GROUND))] + rng.uniform(-10, 10, 3).astype(np.float32)
    tex = 16.0 * _smooth_noise(rng, size, 6) + 8.0 * _smooth_noise(rng, size, 25)
    tex += rng.random((size, size), dtype=np.float32) * 12.0 - 6.0
    image = base[:, None, None] + tex[None] * np.array([1.0, 1.0, 0.85], np.float32)[:, None, None]

    # roads: long bands through the scene, mostly on a grid (near 0 or 90 degrees)
    road = np.zeros((size, size), dtype=bool)
    grid = float(rng.uniform(0, math.pi / 2)) if rng.random() < 0.3 else 0.0  # grid rotation
    road_angles = []
    for _ in range(int(rng.choice(4, p=[0.15, 0.35, 0.35, 0.15]))):
        angle = grid + (math.pi / 2) * rng.integers(2) + rng.normal(0, 0.05)
        py, px = rng.uniform(0, size, 2)
        width = rng.uniform(5, 12) * s
        band = np.abs((xx - px) * math.sin(angle) - (yy - py) * math.cos(angle)) < width / 2
        grey = rng.uniform(88, 138)
        image[:, band] = grey + rng.uniform(-5, 5, (1, int(band.sum()))).astype(np.float32)
        road |= band
        road_angles.append(angle)

    # roofs: rotated rectangles placed until they cover the drawn fraction (10-25%), away from
    # roads and from each other (the bounding box of the roof grown by 2 px must be free)
    target = rng.uniform(0.10, 0.25) * size * size
    tries = 400
    dims = rng.uniform(8, 30, (tries, 2)) * s
    centers = rng.uniform(-4, size + 4, (tries, 2))
    kinds = rng.random(tries)
    free_angles = rng.uniform(0, math.pi / 2, tries)
    picks = rng.integers(0, max(1, len(road_angles)), tries)
    shades = np.where(rng.random(tries) < 0.6, rng.uniform(0.8, 0.95, tries), 1.0)
    occupied = road.copy()
    roof_id = np.zeros((size, size), dtype=np.int16)
    tone = np.ones((size, size), dtype=np.float32)
    roofs: list[tuple[slice, slice, np.ndarray]] = []
    area, grow = 0, 2.0 * s
    for i in range(tries):
        if area >= target:
            break
        h, w = float(dims[i, 0]), float(dims[i, 1])
        cy, cx = float(centers[i, 0]), float(centers[i, 1])
        if road_angles and kinds[i] < 0.5:
            angle = road_angles[picks[i]]
        else:
            angle = grid if kinds[i] < 0.8 else float(free_angles[i])
        box = _box(cy, cx, h, w, angle, grow, size)
        y0, y1, x0, x1 = box
        if y0 >= y1 or x0 >= x1 or occupied[y0:y1, x0:x1].any():
            continue
        inside, grown, half = _rect_masks(box, cy, cx, h, w, angle, grow)
        if not inside.any():
            continue
        rows, cols = slice(y0, y1), slice(x0, x1)
        occupied[rows, cols] |= grown
        roof_id[rows, cols][inside] = len(roofs) + 1
        tone[rows, cols][inside & half] = shades[i]
        roofs.append((rows, cols, inside))
        area += int(inside.sum())
    mask = roof_id > 0

    # trees: dark-green discs on the ground (roofs cover them, they are background)
    tree = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(0, 14))):
        r = rng.uniform(2.5, 7) * s
        ty, tx = rng.uniform(0, size, 2)
        y0, y1 = max(0, int(ty - r)), min(size, int(ty + r) + 1)
        x0, x1 = max(0, int(tx - r)), min(size, int(tx + r) + 1)
        if y0 < y1 and x0 < x1:
            tree[y0:y1, x0:x1] |= (yy[y0:y1] - ty) ** 2 + (xx[:, x0:x1] - tx) ** 2 < r * r
    if tree.any():
        noise = rng.uniform(-10, 10, (1, int(tree.sum()))).astype(np.float32)
        image[:, tree] = _TREE[:, None] + noise

    # shadows: each roof moved away from the sun (one direction per scene) by its height
    # darkens what is below; roofs are painted afterwards, so no roof pixel is in shadow
    sun = int(rng.integers(4))
    sy, sx = (1, 1, -1, -1)[sun], (1, -1, 1, -1)[sun]
    lengths = np.maximum(1, np.rint(rng.uniform(2, 6, len(roofs)) * s)).astype(int)
    shadow = np.zeros((size, size), dtype=bool)
    for (rows, cols, inside), length in zip(roofs, lengths.tolist()):
        dy, dx = sy * length, sx * length
        y0, y1, x0, x1 = rows.start + dy, rows.stop + dy, cols.start + dx, cols.stop + dx
        cy0, cy1, cx0, cx1 = max(0, y0), min(size, y1), max(0, x0), min(size, x1)
        if cy0 < cy1 and cx0 < cx1:
            shadow[cy0:cy1, cx0:cx1] |= inside[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    shadow &= ~mask
    image[:, shadow] *= 0.5

    # roofs: a colour each (palette + jitter), two-tone for gable roofs, slight noise
    colours = _ROOFS[rng.integers(len(_ROOFS), size=len(roofs) + 1)]
    colours += rng.uniform(-12, 12, colours.shape).astype(np.float32)
    ids = roof_id[mask]
    noise = rng.uniform(-3, 3, ids.shape).astype(np.float32)
    image[:, mask] = colours[ids].T * tone[mask] + noise

    out = np.clip(image, 0, 255, out=image).astype(np.uint8)
    if layers:
        return out, mask, {"road": road & ~mask, "tree": tree & ~mask, "shadow": shadow}
    return out, mask


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The Generator of scene `index` of `split`: seeded from (seed, split, index) only."""
    return np.random.default_rng([int(seed), _SPLIT_CODES[split], int(index)])


class SyntheticBuildings(Dataset):
    """`length` generated scenes of one split: items (image uint8 (3, H, W), mask int64 (H, W))."""

    num_classes = 2
    in_chans = 3
    targets = None  # segmentation: no per-image label

    def __init__(
        self, split: str, size: int = 250, length: int | None = None, seed: int = 0, cache=False
    ) -> None:
        self.split = split
        self.size = int(size)
        self.length = DEFAULT_LENGTHS[split] if length is None else int(length)
        self.seed = int(seed)
        self.cache = bool(cache)
        self._items: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.classes = list(CLASSES)
        self.mean, self.std = SYNTHETIC_MEAN, SYNTHETIC_STD
        self.image_size = (self.size, self.size)

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (3, H, W), mask bool (H, W)) of item `index`."""
        return render_scene(scene_rng(self.seed, self.split, index), self.size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(index)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} scenes")
        if index in self._items:
            image, mask = self._items[index]
            return image, mask.long()
        image, mask = self.scene(index)
        x = torch.from_numpy(image)
        m = torch.from_numpy(mask.view(np.uint8))
        if self.cache:
            self._items[index] = (x, m)
        return x, m.long()

    def __repr__(self) -> str:
        return (
            f"SyntheticBuildings(split={self.split!r}: {self.length} x 3x{self.size}x{self.size}, "
            f"seed={self.seed}, 2 classes)"
        )


@register_dataset("synthetic_buildings", info={"num_classes": 2, "in_chans": 3})
def synthetic_buildings(
    root: str | None = None,
    split: str = "train",
    size: int = 250,
    length: int | None = None,
    seed: int = 0,
    cache: bool = False,
) -> SyntheticBuildings:
    """Generated building scenes (no files): splits train/val/test of 200/50/50 scenes of
    `size` x `size` by default (`length` sets the split's count), deterministic in `seed`."""
    if root is not None:
        raise UserError(
            f"dataset 'synthetic_buildings' is generated and reads no files, but root={root!r} "
            "was given: expected no root (use dataset 'buildings' for the real tiles)"
        )
    if split == "valid":
        split = "val"
    check_split("synthetic_buildings", split, SPLITS)
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise UserError(f"dataset 'synthetic_buildings': size={size!r}: expected an int >= 16")
    if length is not None and (
        isinstance(length, bool) or not isinstance(length, int) or length < 1
    ):
        raise UserError(
            f"dataset 'synthetic_buildings': length={length!r}: expected a positive int"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"dataset 'synthetic_buildings': seed={seed!r}: expected an int >= 0")
    return SyntheticBuildings(split, size=size, length=length, seed=seed, cache=bool(cache))
