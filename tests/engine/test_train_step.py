"""One training step as the loop runs it: nothing in it waits for the device (checked with
the CPU stand-in of the GPU lane's sync guard), gradient clipping leaves Bop's gradients alone,
the epoch's sums match the host arithmetic they replaced, and a non-finite loss stops the run
within a bounded number of steps, naming the step where it happened."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from lightnets.data import load_dataset
from lightnets.engine import Callback, NonFiniteError, Trainer, load_config
from lightnets.engine.metrics import TrainSums
from lightnets.engine.nonfinite import CHECK_EVERY_STEPS
from lightnets.optim import binary_parameters, real_parameters
from tests.conftest import TINY, ExplodesAfter
from tests.cuda.support import host_resident_state, no_host_sync

CPU = torch.device("cpu")
QUIET = ["train.progress=false", "output.plot=false", "train.device=cpu", "schedule.warmup=0"]


@pytest.fixture(scope="module")
def small_data():
    """256 training and 64 test images of the bundled MNIST subset: 4 steps of 64 an epoch."""
    train = load_dataset("mnist5k", split="train")
    test = load_dataset("mnist5k", split="test")
    return Subset(train, list(range(256))), Subset(test, list(range(64)))


class _Batches:
    """The loader's batches fetched beforehand (reading a dataset on the CPU is no device
    sync, but the CPU stand-in of the guard cannot tell): the loop's own work stays inside."""

    def __init__(self, loader) -> None:
        self.generator = loader.generator
        self.batches = list(loader)

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("mnist_cnn", ["model.args.width=8", "train.grad_clip=1.0"]),
        ("mnist_demo", []),  # FBN
        ("bnn_mnist_bop", ["train.grad_clip=0.5", "binary_schedule.unit=step"]),
        ("bnn_mnist", []),  # latent weights, clipped after each step
    ],
)
def test_the_training_loop_does_not_wait_for_the_device(tmp_path, small_data, recipe, extra):
    config = load_config(recipe, [*QUIET, "train.epochs=3", *extra])
    trainer = Trainer(config, tmp_path / "run", datasets=small_data)
    trainer.loaders["train"] = _Batches(trainer.loaders["train"])
    x, y = trainer.loaders["train"].batches[0]
    trainer.train_step(*trainer._apply_augment(trainer.train_augment, x, y))  # lazy state
    trainer.batch_in_epoch = trainer.step = 0
    trainer.check_finite()
    ends = []
    trainer._end_epoch = ends.append  # the epoch's end reads its sums: a sync by design
    with no_host_sync(CPU, lambda: host_resident_state(trainer.optimizer)):
        trainer._train_epoch()
    assert len(ends) == 1 and trainer.step == 4
    assert len(trainer.nonfinite.pending) == 4  # read at the epoch's end, not before
    trainer.check_finite()
    sums = trainer.train_sums.values()
    assert sums["n"] == 4 * 64 and math.isfinite(sums["loss"])


def test_gradient_clipping_leaves_bops_gradients_alone(tmp_path, small_data):
    """train.grad_clip rescales the real-valued parameters' gradients to the clip norm;
    the +1/-1 weights' gradients (Bop's signal) reach Bop as backward made them."""
    clip = 1e-3
    config = load_config("bnn_mnist_bop", [*QUIET, f"train.grad_clip={clip}"])
    trainer = Trainer(config, tmp_path / "run", datasets=small_data)
    x, y = next(iter(trainer.loaders["train"]))
    x, y = trainer._apply_augment(trainer.train_augment, x, y)
    reference = copy.deepcopy(trainer.model)
    trainer.loss_fn(reference(x), y).backward()
    want_binary = [p.grad.clone() for p in binary_parameters(reference)]
    want_real = [p.grad.clone() for p in real_parameters(reference)]
    real_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in want_real]))
    all_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in want_real + want_binary]))
    assert real_norm > 10 * clip  # so clipping has something to do

    seen = {}
    step = trainer.optimizer.step

    def record():
        seen["binary"] = [p.grad.clone() for p in binary_parameters(trainer.model)]
        seen["real"] = [p.grad.clone() for p in real_parameters(trainer.model)]
        step()

    trainer.optimizer.step = record
    info = trainer.train_step(x, y)
    for got, want in zip(seen["binary"], want_binary):
        assert torch.equal(got, want)  # untouched
    scale = clip / (float(real_norm) + 1e-6)  # torch's clip_grad_norm_ coefficient
    for got, want in zip(seen["real"], want_real):
        torch.testing.assert_close(got, want * scale, rtol=1e-5, atol=1e-12)
    clipped = torch.linalg.vector_norm(torch.stack([g.norm() for g in seen["real"]]))
    assert float(clipped) == pytest.approx(clip, rel=1e-3)
    assert float(info["grad_norm"]) == pytest.approx(float(all_norm), rel=1e-5)


