"""The shared experiment runner: variants x seeds through the Trainer, resumably, into one table.

An experiment is a list of named `Variant`s (config overrides on a recipe, and the paper's
number for that variant), run for each seed into `<out>/<variant>/seed<k>/`:

- a run whose `last.pt` is finished (all its epochs / `max_steps`) is not trained again: its
  result is read back from the checkpoint and `metrics.jsonl`;
- a run with an unfinished `last.pt` is resumed (`Trainer(resume=True)`); a run dir with no
  checkpoint yet is started afresh; so re-running a killed experiment with the same command
  continues where it stopped;
- `<out>/experiment.json` holds the experiment's name and the arguments that define its runs;
  an out dir holding another experiment, other arguments, or anything else is refused unless
  `overwrite=True` (which deletes it first). The seed count may change between invocations
  (more seeds add runs, fewer aggregate fewer), since each seed's run is independent;
- a variant whose model cannot be built (e.g. a group count that does not divide a layer's
  channels) is recorded as "n/a (reason)" instead of stopping the experiment; a run whose loss
  becomes non-finite is recorded as failed (`failed.json` in its run dir) and not retried.

Results: per run the final and the best value of the metric (best over evaluated epochs, as
the Trainer's `best.pt`), and with `median_of_last = k` the median of the last k evaluated
epochs (the GN paper's statistic), which is then the headline number compared with the paper;
per variant mean ± std over seeds (std with ddof=1, 0 for one seed). Written to `results.md`
(also printed), `results.json`, `results.csv` and `results.png`. The numbers are what the
runs measured; the paper's are shown beside them, never mixed in.

Before anything trains, the runner prints the run plan (`lightnets.experiments.plan`: one
JSON line per run with the resolved setting and its deviations from the paper's) and keeps it
in `<out>/plan.jsonl`; `plan_spec` gives the same lines without running (`--dry-run`).

Under torchrun every process runs this same loop (each run is one DDP training over all
processes); only rank 0 writes and prints. `processes`, when given, must equal the number of
processes the experiment is launched with, since the plan's batch and lr were resolved for it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import statistics
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightnets.engine import distributed as dist_utils
from lightnets.engine.files import atomic_write_bytes
from lightnets.errors import UserError
from lightnets.experiments.plan import PaperSetting, plan_line

__all__ = [
    "ExperimentResults",
    "ExperimentSpec",
    "RunResult",
    "Summary",
    "Variant",
    "VariantResult",
    "format_table",
    "mean_std",
    "int_list",
    "is_main_process",
    "plan_spec",
    "prepare_out_dir",
    "print_plan",
    "save_figure",
    "run_experiment",
    "summarize",
    "toml_string",
    "write_text",
    "write_results",
]

EXPERIMENT_FILE = "experiment.json"
FAILED_FILE = "failed.json"
PLAN_FILE = "plan.jsonl"


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
    callbacks: Callable[[str, int], list] | None = None
    #: the paper's setting of every run (variants change it with Variant.paper_setting)
    paper_setting: PaperSetting | None = None
    #: what the reported number is, in words, for the plan ("median top-1 error of ...")
    plan_metric: str = ""
    #: processes the runs are planned for (None: as many as the experiment is launched with)
    processes: int | None = None
    #: report the median of the metric over the last k evaluated epochs as the headline
    median_of_last: int | None = None


@dataclass
class RunResult:
    """One variant x seed. `status`: trained, resumed, skipped (finished before), failed, n/a."""

    variant: str
    seed: int
    run_dir: str
    status: str
    final: float | None = None
    best: float | None = None
    epoch: int | None = None
    step: int | None = None
    seconds: float | None = None
    reason: str | None = None
    #: median of the metric over the last k evaluated epochs (ExperimentSpec.median_of_last)
    median_last: float | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("trained", "resumed", "skipped") and self.final is not None


@dataclass
class Summary:
    """Mean ± std (ddof=1; 0 for a single value) of `values`."""

    mean: float | None
    std: float | None
    n: int
    values: list[float]


def mean_std(s: Summary) -> str:
    """'12.34 ± 0.56', or '12.34' for one value (a single seed has no spread to show)."""
    return f"{s.mean:.2f}" if s.n == 1 else f"{s.mean:.2f} ± {s.std:.2f}"


def summarize(values: list[float]) -> Summary:
    """Mean and sample standard deviation (ddof=1 when n > 1, else 0) of `values`."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return Summary(None, None, 0, [])
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Summary(mean, std, n, values)


