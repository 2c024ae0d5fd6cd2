"""The experiment runner: variants x seeds through the Trainer, resumably, into one table.

`run_experiment(spec)` runs an `ExperimentSpec` (named `Variant`s, config overrides on a
recipe, each with the paper's number) for each seed into `<out>/<variant>/seed<k>/` and writes
the report; `run_one` trains, resumes or skips a single run, and is what an experiment with
more than one phase per seed calls itself (e.g. bop-approx retrains a model it built). Both
take a model: `ExperimentSpec.model_factory` builds each run's model, `run_one(model=...)`
trains the one it is given; without them the Trainer builds the model the config names.

- a run whose `last.pt` is finished (all its epochs / `max_steps`, or stopped by a callback)
  is not trained again: its result is read back from the checkpoint and `metrics.jsonl` (and
  its weights loaded into a model given to `run_one`);
- a run with an unfinished `last.pt` is resumed (`Trainer(resume=True)`); a run dir with no
  checkpoint yet is started afresh; so re-running a killed experiment with the same command
  continues where it stopped. A checkpoint of another config, or trained by another launch
  (processes x images per process), is refused rather than reused;
- the out dir is the experiment's (`lightnets.experiments.outdir`): the seed count may change
  between invocations (more seeds add runs, fewer aggregate fewer), the arguments may not;
- a variant whose model cannot be built (e.g. a group count that does not divide a layer's
  channels) is recorded as "n/a (reason)" instead of stopping the experiment; a run whose loss
  becomes non-finite is recorded as failed (`failed.json` in its run dir) and not retried.

Before anything trains, the runner prints the run plan (`ExperimentSpec.plan`: one JSON line
per run with the resolved setting and its deviations from the paper's) and keeps it in
`<out>/plan.jsonl`.

Under torchrun every process runs this same loop (each run is one DDP training over all
processes); only rank 0 writes and prints. `processes`, when given, must equal the number of
processes the experiment is launched with, since the plan's batch and lr were resolved for it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from lightnets.engine import distributed as dist_utils
from lightnets.engine.callbacks import Callback
from lightnets.engine.checkpoint import load_checkpoint, load_model_state
from lightnets.engine.config import Config, load_config
from lightnets.engine.trainer import NonFiniteError, Trainer, build_datasets, resolve_model_args
from lightnets.errors import UserError
from lightnets.experiments.outdir import (
    is_main_process,
    normalized,
    prepare_out_dir,
    say,
    write_text,
)
from lightnets.experiments.plan import PLAN_FILE, plan_text, print_plan
from lightnets.experiments.report import format_table, write_results
from lightnets.experiments.results import (
    ExperimentResults,
    RunResult,
    VariantResult,
    as_error,
    best_of,
    median_of_last,
    variant_result,
)
from lightnets.experiments.spec import ExperimentSpec, ModelFactory
from lightnets.models import create_model

__all__ = [
    "FAILED_FILE",
    "DatasetCache",
    "check_processes",
    "run_experiment",
    "run_one",
]

#: A run whose loss became non-finite: its reason, so a re-run skips it instead of retrying.
FAILED_FILE = "failed.json"


class DatasetCache:
    """Train/val datasets of runs, built once per data config (all variants usually share
    one; a stratified held-out split depends on the seed, so it is one per seed)."""

    def __init__(self) -> None:
        self._sets: dict[str, tuple[Dataset, Dataset | None]] = {}

    def get(self, config: Config) -> tuple[Dataset, Dataset | None]:
        """(train, val) of `config`'s data, built on first use."""
        key = json.dumps(asdict(config.data), sort_keys=True, default=str)
        if config.data.val_fraction > 0 and config.data.val_holdout == "stratified":
            key += f"/seed{config.train.seed}"  # the held-out split depends on the seed
        if key not in self._sets:
            self._sets[key] = build_datasets(config)
        return self._sets[key]


def check_processes(spec: ExperimentSpec) -> None:
    """Refuse to run when --processes differs from the processes actually launched."""
    world = dist_utils.env_world_size()
    if spec.processes is not None and spec.processes != world:
        raise UserError(
            f"--processes {spec.processes} but this experiment runs in {world} process(es): "
            f"expected `torchrun --nproc_per_node {spec.processes} -m lightnets repro "
            f"{spec.experiment} ...` (or --processes {world}); the plan's batch and lr are "
            "resolved for the processes given"
        )


