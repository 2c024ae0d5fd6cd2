"""The trainer runs end to end on every real on-disk format, not only the bundled subset."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from lightnets.cli import main
from tests.conftest import TINY
from tests.data.conftest import write_cifar10


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


def _train(tmp_path, capsys, *settings):
    argv = ["train", "mnist_cnn", *_sets([*TINY, *settings]), "--out", str(tmp_path / "run")]
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cifar_binary_with_the_cifar_augmentation(tmp_path, capsys):
    write_cifar10(tmp_path / "data", "bin", per_batch=8, n_test=8)
    row = _train(
        tmp_path,
        capsys,
        "data.name=cifar10",
        f"data.root={tmp_path / 'data'}",
        "data.batch_size=8",
        "data.augment=pad_crop,hflip,normalize",
        "train.epochs=1",
        "schedule.warmup=0",
    )
    assert row["step"] == 5 and 0.0 <= row["val_acc1"] <= 100.0


def test_image_folder_imagenet_layout(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = tmp_path / "imgs" / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                size = tuple(int(v) for v in rng.integers(40, 80, size=2))
                pixels = rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    row = _train(
        tmp_path,
        capsys,
        "data.name=folder",
        f"data.root={tmp_path / 'imgs'}",
        "data.val_split=val",
        "data.args.image_size=32",
        "data.batch_size=4",
        "data.augment=hflip,normalize",
        "train.epochs=1",
        "schedule.warmup=0",
    )
    assert row["step"] == 2 and "val_acc1" in row
