"""Recipes and overrides: typed loading, clear refusals, TOML round trip."""

from __future__ import annotations

import sys

import pytest

from lightnets.engine.config import Config, list_recipes, load_config, save_config
from lightnets.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_shipped_recipes_load():
    assert "mnist_cnn" in list_recipes()
    for name in list_recipes():
        config = load_config(name)
        assert isinstance(config, Config)
        assert config.output.name == name


def test_overrides_convert_types():
    config = load_config(
        "mnist_cnn",
        [
            "train.epochs=3",
            "optim.lr=0.5",
            "optim.weight_decay=0",  # int literal accepted for a float
            "train.deterministic=true",
            "schedule.milestones=[2,4]",
            "model.args.width=8",
            "model.name=mnist_cnn",
            "data.root=/tmp/somewhere",
            "train.grad_clip=none",
        ],
    )
    assert config.train.epochs == 3
    assert config.optim.lr == 0.5 and isinstance(config.optim.weight_decay, float)
    assert config.train.deterministic is True
    assert config.schedule.milestones == [2, 4]
    assert config.model.args == {"width": 8}
    assert config.data.root == "/tmp/somewhere"
    assert config.train.grad_clip is None


def test_comma_list_override():
    config = load_config(None, ["schedule.milestones=100,150"])
    assert config.schedule.milestones == [100, 150]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.epoch=3", "did you mean 'epochs'"),
        ("train.epochs=abc", "expected int"),
        ("train.epochs=1.5", "expected int"),
        ("optim.lr=-0.1", "expected > 0"),
        ("data.batch_size=0", "data.batch_size=0 is invalid: expected >= 1"),
        ("trian.epochs=1", "one of model, data, optim, schedule, binary_schedule, train, output"),
        ("train.epochs", "expected section.key=value"),
        ("train.amp=fp16", "'none' or 'bf16'"),
        ("train.epochs.x=1", "is not a table"),
    ],
)
def test_bad_overrides_are_refused(override, fragment):
    with pytest.raises(UserError) as err:
        load_config("mnist_cnn", [override])
    assert fragment in str(err.value)


def test_unknown_key_in_recipe_lists_valid_keys(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[optim]\nname = 'sgd'\nlearning_rate = 0.1\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    assert "optim.learning_rate" in str(err.value) and "lr" in str(err.value)


def test_invalid_toml_and_unknown_recipe(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = ")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(UserError, match="unknown recipe 'mnist_dem'.*did you mean 'mnist_demo'"):
        load_config("mnist_dem")


def test_saved_config_round_trips(tmp_path):
    config = load_config("mnist_cnn", ["model.args.width=12", "train.max_steps=7"])
    save_config(config, tmp_path / "config.toml")
    raw = tomllib.loads((tmp_path / "config.toml").read_text())
    assert raw["model"]["args"] == {"width": 12}
    again = load_config(tmp_path / "config.toml")
    assert again.to_dict() == config.to_dict() | {"output": again.to_dict()["output"]}
    assert again.train.max_steps == 7
