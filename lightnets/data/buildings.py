"""Massachusetts Buildings (`buildings`): the aerial tiles of paper 003, and their 250x250 tiles.

The dataset (151 RGB images of 1500x1500 px: 137 train / 4 val / 10 test) is distributed in
two common layouts, both read here; images are matched to labels by file name without
extension (stem):

- `{train,val,test}/<name>.tiff` with the labels in `{train,val,test}_labels/<name>.tif`
  (the same layout under `root/tiff/` is found too);
- `{train,valid,test}/sat/<name>.tiff` with the labels in `{train,valid,test}/map/<name>.tif`.

Labels are 3-channel images, building = 255 and background = 0; a pixel is *building* where
the label's first channel is > 127 (single-channel labels are read the same way), so the mask
is 1 = building, 0 = background. A label whose largest value is 1-127 (a 0/1 label, say) is
refused rather than read as all background.

`lightnets data tile ROOT OUT` (`tile_buildings`) cuts every image into 250x250 tiles (36
per 1500x1500 image) cached as PNG in `OUT/{train,val,test}/{images,masks}/<name>_rNN_cNN.png`
with a `manifest.json`; `buildings` with root=OUT reads them the same way. Images are decoded
on access (one item at a time), never all at once.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from lightnets.data.folder import IMAGENET_MEAN, IMAGENET_STD
from lightnets.data.images import open_image
from lightnets.data.registry import register_dataset, require_root
from lightnets.errors import UserError

SPLITS = ("train", "val", "test")
#: Folder names each split may have in the raw layouts ("valid" in the sat/map layout).
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid"), "test": ("test",)}
IMAGE_SUFFIXES = (".tiff", ".tif", ".png")
LABEL_SUFFIXES = (".tif", ".tiff", ".png")
CLASSES = ["background", "building"]
MANIFEST = "manifest.json"
TILE_FORMAT = "lightnets-buildings-tiles"
TILE_VERSION = 1
_EXPECTED_ROOT = (
    "a Massachusetts Buildings directory with {train,val,test} + {train,val,test}_labels "
    "folders, {train,valid,test}/{sat,map} folders, or the output of `lightnets data tile`"
)
_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class SplitFiles:
    """The matched files of one split: layout name, folders, and (stem, image, label) pairs."""

    layout: str  # "labels" ({split} + {split}_labels), "sat_map", or "tiles"
    image_dir: Path
    label_dir: Path
    pairs: tuple[tuple[str, Path, Path], ...]


# ---------------------------------------------------------------------------- finding files
def find_split(root: Path, split: str) -> SplitFiles | None:
    """The files of `split` under `root` in whichever layout is there (None if none is)."""
    bases = [root]
    if (root / "tiff").is_dir():
        bases.append(root / "tiff")  # e.g. the Kaggle copy: tiff/{train,val,test}{,_labels}
    if (root / split / "images").is_dir() and (root / split / "masks").is_dir():
        images, labels = root / split / "images", root / split / "masks"
        return SplitFiles("tiles", images, labels, _pair_files(images, labels, (".png",)))
    for base in bases:
        for folder in SPLIT_FOLDERS[split]:
            for layout, images, labels in (
                ("sat_map", base / folder / "sat", base / folder / "map"),
                ("labels", base / folder, base / f"{folder}_labels"),
            ):
                if layout == "labels" and not labels.is_dir():
                    continue  # a bare split folder could be anything: the labels folder decides
                if images.is_dir() or labels.is_dir():
                    _need_both(images, labels, layout)
                    return SplitFiles(layout, images, labels, _pair_files(images, labels))
    return None


def _need_both(images: Path, labels: Path, layout: str) -> None:
    for missing, other in ((images, labels), (labels, images)):
        if not missing.is_dir():
            what = (
                "{split}/sat + {split}/map" if layout == "sat_map" else "{split} + {split}_labels"
            )
            raise UserError(
                f"{other} exists but {missing} does not: expected both the image and the label "
                f"folder of the {what} layout"
            )


def _stems(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.name.startswith(".") or path.suffix.lower() not in suffixes:
            continue
        if not entry.is_file():
            continue
        if path.stem in found:
            raise UserError(
                f"two files named {path.stem!r} in {folder}: {found[path.stem].name} and "
                f"{path.name}: expected one file per name"
            )
        found[path.stem] = path
    return found


def _pair_files(
    image_dir: Path,
    label_dir: Path,
    suffixes: Sequence[str] | None = None,
) -> tuple[tuple[str, Path, Path], ...]:
    images = _stems(image_dir, suffixes or IMAGE_SUFFIXES)
    labels = _stems(label_dir, suffixes or LABEL_SUFFIXES)
    if not images:
        raise UserError(
            f"no images in {image_dir}: expected files ending in "
            f"{', '.join(suffixes or IMAGE_SUFFIXES)}"
        )
    for stem, path in images.items():
        if stem not in labels:
            extra = len(set(images) - set(labels)) - 1
            more = f" (and {extra} more images without labels)" if extra > 0 else ""
            raise UserError(
                f"image {path} has no label: expected {label_dir / stem}"
                f"{(suffixes or LABEL_SUFFIXES)[0]} (labels are matched to images by file "
                f"name without extension){more}"
            )
    for stem, path in labels.items():
        if stem not in images:
            raise UserError(
                f"label {path} has no image: expected {image_dir / stem}"
                f"{(suffixes or IMAGE_SUFFIXES)[0]} (labels are matched to images by file "
                "name without extension)"
            )
    return tuple((stem, images[stem], labels[stem]) for stem in sorted(images))


def _split_name(split: Any) -> str:
    if split == "valid":
        return "val"
    if split not in SPLITS:
        raise UserError(
            f"dataset 'buildings' has no split {split!r}: expected one of {', '.join(SPLITS)}"
        )
    return split


# ---------------------------------------------------------------------------- reading files
def image_size_of(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except _READ_ERRORS as e:
        raise UserError(f"cannot read image {path} ({e}): expected a readable image file") from None
    return height, width


def read_image(path: Path) -> np.ndarray:
    """RGB pixels uint8 (H, W, 3) of an image file (16-bit tiles are refused, not clipped:
    `lightnets.data.images`)."""
    return np.asarray(open_image(path, "RGB"), dtype=np.uint8)


def read_label(path: Path) -> np.ndarray:
    """Building mask bool (H, W) of a label file: its first channel > 127."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "RGBX"):
                raise UserError(
                    f"label {path} has mode {img.mode}: expected an 8-bit label image "
                    "(building = 255, background = 0)"
                )
            first = np.asarray(img.convert("RGB"), dtype=np.uint8)[:, :, 0]
    except UserError:
        raise
    except _READ_ERRORS as e:
        raise UserError(f"cannot read label {path} ({e}): expected a readable image file") from None
    top = int(first.max()) if first.size else 0
    if 0 < top <= 127:
        raise UserError(
            f"label {path} has values 0-{top}: expected building = 255 and background = 0 "
            "(a pixel is building where the first channel is > 127)"
        )
    return first > 127


