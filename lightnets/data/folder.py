"""Image-folder datasets in the ImageNet layout: root/<split>/<class_name>/<image>.

Images are decoded with Pillow on access (ImageNet does not fit in memory) and brought to a
fixed size by a per-sample transform, so they can be batched; the random flip and the
normalization are done later on whole batches by the batch augmentation.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from lightnets.data.images import open_image
from lightnets.data.registry import register_dataset, require_root
from lightnets.data.transforms import RandomResizedCrop, ResizeCenterCrop
from lightnets.errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: ImageNet's per-channel mean and std on the [0, 1] scale, the usual default for photos.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[Image.Image], torch.Tensor]


class ImageFolderDataset(Dataset):
    """Images in `root/<class_name>/*` (classes sorted by name), decoded to RGB.

    Items are `(transform(image) uint8 (3, H, W), label int)`. `image_size` is the transform's
    output size when it has a `size` attribute (both built-in transforms do), else None.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Transform,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        self.classes, self.samples = scan_image_folder(self.root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = torch.tensor([label for _, label in self.samples], dtype=torch.long)
        self.mean, self.std = tuple(mean), tuple(std)
        self.in_chans = 3
        size = getattr(transform, "size", None)
        self.image_size = tuple(size) if size is not None else None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(load_rgb(path)), label

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset({str(self.root)!r}: {len(self)} images, "
            f"{self.num_classes} classes, transform={self.transform!r})"
        )


def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(sorted class names, [(path, label)]) for a class-per-subfolder directory."""
    if not root.is_dir():
        raise UserError(f"{root}: not a directory: expected a folder with one subfolder per class")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"{root}: no class subfolders: expected {root}/<class_name>/<image>")
    samples: list[tuple[Path, int]] = []
    empty = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."):
                    found.append((Path(dirpath) / f, label))
        if not found:
            empty.append(str(root / name))
        samples.extend(found)
    if empty:
        raise UserError(
            f"no images in {', '.join(empty)}: expected files ending in {', '.join(IMG_EXTENSIONS)}"
        )
    return classes, samples


def load_rgb(path: Path) -> Image.Image:
    """Decode an image file to 8-bit RGB, naming the file when it cannot be read (16-bit images
    are refused, not clipped: `lightnets.data.images`)."""
    return open_image(path, "RGB")


def default_transform(
    split: str | None, image_size: int = 224, resize: int | None = None
) -> Transform:
    """Training split: RandomResizedCrop(image_size); otherwise resize + center crop.

    `resize` defaults to image_size / 0.875 (256 for 224), the ImageNet evaluation ratio.
    """
    if split == "train":
        return RandomResizedCrop(image_size)
    return ResizeCenterCrop(resize or int(round(image_size / 0.875)), image_size)


def describe_loading(
    split: str | None, image_size: int = 224, resize: int | None = None, **_: Any
) -> list[dict[str, dict[str, Any]]]:
    """The default transform's random op, as an augment op (for run plans): the training
    split's RandomResizedCrop; other splits are resized and center-cropped (not random)."""
    if split != "train":
        return []
    crop = RandomResizedCrop(image_size)
    return [
        {
            "random_resized_crop": {
                "size": list(crop.size),
                "scale": list(crop.scale),
                "ratio": list(crop.ratio),
                "when": "per image while loading",
            }
        }
    ]


@register_dataset(
    "folder", info={"in_chans": 3}, loading=lambda split, **o: describe_loading(split, **o)
)
def folder(
    root: str | None = None,
    split: str | None = "train",
    transform: Transform | None = None,
    image_size: int = 224,
    resize: int | None = None,
) -> ImageFolderDataset:
    """Images in `root/<split>/<class>/*` (ImageNet layout: splits "train" and "val"), or in
    `root/<class>/*` with split=None.

    `transform` maps a PIL image to a uint8 (3, H, W) tensor; by default the training split
    gets RandomResizedCrop(image_size) and any other split resize + center crop.
    """
    base = require_root("folder", root, "a directory with <split>/<class_name>/<image> files")
    if split is None:
        directory = base
    else:
        if not isinstance(split, str) or not split or "/" in split or split in (".", ".."):
            raise UserError(f"dataset 'folder': split={split!r}: expected a subfolder name or None")
        directory = base / split
        if not directory.is_dir():
            have = sorted(
                e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith(".")
            )
            raise UserError(
                f"dataset 'folder': {directory} does not exist: expected split to be one of the "
                f"subfolders of {base} ({', '.join(have) or 'none'}), or split=None when {base} "
                "itself holds one folder per class"
            )
    return ImageFolderDataset(directory, transform or default_transform(split, image_size, resize))