@dataclass
class VariantResult:
    """A variant's runs and their summaries; `reason` says why it has no result (n/a).

    `headline` is the number compared with the paper: the final value, or the median of the
    last epochs when the experiment reports that (`median`).
    """

    variant: Variant
    runs: list[RunResult]
    final: Summary
    best: Summary
    reason: str | None = None
    median: Summary | None = None

    @property
    def headline(self) -> Summary:
        return self.median if self.median is not None else self.final

    @property
    def status(self) -> str:
        if self.final.n:
            return "ok"
        return "n/a" if any(r.status == "n/a" for r in self.runs) else "failed"


@dataclass
class ExperimentResults:
    """What `run_experiment` returns (and writes to results.json)."""

    spec: ExperimentSpec
    variants: list[VariantResult]
    seconds: float

    def by_name(self, name: str) -> VariantResult | None:
        return next((v for v in self.variants if v.variant.name == name), None)


# ----------------------------------------------------------------------------- options
def int_list(text: str | None, option: str) -> list[int] | None:
    """Comma-separated integers >= 1 from a command-line option (None when not given)."""
    if text is None:
        return None
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise UserError(f"{option} {text!r}: expected comma-separated integers >= 1, e.g. 1,2,4")
    return list(dict.fromkeys(values))  # keep the order, drop repeats