def test_without_a_clip_every_gradient_is_untouched(tmp_path, small_data):
    config = load_config("bnn_mnist_bop", QUIET)
    trainer = Trainer(config, tmp_path / "run", datasets=small_data)
    x, y = next(iter(trainer.loaders["train"]))
    x, y = trainer._apply_augment(trainer.train_augment, x, y)
    reference = copy.deepcopy(trainer.model)
    trainer.loss_fn(reference(x), y).backward()
    seen = []
    step = trainer.optimizer.step

    def record():
        seen.extend(_grads(trainer.model))
        step()

    trainer.optimizer.step = record
    trainer.train_step(x, y)
    want = _grads(reference)
    assert len(seen) == len(want) and any(g is not None for g in want)
    for got, expected in zip(seen, want):
        assert (got is None and expected is None) or torch.equal(got, expected)


def _grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def test_train_sums_match_the_host_arithmetic_they_replaced():
    """The epoch's mean loss was sum(float(loss) * n) / sum(n) in Python floats; the device
    sums in float64 give the very same number."""
    g = torch.Generator().manual_seed(0)
    losses = [torch.rand((), generator=g) * 3 for _ in range(50)]
    sizes = [int(torch.randint(1, 65, (), generator=g)) for _ in range(50)]
    sums = TrainSums(CPU)
    host = {"loss": 0.0, "n": 0.0, "correct": 0.0, "counted": 0.0}
    for loss, n in zip(losses, sizes):
        correct = torch.randint(0, n + 1, (), generator=g)
        sums.add(loss, n, correct, n)
        host["loss"] += float(loss) * n
        host["n"] += n
        host["correct"] += float(correct)
        host["counted"] += n
    assert sums.values() == host
    assert sums.reduced() == host  # one process: nothing to add
    assert sums.accuracy() == host["correct"] / host["counted"] * 100
    again = TrainSums(CPU)
    again.load(sums.values())
    assert again.values() == host
    old = {"loss": 3.0, "n": 4.0, "correct": 2.0}  # a checkpoint from before "counted"
    again.load(old)
    assert again.values() == {**old, "counted": 4.0}


def test_a_non_finite_loss_stops_within_the_bound_and_names_its_step(tmp_path):
    """No checkpoint in between, no progress bar: the watch reads the steps' verdicts every
    CHECK_EVERY_STEPS steps, so a NaN at step 3 stops the run by step 3 + that, and the error
    names step 3."""
    config = load_config("mnist_cnn", [*TINY, "train.device=cpu", "train.epochs=1"])
    trainer = Trainer(config, tmp_path / "run", model=ExplodesAfter(after=2))
    assert trainer.steps_per_epoch > CHECK_EVERY_STEPS + 3  # the epoch's end comes later
    with pytest.raises(NonFiniteError, match="loss became non-finite at epoch 1 step 3 ") as err:
        trainer.fit()
    assert trainer.step <= 3 + CHECK_EVERY_STEPS
    assert f"noticed {trainer.step - 3} step(s) later" in str(err.value)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_an_error_after_a_non_finite_step_reports_the_non_finite_step(tmp_path):
    class Breaks(Callback):
        def on_step_end(self, trainer, info):
            if trainer.step == 5:
                raise RuntimeError("something downstream of the NaN")

    config = load_config("mnist_cnn", [*TINY, "train.device=cpu"])
    trainer = Trainer(config, tmp_path / "run", model=ExplodesAfter(after=3), callbacks=[Breaks()])
    with pytest.raises(NonFiniteError, match="at epoch 1 step 4 .noticed 1 step"):
        trainer.fit()


def test_the_trainer_knows_nothing_of_binary_networks():
    """Bop, flips, latent clipping and the no-flip stop live in lightnets.engine.binary."""
    import lightnets.engine.trainer as trainer_module

    source = open(trainer_module.__file__).read()
    for name in ("lightnets.optim.bop", "lightnets.nn.binary", "NoFlipStopping", "flip_columns"):
        assert name not in source, name
