"""What a run reads: its datasets from the config, their attributes, the loaders, and the batch
augmentation done on the training device.

The training loader draws its order from `ResumableSampler` (a pure function of seed and
epoch) and its workers' seeds from a generator of its own, so that creating an iterator never
moves the global RNG: a resumed epoch creates one more iterator than an uninterrupted run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightnets.data import build_batch_augment, load_dataset, split_train_val
from lightnets.engine.config import Config
from lightnets.engine.sampler import ResumableSampler
from lightnets.models.registry import model_arguments

__all__ = [
    "ChannelsLast",
    "build_augments",
    "build_datasets",
    "dataset_attr",
    "eval_loader",
    "resolve_model_args",
    "train_loader",
]


def build_datasets(config: Config) -> tuple[Dataset, Dataset | None]:
    """Train and validation datasets from the data config (no validation set when
    data.val_split is none and data.val_fraction is 0)."""
    cfg = config.data
    train = load_dataset(cfg.name, root=cfg.root, split=cfg.train_split, **cfg.args)
    if cfg.val_fraction > 0:
        return split_train_val(
            train, cfg.val_fraction, seed=config.train.seed, holdout=cfg.val_holdout
        )
    if cfg.val_split:
        return train, load_dataset(cfg.name, root=cfg.root, split=cfg.val_split, **cfg.args)
    return train, None


def dataset_attr(dataset: Dataset, name: str, default: Any) -> Any:
    """`dataset.<name>` (mean, std, num_classes, image_size, ...), looked up through torch
    Subsets and other wrappers that keep the wrapped dataset as `.dataset`; `default` when no
    layer has it."""
    while not hasattr(dataset, name) and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return getattr(dataset, name, default)


def resolve_model_args(config: Config, dataset: Dataset) -> dict[str, Any]:
    """Model kwargs with num_classes / in_chans filled in from the dataset when not given."""
    args = dict(config.model.args)
    accepted = model_arguments(config.model.name)
    for key in ("num_classes", "in_chans"):
        if key in accepted and key not in args and hasattr(dataset, key):
            args[key] = int(getattr(dataset, key))
    return args


class ChannelsLast(nn.Module):
    """An augmentation whose output batch comes back in channels-last memory format (NHWC),
    for a model converted with `.to(memory_format=torch.channels_last)`."""

    def __init__(self, augment: nn.Module) -> None:
        super().__init__()
        self.augment = augment

    def forward(self, x: torch.Tensor, *rest: torch.Tensor):
        out = self.augment(x, *rest)
        if isinstance(out, tuple):
            return (out[0].contiguous(memory_format=torch.channels_last), *out[1:])
        return out.contiguous(memory_format=torch.channels_last)


def build_augments(
    config: Config, dataset: Dataset, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """The training and the evaluation batch augmentation (data.augment, data.eval_augment),
    normalized with the dataset's mean and std, on `device`."""
    cfg = config.data
    mean = dataset_attr(dataset, "mean", None)
    std = dataset_attr(dataset, "std", None)
    size = cfg.image_size or dataset_attr(dataset, "image_size", None)
    train = build_batch_augment(cfg.augment, mean=mean, std=std, image_size=size)
    evaluate = build_batch_augment(cfg.eval_augment, mean=mean, std=std, image_size=size)
    if config.train.channels_last:
        train, evaluate = ChannelsLast(train), ChannelsLast(evaluate)
    return train.to(device), evaluate.to(device)


def train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    rank: int,
    world: int,
    num_workers: int,
    pin_memory: bool,
) -> tuple[DataLoader, ResumableSampler]:
    """The training loader (whole batches only) and its resumable sampler, this rank's shard."""
    sampler = ResumableSampler(len(dataset), shuffle=True, seed=seed, rank=rank, world_size=world)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=True,
        pin_memory=pin_memory,
        generator=torch.Generator(),  # its own: an iterator must not draw from the global RNG
    )
    return loader, sampler


def eval_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    rank: int,
    world: int,
    num_workers: int,
    pin_memory: bool,
) -> DataLoader:
    """Each rank evaluates its own shard (no padding: metrics are summed over ranks)."""
    sampler = ResumableSampler(len(dataset), shuffle=False, rank=rank, world_size=world, pad=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator(),  # evaluating must not move the global RNG
    )
