"""The training loop: config in, run directory (checkpoints, metrics, curves) out.

Everything the loop draws randomness from is either restored from the checkpoint (torch,
numpy and Python RNGs) or a pure function of (seed, epoch) (the data order), so a run killed
at any step and resumed ends with exactly the weights of an uninterrupted run.

Binary networks (paper 004): with `optim.binary = "bop"` the optimizer is a
`CompositeOptimizer` (Bop for the +1/-1 weights of bop-mode binary layers, `optim.name` for the
rest) and `[binary_schedule]` schedules Bop's gamma (or threshold) apart from the lr. Each
epoch row then has `flips` (weights flipped in the epoch), `log_flip_ratio` (eq. 7's
pi_t = ln(flips_t / n + 1e-9), averaged over the epoch's steps), `log_flip_ratio_steps` (pi_t
of every step, for per-step plots) and `bop_gamma` (the gamma of the epoch's last step).
`train.stop_after_flipless_epochs = N` ends the run after N epochs without a flip. After every
optimizer step, latent weights of binary layers with clip_weights=True are clamped to [-1, 1].
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightnets.engine import distributed as dist_utils
from lightnets.engine.callbacks import Callback, NoFlipStopping
from lightnets.engine.checkpoint import (
    FORMAT,
    VERSION,
    atomic_torch_save,
    load_checkpoint,
    load_model_state,
    rng_state,
    set_rng_state,
)
from lightnets.engine.config import Config, load_config, save_config
from lightnets.engine.runlock import LOCK_NAME, RunLock
from lightnets.engine.sampler import ResumableSampler
from lightnets.errors import UserError
from lightnets.nn.binary import clip_latent_weights_, is_binary_layer


class NonFiniteError(UserError):
    """The loss or the gradient became NaN/Inf; the last good checkpoint is kept."""


def _fresh_sums() -> dict[str, float]:
    """An epoch's running training sums: loss * samples, samples, correct and counted
    predictions (images, or labelled pixels for segmentation)."""
    return {"loss": 0.0, "n": 0.0, "correct": 0.0, "counted": 0.0}


def _accuracy(sums: dict[str, float]) -> float:
    return sums["correct"] / max(sums["counted"], 1) * 100


#: What a run writes before its first checkpoint: a run dir holding only these lost nothing
#: that a start from the beginning would not write again
_BEFORE_CHECKPOINT = {"config.toml", "metrics.jsonl", "metrics.csv", "curves.png"}


def _entries(run_dir: Path) -> list[Path]:
    """The run dir's entries, less the lock and temporary files of killed writes."""
    return [p for p in run_dir.iterdir() if p.name != LOCK_NAME and not _is_temp(p)]


#: Config keys (prefixes) a resumed run may change: how long it runs, how it logs and
#: evaluates, where it reads data and on which device; nothing that the saved model,
#: optimizer or sampler state depends on. A new length changes a linear / cosine / poly
#: schedule (a function of the step and the run's length) from where the run is on: the
#: resume says so, with the value it jumps from and to (`Trainer._say_stretched`).
RESUMABLE_PREFIXES = (
    "train.epochs",
    "train.max_steps",
    "train.progress",
    "train.eval_every",
    "train.checkpoint_every",
    "train.device",
    "train.stop_after_flipless_epochs",
    "data.root",
    "data.num_workers",
    "data.eval_batch_size",
    "output.",
)


#: schedules whose factor depends on the run's length (the others count steps from 0)
LENGTH_SCHEDULES = ("linear", "cosine", "poly")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 3}} -> {"train.epochs": 3} (model.args and data.args kept whole)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in ("model.args", "data.args"):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _never_checkpointed(run_dir: Path) -> bool:
    """A run dir of a run that stopped before its first checkpoint (its config, maybe a
    metrics row): nothing in it is lost by starting again, so that needs no --overwrite."""
    return {p.name for p in _entries(run_dir)} <= _BEFORE_CHECKPOINT


def _killed_between_checkpoints(run_dir: Path) -> bool:
    """best.pt but no last.pt: a run killed between the two writes of its first checkpoint
    (an improving epoch writes best.pt, then last.pt, with nothing changing in between, so
    best.pt holds exactly the state last.pt would). A resume continues from best.pt."""
    names = {p.name for p in _entries(run_dir)}
    return (
        "best.pt" in names and "last.pt" not in names and names <= _BEFORE_CHECKPOINT | {"best.pt"}
    )


