"""Checkpoints: atomic writes, weights-only reads, clear refusals, RNG round trip."""

from __future__ import annotations

import os
import pickle
import random
import stat

import numpy as np
import pytest
import torch
from torch import nn

from lightnets.engine.checkpoint import (
    FORMAT,
    atomic_torch_save,
    load_checkpoint,
    load_model_state,
    rng_state,
    set_rng_state,
)
from lightnets.errors import UserError


def test_round_trip(tmp_path):
    state = {"format": FORMAT, "version": 1, "w": torch.arange(4.0), "meta": {"a": [1, 2]}}
    atomic_torch_save(state, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == [tmp_path / "last.pt"]  # no temp file left
    loaded = load_checkpoint(tmp_path)  # a run dir resolves to last.pt
    assert torch.equal(loaded["w"], state["w"]) and loaded["meta"] == {"a": [1, 2]}


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "last.pt"
    atomic_torch_save({"format": FORMAT, "version": 1, "x": 1}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"x": Unsaveable()}, path)
    assert load_checkpoint(path)["x"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_truncated_and_garbage_files_are_refused(tmp_path):
    path = tmp_path / "last.pt"
    atomic_torch_save({"format": FORMAT, "version": 1, "w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"cannot read checkpoint {path}"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": 1, "x": _Payload(marker)}, path)
    with pytest.raises(UserError, match="weights-only") as caught:
        load_checkpoint(path)
    assert not marker.exists()
    # the reason (the refused global) is kept; torch's advice to retry unsafely is not
    message = str(caught.value)
    assert "GLOBAL posix.system" in message or "GLOBAL os.system" in message
    assert "weights_only` set to `False" not in message and "False" not in message
    raw = tmp_path / "evil_raw.pt"
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UserError):
        load_checkpoint(raw)
    assert not marker.exists()


def test_foreign_file_and_newer_version_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "a.pt")
    with pytest.raises(UserError, match="not a lightnets checkpoint"):
        load_checkpoint(tmp_path / "a.pt")
    torch.save({"format": FORMAT, "version": 99}, tmp_path / "b.pt")
    with pytest.raises(UserError, match="version 99"):
        load_checkpoint(tmp_path / "b.pt")


def test_incompatible_state_names_the_keys():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2)).state_dict()
    with pytest.raises(UserError, match=r"shape mismatch.*0\.weight \(5, 3\) vs \(4, 3\)"):
        load_model_state(model, state, "x.pt")
    state = model.state_dict()
    state.pop("1.bias")
    state["extra"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"missing 1\.bias; unexpected extra"):
        load_model_state(model, state, "x.pt")


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.randn()  # leave a cached gaussian behind
    state = rng_state()
    atomic_torch_save({"format": FORMAT, "version": 1, "rng": state}, tmp_path / "c.pt")
    expected = (random.random(), np.random.randn(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (random.random(), np.random.randn(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_atomic_files_respect_the_umask_and_leave_no_temp(tmp_path):
    """Checkpoints get mode 0666 minus the umask like any new file (mkstemp's 0600 would
    lock teammates out), and a failed write leaves the old file and no temp file behind."""
    from lightnets.files import atomic_path

    old = os.umask(0o022)
    try:
        path = tmp_path / "last.pt"
        atomic_torch_save({"x": torch.ones(2)}, path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        with pytest.raises(RuntimeError, match="boom"), atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))