def _check_sizes(image: Path, label: Path, image_hw, label_hw) -> None:
    if tuple(image_hw) != tuple(label_hw):
        raise UserError(
            f"image {image} is {image_hw[1]}x{image_hw[0]} but its label {label} is "
            f"{label_hw[1]}x{label_hw[0]} (width x height): expected the same size"
        )


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The tile cache's manifest.json (None if there is none)."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot read {path} ({e}): expected the JSON `lightnets data tile` writes"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != TILE_FORMAT:
        raise UserError(f"{path} is not a tile manifest: expected format {TILE_FORMAT!r}")
    return manifest


# ---------------------------------------------------------------------------- the dataset
class BuildingsDataset(Dataset):
    """Image/label pairs read on access: items (image uint8 (3, H, W), mask int64 (H, W)).

    The mask is 1 where the label is building, 0 elsewhere. `image_size` is the size all
    images share (None when they differ; batching then needs a batch size of 1).
    """

    num_classes = 2
    in_chans = 3
    targets = None  # segmentation: no per-image label

    def __init__(
        self,
        files: SplitFiles,
        split: str,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.files = files
        self.split = split
        self.layout = files.layout
        self.samples = [(image, label) for _, image, label in files.pairs]
        self.classes = list(CLASSES)
        self.mean, self.std = tuple(mean), tuple(std)
        sizes = set()
        for image, label in self.samples:  # headers only: cheap, and catches bad files early
            image_hw, label_hw = image_size_of(image), image_size_of(label)
            _check_sizes(image, label, image_hw, label_hw)
            sizes.add(image_hw)
        self.image_size = sizes.pop() if len(sizes) == 1 else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.samples[index]
        image, mask = read_image(image_path), read_label(label_path)
        _check_sizes(image_path, label_path, image.shape[:2], mask.shape)
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return x, torch.from_numpy(mask.astype(np.int64))

    def __repr__(self) -> str:
        size = "x".join(map(str, self.image_size)) if self.image_size else "mixed sizes"
        return (
            f"BuildingsDataset({self.split}: {len(self)} images ({size}) from "
            f"{self.files.image_dir}, layout {self.layout!r})"
        )


@register_dataset("buildings", info={"num_classes": 2, "in_chans": 3})
def buildings(root: str | None = None, split: str = "train") -> BuildingsDataset:
    """Massachusetts Buildings from `root` (either raw layout, or a `lightnets data tile`
    output); split train, val (folder `val` or `valid`) or test.

    mean/std: a tile cache's manifest holds the per-channel statistics of its training tiles,
    used when present; otherwise ImageNet's (pass mean=/std= to override either).
    """
    base = require_root("buildings", root, _EXPECTED_ROOT)
    split = _split_name(split)
    files = find_split(base, split)
    if files is None:
        have = sorted(e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith("."))
        looked = [f"{base / split}/{{images,masks}}"]
        for folder in SPLIT_FOLDERS[split]:
            looked += [f"{base / folder}/{{sat,map}}", f"{base / folder} + {base / folder}_labels"]
        raise UserError(
            f"dataset 'buildings': no {split} split under {base} (folders there: "
            f"{', '.join(have) or 'none'}): looked for {', '.join(looked)}"
        )
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if files.layout == "tiles":
        manifest = read_manifest(base)
        if manifest is not None and not manifest.get("complete", False):
            raise UserError(
                f"tile cache {base} is incomplete (its tiling was interrupted): expected a "
                f"finished one; run `lightnets data tile {manifest.get('source', 'ROOT')} {base}` "
                "again to finish it"
            )
        if manifest is not None and manifest.get("mean") and manifest.get("std"):
            mean, std = tuple(manifest["mean"]), tuple(manifest["std"])
    return BuildingsDataset(files, split, mean=mean, std=std)


# ---------------------------------------------------------------------------- tiling
def _atomic_png(array: np.ndarray, path: Path, mode: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array, mode=mode).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)


