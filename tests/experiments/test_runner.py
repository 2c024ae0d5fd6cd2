"""The runner takes a model: `ExperimentSpec.model_factory` builds each run's model and
`run_one(model=...)` trains the one it is given; a finished run is not trained again, and its
weights are loaded into the model the caller holds."""

from __future__ import annotations

import json

import torch
from torch import nn

from lightnets.engine.checkpoint import load_checkpoint
from lightnets.engine.config import load_config
from lightnets.experiments.runner import run_experiment, run_one
from lightnets.experiments.spec import ExperimentSpec, Variant

torch.set_num_threads(1)

TOY = ["train.max_steps=2", "schedule.warmup=0", "train.progress=false", "output.plot=false"]


def _linear(config, train_set) -> nn.Module:
    """A model the registry does not have: one linear layer over the 28x28 digits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, train_set.num_classes))


def test_model_factory_trains_the_models_it_builds(tmp_path, capsys):
    built: list[nn.Module] = []

    def factory(config, train_set):
        built.append(_linear(config, train_set))
        return built[-1]

    spec = ExperimentSpec(
        experiment="toy",
        title="toy: a linear model",
        out=tmp_path / "out",
        recipe="mnist_demo",
        variants=[Variant("linear", "linear")],
        seeds=[0, 1],
        settings={"model": "linear"},
        base_overrides=TOY,
        model_factory=factory,
    )
    results = run_experiment(spec)
    (variant,) = results.variants
    assert variant.status == "ok" and [r.status for r in variant.runs] == ["trained"] * 2
    for run in variant.runs:
        state = load_checkpoint(tmp_path / "out" / "linear" / f"seed{run.seed}" / "last.pt")
        assert set(state["model"]) == {"1.weight", "1.bias"} and state["step"] == 2
    # one model to check that it builds, then one per run
    assert len(built) == 3 and built[1] is not built[2]
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["variants"][0]["final"]["n"] == 2
    # a re-run reads the finished runs back: nothing trains
    capsys.readouterr()
    again = run_experiment(spec)
    assert [r.status for r in again.variants[0].runs] == ["skipped"] * 2
    assert [r.final for r in again.variants[0].runs] == [r.final for r in variant.runs]
    assert capsys.readouterr().out.count("skip (finished)") == 2


def test_a_model_factory_that_cannot_build_makes_the_variant_na(tmp_path):
    def factory(config, train_set):
        raise ValueError("no such width")

    spec = ExperimentSpec(
        experiment="toy",
        title="toy",
        out=tmp_path / "out",
        recipe="mnist_demo",
        variants=[Variant("broken", "broken")],
        seeds=[0],
        settings={},
        base_overrides=TOY,
        model_factory=factory,
    )
    (variant,) = run_experiment(spec).variants
    assert variant.status == "n/a" and variant.reason == "ValueError: no such width"
    assert not (tmp_path / "out" / "broken" / "seed0").exists()


def test_run_one_trains_the_given_model_and_loads_a_finished_runs_weights(tmp_path):
    config = load_config("mnist_demo", TOY)
    run_dir = tmp_path / "run"
    first = _linear(config, type("T", (), {"num_classes": 10}))
    before = first[1].weight.detach().clone()
    run = run_one(config, run_dir, variant="linear", seed=0, tag="toy", model=first)
    assert run.status == "trained" and run.step == 2 and run.final is not None
    trained = load_checkpoint(run_dir / "last.pt")["model"]
    assert torch.equal(first[1].weight.detach().cpu(), trained["1.weight"])  # trained in place
    assert not torch.equal(before, trained["1.weight"])
    # finished: skipped, and a fresh model given to it holds the trained weights afterwards
    second = _linear(config, type("T", (), {"num_classes": 10}))
    again = run_one(config, run_dir, variant="linear", seed=0, tag="toy", model=second)
    assert again.status == "skipped" and again.final == run.final
    assert torch.equal(second[1].weight.detach(), trained["1.weight"])
