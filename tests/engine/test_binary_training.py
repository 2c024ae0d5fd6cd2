"""Training binary networks through the Trainer: Bop + Adam as one optimizer (state round trip,
resume), gamma schedules, flips and the eq. 7 log flip ratio in the metrics, stopping after
flip-free epochs, latent-weight clipping after each step, and clear refusals."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from lightnets.data import load_dataset
from lightnets.engine.binary import BinaryTraining
from lightnets.engine.callbacks import Callback, NoFlipStopping
from lightnets.engine.checkpoint import load_checkpoint
from lightnets.engine.config import load_config
from lightnets.engine.trainer import Trainer
from lightnets.errors import UserError
from lightnets.models import create_model
from lightnets.nn.binary import BinaryConv2d, BinaryLinear
from lightnets.optim import (
    Bop,
    CompositeOptimizer,
    binary_parameters,
    build_binary_optimizer,
    build_optimizer,
    build_schedule,
    real_parameters,
)

torch.set_num_threads(1)

N_BINARY = 60_320  # bnn_mnist: 288 + 18432 + 36864 + 4096 + 640 (counted by hand in the model)
QUIET = ["train.progress=false", "output.plot=false"]


@pytest.fixture(scope="module")
def small_data():
    """256 training and 128 test images of the bundled MNIST subset: 4 steps of 64 per epoch."""
    train = load_dataset("mnist5k", split="train")
    test = load_dataset("mnist5k", split="test")
    g = torch.Generator().manual_seed(0)
    return (
        Subset(train, torch.randperm(len(train), generator=g)[:256].tolist()),
        Subset(test, torch.randperm(len(test), generator=g)[:128].tolist()),
    )


def _trainer(tmp_path, recipe, overrides, data, name="run", **kwargs) -> Trainer:
    config = load_config(recipe, [*QUIET, *overrides])
    return Trainer(config, tmp_path / name, datasets=data, **kwargs)


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- optimizer
def test_build_binary_optimizer_splits_the_model():
    model = create_model("bnn_mnist", mode="bop", bn_scale=True)
    opt = build_binary_optimizer(
        model, "adamw", 1e-3, gamma=1e-3, threshold=1e-6, weight_decay=0.1, norm_weight_decay=0
    )
    assert isinstance(opt, CompositeOptimizer) and list(opt) == ["real", "binary"]
    binary = {id(p) for p in binary_parameters(model)}
    weights = [m.weight for m in model.modules() if isinstance(m, (BinaryConv2d, BinaryLinear))]
    assert binary == {id(w) for w in weights} and sum(w.numel() for w in weights) == N_BINARY
    bop, adam = opt["binary"], opt["real"]
    assert isinstance(bop, Bop) and isinstance(adam, torch.optim.AdamW)
    assert {id(p) for g in bop.param_groups for p in g["params"]} == binary
    real = {id(p) for g in adam.param_groups for p in g["params"]}
    bn = [
        p
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for p in m.parameters()
    ]
    assert real == {id(p) for p in bn} == {id(p) for p in real_parameters(model)}
    assert [g["weight_decay"] for g in adam.param_groups] == [0.0]  # all of it is norm
    assert (bop.param_groups[0]["gamma"], bop.param_groups[0]["threshold"]) == (1e-3, 1e-6)
    # param_groups: Adam's, then Bop's, the very dicts (a scheduler sets values through them)
    assert (
        opt.param_groups[0] is adam.param_groups[0] and opt.param_groups[-1] is bop.param_groups[0]
    )


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_composite_state_round_trip_continues_identically():
    torch.manual_seed(0)
    a = create_model("bnn_mnist", mode="bop")
    b = create_model("bnn_mnist", mode="bop")
    b.load_state_dict(a.state_dict())
    opt_a = build_binary_optimizer(a, "adam", 1e-2, gamma=0.1, threshold=0.0)
    for seed in range(3):
        _step(a, opt_a, seed)
    assert opt_a["binary"].last_flips > 0
    state = copy.deepcopy(opt_a.state_dict())  # torch loads tensors as they are: no sharing
    b.load_state_dict(a.state_dict())
    opt_b = build_binary_optimizer(b, "adam", 1.0, gamma=0.5, threshold=1.0)  # overwritten
    opt_b.load_state_dict(state)
    assert opt_b["binary"].param_groups[0]["gamma"] == 0.1
    assert opt_b["real"].param_groups[0]["lr"] == 1e-2
    for pa, pb in zip(binary_parameters(a), binary_parameters(b)):
        assert torch.equal(opt_a.state[pa]["m"], opt_b.state[pb]["m"])
    for seed in range(3, 5):
        _step(a, opt_a, seed)
        _step(b, opt_b, seed)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    for pa, pb in zip(binary_parameters(a), binary_parameters(b)):
        assert torch.equal(opt_a.state[pa]["m"], opt_b.state[pb]["m"])
        assert bool(((pa == 1) | (pa == -1)).all())


def test_composite_refuses_foreign_state_and_shared_parameters():
    model = create_model("bnn_mnist", mode="bop")
    opt = build_binary_optimizer(model, "adam", 1e-3)
    plain = torch.optim.Adam(real_parameters(model), 1e-3)
    with pytest.raises(ValueError, match="not a CompositeOptimizer's"):
        opt.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match=r"parts \['real'\].*\['binary', 'real'\]"):
        opt.load_state_dict({"optimizers": {"real": plain.state_dict()}})
    with pytest.raises(UserError, match="in both 'a' and 'b'"):
        CompositeOptimizer({"a": plain, "b": torch.optim.SGD(real_parameters(model)[:1], 0.1)})


def test_bop_weights_are_refused_to_a_real_optimizer_and_vice_versa():
    with pytest.raises(UserError, match=r"5 weight\(s\) of binary layers in mode='bop'"):
        build_optimizer(create_model("bnn_mnist", mode="bop"), "adam", 1e-3)
    with pytest.raises(UserError, match="no binary weights in mode='bop'"):
        build_binary_optimizer(create_model("bnn_mnist"), "adam", 1e-3)
    with pytest.raises(UserError, match="unknown binary optimizer 'bopp'"):
        build_binary_optimizer(create_model("bnn_mnist", mode="bop"), "adam", 1e-3, binary="bopp")


def test_one_scheduler_per_key_on_the_composite():
    model = create_model("bnn_mnist", mode="bop")
    opt = build_binary_optimizer(model, "adam", 1e-3, gamma=1e-4, threshold=1e-8)
    gamma = build_schedule(opt, "step", 10, step_size=2, gamma=0.1, keys=("gamma", "threshold"))
    lr = build_schedule(opt, "linear", 4, keys=("lr",))
    for _ in range(2):
        gamma.step()
        lr.step()
    bop, adam = opt["binary"].param_groups[0], opt["real"].param_groups[0]
    assert bop["gamma"] == pytest.approx(1e-5) and bop["threshold"] == pytest.approx(1e-9)
    assert adam["lr"] == pytest.approx(0.5e-3) and "lr" not in bop and "gamma" not in adam
    with pytest.raises(UserError, match="param group 0 has no numeric 'momentum'"):
        build_schedule(opt, "constant", 3, keys=("momentum",))


# ----------------------------------------------------------------------------- trainer
class FlipWatcher(Callback):
    """Counts, independently of Bop, the binary weights whose sign changed in each step."""

    def __init__(self):
        self.flips: list[int] = []
        self.before = None

    def _snapshot(self, trainer):
        return [p.detach().clone() for p in binary_parameters(trainer.model)]

    def on_train_start(self, trainer):
        self.before = self._snapshot(trainer)

    def on_step_end(self, trainer, info):
        now = self._snapshot(trainer)
        self.flips.append(sum(int((a != b).sum()) for a, b in zip(self.before, now)))
        self.before = now


def test_flips_and_log_flip_ratio_in_the_metrics(tmp_path, small_data):
    watcher = FlipWatcher()
    t = _trainer(tmp_path, "bnn_mnist_bop", ["train.epochs=2"], small_data, callbacks=[watcher])
    row = t.fit()
    rows = _rows(tmp_path / "run")
    assert t.part(BinaryTraining).bop.num_binary == N_BINARY and len(watcher.flips) == 8
    assert sum(watcher.flips) > 0  # gamma 1e-3, tau 1e-6: the first steps flip weights
    for epoch, r in enumerate(rows):
        per_step = watcher.flips[4 * epoch : 4 * epoch + 4]
        pis = [math.log(f / N_BINARY + 1e-9) for f in per_step]
        assert r["flips"] == sum(per_step)
        assert r["log_flip_ratio_steps"] == [round(p, 4) for p in pis]
        assert r["log_flip_ratio"] == pytest.approx(sum(pis) / 4, abs=1e-12)
        assert r["bop_gamma"] == 1e-3 and r["lr"] == 1e-3
    assert row["flips"] == rows[-1]["flips"]
    for p in binary_parameters(t.model):  # Adam never touched them: still exactly +-1
        assert bool(((p == 1) | (p == -1)).all())
    csv_header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"flips", "log_flip_ratio", "log_flip_ratio_steps", "bop_gamma"} <= set(csv_header)


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_gamma_follows_the_binary_schedule_and_lr_its_own(tmp_path, small_data, unit):
    size = 1 if unit == "epoch" else 2
    overrides = [
        "train.epochs=2",
        'binary_schedule.name="step"',
        f'binary_schedule.unit="{unit}"',
        f"binary_schedule.step_size={size}",
        "binary_schedule.gamma=0.5",
        'schedule.name="step"',
        "schedule.step_size=1",
        "schedule.gamma=0.1",
    ]
    t = _trainer(tmp_path, "bnn_mnist_bop", overrides, small_data)
    t.fit()
    rows = _rows(tmp_path / "run")
    if unit == "epoch":  # gamma of the epoch's last step: 1e-3, then 5e-4
        assert [r["bop_gamma"] for r in rows] == pytest.approx([1e-3, 5e-4])
        assert t.part(BinaryTraining).bop.param_groups[0]["gamma"] == pytest.approx(2.5e-4)
    else:  # x0.5 every 2 steps; the last (8th) step ran at t=7: 1e-3 * 0.5**3
        assert [r["bop_gamma"] for r in rows] == pytest.approx([1e-3 * 0.5**1, 1e-3 * 0.5**3])
    assert t.part(BinaryTraining).bop.param_groups[0]["threshold"] == 1e-6  # not scheduled
    assert [r["lr"] for r in rows] == pytest.approx([1e-4, 1e-5])  # Adam's own schedule


def test_resume_continues_bop_and_adam_exactly(tmp_path, small_data):
    sched = ['binary_schedule.name="step"', "binary_schedule.step_size=1"]
    full = _trainer(tmp_path, "bnn_mnist_bop", ["train.epochs=2", *sched], small_data, "full")
    full.fit()
    half = _trainer(tmp_path, "bnn_mnist_bop", ["train.epochs=1", *sched], small_data, "half")
    half.fit()
    config = load_config("bnn_mnist_bop", [*QUIET, "train.epochs=2", *sched])
    resumed = Trainer(config, tmp_path / "half", resume=True, datasets=small_data)
    assert resumed.part(BinaryTraining).bop.param_groups[0]["gamma"] == pytest.approx(
        1e-4
    )  # decayed once
    resumed.fit()
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(binary_parameters(full.model), binary_parameters(resumed.model)):
        assert torch.equal(full.optimizer.state[a]["m"], resumed.optimizer.state[b]["m"])
    for a, b in zip(real_parameters(full.model), real_parameters(resumed.model)):
        sa, sb = full.optimizer.state[a], resumed.optimizer.state[b]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["step"], sb["step"])
    assert _rows(tmp_path / "full")[1]["flips"] == _rows(tmp_path / "half")[1]["flips"]

    # resuming with another binary schedule (now also on the threshold) is refused, not crashed
    keys = 'binary_schedule.keys=["gamma", "threshold"]'
    other = load_config("bnn_mnist_bop", [*QUIET, "train.epochs=2", *sched, keys])
    with pytest.raises(UserError, match=r"another config \(binary_schedule.keys: \['gamma'\]"):
        Trainer(other, tmp_path / "half", resume=True, datasets=small_data)


class Crash(Callback):
    def on_step_end(self, trainer, info):
        if trainer.step == 3:
            raise KeyboardInterrupt


def test_killed_mid_epoch_resumes_with_the_epochs_flips(tmp_path, small_data):
    overrides = ["train.epochs=1", "train.checkpoint_every=2"]
    full = _trainer(tmp_path, "bnn_mnist_bop", overrides, small_data, "full")
    full.fit()
    killed = _trainer(tmp_path, "bnn_mnist_bop", overrides, small_data, "k", callbacks=[Crash()])
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    ckpt = load_checkpoint(tmp_path / "k" / "last.pt")
    assert ckpt["step"] == 2 and len(ckpt["flip_counts"]) == 2  # the first two steps' flips
    config = load_config("bnn_mnist_bop", [*QUIET, *overrides])
    Trainer(config, tmp_path / "k", resume=True, datasets=small_data).fit()
    (a,), (b,) = _rows(tmp_path / "full"), _rows(tmp_path / "k")
    assert a["flips"] > 0
    for key in ("flips", "log_flip_ratio", "log_flip_ratio_steps", "bop_gamma", "val_acc1"):
        assert a[key] == b[key], key


def test_no_flip_stopping_ends_the_run_and_stays_stopped(tmp_path, small_data):
    overrides = ["train.epochs=5", "optim.bop_threshold=1e3", "train.stop_after_flipless_epochs=2"]
    t = _trainer(tmp_path, "bnn_mnist_bop", overrides, small_data)
    t.fit()
    assert t.epoch == 2 and t.should_stop and "no weight flipped in 2" in t.stop_reason
    assert [r["flips"] for r in _rows(tmp_path / "run")] == [0, 0]
    config = load_config("bnn_mnist_bop", [*QUIET, *overrides])
    again = Trainer(config, tmp_path / "run", resume=True, datasets=small_data)
    again.fit()
    assert again.step == t.step == 8  # a stopped run is finished: nothing more is trained


def test_no_flip_stopping_counts_consecutive_epochs():
    class Fake:
        should_stop, stop_reason = False, ""

    cb, trainer = NoFlipStopping(2), Fake()
    for flips in (0, 5, 0):
        cb.on_epoch_end(trainer, {"flips": flips})
        assert not trainer.should_stop
    cb.on_epoch_end(trainer, {"flips": 0})
    assert trainer.should_stop and cb.state_dict() == {"flipless": 2}
    with pytest.raises(UserError, match="patience=0"):
        NoFlipStopping(0)


@pytest.mark.parametrize("clip", [True, False])
def test_latent_weights_are_clipped_after_every_step(tmp_path, small_data, clip):
    overrides = [
        "train.epochs=1",
        'optim.name="adam"',
        "optim.lr=2.0",  # every latent weight with a gradient moves by ~2 per step
        f"model.args.clip_weights={'true' if clip else 'false'}",
    ]
    clipped = []

    class Check(Callback):
        def on_step_end(self, trainer, info):
            clipped.append(max(float(p.detach().abs().max()) for p in _latent(trainer.model)))

    t = _trainer(tmp_path, "bnn_mnist", overrides, small_data, callbacks=[Check()])
    t.fit()
    if clip:  # after every step, right after the optimizer: at most 1, and some at exactly 1
        assert clipped == [1.0] * 4
    else:
        assert max(clipped) > 1.0


def _latent(model):
    return [m.weight for m in model.modules() if isinstance(m, (BinaryConv2d, BinaryLinear))]


# ----------------------------------------------------------------------------- refusals
def test_misconfigurations_are_refused_clearly(tmp_path, small_data):
    with pytest.raises(
        UserError, match=r"has 5 binary layer weight\(s\) in mode='bop'.*optim.binary = 'bop'"
    ):
        _trainer(tmp_path, "bnn_mnist_bop", ["optim.binary=none"], small_data)
    with pytest.raises(UserError, match="optim.binary='bop', but model 'bnn_mnist' has no binary"):
        _trainer(tmp_path, "bnn_mnist", ['optim.binary="bop"'], small_data)
    with pytest.raises(UserError, match="optim.binary='bopp' is invalid"):
        load_config("bnn_mnist_bop", ['optim.binary="bopp"'])
    with pytest.raises(UserError, match="stop_after_flipless_epochs=3 is invalid.*optim.binary"):
        load_config("bnn_mnist", ["train.stop_after_flipless_epochs=3"])
    with pytest.raises(UserError, match=r"binary_schedule.keys=\['lr'\] is invalid"):
        load_config("bnn_mnist_bop", ['binary_schedule.keys=["lr"]'])
    with pytest.raises(UserError, match="optim.bop_gamma=0.0 is invalid"):
        load_config("bnn_mnist_bop", ["optim.bop_gamma=0"])
    with pytest.raises(UserError, match="unknown config key 'binary_schedule.gama'"):
        load_config({"binary_schedule": {"gama": 0.1}})
    # a latent run's checkpoint cannot be resumed as a Bop run
    plain = _trainer(tmp_path, "bnn_mnist", ["train.max_steps=1"], small_data, "plain")
    plain.fit()
    config = load_config("bnn_mnist_bop", [*QUIET])
    with pytest.raises(UserError, match=r"cannot resume .* another config \(model.args: .*optim"):
        Trainer(config, tmp_path / "plain", resume=True, datasets=small_data)
