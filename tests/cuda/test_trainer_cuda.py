"""The trainer on the device: bfloat16 autocast, channels-last, FBN, Bop; a resumed run.

Each variant trains 6 steps on the bundled MNIST subset three ways: uninterrupted; stopped by
an exception at step 4 (its last checkpoint is step 3's, mid-epoch); and that run resumed.
Checked: losses finite, the run dir complete, activations in bfloat16 under train.amp="bf16",
every 4-D parameter and the activations in channels-last under train.channels_last=true, and
the resumed run ending where the uninterrupted one ends: bit for bit on the CPU; on CUDA within
5% of the distance the last three steps moved the weights (cuDNN / atomics may round
differently from run to run; a resume that lost or repeated a step, or the optimizer state,
is off by about a third of that distance or more).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lightnets.engine import Callback, Trainer, load_config
from lightnets.engine.binary import BinaryTraining
from lightnets.engine.checkpoint import load_checkpoint
from lightnets.nn import FBNConv2d

pytestmark = pytest.mark.cuda

COMMON = [
    "train.progress=false",
    "output.plot=false",
    "train.max_steps=6",
    "train.checkpoint_every=3",
    "train.deterministic=true",
    "schedule.warmup=0",
    "data.eval_batch_size=500",
]
VARIANTS = {
    "bf16": ("mnist_cnn", ["model.args.width=8", "train.amp=bf16"]),
    "channels_last": ("mnist_cnn", ["model.args.width=8", "train.channels_last=true"]),
    "fbn-bf16-channels_last": ("mnist_demo", ["train.amp=bf16", "train.channels_last=true"]),
    "bop": ("bnn_mnist_bop", []),
}
RUN_FILES = {"config.toml", "last.pt", "best.pt", "metrics.jsonl", "metrics.csv"}


@pytest.fixture(autouse=True)
def _restore_global_flags():
    """train.deterministic sets process-wide flags; later tests get them back as they were."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2:]


class _Interrupted(Exception):
    pass


class _StopAt(Callback):
    """Raises at the end of step `step` (before that step's checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, info) -> None:
        if trainer.step >= self.step:
            raise _Interrupted


class _Activations:
    """dtype and memory format of the training-mode outputs of every conv."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: list[tuple[torch.dtype, bool]] = []
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, FBNConv2d)):
                m.register_forward_hook(self._hook)

    def _hook(self, module, inputs, out) -> None:
        if module.training and out.dim() == 4 and out.shape[1] > 1 and out.shape[-1] > 1:
            channels_last = out.is_contiguous(memory_format=torch.channels_last)
            self.seen.append((out.dtype, channels_last and not out.is_contiguous()))


def _config(recipe: str, extra: list[str], device: torch.device):
    return load_config(recipe, [*COMMON, f"train.device={device}", *extra])


def _float_state(state: dict) -> torch.Tensor:
    return torch.cat([v.double().flatten() for v in state.values() if v.is_floating_point()])


def _check_channels_last(model: nn.Module) -> None:
    four_d = [(n, p) for n, p in model.named_parameters() if p.dim() == 4]
    assert four_d
    wrong = [n for n, p in four_d if not p.is_contiguous(memory_format=torch.channels_last)]
    assert not wrong, wrong


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_then_resume(device, tmp_path, variant):
    recipe, extra = VARIANTS[variant]
    amp = "train.amp=bf16" in extra
    channels_last = "train.channels_last=true" in extra

    full = Trainer(_config(recipe, extra, device), tmp_path / "full")
    assert full.device.type == device.type
    activations = _Activations(full.model)
    row = full.fit()
    assert {p.name for p in (tmp_path / "full").iterdir()} >= RUN_FILES
    rows = [json.loads(s) for s in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == row["step"] == 6
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])
    assert 0 <= row["val_acc1"] <= 100
    last = load_checkpoint(tmp_path / "full" / "last.pt")
    assert last["step"] == 6
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert all(p.device.type == device.type for p in full.model.parameters())
    assert activations.seen
    dtypes = {dtype for dtype, _ in activations.seen}
    assert dtypes == ({torch.bfloat16} if amp else {torch.float32}), dtypes
    if channels_last:
        _check_channels_last(full.model)
        assert all(cl for _, cl in activations.seen), activations.seen
    if variant == "bop":
        assert "flips" in row and row["flips"] > 0 and math.isfinite(row["log_flip_ratio"])
        for p in full.part(BinaryTraining).bop.param_groups[0]["params"]:
            assert bool(((p == 1) | (p == -1)).all())

    cut = tmp_path / "cut"
    with pytest.raises(_Interrupted):
        Trainer(_config(recipe, extra, device), cut, callbacks=[_StopAt(4)]).fit()
    at_cut = load_checkpoint(cut / "last.pt")
    assert at_cut["step"] == 3 and at_cut["batch_in_epoch"] == 3
    resumed = Trainer(_config(recipe, extra, device), cut, resume=True)
    assert resumed.step == 3
    if channels_last:
        _check_channels_last(resumed.model)  # loading the checkpoint kept the format
    row = resumed.fit()
    assert row["step"] == 6 and math.isfinite(row["train_loss"])
    assert {p.name for p in cut.iterdir()} >= RUN_FILES
    end = load_checkpoint(cut / "last.pt")
    assert end["step"] == 6
    for key, value in last["model"].items():
        if not value.is_floating_point():
            assert torch.equal(end["model"][key], value), key
    if device.type == "cpu":
        for key, value in last["model"].items():
            assert torch.equal(end["model"][key], value), key
    else:
        a, b = _float_state(last["model"]), _float_state(end["model"])
        moved = float((a - _float_state(at_cut["model"])).norm())
        assert moved > 0
        assert float((a - b).norm()) <= 0.05 * moved, (float((a - b).norm()), moved)
