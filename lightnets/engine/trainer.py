"""The training loop: config in, run directory (checkpoints, metrics, curves) out.

Everything the loop draws randomness from is either restored from the checkpoint (torch,
numpy and Python RNGs) or a pure function of (seed, epoch) (the data order), so a run killed
at any step and resumed ends with exactly the weights of an uninterrupted run.

What a run of a binary network adds (Bop's flips and schedule, latent-weight clipping, the
no-flip stop) is `lightnets.engine.binary.BinaryTraining`, a `TrainingPart` the trainer composes
without knowing what it does. The loop keeps a step's loss, accuracy and finite-ness on the
device (`TrainSums`, `NonFiniteWatch`): it waits for the device only when the progress bar
refreshes, every `CHECK_EVERY_STEPS` steps, before a checkpoint and at an epoch's end.

How a run starts in its run dir is `lightnets.engine.rundir`, what a resume checks
`lightnets.engine.resume`, the data `datasets`, the optimizer and schedules `optimizers`,
evaluation `evaluation`.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightnets.engine import distributed as dist_utils
from lightnets.engine import resume as resume_checks
from lightnets.engine.binary import BinaryTraining
from lightnets.engine.callbacks import Callback, TrainingPart
from lightnets.engine.checkpoint import (
    FORMAT,
    VERSION,
    atomic_torch_save,
    load_checkpoint,
    load_model_state,
    rng_state,
    set_rng_state,
)
from lightnets.engine.config import Config, save_config
from lightnets.engine.datasets import (
    ChannelsLast,
    build_augments,
    build_datasets,
    dataset_attr,
    eval_loader,
    resolve_model_args,
    train_loader,
)
from lightnets.engine.distributed import sync_batch_statistics
from lightnets.engine.evaluation import evaluate
from lightnets.engine.logging import MetricsLogger, ProgressBar, plot_curves
from lightnets.engine.metrics import TrainSums, correct_predictions
from lightnets.engine.nonfinite import NonFiniteError, NonFiniteWatch
from lightnets.engine.optimizers import (
    build_run_optimizer,
    build_run_schedule,
    real_optimizer,
    scaled_lr,
)
from lightnets.engine.resume import LENGTH_SCHEDULES, RESUMABLE_PREFIXES
from lightnets.engine.rundir import abandon_start, missing_dirs, prepare_run_dir
from lightnets.engine.runlock import RunLock
from lightnets.engine.sampler import ResumableSampler
from lightnets.errors import UserError
from lightnets.models.registry import create_model

__all__ = [
    "LENGTH_SCHEDULES",
    "RESUMABLE_PREFIXES",
    "ChannelsLast",
    "NonFiniteError",
    "Trainer",
    "build_datasets",
    "dataset_attr",
    "evaluate",
    "resolve_model_args",
    "seed_everything",
    "sync_batch_statistics",
]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed every RNG the loop uses; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


class Trainer:
    """Train one model according to a Config, writing everything into `run_dir`."""

    def __init__(
        self,
        config: Config,
        run_dir: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
        callbacks: Sequence[Callback] = (),
        model: nn.Module | None = None,
        datasets: tuple[Dataset, Dataset | None] | None = None,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.callbacks = list(callbacks)
        self.should_stop = False
        self.stop_reason = ""
        self.device = dist_utils.local_device(config.train.device)
        self.distributed = dist_utils.init_distributed(self.device)
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.is_main = self.rank == 0
        self.lock = RunLock(self.run_dir)  # rank 0, the one writer, holds it while it trains
        self.resume_from: Path | None = None  # the checkpoint a resumed run continues
        created = missing_dirs(self.run_dir)
        try:
            self._start(config, resume, overwrite, model, datasets)
        except BaseException:
            abandon_start(self.lock, created, self.is_main)
            raise

    def _start(
        self,
        config: Config,
        resume: bool,
        overwrite: bool,
        model: nn.Module | None,
        datasets: tuple[Dataset, Dataset | None] | None,
    ) -> None:
        """The rest of __init__, from locking the run dir on: any error in it releases the
        lock (`abandon_start`)."""
        self.resume_from = prepare_run_dir(
            self.run_dir, self.lock, resume=resume, overwrite=overwrite, is_main=self.is_main
        )
        seed_everything(config.train.seed, config.train.deterministic)

        self.train_set, self.val_set = datasets if datasets is not None else build_datasets(config)
        if len(self.train_set) == 0:
            raise UserError(
                f"dataset {config.data.name!r} split {config.data.train_split!r} is empty"
            )
        self.batch_size = config.data.per_process_batch(self.world)  # images per process
        self.global_batch = self.batch_size * self.world
        self.model_args = resolve_model_args(config, self.train_set) if model is None else {}
        if model is None:
            model = create_model(config.model.name, **self.model_args)
        self.model = model.to(self.device)
        if config.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_augment, self.eval_augment = build_augments(config, self.train_set, self.device)
        self.loaders = self._build_loaders()
        self.steps_per_epoch = len(self.loaders["train_sampler"]) // self.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the batch ({self.batch_size} per process x {self.world} process(es)) is "
                f"larger than the training set ({len(self.train_set)} samples): expected at "
                "most its size"
            )
        self.epochs = config.train.epochs
        self.max_steps = config.train.max_steps
        if self.max_steps:
            self.epochs = math.ceil(self.max_steps / self.steps_per_epoch)
        self.total_steps = self.max_steps or self.epochs * self.steps_per_epoch

        if config.train.sync_bn and self.distributed:
            self.model = sync_batch_statistics(self.model, self.device)
        self.base_lr = scaled_lr(config, self.global_batch)
        self.optimizer = build_run_optimizer(config, self.model, self.base_lr)
        self.scheduler = self._build_schedule()
        #: the parts of training the trainer composes (binary networks: BinaryTraining)
        self.parts: list[TrainingPart] = [
            part for part in (BinaryTraining.for_run(self),) if part is not None
        ]
        for part in self.parts:
            self.callbacks.extend(part.callbacks())
        unclipped = {id(p) for part in self.parts for p in part.unclipped_parameters()}
        params = list(self.model.parameters())
        self._clipped = [p for p in params if id(p) not in unclipped]
        self._unclipped = [p for p in params if id(p) in unclipped]
        self.nonfinite = NonFiniteWatch()
        self.ddp_model: nn.Module = self.model
        if self.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)

        self.epoch = 0  # completed epochs
        self.batch_in_epoch = 0  # batches done in the current epoch
        self.step = 0  # optimizer steps done
        self.best: float | None = None
        self.train_sums = TrainSums(self.device)
        self.last_row: dict[str, Any] = {}
        self.best_metric = config.train.best_metric or (
            "val_miou" if config.train.task == "segmentation" else "val_acc1"
        )
        self.logger = MetricsLogger(self.run_dir) if self.is_main else None
        if self.resume_from is not None:
            self._resume()
        elif self.is_main:
            save_config(config, self.run_dir / "config.toml")

    # ----------------------------------------------------------------- set-up helpers
    def _build_loaders(self) -> dict[str, Any]:
        loader, sampler = train_loader(
            self.train_set,
            batch_size=self.batch_size,
            seed=self.config.train.seed,
            rank=self.rank,
            world=self.world,
            num_workers=self.config.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        loaders: dict[str, Any] = {"train_sampler": sampler, "train": loader}
        if self.val_set is not None:
            loaders["val"] = self.eval_loader(self.val_set)
        return loaders

    def eval_loader(self, dataset: Dataset) -> DataLoader:
        """Each rank evaluates its own shard (no padding: metrics are summed over ranks)."""
        cfg = self.config.data
        return eval_loader(
            dataset,
            batch_size=cfg.eval_batch_size or self.batch_size,
            rank=self.rank,
            world=self.world,
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _build_schedule(self):
        """The lr schedule of the real-valued optimizer (None when it has no parameters)."""
        real = real_optimizer(self.optimizer)
        if real is None:
            return None
        return build_run_schedule(
            real,
            self.config.schedule,
            "schedule",
            ("lr",),
            epochs=self.epochs,
            total_steps=self.total_steps,
        )

    def part(self, kind: type) -> Any:
        """The training part of type `kind` this run composes (e.g. BinaryTraining), or None."""
        return next((p for p in self.parts if isinstance(p, kind)), None)

    def schedulers(self) -> dict[str, tuple[str, Any]]:
        """checkpoint key -> (config section, scheduler or None) of every schedule of the run."""
        out: dict[str, tuple[str, Any]] = {
            "scheduler": ("schedule", self.scheduler),
            "binary_scheduler": ("binary_schedule", None),  # the key every checkpoint has
        }
        for part in self.parts:
            out.update(part.schedulers())
        return out

    # ----------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue this run bit-exactly."""
        state = {
            "format": FORMAT,
            "version": VERSION,
            "model_name": self.config.model.name,
            "model_args": self.model_args,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **{k: None if s is None else s.state_dict() for k, (_, s) in self.schedulers().items()},
            "stop_reason": self.stop_reason,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "best": self.best,
            "processes": self.world,
            "batch_per_process": self.batch_size,
            "flip_counts": [],  # the key every checkpoint has (BinaryTraining's entry)
            **{k: v for part in self.parts for k, v in part.state_entries().items()},
            "train_sums": self.train_sums.values(),
            "rng": rng_state(),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "config": self.config.to_dict(),
            "metrics": dict(self.last_row),
        }
        return state

    def save(self, name: str = "last") -> Path | None:
        """Atomically write `<name>.pt` (rank 0 only)."""
        self.check_finite()  # a checkpoint holds only states of finite steps
        if not self.is_main:
            return None
        path = self.run_dir / f"{name}.pt"
        atomic_torch_save(self.checkpoint_state(), path)
        return path

    def _resume(self) -> None:
        path = self.resume_from or self.run_dir / "last.pt"
        ckpt = load_checkpoint(path)
        changed = resume_checks.check_resumed_config(ckpt, self.config)
        resume_checks.check_resumable_length(
            ckpt, steps_per_epoch=self.steps_per_epoch, epochs=self.epochs, max_steps=self.max_steps
        )
        resume_checks.check_same_launch(
            ckpt,
            model_name=self.config.model.name,
            processes=self.world,
            batch_per_process=self.batch_size,
        )
        load_model_state(self.model, ckpt["model"], ckpt["path"])
        resume_checks.load_optimizer_state(self.optimizer, ckpt, self.config.optim.name)
        resume_checks.load_schedulers(ckpt, self.schedulers())
        for part in self.parts:
            part.load_state_entries(ckpt)
        self.stop_reason = ckpt.get("stop_reason") or ""
        self.should_stop = bool(self.stop_reason)  # a stopped run stays finished
        self.epoch, self.batch_in_epoch = ckpt["epoch"], ckpt["batch_in_epoch"]
        self.step, self.best = ckpt["step"], ckpt["best"]
        self.train_sums.load(ckpt["train_sums"])
        self.last_row = dict(ckpt.get("metrics", {}))
        for cb, state in zip(self.callbacks, ckpt.get("callbacks", [])):
            cb.load_state_dict(state)
        set_rng_state(ckpt["rng"])
        if self.logger is not None:
            self.logger.truncate(after_epoch=self.epoch + 1)
        if not self.is_main:
            return
        if path.name != "last.pt":
            print(
                f"note: {self.run_dir} has {path.name} but no last.pt (killed between writing "
                f"the two, which then hold the same state); resuming from {path.name} at epoch "
                f"{self.epoch}, step {self.step}",
                file=sys.stderr,
            )
        if changed:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            print(f"note: resuming with {shown}; config.toml updated", file=sys.stderr)
            save_config(self.config, self.run_dir / "config.toml")
            resume_checks.say_stretched(
                ckpt,
                self.config,
                steps_per_epoch=self.steps_per_epoch,
                epochs=self.epochs,
                total_steps=self.total_steps,
                schedulers=self.schedulers(),
            )

    # ----------------------------------------------------------------- the loop
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.config.train.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        tcfg = self.config.train
        ignore = -100 if tcfg.ignore_index is None else tcfg.ignore_index
        return F.cross_entropy(
            output.float(), target, label_smoothing=tcfg.label_smoothing, ignore_index=ignore
        )

    def _apply_augment(self, augment: nn.Module, x: torch.Tensor, y: torch.Tensor):
        if self.config.train.task == "segmentation":
            return augment(x, y)
        return augment(x), y

    def fit(self) -> dict[str, Any]:
        """Train to the end (or until a callback stops), return the last epoch's metrics row."""
        try:  # the run dir stays locked until the last callback has run
            for cb in self.callbacks:
                cb.on_train_start(self)
            try:
                self._train_epochs()
                shown = self.is_main and self.config.train.progress
                if self.should_stop and self.stop_reason and shown:
                    print(f"stopped after epoch {self.epoch}: {self.stop_reason}", flush=True)
            finally:
                if self.is_main and self.config.output.plot and self.logger is not None:
                    plot_curves(self.run_dir)
            for cb in self.callbacks:
                cb.on_train_end(self)
        finally:
            self.lock.release()
        return self.last_row

    def _train_epochs(self) -> None:
        try:
            while self.epoch < self.epochs and not self.should_stop and not self._done_steps():
                self._train_epoch()
        except NonFiniteError:
            raise
        except Exception as error:  # maybe a consequence of a non-finite step not read yet
            try:
                self.check_finite()
            except NonFiniteError as bad:
                raise bad from error
            raise

    def check_finite(self) -> None:
        """Read the steps' pending loss / gradient verdicts (one sync): NonFiniteError names
        the first non-finite step."""
        self.nonfinite.check(self.run_dir)

    def _done_steps(self) -> bool:
        return bool(self.max_steps) and self.step >= self.max_steps

    def _train_epoch(self) -> None:
        tcfg = self.config.train
        sampler: ResumableSampler = self.loaders["train_sampler"]
        sampler.set_epoch(self.epoch, start=self.batch_in_epoch * self.batch_size)
        self.loaders["train"].generator.manual_seed(tcfg.seed * 1_000_003 + self.epoch)
        if self.batch_in_epoch == 0:
            self.train_sums.reset()
        steps_left = self.steps_per_epoch - self.batch_in_epoch
        if self.max_steps:
            steps_left = min(steps_left, self.max_steps - self.step)
        bar = ProgressBar(
            total=self.batch_in_epoch + steps_left,  # a max_steps run ends mid-epoch
            desc=f"epoch {self.epoch + 1}/{self.epochs}",
            disable=not (tcfg.progress and self.is_main),
            initial=self.batch_in_epoch,
        )
        self.ddp_model.train()
        start = time.perf_counter()
        images = 0
        for x, y in self.loaders["train"]:
            if steps_left <= 0:
                break
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with torch.no_grad():
                x, y = self._apply_augment(self.train_augment, x, y)
            info = self.train_step(x, y)
            steps_left -= 1
            images += x.shape[0] * self.world
            refresh = bar.due()  # the bar reads the loss then: a sync anyway
            bar.update(x.shape[0] * self.world, loss=info["loss"], acc=self.train_sums.accuracy)
            if self.nonfinite.due() or (refresh and not self.distributed):
                self.check_finite()  # under DDP every rank checks at the same steps
            for cb in self.callbacks:
                cb.on_step_end(self, info)
            if tcfg.checkpoint_every and self.step % tcfg.checkpoint_every == 0:
                self.save("last")
        bar.close()
        elapsed = time.perf_counter() - start
        self._end_epoch(images / max(elapsed, 1e-9))

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """One optimizer step. Nothing in it waits for the device: the loss, the gradient
        norm and the sums stay device tensors, their finite-ness is read later
        (`check_finite`), so a non-finite step stops the run a bounded number of steps on."""
        tcfg = self.config.train
        with self.autocast():
            output = self.ddp_model(x)
            loss = self.loss_fn(output, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self._clip_gradients()
        loss = loss.detach()
        self.nonfinite.record(loss, grad_norm, self.epoch + 1, self.step + 1)
        self.optimizer.step()
        for part in self.parts:
            part.after_optimizer_step(self)
        if self.config.schedule.unit == "step" and self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        self.batch_in_epoch += 1
        output = output.detach()
        correct, counted = correct_predictions(output, y, tcfg.task, tcfg.ignore_index)
        self.train_sums.add(loss, y.shape[0], correct, counted)
        return {"loss": loss, "grad_norm": grad_norm, "output": output}

    def _clip_gradients(self) -> torch.Tensor:
        """train.grad_clip over the gradients it may rescale (not those a part keeps apart,
        e.g. Bop's); returns the norm of all gradients, a device tensor."""
        max_norm = self.config.train.grad_clip
        grads = [p.grad for p in self._clipped if p.grad is not None]
        if max_norm and grads:
            norm = torch.nn.utils.clip_grad_norm_(self._clipped, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        kept = [p.grad for p in self._unclipped if p.grad is not None]
        if kept:
            kept_norm = torch.nn.utils.get_total_norm(kept).to(norm.device)
            norm = torch.linalg.vector_norm(torch.stack([norm, kept_norm]))
        return norm

    def _end_epoch(self, images_per_s: float) -> None:
        self.check_finite()
        self.epoch += 1
        self.batch_in_epoch = 0
        part_columns = {k: v for part in self.parts for k, v in part.end_epoch(self).items()}
        if self.config.schedule.unit == "epoch" and self.scheduler is not None:
            self.scheduler.step()
        sums = self.train_sums.reduced()
        real = real_optimizer(self.optimizer)
        row: dict[str, Any] = {"epoch": self.epoch, "step": self.step}
        if real is not None:  # a model of binary weights only has no lr
            row["lr"] = real.param_groups[0]["lr"]
        row["train_loss"] = TrainSums.mean_loss(sums)
        row["images_per_s"] = images_per_s
        accuracy = "train_acc1" if self.config.train.task == "classification" else "train_pixel_acc"
        row[accuracy] = TrainSums.percent_correct(sums)
        row.update(part_columns)
        last = self.epoch >= self.epochs or self._done_steps()
        if "val" in self.loaders and (self.epoch % self.config.train.eval_every == 0 or last):
            row.update({f"val_{k}": v for k, v in self.evaluate(self.loaders["val"]).items()})
        for cb in self.callbacks:
            cb.on_epoch_end(self, row)
        self.last_row = row
        improved = False
        if self.best_metric in row:
            value = float(row[self.best_metric])
            lower_better = self.best_metric.endswith("loss")
            if self.best is None or (value < self.best if lower_better else value > self.best):
                self.best, improved = value, True
        if self.logger is not None:
            self.logger.log(row)
        # best.pt before last.pt: last.pt records the new best, so a kill between the two
        # writes must find best.pt already written (a resume redoes the epoch otherwise)
        if improved:
            self.save("best")
        self.save("last")
        if self.is_main and self.config.train.progress:
            shown = ", ".join(
                f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "lr"
            )
            print(f"epoch {self.epoch}/{self.epochs}: {shown}", flush=True)

    @torch.no_grad()
    def evaluate(self, loader: DataLoader) -> dict[str, Any]:
        """Metrics over the whole loader (summed over ranks when distributed)."""
        return evaluate(
            self.model,
            loader,
            task=self.config.train.task,
            device=self.device,
            augment=self.eval_augment,
            loss_fn=self.loss_fn,
            num_classes=self.model_args.get("num_classes")
            or dataset_attr(self.train_set, "num_classes", None),
            autocast=self.autocast,
            ignore_index=self.config.train.ignore_index,
        )