def sync_batch_statistics(model: nn.Module, device: torch.device) -> nn.Module:
    """`train.sync_bn`: batch statistics over all processes, for BN (torch's SyncBatchNorm,
    CUDA only) and for FBN (its sync_stats all-reduce, any backend). Returns the model.

    torch's `convert_sync_batchnorm` turns any BatchNorm subclass into a plain SyncBatchNorm,
    which drops the activation of timm's BatchNormAct2d and the like: such layers are split
    first (`lightnets.deploy.normact`: the norm is synced, the activation kept; their state
    keys gain a ``.norm``), and BN subclasses with a forward of their own that cannot be
    split are left unsynced, with a warning naming them. lightnets' FrozenBatchNorm and
    BatchRenorm are left as they are."""
    from lightnets.deploy.fuse import is_foldable_norm, set_module
    from lightnets.deploy.normact import name_a_few, split_norm_act
    from lightnets.nn.fbn import FBNConv2d

    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and device.type != "cuda":
        raise UserError(
            "train.sync_bn=true needs CUDA devices for the model's BatchNorm layers (torch's "
            "SyncBatchNorm has no CPU kernel): expected train.sync_bn=false on CPU, or a model "
            "whose only batch norms are FBN layers"
        )
    for m in model.modules():
        if isinstance(m, FBNConv2d):
            m.sync_stats = True
    if not has_bn:
        return model
    model, report = split_norm_act(model)
    if report.unsplit:
        names = list(report.unsplit)
        warnings.warn(
            f"train.sync_bn: left {len(names)} norm layer(s) with a forward of their own "
            f"unsynced: {name_a_few(names)} ({report.unsplit[names[0]]}; a plain SyncBatchNorm "
            "in their place would drop what their forward adds)",
            stacklevel=2,
        )
    plain = [
        (name, m)
        for name, m in model.named_modules()
        if is_foldable_norm(m) and not isinstance(m, nn.SyncBatchNorm)
    ]
    for name, m in plain:
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(m)
        if not name:
            return synced
        set_module(model, name, synced)
    return model


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed every RNG the loop uses; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def build_datasets(config: Config) -> tuple[Dataset, Dataset | None]:
    """Train and validation datasets from the data config."""
    from lightnets.data import load_dataset, split_train_val

    cfg = config.data
    train = load_dataset(cfg.name, root=cfg.root, split=cfg.train_split, **cfg.args)
    if cfg.val_fraction > 0:
        return split_train_val(
            train, cfg.val_fraction, seed=config.train.seed, holdout=cfg.val_holdout
        )
    if cfg.val_split:
        return train, load_dataset(cfg.name, root=cfg.root, split=cfg.val_split, **cfg.args)
    return train, None


def resolve_model_args(config: Config, dataset: Dataset) -> dict[str, Any]:
    """Model kwargs with num_classes / in_chans filled in from the dataset when not given."""
    from lightnets.models.registry import model_arguments

    args = dict(config.model.args)
    accepted = model_arguments(config.model.name)
    for key in ("num_classes", "in_chans"):
        if key in accepted and key not in args and hasattr(dataset, key):
            args[key] = int(getattr(dataset, key))
    return args


def _dataset_attr(dataset: Dataset, name: str, default: Any) -> Any:
    while not hasattr(dataset, name) and hasattr(dataset, "dataset"):
        dataset = dataset.dataset  # torch Subset and friends
    return getattr(dataset, name, default)


