"""What an experiment runs: its variants (config overrides on a recipe, with the paper's number
beside each) and everything the runner needs to train them for N seeds and present them.

The runner (`lightnets.experiments.runner`) trains a spec and the report
(`lightnets.experiments.report`) writes its tables and figures; the spec itself resolves
every run's config and plan line (`lightnets.experiments.plan`) without training anything or
reading data, which is what `--dry-run` prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from lightnets.engine.callbacks import Callback
from lightnets.engine.config import Config, load_config
from lightnets.engine.distributed import env_world_size
from lightnets.experiments.plan import PaperSetting, plan_line

__all__ = ["CallbackFactory", "ExperimentSpec", "ModelFactory", "Variant"]

#: A run's callbacks: (variant name, seed) -> fresh Callback objects for that run.
CallbackFactory = Callable[[str, int], list[Callback]]
#: A run's model: (its config, its training set) -> a new model (instead of the registry's).
ModelFactory = Callable[[Config, Dataset], nn.Module]


@dataclass
class Variant:
    """One configuration of an experiment.

    `name` is its directory name, `label` its row in the table, `overrides` the config
    overrides ("section.key=value") that make it, `paper` the paper's number (None where the
    paper has none), `baseline` the name of the variant it is compared with (Δ columns) and
    `paper_setting` what differs in the paper's setting of this variant from the experiment's
    (PaperSetting fields, e.g. {"batch_per_process": 8, "lr": 0.025}).
    """

    name: str
    label: str
    overrides: list[str] = field(default_factory=list)
    paper: float | None = None
    baseline: str | None = None
    paper_setting: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExperimentSpec:
    """Everything the runner needs: what to train, where, and how to present it.

    `settings` are the arguments that define the runs (stored in experiment.json and compared
    on re-runs); `base_overrides` apply to every run before the variant's own overrides;
    `notes` are lines printed under the table's title in results.md.
    """

    experiment: str
    title: str
    out: Path
    recipe: str
    variants: list[Variant]
    seeds: list[int]
    settings: dict[str, Any]
    base_overrides: list[str] = field(default_factory=list)
    metric: str = "val_acc1"
    metric_label: str = "top-1 accuracy (%)"
    paper_label: str = "paper"
    notes: list[str] = field(default_factory=list)
    overwrite: bool = False
    #: report 100 - metric (top-1 error from accuracy), as papers that tabulate error do
    as_error: bool = False
    #: callbacks for one run (a variant's name and seed -> fresh Callback objects)
    callbacks: CallbackFactory | None = None
    #: the paper's setting of every run (variants change it with Variant.paper_setting)
    paper_setting: PaperSetting | None = None
    #: what the reported number is, in words, for the plan ("median top-1 error of ...")
    plan_metric: str = ""
    #: processes the runs are planned for (None: as many as the experiment is launched with)
    processes: int | None = None
    #: report the median of the metric over the last k evaluated epochs as the headline
    median_of_last: int | None = None
    #: builds each run's model from its config and training set (None: the model the config
    #: names, from the registry); a model it cannot build makes the variant "n/a (reason)"
    model_factory: ModelFactory | None = None

    def paper_setting_of(self, variant: Variant) -> PaperSetting | None:
        """The paper's setting of one variant's runs (None where none is recorded)."""
        if self.paper_setting is None:
            return None
        return self.paper_setting.updated(**variant.paper_setting)

    def planned_processes(self) -> int:
        """The processes the runs are planned for: `processes`, or torchrun's world size."""
        return self.processes or env_world_size()

    def configs(self) -> dict[tuple[str, int], Config]:
        """The validated Config of every (variant name, seed); no data is read."""
        return {
            (v.name, seed): load_config(
                self.recipe, [*self.base_overrides, *v.overrides, f"train.seed={seed}"]
            )
            for v in self.variants
            for seed in self.seeds
        }

    def plan(self, configs: dict[tuple[str, int], Config] | None = None) -> list[dict[str, Any]]:
        """One plan line per run (variant x seed): the resolved setting and its deviations from
        the paper's (`lightnets.experiments.plan`). Trains nothing and reads no data."""
        configs = configs if configs is not None else self.configs()
        processes = self.planned_processes()
        return [
            plan_line(
                f"{v.name}/seed{seed}",
                configs[(v.name, seed)],
                processes,
                self.plan_metric or self.metric_label,
                self.paper_setting_of(v),
                runs=len(self.seeds),
            )
            for v in self.variants
            for seed in self.seeds
        ]
