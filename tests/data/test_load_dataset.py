"""The dataset registry, the attributes every dataset reports, and train/val splitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lightnets.data import (
    DATASET_ATTRIBUTES,
    ImageTensorDataset,
    list_datasets,
    load_dataset,
    register_dataset,
    split_train_val,
)
from lightnets.data import registry as registry_module
from lightnets.errors import UserError


def test_builtin_names():
    assert {"mnist5k", "mnist", "cifar10", "cifar100", "folder"} <= set(list_datasets())


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError) as err:
        load_dataset("cifar01")
    msg = str(err.value)
    assert "unknown dataset 'cifar01'" in msg and "did you mean 'cifar10'" in msg
    assert all(name in msg for name in list_datasets())


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "folder"])
def test_missing_root(name, tmp_path):
    with pytest.raises(UserError, match=f"dataset '{name}' needs root="):
        load_dataset(name)
    with pytest.raises(UserError, match="is not a directory"):
        load_dataset(name, root=tmp_path / "nope")


@pytest.mark.parametrize("name", ["mnist5k", "mnist", "cifar10", "cifar100"])
def test_bad_split(name, tmp_path):
    root = None if name == "mnist5k" else tmp_path
    with pytest.raises(UserError, match=f"dataset '{name}' has no split 'val'"):
        load_dataset(name, root=root, split="val")


def test_unknown_option():
    with pytest.raises(UserError, match="dataset 'mnist5k' has no option 'size'.*mean, std"):
        load_dataset("mnist5k", size=3)
    with pytest.raises(UserError, match="has no option 'labls'.*did you mean 'labels'"):
        load_dataset("cifar100", root=".", labls="fine")


def test_mean_std_override():
    ds = load_dataset("mnist5k", split="test", mean=0.5, std=[0.25])
    assert ds.mean == (0.5,) and ds.std == (0.25,)
    with pytest.raises(UserError, match="std=.*expected one number or 1 numbers"):
        load_dataset("mnist5k", split="test", std=(0.1, 0.2))
    with pytest.raises(UserError, match="std=0"):
        load_dataset("mnist5k", split="test", std=0)


def test_register_dataset():
    @register_dataset("_tiny_for_test")
    def tiny(root=None, split="train", n: int = 4):
        images = torch.zeros(n, 2, 3, 3, dtype=torch.uint8)
        return ImageTensorDataset(images, torch.arange(n) % 2, ["a", "b"], (0.5, 0.5), (1, 1))

    try:
        assert "_tiny_for_test" in list_datasets()
        ds = load_dataset("_tiny_for_test", n=6)
        assert len(ds) == 6 and ds.in_chans == 2 and ds.num_classes == 2
        with pytest.raises(ValueError, match="registered twice"):
            register_dataset("_tiny_for_test")(lambda root=None, split="train": None)
    finally:
        registry_module.DATASETS.remove("_tiny_for_test")


def _all_datasets(files, tmp_path):
    files.write_cifar10(tmp_path, "bin")
    files.write_cifar100(tmp_path, "py")
    for c in ("a", "b"):
        d = tmp_path / "imgs" / "train" / c
        d.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (9 + i, 7), (i * 50, 0, 0)).save(d / f"{i}.png")
    return [
        load_dataset("mnist5k"),
        load_dataset("cifar10", root=tmp_path, split="test"),
        load_dataset("cifar100", root=tmp_path, split="test"),
        load_dataset("folder", root=tmp_path / "imgs", image_size=6),
    ]


def test_every_dataset_reports_its_attributes(files, tmp_path):
    for ds in _all_datasets(files, tmp_path):
        for attr in DATASET_ATTRIBUTES:
            assert hasattr(ds, attr), (ds, attr)
        assert isinstance(ds.num_classes, int) and ds.num_classes == len(ds.classes)
        assert all(isinstance(c, str) for c in ds.classes)
        assert len(ds.mean) == len(ds.std) == ds.in_chans
        assert all(0 < s < 1 for s in ds.std) and all(0 < m < 1 for m in ds.mean)
        assert ds.targets.dtype == torch.long and ds.targets.shape == (len(ds),)
        x, y = ds[0]
        assert x.dtype == torch.uint8 and x.shape == (ds.in_chans, *ds.image_size)
        assert y == ds.targets[0]


def test_split_train_val_is_stratified_disjoint_and_deterministic():
    ds = load_dataset("mnist5k")
    train, val = split_train_val(ds, 0.1, seed=3)
    assert len(train) == 3600 and len(val) == 400
    assert torch.bincount(val.targets).tolist() == [40] * 10
    assert isinstance(train, ImageTensorDataset) and train.num_classes == 10
    assert train.mean == ds.mean and train.image_size == (28, 28)
    # disjoint and covering: every image of ds lands in exactly one part
    key = ds.images.flatten(1).float() @ torch.randn(
        784, generator=torch.Generator().manual_seed(0)
    )
    parts = torch.cat([train.images, val.images]).flatten(1).float() @ torch.randn(
        784, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(parts.sort().values, key.sort().values)
    again_train, again_val = split_train_val(ds, 0.1, seed=3)
    assert torch.equal(again_val.images, val.images) and torch.equal(again_val.targets, val.targets)
    _, other = split_train_val(ds, 0.1, seed=4)
    assert not torch.equal(other.images, val.images)


def test_split_train_val_last_is_the_tail_in_order_whatever_the_seed():
    """holdout="last" ([Re] Bop §3.3: "The last 10% of the training data"): the final
    round(n x fraction) samples in the dataset's order, the rest before them, seed-free."""
    ds = load_dataset("mnist5k")
    train, val = split_train_val(ds, 0.1, seed=3, holdout="last")
    assert (len(train), len(val)) == (3600, 400)
    assert torch.equal(val.images, ds.images[3600:]) and torch.equal(train.images, ds.images[:3600])
    assert torch.equal(val.targets, ds.targets[3600:])
    _, other = split_train_val(ds, 0.1, seed=4, holdout="last")
    assert torch.equal(other.images, val.images)
    with pytest.raises(UserError, match="holdout='random': expected 'stratified' or 'last'"):
        split_train_val(ds, 0.1, holdout="random")


def test_split_train_val_of_a_generic_dataset(files, tmp_path):
    folder = _all_datasets(files, tmp_path)[3]
    train, val = split_train_val(folder, 0.5, seed=0)
    assert len(train) == len(val) == 2
    assert val.targets.tolist() == [0, 1] and val.num_classes == 2 and val.image_size == (6, 6)
    x, y = val[1]
    assert x.shape == (3, 6, 6) and y == 1
    loader = torch.utils.data.DataLoader(val, batch_size=2)
    assert next(iter(loader))[0].shape == (2, 3, 6, 6)


def test_split_train_val_refusals():
    ds = load_dataset("mnist5k", split="test")
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(UserError, match="expected a number between 0 and 1"):
            split_train_val(ds, bad)
    tiny = ds.subset(np.arange(3))
    with pytest.raises(UserError, match="empty training or validation set"):
        split_train_val(tiny, 0.01)


def test_dataloader_batches_in_memory_data():
    ds = load_dataset("mnist5k", split="test")
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=32, shuffle=False)))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(x, ds.images[:32]) and torch.equal(y, ds.targets[:32])