# ----------------------------------------------------------------------------- one run
def run_one(
    config: Config,
    run_dir: Path,
    *,
    variant: str,
    seed: int,
    tag: str,
    metric: str = "val_acc1",
    datasets: DatasetCache | None = None,
    callbacks: Sequence[Callback] = (),
    model: nn.Module | None = None,
    median_k: int | None = None,
) -> RunResult:
    """Train, resume or skip one run; every process of a DDP launch calls this together.

    `model`: train this model instead of the one the config names (a finished run loads its
    last weights into it, so the caller holds the trained model either way). `median_k`: also
    record the median of the metric over the last median_k epochs. `tag` starts every line
    printed about the run.
    """
    datasets = datasets if datasets is not None else DatasetCache()

    def median() -> float | None:
        return median_of_last(run_dir, metric, median_k) if median_k else None

    failed = run_dir / FAILED_FILE
    if failed.is_file():
        reason = json.loads(failed.read_text()).get("reason", "failed")
        say(f"{tag}: skip (failed before: {reason}; --overwrite to retry)")
        return RunResult(variant, seed, str(run_dir), "failed", reason=reason)
    resume = False
    if (run_dir / "last.pt").is_file():
        ckpt = load_checkpoint(run_dir / "last.pt")
        if _comparable(ckpt.get("config")) != _comparable(config.to_dict()):
            raise UserError(
                f"{run_dir} holds a run with another config than this experiment asks for: "
                "expected the same config to continue it (pass --overwrite to start afresh)"
            )
        _check_launch(ckpt, config, run_dir)
        if _is_finished(ckpt, config):
            if model is not None:
                load_model_state(model, ckpt["model"], ckpt["path"])
            metrics = ckpt.get("metrics") or {}
            final = metrics.get(metric)
            best = best_of(run_dir, metric, ckpt.get("best"))
            say(f"{tag}: skip (finished) {_fmt_metric(metric, final, best)}")
            return RunResult(
                variant,
                seed,
                str(run_dir),
                "skipped",
                final=None if final is None else float(final),
                best=best,
                epoch=ckpt.get("epoch"),
                step=ckpt.get("step"),
                median_last=median(),
            )
        resume = True
        say(f"{tag}: resume from epoch {ckpt.get('epoch')} step {ckpt.get('step')} ({run_dir})")
    else:
        say(f"{tag}: start ({run_dir})")
    start = time.perf_counter()
    try:
        trainer = Trainer(
            config,
            run_dir,
            resume=resume,
            overwrite=not resume,  # a dir without a checkpoint holds nothing worth keeping
            datasets=datasets.get(config),
            callbacks=callbacks,
            model=model,
        )
        row = trainer.fit()
    except NonFiniteError as err:
        reason = str(err).split(";")[0]
        if is_main_process():
            write_text(failed, json.dumps({"reason": reason}) + "\n")
        dist_utils.barrier()
        say(f"{tag}: failed ({reason})")
        return RunResult(variant, seed, str(run_dir), "failed", reason=reason)
    dist_utils.barrier()  # rank 0 has written the run's files before anyone reads them
    seconds = time.perf_counter() - start
    final = row.get(metric)
    best = best_of(run_dir, metric, trainer.best)
    say(f"{tag}: done in {seconds:.0f} s, {_fmt_metric(metric, final, best)}")
    return RunResult(
        variant,
        seed,
        str(run_dir),
        "resumed" if resume else "trained",
        final=None if final is None else float(final),
        best=best,
        epoch=trainer.epoch,
        step=trainer.step,
        seconds=seconds,
        median_last=median(),
    )


def _comparable(config_dict: Any) -> Any:
    """A run's config as compared on re-runs: display-only keys (train.progress) left out.

    The stored config is read through the current Config first, so keys added to Config since
    the run was started (with their defaults) do not make an old run look different.
    """
    if isinstance(config_dict, dict):
        try:
            config_dict = load_config(config_dict).to_dict()
        except UserError:
            pass  # not a config of this version: compared as it is (and found different)
    value = normalized(config_dict)
    if isinstance(value, dict) and isinstance(value.get("train"), dict):
        value["train"].pop("progress", None)
    return value


def _is_finished(ckpt: dict[str, Any], config: Config) -> bool:
    if ckpt.get("stop_reason"):  # stopped early by a callback (no flips, no improvement)
        return True
    max_steps = config.train.max_steps
    if max_steps:
        return int(ckpt.get("step", 0)) >= max_steps
    return int(ckpt.get("epoch", 0)) >= config.train.epochs


