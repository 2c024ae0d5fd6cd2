"""Fault cases of a run directory: concurrent writers, kills at awkward moments, a full disk,
a resume with another config, an --out that is a file. Each ends in one clear line (exit 2 for
what the user can fix, 1 for a failed write) and loses nothing that was saved."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightnets.cli import main
from lightnets.engine.checkpoint import load_checkpoint
from tests.conftest import REPO, TINY, run_cli

QUICK = [*TINY, "schedule.warmup=0", "data.batch_size=256"]  # 15 steps an epoch


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    first = subprocess.Popen(
        [sys.executable, "-m", "lightnets", "train", "mnist_cnn"]
        + _sets([*QUICK, "train.epochs=50"])
        + ["--out", str(run)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while not (run / "last.pt").is_file():  # training, lock held, one checkpoint out
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
        second = run_cli("train", "mnist_cnn", *_sets(QUICK), "--out", str(run), "--resume")
        assert second.returncode == 2
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and f"in use by another lightnets process (pid {first.pid})" in err[0]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the OS dropped the lock with the process: the run resumes at once
    step = load_checkpoint(run / "last.pt")["step"]
    again = run_cli(
        "train", "mnist_cnn", *_sets([*QUICK, "train.epochs=50", f"train.max_steps={step + 5}"]),
        "--out", str(run), "--resume",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert load_checkpoint(run / "last.pt")["step"] == step + 5


def test_a_run_killed_in_its_first_checkpoint_write_restarts_under_resume(tmp_path):
    """What a kill during the first last.pt write leaves: the config, one metrics row and a
    temporary file. --resume (which the message advises) starts the run afresh."""
    run = tmp_path / "run"
    first = run_cli("train", "mnist_cnn", *_sets([*QUICK, "train.epochs=1"]), "--out", str(run))
    assert first.returncode == 0, first.stderr
    (run / "last.pt").rename(run / ".last.pt.1a2b3c4d.tmp")  # the killed write
    (run / "best.pt").unlink()
    (run / "curves.png").unlink(missing_ok=True)
    again = run_cli(
        "train", "mnist_cnn", *_sets([*QUICK, "train.epochs=1"]), "--out", str(run), "--resume"
    )
    assert again.returncode == 0, again.stderr
    assert (
        "stopped before its first checkpoint" in again.stderr
        and "starting it afresh" in again.stderr
    )
    assert not list(run.glob(".*.tmp"))
    assert [r["epoch"] for r in _rows(run)] == [1]  # the failed attempt's row is gone
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


def test_stale_temporary_files_are_removed_on_the_next_start(tmp_path):
    run = tmp_path / "run"
    assert (
        run_cli(
            "train", "mnist_cnn", *_sets([*QUICK, "train.max_steps=3"]), "--out", str(run)
        ).returncode
        == 0
    )  # noqa: E501
    (run / ".metrics.jsonl.deadbeef.tmp").write_text("half")
    done = run_cli(  # a finished run: the resume only cleans up (a longer one is refused)
        "train", "mnist_cnn", *_sets([*QUICK, "train.max_steps=3"]), "--out", str(run), "--resume"
    )
    assert done.returncode == 0, done.stderr
    assert not list(run.glob(".*.tmp"))


def test_out_that_is_a_file_is_one_line(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    done = run_cli("train", "mnist_cnn", *_sets(QUICK), "--out", str(target))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"lightnets train: error: --out {target} is a file: expected a directory for the run "
        "(a new path, or an existing run dir)"
    )
    assert target.read_text() == "mine"


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, capsys
):
    import torch

    import lightnets.engine.checkpoint as checkpoint

    run = tmp_path / "run"
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) > 2:  # epoch 1's best.pt and last.pt are written; epoch 2's fail
            raise RuntimeError(
                "[enforce fail at inline_container.cc:626] . unexpected pos 832 vs 768\n"
                "PytorchStreamWriter failed writing file data/3: file write failed"
            )
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    code = main(["train", "mnist_cnn", *_sets([*QUICK, "train.epochs=3"]), "--out", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith(f"lightnets train: error: cannot write {run}")
    assert "(the disk may be full)" in err[0] and "is intact" in err[0]
    assert load_checkpoint(run / "last.pt")["epoch"] == 1  # the previous checkpoint
    assert not list(run.glob(".*.tmp"))


def test_a_full_disk_while_logging_is_one_line(tmp_path, monkeypatch, capsys):
    real_open = Path.open

    def open_(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    run = tmp_path / "run"
    code = main(["train", "mnist_cnn", *_sets([*QUICK, "train.epochs=1"]), "--out", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "cannot write" in err[0] and "metrics.jsonl" in err[0] and "No space left" in err[0]


def test_a_resume_with_another_optimizer_is_refused_before_anything_is_cut(tmp_path):
    """Today's bug: an Adam checkpoint in an SGD run loaded, cut metrics.jsonl back, then
    crashed with KeyError: 'momentum'."""
    run = tmp_path / "run"
    assert (
        run_cli(
            "train", "mnist_cnn", *_sets([*QUICK, "train.epochs=2"]), "--out", str(run)
        ).returncode
        == 0
    )  # noqa: E501
    before = (run / "metrics.jsonl").read_bytes()
    last = load_checkpoint(run / "last.pt")
    # the config says adam from now on, the checkpoint holds an SGD state
    config = (run / "config.toml").read_text().replace('name = "sgd"', 'name = "adam"')
    (run / "config.toml").write_text(config)
    done = run_cli("train", "mnist_cnn", *_sets(["train.epochs=4"]), "--out", str(run), "--resume")
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "optim.name: 'sgd' -> 'adam'" in err[0]
    assert "cannot change mid-run" in err[0]
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing truncated
    assert load_checkpoint(run / "last.pt")["step"] == last["step"]


def test_a_resume_may_change_its_length_and_says_so(tmp_path):
    run = tmp_path / "run"
    assert (
        run_cli(
            "train", "mnist_cnn", *_sets([*QUICK, "train.epochs=1"]), "--out", str(run)
        ).returncode
        == 0
    )  # noqa: E501
    done = run_cli("train", "mnist_cnn", *_sets(["train.epochs=2"]), "--out", str(run), "--resume")
    assert done.returncode == 0, done.stderr
    assert "train.epochs: 1 -> 2; config.toml updated" in done.stderr
    assert "epochs = 2" in (run / "config.toml").read_text()
    assert [r["epoch"] for r in _rows(run)] == [1, 2]
    bad = run_cli("train", "mnist_cnn", *_sets(["optim.lr=0.5"]), "--out", str(run), "--resume")
    assert bad.returncode == 2 and "optim.lr: 0.1 -> 0.5" in bad.stderr  # not a length


def test_a_resume_of_a_mistyped_out_is_one_line(tmp_path, capsys):
    """`lightnets train mnist_cnn --resume --out typo` started a new run in `typo`."""
    typo = tmp_path / "runs" / "typo"
    code = main(["train", "mnist_cnn", *_sets(QUICK), "--resume", "--out", str(typo)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"cannot resume: run dir {typo} does not exist" in err[0]
    assert not typo.exists()


def test_a_run_stopped_mid_epoch_by_max_steps_is_not_lengthened(tmp_path):
    """A run stopped at max_steps=2 of an epoch's 15 closed epoch 1 there: a resume with
    max_steps=4 trained nothing (and max_steps=20 stopped at 17) while config.toml claimed the
    new length. It is refused before anything is written; the same length still resumes."""
    from lightnets.engine import Trainer, load_config
    from lightnets.errors import UserError

    run = tmp_path / "run"
    Trainer(load_config("mnist_cnn", [*QUICK, "train.max_steps=2"]), run).fit()
    before = {name: (run / name).read_bytes() for name in ("config.toml", "metrics.jsonl")}
    for steps in (4, 20):
        longer = load_config(run / "config.toml", [f"train.max_steps={steps}"])
        with pytest.raises(UserError) as err:
            Trainer(longer, run, resume=True)
        message = str(err.value)
        assert (
            "for longer: it stopped at train.max_steps=2, 2 of the 15 steps of epoch 1" in message
        )
        assert "expected train.max_steps <= 2 for this run, or a new --out" in message
    assert {name: (run / name).read_bytes() for name in before} == before
    assert load_checkpoint(run / "last.pt")["step"] == 2
    Trainer(load_config(run / "config.toml"), run, resume=True).fit()  # finished: nothing to do


def test_a_new_length_changes_a_cosine_schedule_and_the_resume_says_so(tmp_path, capsys):
    """A per-step cosine over 15 steps, resumed for 30: from step 15 on it follows the new
    length, so the lr jumps from 0 (the end of the old cosine) to half the base lr."""
    from lightnets.engine import Trainer, load_config

    run = tmp_path / "run"
    cosine = ["schedule.name=cosine", "schedule.unit=step", "train.epochs=1"]
    Trainer(load_config("mnist_cnn", [*QUICK, *cosine]), run).fit()
    capsys.readouterr()
    trainer = Trainer(load_config(run / "config.toml", ["train.epochs=2"]), run, resume=True)
    err = capsys.readouterr().err
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(group["initial_lr"] / 2)
    assert (
        "note: the schedule (cosine) now runs over 30 steps instead of 15: it follows the new "
        f"length from step 15 on, so lr goes from 0 to {group['lr']:.4g} there"
    ) in err
    assert "train.epochs: 1 -> 2; config.toml updated" in err
