"""Dataset registry: recipes and the CLI name a dataset; `load_dataset` builds it.

A factory takes `root` and `split` plus its own keyword options; `load_dataset` checks the
caller's options against the factory's signature so a misspelled option is refused instead
of silently ignored. `mean=` and `std=` are accepted by every dataset and override the
normalization statistics it reports.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lightnets.errors import UserError, did_you_mean
from lightnets.registry import Registry

DatasetFactory = Callable[..., Dataset]
#: describe_loading(split, **options) -> what the loader does to each image (random crops
#: done per image while loading, e.g. the folder dataset's RandomResizedCrop), as augment ops
LoadingDescription = Callable[..., list]
#: Dataset factories by name.
DATASETS: Registry[DatasetFactory] = Registry("dataset")
_INFO: dict[str, dict[str, Any]] = {}
_LOADING: dict[str, LoadingDescription] = {}


def register_dataset(
    name: str,
    info: dict[str, Any] | None = None,
    loading: LoadingDescription | None = None,
) -> Callable[[DatasetFactory], DatasetFactory]:
    """Decorator: register `fn(root, split, **options) -> Dataset` under `name`.

    `info`: what is known without reading any file (num_classes, in_chans, train_size: images
    in the default training split), so a run can be planned before the data exists.
    `loading`: describes random per-image ops the dataset applies while loading a split.
    """

    def decorator(fn: DatasetFactory) -> DatasetFactory:
        DATASETS.add(name, fn)
        _INFO[name] = dict(info or {})
        if loading is not None:
            _LOADING[name] = loading
        return fn

    return decorator


def dataset_info(name: str) -> dict[str, Any]:
    """Facts about dataset `name` known without reading data (may be empty, e.g. a folder)."""
    return dict(_INFO[DATASETS.key(name)])


def describe_loading(name: str, split: str | None, **options: Any) -> list:
    """The random per-image ops dataset `name` applies while loading `split` (as augment ops,
    e.g. [{"random_resized_crop": {...}}]); [] when it only decodes."""
    describe = _LOADING.get(DATASETS.key(name))
    return list(describe(split, **options)) if describe is not None else []


def list_datasets() -> list[str]:
    """Sorted names of all registered datasets."""
    return DATASETS.names()


def load_dataset(
    name: str, root: str | Path | None = None, split: str | None = "train", **kw
) -> Dataset:
    """Build the registered dataset `name` for `split`, reading files under `root`.

    Every returned dataset has `num_classes`, `in_chans`, `classes`, `mean`, `std`,
    `image_size` (None when images differ in size) and `targets` (int64 labels).
    """
    factory = DATASETS.lookup(name)
    mean, std = kw.pop("mean", None), kw.pop("std", None)
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        valid = [p for p in params if p not in ("root", "split")] + ["mean", "std"]
        for key in kw:
            if key not in params or key in ("root", "split"):
                raise UserError(
                    f"dataset {name!r} has no option {key!r}{did_you_mean(key, valid)}: "
                    f"valid options are {', '.join(valid)}"
                )
    dataset = factory(root=root, split=split, **kw)
    for attr, value in (("mean", mean), ("std", std)):
        if value is not None:
            setattr(dataset, attr, _per_channel(name, attr, value, dataset.in_chans))
    return dataset


def require_root(dataset: str, root: str | Path | None, expected: str) -> Path:
    """The dataset's root directory, refusing a missing or non-existent one."""
    if root is None or str(root) == "":
        raise UserError(f"dataset {dataset!r} needs root=<{expected}>: none was given")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(
            f"dataset {dataset!r}: root {str(path)!r} is not a directory: expected {expected}"
        )
    return path


def _per_channel(name: str, attr: str, value, channels: int) -> tuple[float, ...]:
    values = (value,) if isinstance(value, (int, float)) else tuple(value)
    if len(values) == 1:
        values = values * channels
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if len(values) != channels or not ok or (attr == "std" and min(values) <= 0):
        raise UserError(
            f"dataset {name!r}: {attr}={value!r}: expected one number or {channels} numbers "
            "(one per channel, on the [0, 1] scale)"
        )
    return tuple(float(v) for v in values)
