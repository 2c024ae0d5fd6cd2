"""The training loop: it learns, it stops on NaN keeping the last good checkpoint, it logs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lightnets.engine import Callback, EarlyStopping, NonFiniteError, Trainer, load_config
from lightnets.engine.checkpoint import load_checkpoint
from lightnets.errors import UserError
from tests.conftest import TINY, ExplodesAfter, GradientExplodesAfter


def test_short_run_learns_and_writes_run_dir(tmp_path):
    config = load_config("mnist_cnn", [*TINY, "train.epochs=2", "output.plot=true"])
    row = Trainer(config, tmp_path / "run").fit()
    run = tmp_path / "run"
    assert row["val_acc1"] > 80.0  # 10 classes: chance is 10%
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "train_loss", "val_acc1", "lr"} <= set(header)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "config.toml").is_file()
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert last["epoch"] == 2 and last["step"] == 2 * (4000 // 64)
    assert best["best"] == max(r["val_acc1"] for r in rows)


def test_existing_run_dir_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    config = load_config("mnist_cnn", TINY)
    with pytest.raises(UserError, match="already exists"):
        Trainer(config, run)
    assert (run / "precious.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="cannot resume: .* holds other files .precious.txt"):
        Trainer(config, run, resume=True)
    assert (run / "precious.txt").read_text() == "keep me"


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = load_config("mnist_cnn", [*TINY, "train.checkpoint_every=1"])
    trainer = Trainer(config, tmp_path / "run", model=ExplodesAfter(after=3))
    with pytest.raises(NonFiniteError, match="loss became non-finite at epoch 1 step 4"):
        trainer.fit()
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_non_finite_gradient_stops_too_and_a_failed_start_can_be_rerun(tmp_path):
    config = load_config("mnist_cnn", [*TINY, "train.checkpoint_every=100"])
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="gradient norm became non-finite") as caught:
        Trainer(config, run, model=GradientExplodesAfter(after=0)).fit()
    assert "no checkpoint had been written yet" in str(caught.value)
    assert sorted(p.name for p in run.iterdir() if p.name != ".lock") == ["config.toml"]
    # the failed start left only its config: a plain re-run starts afresh, no --overwrite
    row = Trainer(config, run).fit()
    assert row["step"] > 0 and (run / "last.pt").is_file()


def test_callbacks_see_steps_and_can_stop(tmp_path):
    class Count(Callback):
        steps = 0

        def on_step_end(self, trainer, info):
            Count.steps += 1
            assert math.isfinite(info["loss"])

    stopper = EarlyStopping("val_acc1", patience=1, mode="min")  # acc rises: stops after epoch 2
    config = load_config("mnist_cnn", [*TINY, "train.epochs=5"])
    trainer = Trainer(config, tmp_path / "run", callbacks=[Count(), stopper])
    trainer.fit()
    assert trainer.epoch == 2 and "early stop" in trainer.stop_reason
    assert Count.steps == 2 * (4000 // 64)


def test_max_steps_bf16_and_step_schedule(tmp_path):
    config = load_config(
        "mnist_cnn",
        [*TINY, "train.max_steps=7", "train.amp=bf16", "schedule.name=linear", "schedule.warmup=2"],
    )
    trainer = Trainer(config, tmp_path / "run")
    trainer.fit()
    assert trainer.step == 7
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_batch_larger_than_dataset_is_refused(tmp_path):
    config = load_config("mnist_cnn", [*TINY, "data.batch_size=5000"])
    with pytest.raises(UserError, match="larger than the training set"):
        Trainer(config, tmp_path / "run")


def test_sync_bn_syncs_fbn_statistics_and_refuses_bn_on_cpu():
    """train.sync_bn reaches the FBN layers (their own all-reduce, gloo included); torch's
    SyncBatchNorm has no CPU kernel, so a CPU model with BatchNorm is refused in one line."""
    from lightnets.engine.trainer import sync_batch_statistics
    from lightnets.nn.fbn import FBNConv2d

    fbn_only = nn.Sequential(FBNConv2d(8, 8, 3, fbn_groups=2), nn.ReLU(), FBNConv2d(8, 4, 1))
    synced = sync_batch_statistics(fbn_only, torch.device("cpu"))
    assert [m.sync_stats for m in synced.modules() if isinstance(m, FBNConv2d)] == [True, True]
    with pytest.raises(UserError, match="sync_bn=true needs CUDA devices for the model's"):
        sync_batch_statistics(
            nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), torch.device("cpu")
        )


def test_batch_per_process_sets_the_global_batch_and_the_lr(tmp_path):
    """N images per process, W processes: global batch N x W, lr scaled on the global batch
    (one process here); a checkpoint resumed with another batch per process is refused."""
    config = load_config(
        "mnist_cnn",
        [*TINY, "data.batch_size=none", "data.batch_per_process=16", "optim.lr_reference_batch=32"]
        + ["train.max_steps=3", "schedule.warmup=0"],
    )
    trainer = Trainer(config, tmp_path / "run")
    assert (trainer.batch_size, trainer.global_batch) == (16, 16)
    assert trainer.base_lr == pytest.approx(0.1 * 16 / 32)
    assert trainer.steps_per_epoch == 4000 // 16
    x, _ = next(iter(trainer.loaders["train"]))
    assert x.shape[0] == 16
    trainer.fit()
    path = tmp_path / "run" / "last.pt"
    ckpt = load_checkpoint(path)
    assert (ckpt["processes"], ckpt["batch_per_process"]) == (1, 16)
    ckpt["batch_per_process"] = 8  # as if it had been started with another batch
    torch.save({k: v for k, v in ckpt.items() if k != "path"}, path)
    with pytest.raises(UserError, match=r"1 process\(es\) x 8 images, this resume has 1 x 16"):
        Trainer(config, tmp_path / "run", resume=True)


def test_batch_size_and_batch_per_process_are_exclusive():
    with pytest.raises(UserError, match="data.batch_size=64 is invalid: expected no value"):
        load_config("mnist_cnn", ["data.batch_size=64", "data.batch_per_process=8"])
    config = load_config("mnist_cnn", ["data.batch_size=none", "data.batch_per_process=8"])
    assert config.data.global_batch(4) == 32
    with pytest.raises(UserError, match="must be divisible by the number of processes"):
        load_config("mnist_cnn", ["data.batch_size=30"]).data.per_process_batch(4)


def test_channels_last_model_and_batches(tmp_path):
    config = load_config(
        "mnist_cnn", [*TINY, "train.channels_last=true", "train.max_steps=2", "schedule.warmup=0"]
    )
    trainer = Trainer(config, tmp_path / "run")
    convs = [p for p in trainer.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    x, y = next(iter(trainer.loaders["train"]))
    out = trainer.train_augment(x)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.shape[1] == 1
    row = trainer.fit()
    assert trainer.step == 2 and math.isfinite(row["train_loss"])


def test_a_failed_start_releases_the_lock_and_leaves_nothing_new(tmp_path):
    """An error in __init__ after the run dir is locked (here: a warmup longer than the run)
    released nothing before: a second Trainer of this process on that dir was refused, naming
    this very process, and a new dir kept its .lock."""
    run = tmp_path / "new" / "run"
    bad = load_config("mnist_cnn", [*TINY, "train.max_steps=2", "schedule.warmup=5"])
    good = load_config("mnist_cnn", [*TINY, "train.max_steps=2", "schedule.warmup=0"])
    with pytest.raises(UserError, match="warmup=5 must be shorter than the run"):
        Trainer(bad, run)
    assert not (tmp_path / "new").exists()  # nothing new: no dir, no .lock
    Trainer(good, run).fit()  # the same process starts on it at once
    longer = load_config("mnist_cnn", [*TINY, "train.max_steps=4", "schedule.warmup=5"])
    with pytest.raises(UserError, match="warmup=5 must be shorter than the run"):
        Trainer(longer, run, resume=True)
    assert (run / "last.pt").is_file()  # an existing run dir keeps what it holds
    Trainer(good, run, resume=True).fit()


def test_resume_of_a_dir_that_does_not_exist_is_refused(tmp_path, capsys):
    """A mistyped --out with --resume started a new run without a word."""
    config = load_config("mnist_cnn", [*TINY, "train.max_steps=2", "schedule.warmup=0"])
    with pytest.raises(UserError, match=r"cannot resume: run dir .*typo does not exist"):
        Trainer(config, tmp_path / "typo", resume=True)
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()  # exists, never checkpointed: starts afresh, saying so
    Trainer(config, tmp_path / "empty", resume=True).fit()
    assert "holds no run to resume (no checkpoint); starting a new run" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "empty" / "last.pt")["step"] == 2


class _NormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d layout: a BatchNorm2d subclass with its own activation."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class _OwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_sync_bn_keeps_the_activation_of_norm_act_layers():
    """torch's convert_sync_batchnorm made a plain SyncBatchNorm of timm's BatchNormAct2d,
    dropping its activation; now the norm is synced and the activation kept, and a BN
    subclass that cannot be split is left as it was, named in a warning."""
    from lightnets.deploy.normact import NormAct
    from lightnets.engine.trainer import sync_batch_statistics

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _NormAct(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        model.train()(x)
        ref = model.eval()(x)
    synced = sync_batch_statistics(model, torch.device("cuda"))  # the conversion needs no GPU
    assert isinstance(synced[1], NormAct) and isinstance(synced[1].norm, nn.SyncBatchNorm)
    assert isinstance(synced[1].act, nn.ReLU) and isinstance(synced[3], nn.SyncBatchNorm)
    with torch.no_grad():
        torch.testing.assert_close(synced.eval()(x), ref)
    odd = nn.Sequential(nn.Conv2d(3, 4, 3), _OwnForward(4))
    with pytest.warns(UserWarning, match=r"train.sync_bn: left 1 norm layer\(s\) .*: 1 \(its"):
        synced = sync_batch_statistics(odd, torch.device("cuda"))
    assert type(synced[1]) is _OwnForward


def test_the_run_dir_stays_locked_until_the_last_callback_has_run(tmp_path):
    """on_train_end callbacks may still write into the run dir: the lock was released before
    them."""
    from lightnets.engine.runlock import RunLock

    class Probe(Callback):
        ran = False

        def on_train_end(self, trainer):
            with pytest.raises(UserError, match="this very process"):
                RunLock(trainer.run_dir).acquire()
            Probe.ran = True

    config = load_config("mnist_cnn", [*TINY, "train.max_steps=1", "schedule.warmup=0"])
    trainer = Trainer(config, tmp_path / "run", callbacks=[Probe()])
    trainer.fit()
    assert Probe.ran and not trainer.lock.held
    RunLock(tmp_path / "run").acquire().release()  # free once fit returned