def toml_string(text: str) -> str:
    """A TOML basic string literal (config overrides are read as TOML values)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ----------------------------------------------------------------------------- out dir
def _normalized(value: Any) -> Any:
    """JSON round trip: tuples become lists, so stored and fresh settings compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def prepare_out_dir(
    out: Path, experiment: str, settings: dict[str, Any], overwrite: bool, seeds: list[int]
) -> None:
    """Create `out` (or accept it when it holds the same experiment and settings).

    A different experiment or different settings in `out` is refused unless `overwrite`,
    which deletes the dir first. The seeds are recorded but may differ between invocations.
    """
    out = Path(out)
    settings = _normalized(settings)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: expected a directory for the experiment")
    if out.is_dir() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        else:
            stored = _read_experiment_file(out)
            if stored is None:
                raise UserError(
                    f"--out {out} already exists and holds no {EXPERIMENT_FILE}: expected an "
                    "empty or new dir, or an experiment's out dir (pass --overwrite to replace it)"
                )
            if stored.get("experiment") != experiment:
                raise UserError(
                    f"--out {out} holds experiment {stored.get('experiment')!r}, not "
                    f"{experiment!r}: pass --overwrite to replace it, or another --out"
                )
            old = stored.get("arguments", {})
            if old != settings:
                keys = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                diffs = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in keys)
                raise UserError(
                    f"--out {out} holds experiment {experiment!r} run with other arguments "
                    f"({diffs}): expected the same arguments to continue it; pass --overwrite "
                    "to replace it, or another --out"
                )
    out.mkdir(parents=True, exist_ok=True)
    record = {"experiment": experiment, "arguments": settings, "seeds": list(seeds)}
    write_text(out / EXPERIMENT_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")


def _read_experiment_file(out: Path) -> dict[str, Any] | None:
    path = out / EXPERIMENT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(
            f"{path} is not valid JSON: expected the file lightnets repro writes (pass "
            "--overwrite to start the experiment afresh)"
        ) from None
    return data if isinstance(data, dict) else None


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (temp file + rename), as every results file is."""
    atomic_write_bytes(path, text)


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure to `path` atomically (temp file + rename), at 120 dpi."""
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------- planning
def is_main_process() -> bool:
    """Rank 0 (or not launched by torchrun): the process that writes and prints. Experiments
    write their own tables and figures only there, after run_experiment."""
    return int(os.environ.get("RANK", "0")) == 0


def _say(text: str) -> None:
    if is_main_process():
        print(text, flush=True)


def planned_processes(spec: ExperimentSpec) -> int:
    """The processes the runs are planned for: spec.processes, or torchrun's world size."""
    return spec.processes or dist_utils.env_world_size()


def _paper_setting(spec: ExperimentSpec, variant: Variant) -> PaperSetting | None:
    if spec.paper_setting is None:
        return None
    return spec.paper_setting.updated(**variant.paper_setting)


def spec_configs(spec: ExperimentSpec) -> dict[tuple[str, int], Any]:
    """The validated Config of every variant x seed (no data is read)."""
    from lightnets.engine.config import load_config

    return {
        (v.name, seed): load_config(
            spec.recipe, [*spec.base_overrides, *v.overrides, f"train.seed={seed}"]
        )
        for v in spec.variants
        for seed in spec.seeds
    }


def plan_spec(spec: ExperimentSpec, configs: dict | None = None) -> list[dict[str, Any]]:
    """One plan line per run (variant x seed): the resolved setting and its deviations from
    the paper's (`lightnets.experiments.plan`). Trains nothing and reads no data."""
    configs = configs if configs is not None else spec_configs(spec)
    processes = planned_processes(spec)
    return [
        plan_line(
            f"{v.name}/seed{seed}",
            configs[(v.name, seed)],
            processes,
            spec.plan_metric or spec.metric_label,
            _paper_setting(spec, v),
            runs=len(spec.seeds),
        )
        for v in spec.variants
        for seed in spec.seeds
    ]


def plan_text(lines: list[dict[str, Any]]) -> str:
    """The plan as JSON lines (what --dry-run prints and plan.jsonl holds)."""
    return "".join(json.dumps(line, default=str, ensure_ascii=False) + "\n" for line in lines)


def print_plan(lines: list[dict[str, Any]]) -> None:
    """Print the plan, one JSON line per run (rank 0 only)."""
    if is_main_process():
        print(plan_text(lines), end="", flush=True)


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


# ----------------------------------------------------------------------------- running
def run_experiment(spec: ExperimentSpec) -> ExperimentResults:
    """Train every variant x seed of `spec` (resuming / skipping what is done), write results."""
    start = time.perf_counter()
    check_processes(spec)
    # Every config first: a typo in an override fails now, not after hours of training.
    configs = spec_configs(spec)
    plan = plan_spec(spec, configs)
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
    spec: ExperimentSpec, configs: dict[tuple[str, int], Any], plan: list[dict[str, Any]]
) -> list[VariantResult]:
    datasets: dict[str, Any] = {}
    if configs:  # the data first: a wrong --root must not leave an out dir that refuses a retry
        _datasets_for(next(iter(configs.values())), datasets)
    if is_main_process():
        prepare_out_dir(spec.out, spec.experiment, spec.settings, spec.overwrite, spec.seeds)
        write_text(spec.out / PLAN_FILE, plan_text(plan))
    dist_utils.barrier()
    total = len(spec.variants) * len(spec.seeds)
    _say(
        f"{spec.experiment}: {len(spec.variants)} variants x {len(spec.seeds)} seeds = {total} "
        f"runs into {spec.out}"
    )
    results: list[VariantResult] = []
    index = 0
    for variant in spec.variants:
        first = configs[(variant.name, spec.seeds[0])] if spec.seeds else None
        reason = _unbuildable(first, datasets) if first is not None else None
        runs = []
        for seed in spec.seeds:
            index += 1
            tag = f"[{index}/{total}] {variant.name} seed{seed}"
            run_dir = spec.out / variant.name / f"seed{seed}"
            if reason is not None:
                _say(f"{tag}: n/a ({reason})")
                runs.append(RunResult(variant.name, seed, str(run_dir), "n/a", reason=reason))
                continue
            config = configs[(variant.name, seed)]
            callbacks = spec.callbacks(variant.name, seed) if spec.callbacks else []
            run = _run_one(
                config,
                run_dir,
                variant.name,
                seed,
                spec.metric,
                tag,
                datasets,
                callbacks,
                median_k=spec.median_of_last,
            )
            runs.append(_as_error(run) if spec.as_error else run)
        results.append(variant_result(variant, runs, reason, spec.median_of_last))
    return results


def variant_result(
    variant: Variant, runs: list[RunResult], reason: str | None, median_k: int | None = None
) -> VariantResult:
    """A variant's summaries over its finished runs."""
    ok = [r for r in runs if r.ok]
    median = None
    if median_k:
        median = summarize([r.median_last for r in ok if r.median_last is not None])
    return VariantResult(
        variant,
        runs,
        summarize([r.final for r in ok]),
        summarize([r.best for r in ok if r.best is not None]),
        reason,
        median,
    )


def _as_error(run: RunResult) -> RunResult:
    """The run with its accuracy values (%) turned into errors (100 - accuracy)."""
    for name in ("final", "best", "median_last"):
        value = getattr(run, name)
        if value is not None:
            setattr(run, name, 100.0 - value)
    return run


