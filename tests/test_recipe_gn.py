"""The resnet50_gn_imagenet recipe: the GN paper's ImageNet setting, and a toy-scale run on a
generated image folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lightnets.engine.config import load_config
from lightnets.engine.trainer import Trainer
from lightnets.experiments.plan import resolve_run
from lightnets.models.registry import create_model
from lightnets.models.resnet import BasicBlock, Bottleneck

torch.set_num_threads(1)


def test_recipe_is_the_papers_setting():
    c = load_config("resnet50_gn_imagenet", ["data.root=/data/imagenet"])
    assert c.model.name == "resnet50"
    # §4.1: GN with G = 32 in every norm layer, each block's last gamma zero
    model = create_model(c.model.name, **c.model.args)
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    assert len(norms) == 53 and all(isinstance(m, nn.GroupNorm) for m in norms)
    assert all(m.num_groups == 32 for m in norms)
    blocks = [b for b in model.modules() if isinstance(b, Bottleneck)]
    assert len(blocks) == 16 and all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
    assert (c.data.name, c.data.train_split, c.data.val_split) == ("folder", "train", "val")
    assert c.data.args == {"image_size": 224}
    assert (c.optim.name, c.optim.momentum, c.optim.nesterov) == ("sgd", 0.9, True)  # [17]'s
    assert (c.optim.weight_decay, c.optim.norm_weight_decay) == (1e-4, 1e-4)  # gamma, beta too
    # §4.1: 32 images per GPU on 8 GPUs, lr 0.1; 0.1 N / 32 for N images per GPU
    for processes, per, total, lr in ((8, 32, 256, 0.1), (1, 32, 32, 0.0125)):
        plan = resolve_run(c, processes)
        assert (plan["batch_per_process"], plan["global_batch"]) == (per, total)
        assert plan["lr"] == pytest.approx(lr)
    two = load_config("resnet50_gn_imagenet", ["data.batch_per_process=2"])
    assert resolve_run(two, 8)["lr"] == pytest.approx(0.1 * 2 / 32)
    assert (c.schedule.name, c.schedule.unit) == ("multistep", "epoch")
    assert (c.schedule.milestones, c.schedule.gamma, c.train.epochs) == ([30, 60, 90], 0.1, 100)


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


def test_recipe_trains_on_an_image_folder(tmp_path):
    _image_folder(tmp_path / "imagenet")
    overrides = [
        f"data.root={tmp_path / 'imagenet'}",
        "model.name=resnet18",
        "model.args.cifar_stem=true",
        "data.args.image_size=32",
        "data.batch_per_process=4",
        "data.num_workers=0",
        "train.max_steps=2",
        "train.progress=false",
        "output.plot=false",
    ]
    trainer = Trainer(load_config("resnet50_gn_imagenet", overrides), tmp_path / "run")
    model = trainer.model
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 20 and all(m.num_groups == 32 for m in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for block in model.modules():
        if isinstance(block, BasicBlock):  # zero_init_last: the block starts as the identity
            assert torch.count_nonzero(block.bn2.weight) == 0 and torch.all(block.bn1.weight == 1)
    assert trainer.base_lr == pytest.approx(0.1 * 4 / 256)
    decays = {g["weight_decay"] for g in trainer.optimizer.param_groups}
    assert decays == {1e-4}  # conv weights, gamma/beta and the fc bias alike
    row = trainer.fit()
    assert trainer.step == 2 and trainer.model_args["num_classes"] == 2
    assert trainer.train_set.image_size == (32, 32)
    assert 0.0 <= row["val_acc1"] <= 100.0
    assert (tmp_path / "run" / "last.pt").is_file()


def test_resnet_gn_cifar_recipe_is_the_papers_setting_on_cifar():
    c = load_config("resnet_gn_cifar", ["data.root=/data/cifar"])
    assert c.model.name == "resnet18"
    assert c.model.args == {
        "cifar_stem": True,
        "norm": "gn",
        "norm_kwargs": {"num_groups": 32},
        "zero_init_last": True,
    }
    assert c.data.name == "cifar10"
    # the paper's rule: 0.1 for 32 images on each of 8 processes; one process: 1/8 of it
    assert resolve_run(c, 8)["lr"] == pytest.approx(0.1)
    assert resolve_run(c, 1)["lr"] == pytest.approx(0.0125)
    assert resolve_run(c, 1)["batch_per_process"] == 32
    assert (c.optim.weight_decay, c.optim.norm_weight_decay) == (1e-4, 1e-4)
    assert (c.schedule.milestones, c.train.epochs) == ([30, 60, 90], 100)


def test_resnet_gn_cifar_recipe_trains_on_cifar_binary_files(tmp_path):
    from tests.data.conftest import write_cifar10

    write_cifar10(tmp_path / "data", "bin", per_batch=4, n_test=4)
    overrides = [
        f"data.root={tmp_path / 'data'}",
        "data.batch_per_process=4",
        "train.max_steps=2",
        "train.progress=false",
        "output.plot=false",
    ]
    trainer = Trainer(load_config("resnet_gn_cifar", overrides), tmp_path / "run")
    assert sum(isinstance(m, nn.GroupNorm) for m in trainer.model.modules()) == 20
    assert trainer.base_lr == pytest.approx(0.1 * 4 / 256)
    row = trainer.fit()
    assert trainer.step == 2 and 0.0 <= row["val_acc1"] <= 100.0


def test_gn_mnist_recipe_is_the_small_scale_setting():
    c = load_config("gn_mnist")
    assert (c.model.name, c.data.name) == ("resnet_mini", "mnist5k")
    assert c.model.args["norm"] == "gn" and c.model.args["norm_kwargs"] == {"num_groups": 32}
    assert c.optim.norm_weight_decay == 1e-4
    # one process with 32 images trains at the lr of one of the paper's 8 workers: 0.1
    assert (resolve_run(c, 1)["batch_per_process"], resolve_run(c, 1)["lr"]) == (32, 0.1)
    # the paper's lr / 10 at 30%, 60%, 90% of training, rounded up: epochs 2 and 3 of 4
    assert (c.schedule.milestones, c.train.epochs) == ([2, 3], 4)