def _atomic_json(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _tile_settings(root: Path, size: int, max_nodata: float | None, splits: Sequence[str]):
    return {
        "source": str(root.resolve()),
        "tile_size": size,
        "max_nodata": max_nodata,
        "splits": list(splits),
    }


def _prepare_out(out: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Make `out` ready; returns the manifest of an earlier run to continue, or None."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file: expected a directory (new or empty)")
    if not out.exists() or not any(out.iterdir()):
        return None
    if overwrite:
        (out / MANIFEST).unlink(missing_ok=True)
        for split in SPLITS:
            for sub in ("images", "masks"):
                shutil.rmtree(out / split / sub, ignore_errors=True)
        return None
    manifest = read_manifest(out) if (out / MANIFEST).is_file() else None
    if manifest is None:
        raise UserError(
            f"output {out} is not empty: expected a new or empty directory, or pass --overwrite "
            "to replace the tiles in it"
        )
    earlier = {k: manifest.get(k) for k in settings}
    if earlier != settings:
        diff = ", ".join(
            f"{k}={earlier[k]!r} (now {settings[k]!r})"
            for k in settings
            if earlier[k] != settings[k]
        )
        raise UserError(
            f"output {out} holds tiles made with other settings: {diff}: expected the same "
            "settings to continue it, or pass --overwrite to replace them"
        )
    return manifest


def tile_buildings(
    root: str | Path,
    out: str | Path,
    size: int = 250,
    max_nodata: float | None = None,
    splits: Sequence[str] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Cut every image of `splits` under `root` into `size` x `size` tiles written to `out`.

    Tiles start at the top-left corner; a right or bottom remainder smaller than a tile is
    dropped (1500 = 6 x 250: none for Massachusetts Buildings). With `max_nodata`, a tile
    whose fraction of no-data pixels (white, 255/255/255, in the image) exceeds it is not
    written. Files are written atomically (temporary file, then rename) and the manifest is
    updated after each source image, so an interrupted run continues where it stopped when
    started again with the same settings; a finished one is left as it is. A non-empty `out`
    that is not such a run is refused unless `overwrite`, which deletes its manifest and its
    `<split>/images` and `<split>/masks` folders (nothing else) first.

    Returns the manifest; its "summary" counts tiles written, dropped and skipped.
    """
    root = require_root("buildings", root, _EXPECTED_ROOT)
    out = Path(out).expanduser()
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"tile size {size!r}: expected a positive number of pixels")
    if max_nodata is not None and not 0.0 <= float(max_nodata) <= 1.0:
        raise UserError(f"max_nodata={max_nodata!r}: expected a fraction between 0 and 1")
    max_nodata = None if max_nodata is None else float(max_nodata)
    if out.resolve() == root.resolve():
        raise UserError(f"output {out} is the dataset root: expected another directory")
    wanted = list(SPLITS) if splits is None else [_split_name(s) for s in splits]
    found: dict[str, SplitFiles] = {}
    for split in wanted:
        files = find_split(root, split)
        if files is None and splits is not None:
            raise UserError(
                f"no {split} split under {root}: expected {_EXPECTED_ROOT} (or leave out "
                f"--splits to tile the splits that are there)"
            )
        if files is not None and files.layout == "tiles":
            raise UserError(
                f"{root} already holds tiles ({files.image_dir}): expected the original "
                "1500x1500 images"
            )
        if files is not None:
            found[split] = files
    if not found:
        raise UserError(f"no train, val or test split under {root}: expected {_EXPECTED_ROOT}")
    settings = _tile_settings(root, size, max_nodata, list(found))
    manifest = _prepare_out(out, settings, overwrite)
    if manifest is None:
        manifest = {
            "format": TILE_FORMAT,
            "version": TILE_VERSION,
            **settings,
            "complete": False,
            "images": {split: {} for split in found},
            "stats": {"sum": [0.0] * 3, "sum_sq": [0.0] * 3, "pixels": 0},
        }
    summary = {"written": 0, "dropped": 0, "skipped_images": 0, "images": 0}
    if manifest.get("complete"):
        if log:
            log(f"{out} already holds the finished tiles of {root}: nothing to do")
        manifest["summary"] = summary
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    _atomic_json(manifest, out / MANIFEST)
    stats = manifest["stats"]
    threshold = "" if max_nodata is None else f" (no-data > {max_nodata:g})"
    for split, files in found.items():
        image_dir, mask_dir = out / split / "images", out / split / "masks"
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*image_dir.glob(".*.tmp"), *mask_dir.glob(".*.tmp")]:
            stale.unlink(missing_ok=True)  # left by an interrupted run
        done = manifest["images"][split]
        counts = {"written": 0, "dropped": 0, "skipped_images": 0, "images": 0}
        for stem, image_path, label_path in files.pairs:
            counts["images"] += 1
            if stem in done:
                counts["skipped_images"] += 1
                continue
            image, mask = read_image(image_path), read_label(label_path)
            _check_sizes(image_path, label_path, image.shape[:2], mask.shape)
            height, width = mask.shape
            rows, cols = height // size, width // size
            record: dict[str, Any] = {
                "image": str(image_path.relative_to(root)),
                "label": str(label_path.relative_to(root)),
                "size": [height, width],
                "tiles": [],
                "dropped": {},
            }
            white = (image == 255).all(axis=2)
            for r in range(rows):
                for c in range(cols):
                    ys, xs = slice(r * size, (r + 1) * size), slice(c * size, (c + 1) * size)
                    name = f"{stem}_r{r:02d}_c{c:02d}"
                    nodata = float(white[ys, xs].mean())
                    if max_nodata is not None and nodata > max_nodata:
                        record["dropped"][name] = round(nodata, 4)
                        continue
                    tile = np.ascontiguousarray(image[ys, xs])
                    _atomic_png(tile, image_dir / f"{name}.png", "RGB")
                    _atomic_png(mask[ys, xs].astype(np.uint8) * 255, mask_dir / f"{name}.png", "L")
                    record["tiles"].append(name)
                    if split == "train":
                        pixels = tile.reshape(-1, 3).astype(np.float64) / 255.0
                        for ch in range(3):
                            stats["sum"][ch] += float(pixels[:, ch].sum())
                            stats["sum_sq"][ch] += float((pixels[:, ch] ** 2).sum())
                        stats["pixels"] += pixels.shape[0]
            if rows == 0 or cols == 0:
                record["too_small"] = True
                if log:
                    log(f"warning: {image_path} ({width}x{height}) is smaller than one tile")
            counts["written"] += len(record["tiles"])
            counts["dropped"] += len(record["dropped"])
            done[stem] = record
            _atomic_json(manifest, out / MANIFEST)
        for key in summary:
            summary[key] += counts[key]
        if log:
            skipped = counts["skipped_images"]
            again = f", {skipped} images done before" if skipped else ""
            log(
                f"{split}: {counts['images']} images -> {counts['written']} tiles written, "
                f"{counts['dropped']} dropped{threshold}{again}"
            )
    n = stats["pixels"]
    if n:
        mean = [s / n for s in stats["sum"]]
        var = [max(q / n - m * m, 0.0) for q, m in zip(stats["sum_sq"], mean)]
        manifest["mean"] = [round(m, 4) for m in mean]
        manifest["std"] = [round(max(v**0.5, 1e-3), 4) for v in var]
    manifest["complete"] = True
    _atomic_json(manifest, out / MANIFEST)
    total_tiles = sum(
        len(r["tiles"]) for images in manifest["images"].values() for r in images.values()
    )
    if log:
        log(
            f"{out}: {total_tiles} tiles of {size}x{size} ({summary['written']} written now, "
            f"{summary['dropped']} dropped{threshold}); manifest {out / MANIFEST}"
        )
    manifest["summary"] = summary
    return manifest
