"""Datasets and batch augmentation.

`load_dataset(name, root, split)` builds a registered dataset (mnist5k, mnist, cifar10,
cifar100, folder, buildings, synthetic_buildings, and whatever later modules register with
`@register_dataset`). Every dataset reports num_classes, in_chans, classes, mean, std,
image_size and targets (None for segmentation datasets, whose items are (image, mask)).
`build_batch_augment` turns op names into a module that augments and normalizes whole
batches on the training device.
"""

from __future__ import annotations

from lightnets.data import (  # noqa: F401  (register the datasets)
    buildings,
    cifar,
    folder,
    mnist,
    synthetic_buildings,
)
from lightnets.data.augment import (
    AUGMENT_OPS,
    AUGMENT_OPTIONS,
    AugmentOp,
    BatchAugment,
    build_batch_augment,
    describe_augment,
    parse_augment,
)
from lightnets.data.base import (
    DATASET_ATTRIBUTES,
    DatasetSubset,
    ImageTensorDataset,
    split_train_val,
    subset,
)
from lightnets.data.buildings import BuildingsDataset, tile_buildings
from lightnets.data.cifar import CifarUnpickler, read_cifar_binary, read_cifar_pickle
from lightnets.data.folder import IMG_EXTENSIONS, ImageFolderDataset
from lightnets.data.mnist import read_idx
from lightnets.data.registry import (
    dataset_info,
    describe_loading,
    list_datasets,
    load_dataset,
    register_dataset,
)
from lightnets.data.synthetic_buildings import SyntheticBuildings, render_scene
from lightnets.data.transforms import RandomResizedCrop, ResizeCenterCrop, pil_to_tensor

__all__ = [
    "AUGMENT_OPS",
    "AUGMENT_OPTIONS",
    "DATASET_ATTRIBUTES",
    "IMG_EXTENSIONS",
    "AugmentOp",
    "BatchAugment",
    "BuildingsDataset",
    "CifarUnpickler",
    "DatasetSubset",
    "ImageFolderDataset",
    "ImageTensorDataset",
    "RandomResizedCrop",
    "ResizeCenterCrop",
    "SyntheticBuildings",
    "build_batch_augment",
    "dataset_info",
    "describe_augment",
    "describe_loading",
    "list_datasets",
    "load_dataset",
    "parse_augment",
    "pil_to_tensor",
    "read_cifar_binary",
    "read_cifar_pickle",
    "read_idx",
    "register_dataset",
    "render_scene",
    "split_train_val",
    "subset",
    "tile_buildings",
]
