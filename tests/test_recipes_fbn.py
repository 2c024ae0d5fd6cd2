"""The FBN recipes (finet_cifar, resnet_fbn_cifar, finet_imagenet): they load with the paper's
settings and train at toy scale on generated files in the real formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lightnets.data import build_batch_augment
from lightnets.engine.config import load_config
from lightnets.engine.trainer import Trainer
from lightnets.models.registry import create_model
from lightnets.nn import FBNConv2d
from lightnets.nn.blocks import SqueezeExcite
from tests.data.conftest import crop_offsets, write_cifar10

torch.set_num_threads(1)

QUIET = ["train.progress=false", "output.plot=false"]


def test_finet_cifar_recipe_is_the_papers_setting():
    c = load_config("finet_cifar", ["data.root=/data/cifar"])
    assert c.model.args["cifar_stem"] is True
    # §5.3 sets the SE hidden size (200) for these runs: the model has Squeeze-Excite
    model = create_model(c.model.name, **c.model.args)
    se = [m for m in model.modules() if isinstance(m, SqueezeExcite)]
    assert se and all(m.fc1.out_channels == 200 for m in se)
    assert (c.data.name, c.data.per_process_batch(1)) == ("cifar10", 128)
    assert (c.optim.name, c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (
        "sgd",
        0.1,
        0.9,
        5e-4,
    )
    assert (c.schedule.name, c.schedule.milestones, c.schedule.gamma) == (
        "multistep",
        [100, 150],
        0.1,
    )
    assert c.train.epochs == 200


@pytest.mark.parametrize("recipe", ["finet_cifar", "resnet_fbn_cifar"])
def test_cifar_recipes_pad_to_36_then_crop_32(recipe):
    """§5.3: "padded with 0 to 36x36 and then randomly cropped to 32x32": every training crop
    is a 32x32 window of the image zero-padded by 2 pixels, and all 5x5 offsets occur."""
    c = load_config(recipe, ["data.root=/data/cifar"])
    ops = [op for op in c.data.augment if op != "normalize"]
    aug = build_batch_augment(ops, train=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (400, 3, 32, 32), dtype=torch.uint8, generator=g)
    torch.manual_seed(0)
    out = aug(x)
    assert (
        len(crop_offsets(out, x, pad=2, flips=True)) == 25
    )  # 36 - 32 + 1 = 5 positions a side, no more (4-pixel: 81)


def test_resnet_fbn_cifar_recipe_is_the_papers_setting():
    c = load_config("resnet_fbn_cifar", ["data.root=/data/cifar"])
    assert c.model.name == "resnet18"
    # Table 7: every conv + BN but the stem's is an FBN conv with G = 2; CIFAR stem
    model = create_model(c.model.name, **c.model.args)
    fbns = [m for m in model.modules() if isinstance(m, FBNConv2d)]
    assert len(fbns) == 19 and all(m.fbn_groups == 2 for m in fbns)
    assert isinstance(model.bn1, nn.BatchNorm2d) and model.conv1.stride == (1, 1)
    assert c.data.per_process_batch(1) == 64
    assert (c.optim.lr, c.optim.weight_decay, c.schedule.milestones, c.train.epochs) == (
        0.1,
        5e-4,
        [100, 150],
        200,
    )


def test_finet_imagenet_recipe_is_the_papers_setting():
    c = load_config("finet_imagenet", ["data.root=/data/imagenet"])
    assert c.model.name == "finet_large"
    # Table 2's G = 4 in the 32 pointwise convs, dropout 0.2 in the two FC layers, 224 stem
    model = create_model(c.model.name, **c.model.args)
    fbns = [m for m in model.modules() if isinstance(m, FBNConv2d)]
    assert len(fbns) == 32 and all(m.fbn_groups == 4 for m in fbns)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.2, 0.2]
    assert model.conv1.conv.stride == (2, 2)
    assert (c.data.name, c.data.train_split, c.data.val_split) == ("folder", "train", "val")
    assert (c.data.batch_size, c.data.num_workers, c.data.args) == (512, 8, {"image_size": 224})
    assert c.data.augment == ["hflip", "normalize"]
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (0.2, 0.9, 4e-5)
    assert c.optim.lr_reference_batch == 512  # lr 0.2 exactly at the paper's batch
    assert (c.schedule.name, c.schedule.unit, c.schedule.min_factor) == ("linear", "step", 0.0)
    assert c.train.epochs == 320


def _train(recipe: str, run_dir, overrides: list[str]) -> tuple[Trainer, dict]:
    config = load_config(recipe, [*overrides, *QUIET, "train.max_steps=2"])
    trainer = Trainer(config, run_dir)
    return trainer, trainer.fit()


@pytest.mark.parametrize(
    "recipe, model_overrides",
    [
        ("finet_cifar", ["model.name=finet_small"]),  # with the recipe's FBN G=4
        ("resnet_fbn_cifar", []),  # resnet18 with FBN G=2, as the recipe says
    ],
)
def test_cifar_recipes_train_on_cifar_binary_files(tmp_path, recipe, model_overrides):
    write_cifar10(tmp_path / "data", "bin", per_batch=4, n_test=4)
    trainer, row = _train(
        recipe,
        tmp_path / "run",
        [f"data.root={tmp_path / 'data'}", "data.batch_size=4", *model_overrides],
    )
    assert trainer.step == 2 and len(trainer.train_set) == 20 and len(trainer.val_set) == 4
    assert trainer.model_args["num_classes"] == 10
    assert 0.0 <= row["val_acc1"] <= 100.0
    assert (tmp_path / "run" / "last.pt").is_file()


def _image_folder(root, classes=("cat", "dog"), per_split=(3, 2)) -> None:
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_split):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(36, 60, size=2)
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)


def test_finet_imagenet_recipe_trains_on_an_image_folder(tmp_path):
    _image_folder(tmp_path / "imagenet")
    trainer, row = _train(
        "finet_imagenet",
        tmp_path / "run",
        [
            f"data.root={tmp_path / 'imagenet'}",
            "model.name=finet_small",
            "model.args.cifar_stem=true",
            "data.args.image_size=32",
            "data.batch_size=4",
            "data.num_workers=0",
        ],
    )
    assert trainer.step == 2 and trainer.model_args["num_classes"] == 2
    assert trainer.train_set.image_size == (32, 32)
    # lr 0.2 at batch 512 scales to 0.2 * 4 / 512 and decays linearly to 0 over the 2 steps
    assert trainer.base_lr == pytest.approx(0.2 * 4 / 512)
    assert row["lr"] == pytest.approx(0.0, abs=1e-12)
    assert 0.0 <= row["val_acc1"] <= 100.0
