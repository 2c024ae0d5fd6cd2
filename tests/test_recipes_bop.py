"""The [Re] Bop recipes: bnn_mnist (Sec. 3.1.1), bnn_mnist_bop, binarynet_cifar (Sec. 3.3) hold
the paper's settings; binarynet_cifar trains on generated CIFAR-10 binary files."""

from __future__ import annotations

import pytest
import torch

from lightnets.engine.binary import BinaryTraining
from lightnets.engine.callbacks import NoFlipStopping
from lightnets.engine.config import load_config
from lightnets.engine.trainer import Trainer
from lightnets.optim import Bop, CompositeOptimizer, binary_parameters
from tests.data.conftest import write_cifar10

torch.set_num_threads(1)


def test_bnn_mnist_is_section_3_1_1():
    c = load_config("bnn_mnist")
    assert c.model.name == "bnn_mnist"
    args = c.model.args
    assert (args["mode"], args["clip_weights"], args["latent_init"]) == (
        "latent",
        True,
        "glorot_uniform",
    )
    assert (c.data.name, c.data.val_split, c.data.val_fraction) == ("mnist5k", "test", 0.0)
    assert c.data.augment == c.data.eval_augment == ["scale_pm1"]  # pixels in [-1, 1]
    assert (c.optim.name, c.optim.lr, c.optim.betas) == ("adam", 1e-3, [0.9, 0.999])
    assert c.optim.binary is None and c.schedule.name == "constant"
    assert (c.data.batch_size, c.train.epochs) == (64, 6)  # Larq's MNIST tutorial


def test_bnn_mnist_bop_trains_the_binary_weights_with_bop(tmp_path):
    """What the recipe does, not what it writes: Bop gets exactly the +1/-1 weights with the
    recipe's (or an override's) gamma, threshold and flip test; Adam gets the rest; they flip."""
    overrides = ["train.max_steps=3", "train.progress=false", "output.plot=false"]
    c = load_config("bnn_mnist_bop", [*overrides, "optim.bop_gamma=0.02"])
    trainer = Trainer(c, tmp_path / "run")
    bop = trainer.optimizer["binary"]
    assert isinstance(bop, Bop) and trainer.part(BinaryTraining).bop is bop
    group = bop.param_groups[0]
    assert (group["gamma"], group["threshold"], group["flip_test"]) == (
        0.02,
        c.optim.bop_threshold,
        c.optim.bop_flip_test,
    )
    binary = {id(p) for p in binary_parameters(trainer.model)}
    assert {id(p) for p in group["params"]} == binary and len(binary) == 5
    real = [p for g in trainer.optimizer["real"].param_groups for p in g["params"]]
    assert real and not any(id(p) in binary for p in real)
    before = [p.detach().clone() for p in bop.param_groups[0]["params"]]
    trainer.fit()
    after = bop.param_groups[0]["params"]
    assert all(bool(((p == 1) | (p == -1)).all()) for p in after)
    assert sum(int((a != b).sum()) for a, b in zip(after, before)) > 0  # Bop flipped weights


def test_binarynet_cifar_is_section_3_3():
    c = load_config("binarynet_cifar", ["data.root=/data/cifar"])
    assert c.model.name == "binarynet_cifar" and c.model.args == {"mode": "bop"}
    assert (c.data.name, c.data.val_fraction, c.data.batch_size) == ("cifar10", 0.1, 50)
    assert c.data.augment == ["pad_crop", "hflip", "scale_pm1"]  # pad 4, crop 32, flip, [-1, 1]
    assert c.data.eval_augment == ["scale_pm1"]
    assert (c.optim.name, c.optim.lr, c.optim.betas) == ("adam", 1e-3, [0.9, 0.999])
    assert c.schedule.name == "constant"  # Adam's lr is not decayed
    assert (c.optim.binary, c.optim.bop_threshold, c.optim.bop_gamma) == ("bop", 1e-8, 1e-4)
    b = c.binary_schedule
    assert (b.name, b.unit, b.step_size, b.gamma, b.keys) == ("step", "epoch", 100, 0.1, ["gamma"])
    assert (c.train.epochs, c.train.best_metric, c.train.stop_after_flipless_epochs) == (
        500,
        "val_loss",
        10,
    )


def test_binarynet_cifar_trains_on_cifar_files(tmp_path):
    files = write_cifar10(tmp_path / "cifar", "bin", per_batch=14, n_test=2)  # 70 images
    overrides = [
        f"data.root={tmp_path / 'cifar'}",
        "train.max_steps=1",
        "train.progress=false",
        "output.plot=false",
    ]
    trainer = Trainer(load_config("binarynet_cifar", overrides), tmp_path / "run")
    assert isinstance(trainer.optimizer, CompositeOptimizer)
    convs = 9 * (3 * 128 + 128 * 128 + 128 * 256 + 256 * 256 + 256 * 512 + 512 * 512)
    fcs = 512 * 4 * 4 * 1024 + 1024 * 1024 + 1024 * 10
    assert (
        isinstance(trainer.part(BinaryTraining).bop, Bop)
        and trainer.part(BinaryTraining).bop.num_binary == convs + fcs
    )
    assert any(isinstance(cb, NoFlipStopping) and cb.patience == 10 for cb in trainer.callbacks)
    # [Re] §3.3: "The last 10% of the training data was used for validation": the last 7 of
    # the 70 images in file order (data_batch_5's tail), the same for every seed
    assert (len(trainer.train_set), len(trainer.val_set)) == (63, 7)
    val = torch.stack([trainer.val_set[i][0] for i in range(7)])
    assert torch.equal(val, torch.as_tensor(files.train_x[-7:]))
    train_last = trainer.train_set[62][0]
    assert torch.equal(train_last, torch.as_tensor(files.train_x[62]))
    x, _ = next(iter(trainer.loaders["train"]))
    out = trainer.train_augment(x)
    assert out.shape == (50, 3, 32, 32) and out.min() >= -1 and out.max() <= 1
    row = trainer.fit()
    assert trainer.step == 1 and row["bop_gamma"] == pytest.approx(1e-4)
    # after one epoch of a 500-epoch run gamma is not decayed yet (x0.1 only after epoch 100)
    assert trainer.part(BinaryTraining).bop.param_groups[0]["gamma"] == pytest.approx(1e-4)
    sched = trainer.part(BinaryTraining).binary_scheduler
    assert (sched.name, sched.keys, sched.optimizer) == (
        "step",
        ("gamma",),
        trainer.part(BinaryTraining).bop,
    )
    for p in binary_parameters(trainer.model):
        assert bool(((p == 1) | (p == -1)).all())
    assert (tmp_path / "run" / "best.pt").is_file() and "val_loss" in row