def _check_launch(ckpt: dict[str, Any], config: Config, run_dir: Path) -> None:
    """A run trained with other processes x images per process is another run: its result
    must not be reused (nor continued) under this launch, whose batch and lr differ."""
    world = dist_utils.env_world_size()
    saved = (ckpt.get("processes"), ckpt.get("batch_per_process"))
    ours = (world, config.data.per_process_batch(world))
    if saved[0] is not None and saved != ours:
        raise UserError(
            f"{run_dir} was trained with {saved[0]} process(es) x {saved[1]} images, this "
            f"launch has {ours[0]} x {ours[1]}: expected the same launch to reuse or continue "
            "it (another --out, or --overwrite to start afresh)"
        )


def _fmt_metric(metric: str, final: Any, best: Any) -> str:
    f = "none" if final is None else f"{float(final):.2f}"
    b = "none" if best is None else f"{float(best):.2f}"
    return f"{metric}={f} (best {b})"


# ----------------------------------------------------------------------------- all runs
def run_experiment(spec: ExperimentSpec) -> ExperimentResults:
    """Train every variant x seed of `spec` (resuming / skipping what is done), write results."""
    start = time.perf_counter()
    check_processes(spec)
    # Every config first: a typo in an override fails now, not after hours of training.
    configs = spec.configs()
    plan = spec.plan(configs)
    print_plan(plan)
    first_config = next(iter(configs.values()), None)
    if first_config is not None:
        dist_utils.init_distributed(dist_utils.local_device(first_config.train.device))
    try:
        results = _run_all(spec, configs, plan)
    except BaseException:
        dist_utils.shutdown_distributed(wait=False)
        raise
    dist_utils.shutdown_distributed()
    outcome = ExperimentResults(spec, results, time.perf_counter() - start)
    if is_main_process():
        write_results(outcome)
        print()
        print(format_table(outcome), flush=True)
        print(f"results: {spec.out}/results.md, results.json, results.csv, results.png", flush=True)
    return outcome


def _run_all(
    spec: ExperimentSpec, configs: dict[tuple[str, int], Config], plan: list[dict[str, Any]]
) -> list[VariantResult]:
    datasets = DatasetCache()
    if configs:  # the data first: a wrong --root must not leave an out dir that refuses a retry
        datasets.get(next(iter(configs.values())))
    if is_main_process():
        prepare_out_dir(spec.out, spec.experiment, spec.settings, spec.overwrite, spec.seeds)
        write_text(spec.out / PLAN_FILE, plan_text(plan))
    dist_utils.barrier()
    total = len(spec.variants) * len(spec.seeds)
    say(
        f"{spec.experiment}: {len(spec.variants)} variants x {len(spec.seeds)} seeds = {total} "
        f"runs into {spec.out}"
    )
    results: list[VariantResult] = []
    index = 0
    for variant in spec.variants:
        first = configs[(variant.name, spec.seeds[0])] if spec.seeds else None
        reason = None
        if first is not None:
            reason = _unbuildable(first, datasets, spec.model_factory)
        runs = []
        for seed in spec.seeds:
            index += 1
            tag = f"[{index}/{total}] {variant.name} seed{seed}"
            run_dir = spec.out / variant.name / f"seed{seed}"
            if reason is not None:
                say(f"{tag}: n/a ({reason})")
                runs.append(RunResult(variant.name, seed, str(run_dir), "n/a", reason=reason))
                continue
            config = configs[(variant.name, seed)]
            model = None
            if spec.model_factory is not None:
                model = spec.model_factory(config, datasets.get(config)[0])
            run = run_one(
                config,
                run_dir,
                variant=variant.name,
                seed=seed,
                tag=tag,
                metric=spec.metric,
                datasets=datasets,
                callbacks=spec.callbacks(variant.name, seed) if spec.callbacks else (),
                model=model,
                median_k=spec.median_of_last,
            )
            runs.append(as_error(run) if spec.as_error else run)
        results.append(variant_result(variant, runs, reason, spec.median_of_last))
    return results


def _unbuildable(
    config: Config, datasets: DatasetCache, factory: ModelFactory | None = None
) -> str | None:
    """Why the variant's model cannot be built (None when it can)."""
    train_set, _ = datasets.get(config)
    try:
        if factory is not None:
            factory(config, train_set)
        else:
            create_model(config.model.name, **resolve_model_args(config, train_set))
    # UserError is a ValueError; torch raises the others for layer settings it cannot build
    except (ValueError, RuntimeError, NotImplementedError, TypeError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return text if isinstance(err, UserError) else f"{type(err).__name__}: {text}"
    return None
