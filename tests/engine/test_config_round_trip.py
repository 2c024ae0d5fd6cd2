"""Every config value survives the round trips a run makes: `to_dict` (the checkpoint's copy)
and config.toml (what `lightnets train --resume` reads back), None included (TOML has no
null: it is written "none"). A run started with data.val_split=none evaluated on the test
split after --resume while None was dropped."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from lightnets.engine import Trainer
from lightnets.engine.config import Config, load_config, save_config
from lightnets.errors import UserError
from tests.conftest import TINY

#: A valid value other than the default for the keys whose values are constrained (choices,
#: ranges, keys that need another); every other key gets one made from its type below.
VALUES: dict[str, list[typing.Any]] = {
    "model.name": ["bnn_mnist"],
    "model.args": [{"width": 8, "nested": {"a": [1, 2.5, "x"]}, "norm": "none"}],
    "data.name": ["mnist"],
    "data.val_holdout": ["last"],
    "data.val_fraction": [0.25],
    "data.augment": [["hflip", {"pad_crop": {"padding": 2}}, "normalize"]],
    "data.eval_augment": [[]],
    "data.args": [{"size": 64, "flag": True}],
    "optim.name": ["adam"],
    "optim.binary": ["bop"],
    "optim.bop_gamma": [0.5],
    "optim.bop_flip_test": ["inclusive"],
    "schedule.name": ["cosine"],
    "schedule.unit": ["step"],
    "binary_schedule.name": ["step"],
    "binary_schedule.unit": ["step"],
    "binary_schedule.keys": [["threshold"], ["gamma", "threshold"]],
    "train.task": ["segmentation"],
    "train.amp": ["bf16"],
    "train.label_smoothing": [0.1],
    "output.name": ["named"],
}
#: What a key needs beside it to be valid
NEEDS = {
    "data.batch_per_process": {"batch_size": None},
    "train.stop_after_flipless_epochs": {"binary": "bop"},
}


def _fields() -> list[tuple[str, str, typing.Any, typing.Any]]:
    """(section, key, type hint, default) of every config key."""
    out = []
    for section in dataclasses.fields(Config):
        part = getattr(Config(), section.name)
        hints = typing.get_type_hints(type(part))
        for f in dataclasses.fields(part):
            out.append((section.name, f.name, hints[f.name], getattr(part, f.name)))
    return out


def _made_from(hint: typing.Any, default: typing.Any) -> list[typing.Any]:
    """Values of type `hint` other than `default` (None too where the type allows it)."""
    args = typing.get_args(hint)
    if type(None) in args:
        inner = [a for a in args if a is not type(None)]
        values = [v for a in inner for v in _made_from(a, default)]
        return values + ([None] if default is not None else [])
    if typing.get_origin(hint) is list:
        return [[*_made_from(args[0], None)[:1], *_made_from(args[0], None)[:1]]]
    if hint is bool:
        return [not default]
    if hint is int:
        return [(default or 0) + 3]
    if hint is float:
        return [(default or 0.0) + 0.5]
    if hint is str:
        return [f"{default or 'x'}_other"]
    raise AssertionError(f"no value made for {hint}")


def _cases() -> list[tuple[str, typing.Any]]:
    cases = []
    for section, key, hint, default in _fields():
        name = f"{section}.{key}"
        values = VALUES.get(name) or _made_from(hint, default)
        if name in VALUES and type(None) in typing.get_args(hint) and default is not None:
            values = [*values, None]
        for value in values:
            assert value != default, name
            cases.append((name, value))
    return cases


def _config(name: str, value: typing.Any) -> Config:
    section, key = name.split(".")
    config = Config()
    for extra, extra_value in NEEDS.get(name, {}).items():
        target = config.data if extra == "batch_size" else config.optim
        setattr(target, extra, extra_value)
    setattr(getattr(config, section), key, value)
    return config.validate()


CASES = _cases()


def test_every_key_has_a_case_and_none_is_among_them():
    names = {name for name, _ in CASES}
    assert names == {f"{s}.{k}" for s, k, _, _ in _fields()}
    nones = {name for name, value in CASES if value is None}
    assert "data.val_split" in nones  # None where the default is not None; the other Nones:
    defaults = {f"{s}.{k}" for s, k, _, default in _fields() if default is None}
    assert {"data.root", "train.max_steps", "train.grad_clip", "output.name"} <= defaults


def test_the_defaults_round_trip_with_their_nones(tmp_path):
    config = Config()
    assert load_config(config.to_dict()) == config
    save_config(config, tmp_path / "config.toml")
    text = (tmp_path / "config.toml").read_text()
    assert 'max_steps = "none"' in text and 'grad_clip = "none"' in text
    again = load_config(tmp_path / "config.toml")
    assert again.output.name == "config"  # a recipe file without a name: the file's stem
    again.output.name = None
    assert again == config


@pytest.mark.parametrize("name, value", CASES, ids=[f"{n}={v!r}"[:60] for n, v in CASES])
def test_every_value_round_trips(tmp_path, name, value):
    config = _config(name, value)
    assert load_config(config.to_dict()) == config
    json.dumps(config.to_dict())  # the checkpoint's copy is plain data
    path = tmp_path / "config.toml"
    save_config(config, path)
    again = load_config(path)
    if config.output.name is None:  # a recipe file without a name is named after the file
        assert again.output.name == "config"
        again.output.name = None
    assert again == config


def test_old_config_files_without_none_keys_still_read():
    """config.toml files written before None was spelled out left such keys out."""
    config = load_config({"data": {"batch_size": 32}, "train": {"epochs": 2}})
    assert config.data.val_split == "test" and config.train.max_steps is None


def test_none_where_toml_cannot_hold_it_is_refused_by_name(tmp_path):
    config = load_config({"model": {"args": {"width": 8}}})
    config.model.args["norm"] = None
    with pytest.raises(UserError, match=r"model.args.norm=None cannot be written to TOML"):
        save_config(config, tmp_path / "config.toml")
    assert not (tmp_path / "config.toml").exists()
    config = load_config({})
    config.train.epochs = None
    with pytest.raises(UserError, match=r"train.epochs=None cannot be written"):
        save_config(config, tmp_path / "config.toml")


def test_val_split_none_survives_a_resume_from_the_run_dir(tmp_path):
    """The bug: the run dir's config.toml dropped val_split=none, so the resumed run (which
    reads it, as `lightnets train --resume` does) evaluated on the test split."""
    run = tmp_path / "run"
    first = load_config("mnist_cnn", [*TINY, "data.val_split=none", "train.epochs=1"])
    Trainer(first, run).fit()
    saved = load_config(run / "config.toml", ["train.epochs=2"])
    assert saved.data.val_split is None
    assert saved == load_config("mnist_cnn", [*TINY, "data.val_split=none", "train.epochs=2"])
    row = Trainer(saved, run, resume=True).fit()
    assert row["epoch"] == 2 and not any(k.startswith("val_") for k in row)