class ChannelsLast(nn.Module):
    """An augmentation whose output batch comes back in channels-last memory format (NHWC),
    for a model converted with `.to(memory_format=torch.channels_last)`."""

    def __init__(self, augment: nn.Module) -> None:
        super().__init__()
        self.augment = augment

    def forward(self, x: torch.Tensor, *rest: torch.Tensor):
        out = self.augment(x, *rest)
        if isinstance(out, tuple):
            return (out[0].contiguous(memory_format=torch.channels_last), *out[1:])
        return out.contiguous(memory_format=torch.channels_last)


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
        created = self._missing_dirs()
        try:
            self._start(config, resume, overwrite, model, datasets)
        except BaseException:
            self._abandon_start(created)
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
        lock (`_abandon_start`)."""
        resume = self._prepare_run_dir(resume, overwrite)
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
            from lightnets.models.registry import create_model

            model = create_model(config.model.name, **self.model_args)
        self.model = model.to(self.device)
        if config.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_augment, self.eval_augment = self._build_augment()
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
        self.optimizer = self._build_optimizer()
        self.bop = self._find_bop()
        self.scheduler = self._build_schedule()
        self.binary_scheduler = self._build_binary_schedule()
        self._has_binary_layers = any(is_binary_layer(m) for m in self.model.modules())
        self.flip_counts: list[Any] = []  # flips of each step of this epoch (tensors or ints)
        self._bop_gamma: float | None = None  # Bop's gamma in the last step
        if config.train.stop_after_flipless_epochs:
            self.callbacks.append(NoFlipStopping(config.train.stop_after_flipless_epochs))
        self.ddp_model: nn.Module = self.model
        if self.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)

        self.epoch = 0  # completed epochs
        self.batch_in_epoch = 0  # batches done in the current epoch
        self.step = 0  # optimizer steps done
        self.best: float | None = None
        self.train_sums = _fresh_sums()
        self.last_row: dict[str, Any] = {}
        self.best_metric = config.train.best_metric or (
            "val_miou" if config.train.task == "segmentation" else "val_acc1"
        )
        self.logger = None
        if self.is_main:
            from lightnets.engine.logging import MetricsLogger

            self.logger = MetricsLogger(self.run_dir)
        if resume:
            self._resume()
        elif self.is_main:
            save_config(config, self.run_dir / "config.toml")

    # ----------------------------------------------------------------- set-up helpers
    def _missing_dirs(self) -> list[Path]:
        """The run dir and those of its parents that do not exist yet (innermost first): what
        a start creates, and a failed start removes again."""
        missing = []
        for path in (self.run_dir, *self.run_dir.parents):
            if path.exists():
                break
            missing.append(path)
        return missing

    def _abandon_start(self, created: list[Path]) -> None:
        """After an error in __init__: release the lock (this process could not start another
        Trainer on the dir otherwise) and leave nothing new behind (the lock file and the
        empty directories this start created)."""
        self.lock.release(remove=True)  # the lock file only if this start created it
        if not self.is_main:
            return
        for path in created:
            try:
                path.rmdir()
            except OSError:  # not empty (or gone): what is in it is not this start's alone
                break

    def _prepare_run_dir(self, resume: bool, overwrite: bool) -> bool:
        """Lock the run dir, clean what killed writes left, and decide how the run starts:
        returns whether it resumes (and sets `resume_from`). --resume of a dir that does not
        exist is refused (a mistyped --out must not start a new run); of a run with no
        checkpoint it starts afresh, saying so."""
        run_dir = self.run_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(
                f"--out {run_dir} is a file: expected a directory for the run (a new path, or "
                "an existing run dir)"
            )
        if resume and not run_dir.exists():
            raise UserError(
                f"cannot resume: run dir {run_dir} does not exist: expected the --out of an "
                "existing run (check its spelling), or no --resume to start a new run there"
            )
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            for temp in [p for p in run_dir.iterdir() if _is_temp(p)]:  # killed writes
                with contextlib.suppress(OSError):
                    temp.unlink()
        dist_utils.barrier()
        entries = _entries(run_dir)
        if resume and (run_dir / "last.pt").is_file():
            self.resume_from = run_dir / "last.pt"
            return True
        if resume and _killed_between_checkpoints(run_dir):
            self.resume_from = run_dir / "best.pt"
            return True
        if resume and not _never_checkpointed(run_dir):
            raise UserError(
                f"cannot resume: {run_dir / 'last.pt'} does not exist and {run_dir} holds "
                f"other files ({', '.join(sorted(p.name for p in entries)[:5])}): expected a run "
                "dir with a checkpoint (--overwrite replaces it)"
            )
        if entries and _never_checkpointed(run_dir):
            if self.is_main:
                print(
                    f"note: {run_dir} holds a run that stopped before its first checkpoint "
                    f"({', '.join(sorted(p.name for p in entries))}); starting it afresh",
                    file=sys.stderr,
                )
                for path in entries:
                    path.unlink()
        elif resume:  # an empty dir: nothing to resume
            if self.is_main:
                print(
                    f"note: {run_dir} holds no run to resume (no checkpoint); starting a new "
                    "run there",
                    file=sys.stderr,
                )
        elif entries:
            if not overwrite:
                raise UserError(
                    f"run dir {run_dir} already exists and is not empty: pass --resume to "
                    "continue it, --overwrite to replace it, or --out for a new dir"
                )
            if self.is_main:
                for path in entries:  # everything but the lock we hold
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        dist_utils.barrier()
        return False

    def _build_augment(self) -> tuple[nn.Module, nn.Module]:
        from lightnets.data import build_batch_augment

        cfg = self.config.data
        mean = _dataset_attr(self.train_set, "mean", None)
        std = _dataset_attr(self.train_set, "std", None)
        size = cfg.image_size or _dataset_attr(self.train_set, "image_size", None)
        train = build_batch_augment(cfg.augment, mean=mean, std=std, image_size=size)
        evaluate = build_batch_augment(cfg.eval_augment, mean=mean, std=std, image_size=size)
        if self.config.train.channels_last:
            train, evaluate = ChannelsLast(train), ChannelsLast(evaluate)
        return train.to(self.device), evaluate.to(self.device)

    def _build_loaders(self) -> dict[str, Any]:
        cfg, tcfg = self.config.data, self.config.train
        sampler = ResumableSampler(
            len(self.train_set), shuffle=True, seed=tcfg.seed, rank=self.rank, world_size=self.world
        )
        pin = self.device.type == "cuda"
        loaders: dict[str, Any] = {
            "train_sampler": sampler,
            "train": DataLoader(
                self.train_set,
                batch_size=self.batch_size,
                sampler=sampler,
                num_workers=cfg.num_workers,
                drop_last=True,
                pin_memory=pin,
                # Its own generator: creating an iterator must not draw from the global RNG
                # (a resumed epoch creates one more iterator than an uninterrupted run).
                generator=torch.Generator(),
            ),
        }
        if self.val_set is not None:
            loaders["val"] = self.eval_loader(self.val_set)
        return loaders

    def eval_loader(self, dataset: Dataset) -> DataLoader:
        """Each rank evaluates its own shard (no padding: metrics are summed over ranks)."""
        cfg = self.config.data
        sampler = ResumableSampler(
            len(dataset), shuffle=False, rank=self.rank, world_size=self.world, pad=False
        )
        return DataLoader(
            dataset,
            batch_size=(cfg.eval_batch_size or self.batch_size),
            sampler=sampler,
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),  # evaluating must not move the global RNG
        )

    def _build_optimizer(self) -> Any:
        from lightnets.optim import build_binary_optimizer, build_optimizer
        from lightnets.optim.bop import named_binary_parameters

        cfg = self.config.optim
        lr = cfg.lr
        if cfg.lr_reference_batch:  # the linear scaling rule, on the global batch
            lr = lr * self.global_batch / cfg.lr_reference_batch
        self.base_lr = lr
        options = dict(
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            norm_weight_decay=cfg.norm_weight_decay,
            bias_weight_decay=cfg.bias_weight_decay,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
        )
        binary = named_binary_parameters(self.model)
        model_name = self.config.model.name
        if cfg.binary is None:
            if binary:
                raise UserError(
                    f"model {model_name!r} has {len(binary)} binary layer weight(s) in "
                    f"mode='bop' (+1/-1), which optim.name={cfg.name!r} would make real: "
                    "expected optim.binary = 'bop' (Bop flips them, optim.name trains the rest), "
                    "or the model in latent mode (e.g. model.args.mode = 'latent')"
                )
            return build_optimizer(self.model, cfg.name, lr, **options)
        if not binary:
            raise UserError(
                f"optim.binary={cfg.binary!r}, but model {model_name!r} has no binary layer "
                "weights in mode='bop' for it: expected a model with BinaryConv2d / BinaryLinear "
                "in bop mode (e.g. model.args.mode = 'bop'), or no optim.binary"
            )
        return build_binary_optimizer(
            self.model,
            cfg.name,
            lr,
            binary=cfg.binary,
            gamma=cfg.bop_gamma,
            threshold=cfg.bop_threshold,
            flip_test=cfg.bop_flip_test,
            **options,
        )

    def _find_bop(self):
        """The Bop part of the optimizer (None without one): flips are read from it."""
        from lightnets.optim import Bop, CompositeOptimizer

        if isinstance(self.optimizer, Bop):
            return self.optimizer
        if isinstance(self.optimizer, CompositeOptimizer):
            return self.optimizer.get("binary")
        return None

    def _real_optimizer(self):
        """The optimizer of the real-valued parameters (None when there are none)."""
        from lightnets.optim import CompositeOptimizer

        if isinstance(self.optimizer, CompositeOptimizer):
            return self.optimizer.get("real")
        return self.optimizer

    def _schedule_for(self, optimizer, cfg, section: str, keys: tuple[str, ...]):
        from lightnets.optim.schedules import build_schedule

        total = self.epochs if cfg.unit == "epoch" else self.total_steps
        if cfg.warmup >= total:
            raise UserError(
                f"{section}.warmup={cfg.warmup} must be shorter than the run ({total} {cfg.unit}s)"
            )
        return build_schedule(
            optimizer,
            cfg.name,
            total,
            warmup_steps=cfg.warmup,
            warmup_start_factor=cfg.warmup_start_factor,
            step_size=cfg.step_size,
            milestones=tuple(cfg.milestones),
            gamma=cfg.gamma,
            power=cfg.power,
            min_factor=cfg.min_factor,
            keys=keys,
        )

    def _build_schedule(self):
        """The lr schedule of the real-valued optimizer (None when it has no parameters)."""
        real = self._real_optimizer()
        if real is None:
            return None
        return self._schedule_for(real, self.config.schedule, "schedule", ("lr",))

    def _build_binary_schedule(self):
        """The schedule of Bop's gamma / threshold ([binary_schedule]); None without Bop."""
        if self.bop is None:
            return None
        cfg = self.config.binary_schedule
        return self._schedule_for(self.bop, cfg, "binary_schedule", tuple(cfg.keys))

    # ----------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue this run bit-exactly."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "model_name": self.config.model.name,
            "model_args": self.model_args,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "binary_scheduler": (
                None if self.binary_scheduler is None else self.binary_scheduler.state_dict()
            ),
            "flip_counts": self._flip_list(),
            "stop_reason": self.stop_reason,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "best": self.best,
            "processes": self.world,
            "batch_per_process": self.batch_size,
            "train_sums": dict(self.train_sums),
            "rng": rng_state(),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "config": self.config.to_dict(),
            "metrics": dict(self.last_row),
        }

    def save(self, name: str = "last") -> Path | None:
        """Atomically write `<name>.pt` (rank 0 only)."""
        if not self.is_main:
            return None
        path = self.run_dir / f"{name}.pt"
        atomic_torch_save(self.checkpoint_state(), path)
        return path

    def _resume(self) -> None:
        path = self.resume_from or self.run_dir / "last.pt"
        ckpt = load_checkpoint(path)
        changed = self._check_resumed_config(ckpt)
        self._check_resumable_length(ckpt)
        if ckpt.get("model_name") != self.config.model.name:
            raise UserError(
                f"checkpoint {ckpt['path']} holds model {ckpt.get('model_name')!r}, but the "
                f"config asks for {self.config.model.name!r}: expected the same model"
            )
        saved = (ckpt.get("processes"), ckpt.get("batch_per_process"))
        if saved[0] is not None and saved != (self.world, self.batch_size):
            raise UserError(
                f"checkpoint {ckpt['path']} was trained with {saved[0]} process(es) x "
                f"{saved[1]} images, this resume has {self.world} x {self.batch_size}: expected "
                "the same (the batch, the lr scaled from it and the position in the epoch "
                "depend on them); launch it as it was started"
            )
        load_model_state(self.model, ckpt["model"], ckpt["path"])
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as err:
            raise UserError(
                f"checkpoint {ckpt['path']} has optimizer state that does not fit "
                f"optim.name={self.config.optim.name!r}: {err}"
            ) from None
        schedulers = {"scheduler": self.scheduler, "binary_scheduler": self.binary_scheduler}
        for key, sched in schedulers.items():
            saved = ckpt.get(key)
            if (sched is None) != (saved is None) or (
                sched is not None and list(saved.get("keys", sched.keys)) != list(sched.keys)
            ):
                raise UserError(
                    f"checkpoint {ckpt['path']} was trained with another {key.replace('_', ' ')} "
                    "(present / scheduled keys differ from this config's): expected the config "
                    "the run was started with"
                )
            if sched is not None:
                sched.load_state_dict(saved)
        self.flip_counts = list(ckpt.get("flip_counts") or [])
        self.stop_reason = ckpt.get("stop_reason") or ""
        self.should_stop = bool(self.stop_reason)  # a stopped run stays finished
        self.epoch, self.batch_in_epoch = ckpt["epoch"], ckpt["batch_in_epoch"]
        self.step, self.best = ckpt["step"], ckpt["best"]
        sums = dict(ckpt["train_sums"])
        sums.setdefault("counted", sums.get("n", 0.0))  # checkpoints before "counted" existed
        self.train_sums = {**_fresh_sums(), **sums}
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
            self._say_stretched(ckpt)

    def _check_resumable_length(self, ckpt: dict[str, Any]) -> None:
        """A run that stopped at train.max_steps in the middle of an epoch closed that epoch
        there (its metrics row, its epoch schedule step and callbacks are done; the checkpoint
        says epoch done, no batch into the next), so it cannot go on from its step: resuming
        it for longer is one UserError, before anything is loaded, cut or rewritten."""
        spe = self.steps_per_epoch
        epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        into = step - (epoch - 1) * spe  # steps it did of its last epoch
        if ckpt["batch_in_epoch"] or not 0 < into < spe or ckpt.get("stop_reason"):
            return
        if not (self.max_steps > step if self.max_steps else self.epochs > epoch):
            return  # nothing more to train: it stays finished
        raise UserError(
            f"cannot resume {ckpt['path']} for longer: it stopped at train.max_steps={step}, "
            f"{into} of the {spe} steps of epoch {epoch}, and closed that epoch there (its "
            "metrics row, schedule step and callbacks are done), so it cannot go on from that "
            f"step: expected train.max_steps <= {step} for this run, or a new --out for a "
            f"longer one (a run whose max_steps is a multiple of the {spe} steps of an epoch "
            "can be lengthened)"
        )

    def _say_stretched(self, ckpt: dict[str, Any]) -> None:
        """A new length changes a linear / cosine / poly schedule from where the run is (its
        factor is a function of the step and the run's length): say so, with the jump."""
        saved = (ckpt.get("config") or {}).get("train") or {}
        spe = self.steps_per_epoch
        old_max, old_epochs = saved.get("max_steps"), saved.get("epochs")
        if not old_max and not old_epochs:
            return
        old = {
            "epoch": math.ceil(old_max / spe) if old_max else old_epochs,
            "step": old_max or old_epochs * spe,
        }
        new = {"epoch": self.epochs, "step": self.total_steps}
        parts = {"schedule": self.scheduler, "binary_schedule": self.binary_scheduler}
        for section, sched in parts.items():
            cfg = getattr(self.config, section)
            state = "scheduler" if section == "schedule" else "binary_scheduler"
            if sched is None or cfg.name not in LENGTH_SCHEDULES or old[cfg.unit] == new[cfg.unit]:
                continue
            key = sched.keys[0]
            group = next(g for g in sched.optimizer.param_groups if key in g)
            before = group[f"initial_{key}"] * float((ckpt.get(state) or {}).get("last_factor", 1))
            print(
                f"note: the {section} ({cfg.name}) now runs over {new[cfg.unit]} {cfg.unit}s "
                f"instead of {old[cfg.unit]}: it follows the new length from {cfg.unit} "
                f"{sched.t} on, so {key} goes from {before:.4g} to {group[key]:.4g} there",
                file=sys.stderr,
            )

    def _check_resumed_config(self, ckpt: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Before anything is loaded or truncated: the checkpoint's config against this one.
        Keys a run can change mid-way (its length, logging, workers, device) are returned
        (`_resume` takes them, updates config.toml and says so); any other difference is one
        UserError."""
        saved = ckpt.get("config")
        if not isinstance(saved, dict):
            return {}  # a checkpoint of an older version: the checks below still apply
        try:
            old = _flatten(load_config(saved).to_dict())
        except UserError:
            old = _flatten(saved)
        new = _flatten(self.config.to_dict())
        changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))}
        changed = {k: v for k, v in changed.items() if v[0] != v[1]}
        fixed = {k: v for k, v in changed.items() if not k.startswith(RESUMABLE_PREFIXES)}
        if fixed:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(fixed.items())[:6])
            raise UserError(
                f"cannot resume {ckpt['path']} with another config ({shown}"
                f"{'; ...' if len(fixed) > 6 else ''}): these cannot change mid-run (the model, "
                "optimizer and schedule states would not fit); expected the config the run was "
                f"started with, or a new --out (changeable: {', '.join(RESUMABLE_PREFIXES)})"
            )
        return changed

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
                while self.epoch < self.epochs and not self.should_stop and not self._done_steps():
                    self._train_epoch()
                shown = self.is_main and self.config.train.progress
                if self.should_stop and self.stop_reason and shown:
                    print(f"stopped after epoch {self.epoch}: {self.stop_reason}", flush=True)
            finally:
                if self.is_main and self.config.output.plot and self.logger is not None:
                    from lightnets.engine.logging import plot_curves

                    plot_curves(self.run_dir)
            for cb in self.callbacks:
                cb.on_train_end(self)
        finally:
            self.lock.release()
        return self.last_row

    def _done_steps(self) -> bool:
        return bool(self.max_steps) and self.step >= self.max_steps

    def _train_epoch(self) -> None:
        from lightnets.engine.logging import ProgressBar

        tcfg = self.config.train
        sampler: ResumableSampler = self.loaders["train_sampler"]
        sampler.set_epoch(self.epoch, start=self.batch_in_epoch * self.batch_size)
        self.loaders["train"].generator.manual_seed(tcfg.seed * 1_000_003 + self.epoch)
        if self.batch_in_epoch == 0:
            self.train_sums = _fresh_sums()
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
            bar.update(
                x.shape[0] * self.world,
                loss=info["loss"],
                acc=_accuracy(self.train_sums),
            )
            for cb in self.callbacks:
                cb.on_step_end(self, info)
            if tcfg.checkpoint_every and self.step % tcfg.checkpoint_every == 0:
                self.save("last")
        bar.close()
        elapsed = time.perf_counter() - start
        self._end_epoch(images / max(elapsed, 1e-9))

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """One optimizer step; refuses to continue on a non-finite loss or gradient."""
        tcfg = self.config.train
        with self.autocast():
            output = self.ddp_model(x)
            loss = self.loss_fn(output, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = tcfg.grad_clip if tcfg.grad_clip else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value) or not math.isfinite(float(grad_norm)):
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            last = self.run_dir / "last.pt"
            kept = (
                f"{last} keeps the last good state"
                if last.is_file()
                else "no checkpoint had been written yet"
            )
            raise NonFiniteError(
                f"the {what} became non-finite at epoch {self.epoch + 1} step {self.step + 1}; "
                f"stopped without saving ({kept}): expected finite values (try a lower "
                "optim.lr or train.grad_clip)"
            )
        self.optimizer.step()
        if self._has_binary_layers:
            clip_latent_weights_(self.model)
        if self.bop is not None:
            self.flip_counts.append(self.bop.last_flips_tensor)
            self._bop_gamma = float(self.bop.param_groups[0]["gamma"])  # before it is scheduled
        if self.config.schedule.unit == "step" and self.scheduler is not None:
            self.scheduler.step()
        if self.config.binary_schedule.unit == "step" and self.binary_scheduler is not None:
            self.binary_scheduler.step()
        self.step += 1
        self.batch_in_epoch += 1
        n = y.shape[0]
        self.train_sums["loss"] += loss_value * n
        self.train_sums["n"] += n
        correct, counted = self._correct(output.detach(), y)
        self.train_sums["correct"] += correct
        self.train_sums["counted"] += counted
        return {"loss": loss_value, "grad_norm": float(grad_norm), "output": output.detach()}

    def _correct(self, output: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(correct, counted) predictions of the batch: images, or for segmentation labelled
        pixels (the loss's ignore_index, -100 when unset, is what augmentation pads with)."""
        hit = output.argmax(1) == y
        if self.config.train.task == "classification":
            return float(hit.sum()), float(y.shape[0])
        ignore = self.config.train.ignore_index
        valid = y != (-100 if ignore is None else ignore)
        return float((hit & valid).sum()), float(valid.sum())

    def _flip_list(self) -> list[int]:
        """This epoch's per-step flip counts as ints (one device sync for all of them)."""
        tensors = [c for c in self.flip_counts if isinstance(c, torch.Tensor)]
        if tensors:
            values = iter(torch.stack([t.to(tensors[0].device) for t in tensors]).tolist())
            self.flip_counts = [
                next(values) if isinstance(c, torch.Tensor) else int(c) for c in self.flip_counts
            ]
        return [int(c) for c in self.flip_counts]

    def _flip_columns(self) -> dict[str, Any]:
        """flips, log_flip_ratio (eq. 7 averaged over the epoch's steps), per-step pi, gamma."""
        from lightnets.optim.bop import log_flip_ratio

        flips = self._flip_list()
        self.flip_counts = []
        self.bop.check_binary(full=True)  # also what .data writes did, which torch does not count
        self.bop.warn_nonfinite()
        n = self.bop.num_binary
        pis = [log_flip_ratio(f, n) for f in flips]
        columns: dict[str, Any] = {"flips": sum(flips)}
        if pis:
            columns["log_flip_ratio"] = sum(pis) / len(pis)
        columns["log_flip_ratio_steps"] = [round(p, 4) for p in pis]
        gamma = self._bop_gamma
        columns["bop_gamma"] = float(self.bop.param_groups[0]["gamma"]) if gamma is None else gamma
        return columns

    def _end_epoch(self, images_per_s: float) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        flip_columns = self._flip_columns() if self.bop is not None else {}
        if self.config.schedule.unit == "epoch" and self.scheduler is not None:
            self.scheduler.step()
        if self.config.binary_schedule.unit == "epoch" and self.binary_scheduler is not None:
            self.binary_scheduler.step()
        sums = self._reduce_train_sums()
        real = self._real_optimizer()
        row: dict[str, Any] = {"epoch": self.epoch, "step": self.step}
        if real is not None:  # a model of binary weights only has no lr
            row["lr"] = real.param_groups[0]["lr"]
        row["train_loss"] = sums["loss"] / max(sums["n"], 1)
        row["images_per_s"] = images_per_s
        accuracy = "train_acc1" if self.config.train.task == "classification" else "train_pixel_acc"
        row[accuracy] = _accuracy(sums)
        row.update(flip_columns)
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

    def _reduce_train_sums(self) -> dict[str, float]:
        if not self.distributed:
            return dict(self.train_sums)
        keys = sorted(self.train_sums)
        t = torch.tensor(
            [self.train_sums[k] for k in keys], dtype=torch.float64, device=self.device
        )
        torch.distributed.all_reduce(t)
        return dict(zip(keys, t.tolist()))

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
            or _dataset_attr(self.train_set, "num_classes", None),
            autocast=self.autocast,
            ignore_index=self.config.train.ignore_index,
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    task: str = "classification",
    device: torch.device | str = "cpu",
    augment: nn.Module | None = None,
    loss_fn=None,
    num_classes: int | None = None,
    autocast=contextlib.nullcontext,
    ignore_index: int | None = None,
) -> dict[str, Any]:
    """Evaluate `model` over `loader`: accuracy (classification) or mIoU & co (segmentation)."""
    from lightnets.engine.metrics import ClassificationMeter, SegmentationMeter

    device = torch.device(device)
    was_training = model.training
    model.eval()
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out.float(), y))
    if task == "segmentation":
        meter = SegmentationMeter(num_classes or 2, ignore_index=ignore_index)
    else:
        meter = ClassificationMeter(num_classes or 1000)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if augment is not None:
            if task == "segmentation":
                x, y = augment(x, y)
            else:
                x = augment(x)
        with autocast():
            out = model(x)
        meter.update(out.float(), y, loss=loss_fn(out, y))
    model.train(was_training)
    result = meter.compute()
    return {k: v for k, v in result.items() if k != "n" and not isinstance(v, list)}