def _datasets_for(config, cache: dict[str, Any]):
    """Train/val datasets, built once per data config (all variants usually share one)."""
    from lightnets.engine.trainer import build_datasets

    key = json.dumps(asdict(config.data), sort_keys=True, default=str)
    if config.data.val_fraction > 0 and config.data.val_holdout == "stratified":
        key += f"/seed{config.train.seed}"  # the held-out split depends on the seed
    if key not in cache:
        cache[key] = build_datasets(config)
    return cache[key]


def _unbuildable(config, cache: dict[str, Any]) -> str | None:
    """Why the variant's model cannot be built (None when it can)."""
    from lightnets.engine.trainer import resolve_model_args
    from lightnets.models.registry import create_model

    train_set, _ = _datasets_for(config, cache)
    try:
        create_model(config.model.name, **resolve_model_args(config, train_set))
    # UserError is a ValueError; torch raises the others for layer settings it cannot build
    except (ValueError, RuntimeError, NotImplementedError, TypeError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return text if isinstance(err, UserError) else f"{type(err).__name__}: {text}"
    return None


def _comparable(config_dict: Any) -> Any:
    """A run's config as compared on re-runs: display-only keys (train.progress) left out.

    The stored config is read through the current Config first, so keys added to Config since
    the run was started (with their defaults) do not make an old run look different.
    """
    from lightnets.engine.config import load_config

    if isinstance(config_dict, dict):
        try:
            config_dict = load_config(config_dict).to_dict()
        except UserError:
            pass  # not a config of this version: compared as it is (and found different)
    value = _normalized(config_dict)
    if isinstance(value, dict) and isinstance(value.get("train"), dict):
        value["train"].pop("progress", None)
    return value


def _is_finished(ckpt: dict[str, Any], config) -> bool:
    if ckpt.get("stop_reason"):  # stopped early by a callback (no flips, no improvement)
        return True
    max_steps = config.train.max_steps
    if max_steps:
        return int(ckpt.get("step", 0)) >= max_steps
    return int(ckpt.get("epoch", 0)) >= config.train.epochs


def _metric_values(run_dir: Path, metric: str) -> list[float]:
    """The metric's value of every evaluated epoch of a run, in order."""
    from lightnets.engine.logging import read_rows

    return [
        float(r[metric])
        for r in read_rows(run_dir)
        if isinstance(r.get(metric), (int, float)) and not isinstance(r.get(metric), bool)
    ]


def _best_of(run_dir: Path, metric: str, fallback: float | None) -> float | None:
    values = _metric_values(run_dir, metric)
    if not values:
        return fallback
    return min(values) if metric.endswith("loss") else max(values)


def median_of_last(run_dir: Path, metric: str, k: int) -> float | None:
    """Median of the metric over the run's last k epochs: the evaluated epochs among the last
    k (all k with train.eval_every = 1; fewer if the run has fewer)."""
    from lightnets.engine.logging import read_rows

    rows = [
        r
        for r in read_rows(run_dir)
        if isinstance(r.get(metric), (int, float)) and not isinstance(r.get(metric), bool)
    ]
    if not rows:
        return None
    last = max(int(r.get("epoch", 0)) for r in rows)
    values = [float(r[metric]) for r in rows if int(r.get("epoch", 0)) > last - k]
    return float(statistics.median(values))


def _run_one(
    config,
    run_dir: Path,
    variant: str,
    seed: int,
    metric: str,
    tag: str,
    datasets: dict,
    callbacks: list | None = None,
    *,
    median_k: int | None = None,
) -> RunResult:
    """Train, resume or skip one run; every process of a DDP launch calls this together.
    `median_k`: also record the median of the metric over the last median_k epochs."""
    from lightnets.engine.checkpoint import load_checkpoint
    from lightnets.engine.trainer import NonFiniteError, Trainer

    def median() -> float | None:
        return median_of_last(run_dir, metric, median_k) if median_k else None

    failed = run_dir / FAILED_FILE
    if failed.is_file():
        reason = json.loads(failed.read_text()).get("reason", "failed")
        _say(f"{tag}: skip (failed before: {reason}; --overwrite to retry)")
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
            metrics = ckpt.get("metrics") or {}
            final = metrics.get(metric)
            best = _best_of(run_dir, metric, ckpt.get("best"))
            _say(f"{tag}: skip (finished) {_fmt_metric(metric, final, best)}")
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
        _say(f"{tag}: resume from epoch {ckpt.get('epoch')} step {ckpt.get('step')} ({run_dir})")
    else:
        _say(f"{tag}: start ({run_dir})")
    start = time.perf_counter()
    try:
        trainer = Trainer(
            config,
            run_dir,
            resume=resume,
            overwrite=not resume,  # a dir without a checkpoint holds nothing worth keeping
            datasets=_datasets_for(config, datasets),
            callbacks=callbacks or (),
        )
        row = trainer.fit()
    except NonFiniteError as err:
        reason = str(err).split(";")[0]
        if is_main_process():
            write_text(failed, json.dumps({"reason": reason}) + "\n")
        dist_utils.barrier()
        _say(f"{tag}: failed ({reason})")
        return RunResult(variant, seed, str(run_dir), "failed", reason=reason)
    dist_utils.barrier()  # rank 0 has written the run's files before anyone reads them
    seconds = time.perf_counter() - start
    final = row.get(metric)
    best = _best_of(run_dir, metric, trainer.best)
    _say(f"{tag}: done in {seconds:.0f} s, {_fmt_metric(metric, final, best)}")
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


def _check_launch(ckpt: dict[str, Any], config, run_dir: Path) -> None:
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


# ----------------------------------------------------------------------------- results
def _ours(s: Summary, reason: str | None, runs: list[RunResult]) -> str:
    if s.n == 0:
        if reason:
            return f"n/a ({reason})"
        why = next((r.reason for r in runs if r.reason), None)
        return f"failed ({why})" if why else "n/a"
    return f"{mean_std(s)} ({s.n})"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"


def _deltas(results: ExperimentResults, vr: VariantResult) -> tuple[float | None, float | None]:
    """(ours, paper) difference of this variant's final mean to its baseline variant's."""
    base_name = vr.variant.baseline
    if base_name is None or base_name == vr.variant.name:
        return None, None
    base = results.by_name(base_name)
    if base is None:
        return None, None
    ours = None
    if vr.headline.n and base.headline.n:
        ours = vr.headline.mean - base.headline.mean
    paper = None
    if vr.variant.paper is not None and base.variant.paper is not None:
        paper = vr.variant.paper - base.variant.paper
    return ours, paper


def format_table(results: ExperimentResults) -> str:
    """The markdown results table (title, notes, one row per variant)."""
    spec = results.spec
    has_baseline = any(v.variant.baseline for v in results.variants)
    k = spec.median_of_last
    head = ["variant"]
    if k:
        head.append(f"ours (median of last {k})")
    head += ["ours (final)", "ours (best epoch)", spec.paper_label, f"ours − {spec.paper_label}"]
    if has_baseline:
        head += ["Δ vs baseline (ours)", "Δ vs baseline (paper)"]
    lines = [f"## {spec.title}", ""]
    lines += [f"{note}" for note in spec.notes]
    if spec.notes:
        lines.append("")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for vr in results.variants:
        paper = vr.variant.paper
        diff = vr.headline.mean - paper if (vr.headline.n and paper is not None) else None
        best = _ours(vr.best, None, []) if vr.best.n else "—"
        cells = [vr.variant.label]
        if k:
            cells.append(_ours(vr.headline, vr.reason, vr.runs))
        cells += [
            _ours(vr.final, vr.reason, vr.runs),
            best,
            "—" if paper is None else f"{paper:.3f}",
            _signed(diff),
        ]
        if has_baseline:
            ours_d, paper_d = _deltas(results, vr)
            cells += [_signed(ours_d), _signed(paper_d)]
        lines.append("| " + " | ".join(cells) + " |")
    median = (
        f"median of last {k}: the median over each run's last {k} evaluated epochs (the "
        f"number compared with the paper); "
        if k
        else ""
    )
    lines += [
        "",
        f"ours: {'100 − ' if spec.as_error else ''}{spec.metric} ({spec.metric_label}), mean ± "
        "std over seeds (ddof=1) and the number of seeds in parentheses; "
        f"{median}final: at the last epoch; best epoch: the "
        f"{'lowest' if spec.as_error else 'highest'} value over the evaluated epochs (selected "
        "on the evaluation set, so optimistic).",
    ]
    return "\n".join(lines)


def _results_dict(results: ExperimentResults) -> dict[str, Any]:
    spec = results.spec
    variants = []
    for vr in results.variants:
        ours_d, paper_d = _deltas(results, vr)
        variants.append(
            {
                "name": vr.variant.name,
                "label": vr.variant.label,
                "overrides": vr.variant.overrides,
                "status": vr.status,
                "reason": vr.reason,
                "paper": vr.variant.paper,
                "baseline": vr.variant.baseline,
                "final": asdict(vr.final),
                "best": asdict(vr.best),
                "median_of_last": None if vr.median is None else asdict(vr.median),
                "diff_to_paper": (
                    vr.headline.mean - vr.variant.paper
                    if vr.headline.n and vr.variant.paper is not None
                    else None
                ),
                "delta_vs_baseline": ours_d,
                "paper_delta_vs_baseline": paper_d,
                "runs": [asdict(r) for r in vr.runs],
            }
        )
    return {
        "experiment": spec.experiment,
        "title": spec.title,
        "arguments": _normalized(spec.settings),
        "seeds": spec.seeds,
        "recipe": spec.recipe,
        "base_overrides": spec.base_overrides,
        "metric": spec.metric,
        "median_of_last": spec.median_of_last,
        "paper_label": spec.paper_label,
        "notes": spec.notes,
        "seconds": results.seconds,
        "variants": variants,
    }


def _csv_text(results: ExperimentResults) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            "variant",
            "label",
            "status",
            "n",
            "final_mean",
            "final_std",
            "best_mean",
            "best_std",
            "median_last_mean",
            "median_last_std",
            "paper",
            "diff_to_paper",
            "final_values",
            "reason",
        ]
    )
    for vr in results.variants:
        paper = vr.variant.paper
        diff = vr.headline.mean - paper if (vr.headline.n and paper is not None) else None
        median = vr.median or Summary(None, None, 0, [])
        writer.writerow(
            [
                vr.variant.name,
                vr.variant.label,
                vr.status,
                vr.final.n,
                _num(vr.final.mean),
                _num(vr.final.std),
                _num(vr.best.mean),
                _num(vr.best.std),
                _num(median.mean),
                _num(median.std),
                _num(paper),
                _num(diff),
                ";".join(f"{v:.4f}" for v in vr.final.values),
                vr.reason or "",
            ]
        )
    return buf.getvalue()


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def write_results(results: ExperimentResults) -> None:
    """results.md, results.json, results.csv and results.png in the experiment's out dir."""
    out = Path(results.spec.out)
    write_text(out / "results.md", format_table(results) + "\n")
    write_text(
        out / "results.json", json.dumps(_results_dict(results), indent=2, default=str) + "\n"
    )
    write_text(out / "results.csv", _csv_text(results))
    plot_results(results, out / "results.png")


