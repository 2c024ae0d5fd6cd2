"""What every lightnets dataset exposes, the in-memory image dataset, and train/val splitting.

Datasets carry the facts the rest of the library needs (number of classes, channels, class
names, per-channel mean/std for normalization, image size) so recipes never repeat them.
Small datasets (MNIST, CIFAR) live in memory as one uint8 tensor: indexing is a tensor slice,
with no decoding per item, and augmentation happens later on whole batches on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from lightnets.errors import UserError

#: Attributes every dataset returned by `load_dataset` has.
DATASET_ATTRIBUTES = ("num_classes", "in_chans", "classes", "mean", "std", "image_size")


class ImageTensorDataset(Dataset):
    """All images as one uint8 tensor (N, C, H, W) with int64 labels (N,).

    Items are `(image uint8 (C, H, W), label int)`; batches are converted to float and
    normalized by the batch augmentation (`build_batch_augment`) on the training device.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        classes: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        name: str = "",
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        targets = torch.as_tensor(targets, dtype=torch.long)
        if targets.shape != (images.shape[0],):
            raise ValueError(
                f"targets must have shape ({images.shape[0]},), got {tuple(targets.shape)}"
            )
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"mean and std need {images.shape[1]} values (one per channel)")
        self.images = images
        self.targets = targets
        self.classes = list(classes)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.name = name

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return (int(self.images.shape[2]), int(self.images.shape[3]))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Batched fetch used by DataLoader: one gather instead of one index per item."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return list(zip(self.images[idx].unbind(0), self.targets[idx].tolist()))

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageTensorDataset:
        """A new in-memory dataset holding only `indices` (same classes, mean and std)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageTensorDataset(
            self.images[idx], self.targets[idx], self.classes, self.mean, self.std, self.name
        )

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        return (
            f"{type(self).__name__}({self.name or 'images'}: {len(self)} x {c}x{h}x{w} uint8, "
            f"{self.num_classes} classes)"
        )


class DatasetSubset(Subset):
    """torch Subset that keeps the dataset attributes (and subsets `targets`)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        super().__init__(dataset, list(indices))
        for name in DATASET_ATTRIBUTES:
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))
        targets = getattr(dataset, "targets", None)
        if targets is not None:
            self.targets = torch.as_tensor(targets, dtype=torch.long)[
                torch.as_tensor(self.indices, dtype=torch.long)
            ]


def subset(dataset: Dataset, indices: Sequence[int] | torch.Tensor) -> Dataset:
    """`dataset.subset(indices)` when the dataset has one, else a DatasetSubset."""
    if hasattr(dataset, "subset"):
        return dataset.subset(indices)
    return DatasetSubset(dataset, torch.as_tensor(indices, dtype=torch.long).tolist())


def split_train_val(
    dataset: Dataset, val_fraction: float, seed: int = 0, holdout: str = "stratified"
) -> tuple[Dataset, Dataset]:
    """Hold out `val_fraction` of `dataset` as a validation set (e.g. Bop's 10% of CIFAR).

    holdout="stratified": deterministic for a given seed, and stratified when the dataset has
    `targets`: each class gives round(n_class * val_fraction) samples, so the class balance of
    both parts matches the original. holdout="last": the last round(n * val_fraction) samples
    in the dataset's order, the same for every seed (the [Re] Bop paper's CIFAR split: "the
    last 10% of the training data", i.e. CIFAR-10's data_batch_5). Both parts keep the
    original order. Note that a folder dataset's subsets share its per-sample transform (the
    random training crop for split="train").
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise UserError(f"val_fraction={val_fraction!r}: expected a number between 0 and 1")
    if holdout not in ("stratified", "last"):
        raise UserError(f"holdout={holdout!r}: expected 'stratified' or 'last'")
    n = len(dataset)
    gen = torch.Generator().manual_seed(int(seed))
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        targets = torch.as_tensor(targets, dtype=torch.long)
    if holdout == "last":
        k = round(n * val_fraction)
        val_idx = torch.arange(n - k, n)
    elif targets is not None and targets.shape == (n,):
        val_parts = []
        for c in torch.unique(targets).tolist():
            idx = torch.nonzero(targets == c).flatten()
            k = round(len(idx) * val_fraction)
            val_parts.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
        val_idx = torch.cat(val_parts) if val_parts else torch.zeros(0, dtype=torch.long)
    else:
        val_idx = torch.randperm(n, generator=gen)[: round(n * val_fraction)]
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[val_idx] = True
    if not is_val.any() or is_val.all():
        raise UserError(
            f"val_fraction={val_fraction} of {n} samples leaves an empty training or validation "
            "set: expected a fraction that keeps at least one sample in each"
        )
    train_idx = torch.nonzero(~is_val).flatten()
    val_idx = torch.nonzero(is_val).flatten()
    return subset(dataset, train_idx), subset(dataset, val_idx)


def check_split(dataset: str, split: Any, valid: Sequence[str]) -> str:
    """Refuse a split name the dataset does not have."""
    if split not in valid:
        raise UserError(
            f"dataset {dataset!r} has no split {split!r}: expected one of {', '.join(valid)}"
        )
    return split