def plot_results(results: ExperimentResults, path: Path) -> None:
    """Bar chart of ours (final, mean with std error bars) per variant; the paper as markers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spec = results.spec
    variants = results.variants
    n = len(variants)
    fig = Figure(figsize=(max(7.0, 0.9 * n + 4.0), 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(n))
    means = [vr.headline.mean if vr.headline.n else 0.0 for vr in variants]
    stds = [vr.headline.std if vr.headline.n else 0.0 for vr in variants]
    have = [vr.headline.n > 0 for vr in variants]
    values = [m for m, h in zip(means, have) if h]
    values += [vr.variant.paper for vr in variants if vr.variant.paper is not None]
    low = 0.0
    if values:  # accuracies sit in a narrow band: start the axis just below it (noted on it)
        span = max(values) - min(values)
        low = max(0.0, math.floor(min(values) - max(2.0, 0.5 * span) - max(stds, default=0.0)))
    ax.bar(
        [x for x, h in zip(xs, have) if h],
        [m - low for m, h in zip(means, have) if h],
        bottom=low,
        yerr=[s for s, h in zip(stds, have) if h],
        capsize=4,
        color="#4c72b0",
        label=(
            f"ours (median of last {spec.median_of_last}, mean ± std)"
            if spec.median_of_last
            else "ours (final, mean ± std)"
        ),
    )
    px = [x for x, vr in zip(xs, variants) if vr.variant.paper is not None]
    py = [vr.variant.paper for vr in variants if vr.variant.paper is not None]
    if px:
        ax.scatter(px, py, marker="D", color="#c44e52", zorder=3, label=spec.paper_label)
    top = max(values) if values else 1.0
    top += max(1.0, 0.08 * (top - low))
    for x, vr in zip(xs, variants):
        if not vr.headline.n:
            ax.text(x, low + 0.02 * (top - low), "n/a", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(xs)
    ax.set_xticklabels([vr.variant.label for vr in variants], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(low, top)
    cut = f" (axis starts at {low:g})" if low > 0 else ""
    ax.set_ylabel(f"{spec.metric_label}{cut}", fontsize=9)
    ax.set_title(textwrap.fill(spec.title, 70), fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
