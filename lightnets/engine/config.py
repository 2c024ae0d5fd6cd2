"""Typed training configuration, loaded from TOML recipes and `--set a.b=value` overrides.

A recipe is a TOML file with up to seven tables (model, data, optim, schedule,
binary_schedule, train, output).
Every key is checked against the dataclasses below, so a typo or a wrong type is refused
with the list of valid keys or the expected type instead of being silently ignored.

TOML has no null. A key whose type allows None (`data.val_split`, `train.max_steps`, ...) takes
the word "none" for it, in a recipe (`val_split = "none"`) as on the command line
(`--set data.val_split=none`), and `save_config` writes None that way, so a run dir's
config.toml reads back as the very config the run was started with. Inside the free-form
tables (model.args, data.args, augmentation parameters) "none" is a plain string, so None cannot
be written there and is refused by name. A config.toml written before None was spelled out
left such keys out, which reads as their default.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from lightnets.data.augment import parse_augment
from lightnets.errors import UserError, did_you_mean
from lightnets.files import atomic_write_bytes
from lightnets.optim.bop import FLIP_TESTS
from lightnets.optim.composite import BINARY_OPTIMIZERS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class ModelConfig:
    """Which registered model to build; `args` are passed to its factory."""

    name: str = "mnist_cnn"
    args: dict[str, Any] = field(default_factory=dict)


#: The global batch when a recipe gives neither data.batch_size nor data.batch_per_process.
DEFAULT_BATCH = 64
#: How data.val_fraction is held out of the training split.
VAL_HOLDOUTS = ("stratified", "last")


@dataclass
class DataConfig:
    """Dataset, splits, batch size and augmentation.

    The batch is given one of two ways: `batch_size`, the global batch (split over the
    processes), or `batch_per_process`, the images each process sees per step (what BN's
    statistics are computed over; the global batch is then that times the processes, as in
    the GN paper's "32 images per GPU on 8 GPUs"). Neither: a global batch of 64.
    `augment` lists ops by name or with parameters: [{pad_crop = {padding = 2}}, "hflip"].
    """

    name: str = "mnist5k"
    root: str | None = None
    train_split: str = "train"
    val_split: str | None = "test"
    val_fraction: float = 0.0  # > 0: hold out this fraction of the train split instead
    val_holdout: str = "stratified"  # or "last": the last val_fraction of the split, in order
    batch_size: int | None = None
    batch_per_process: int | None = None
    eval_batch_size: int | None = None
    num_workers: int = 0
    augment: list[str | dict[str, Any]] = field(default_factory=lambda: ["normalize"])
    eval_augment: list[str | dict[str, Any]] = field(default_factory=lambda: ["normalize"])
    image_size: list[int] | None = None
    args: dict[str, Any] = field(default_factory=dict)

    def per_process_batch(self, processes: int) -> int:
        """Images per process and step with `processes` processes (a UserError when the
        global batch does not split evenly)."""
        if self.batch_per_process is not None:
            return self.batch_per_process
        total = self.batch_size if self.batch_size is not None else DEFAULT_BATCH
        if total % processes:
            raise UserError(
                f"data.batch_size={total} must be divisible by the number of processes "
                f"({processes}): it is the global batch (or give data.batch_per_process)"
            )
        return total // processes

    def global_batch(self, processes: int) -> int:
        """Images per optimizer step over all `processes` processes."""
        return self.per_process_batch(processes) * processes


@dataclass
class OptimConfig:
    """Optimizer and weight decay; `lr_reference_batch` applies the linear LR scaling rule."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    norm_weight_decay: float | None = None  # None: same as weight_decay
    bias_weight_decay: float | None = None  # None: same as weight_decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    lr_reference_batch: int | None = None  # lr is scaled by the global batch / this
    # Binary networks: "bop" trains the +1/-1 weights of binary layers in bop mode with Bop
    # (paper 004) and everything else with `name` above; None: no binary optimizer.
    binary: str | None = None
    bop_gamma: float = 1e-4  # Bop's adaptivity rate (eq. 5); scheduled by [binary_schedule]
    bop_threshold: float = 1e-8  # Bop's tau (eq. 6)
    # which w * m flip: "strict" (> tau, the original code), "inclusive" (>= tau, [Re] eq. 6)
    # or "larq" (> tau flips, == tau sets +1: larq's arithmetic); see lightnets.optim.Bop
    bop_flip_test: str = "strict"


@dataclass
class ScheduleConfig:
    """Learning-rate schedule; `unit` says whether it advances per epoch or per iteration."""

    name: str = "constant"
    unit: str = "epoch"
    warmup: int = 0  # in `unit`s
    warmup_start_factor: float = 0.0
    milestones: list[int] = field(default_factory=list)
    step_size: int | None = None
    gamma: float = 0.1
    power: float = 0.9
    min_factor: float = 0.0


@dataclass
class BinaryScheduleConfig(ScheduleConfig):
    """The schedule of Bop's hyperparameters (`keys`: "gamma" and/or "threshold"), separate
    from the learning rate's: the [Re] CIFAR recipe keeps Adam's lr constant and decays
    gamma x0.1 every 100 epochs (name = "step", step_size = 100, gamma = 0.1). Here `gamma`
    is the schedule's decay factor, as in [schedule]; Bop's own gamma is optim.bop_gamma."""

    keys: list[str] = field(default_factory=lambda: ["gamma"])


@dataclass
class TrainConfig:
    """Loop length, task, reproducibility, precision and checkpointing."""

    task: str = "classification"
    epochs: int = 10
    max_steps: int | None = None  # iteration-based length; overrides epochs when set
    seed: int = 0
    deterministic: bool = False
    amp: str = "none"
    device: str = "auto"
    grad_clip: float | None = None
    label_smoothing: float = 0.0
    ignore_index: int | None = None
    eval_every: int = 1
    checkpoint_every: int = 0  # also checkpoint every N iterations (0: at epoch ends only)
    best_metric: str | None = None  # default: acc1 (classification) or miou (segmentation)
    sync_bn: bool = False  # under DDP: BN -> SyncBatchNorm (CUDA), FBN sync_stats (any backend)
    channels_last: bool = False  # model and batches in channels-last memory format (NHWC)
    progress: bool = True
    stop_after_flipless_epochs: int | None = None  # Bop: stop after N epochs without a flip


@dataclass
class OutputConfig:
    """Where runs go: `root/name` unless `--out` is given."""

    root: str = "runs"
    name: str | None = None
    plot: bool = True


@dataclass
class Config:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    binary_schedule: BinaryScheduleConfig = field(default_factory=BinaryScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every value, None included: `load_config` reads it back as
        this very config (`to_toml_dict` is the form TOML can hold)."""
        return dataclasses.asdict(self)

    def to_toml_dict(self) -> dict[str, Any]:
        """`to_dict` as TOML can hold it: None spelled "none" (what `load_config` reads back
        as None for keys whose type allows it); None anywhere else is a UserError naming the
        key, as TOML could not keep it."""
        tree: dict[str, Any] = {}
        for section in dataclasses.fields(self):
            part = getattr(self, section.name)
            hints = typing.get_type_hints(type(part))
            table = tree[section.name] = {}
            for f in dataclasses.fields(part):
                key, value = f"{section.name}.{f.name}", getattr(part, f.name)
                if value is None and _allows_none(hints[f.name]):
                    table[f.name] = NONE
                else:
                    _refuse_none(value, key)
                    table[f.name] = copy.deepcopy(value)
        return tree

    def validate(self) -> Config:
        """Refuse values that cannot work, naming the key and what is expected."""
        d = self.data
        if d.batch_size is not None:
            _check(d.batch_size >= 1, "data.batch_size", d.batch_size, ">= 1")
        if d.batch_per_process is not None:
            _check(d.batch_per_process >= 1, "data.batch_per_process", d.batch_per_process, ">= 1")
            _check(
                d.batch_size is None,
                "data.batch_size",
                d.batch_size,
                "no value when data.batch_per_process is set (one is the global batch, the other "
                "the batch of each process: set data.batch_size = none)",
            )
        _check(
            d.val_holdout in VAL_HOLDOUTS,
            "data.val_holdout",
            d.val_holdout,
            " or ".join(repr(v) for v in VAL_HOLDOUTS),
        )
        for key in ("augment", "eval_augment"):
            try:
                parse_augment(getattr(d, key))
            except UserError as err:
                raise UserError(f"config value data.{key}: {err}") from None
        if self.data.eval_batch_size is not None:
            _check(
                self.data.eval_batch_size >= 1,
                "data.eval_batch_size",
                self.data.eval_batch_size,
                ">= 1",
            )
        _check(self.data.num_workers >= 0, "data.num_workers", self.data.num_workers, ">= 0")
        _check(
            0.0 <= self.data.val_fraction < 1.0,
            "data.val_fraction",
            self.data.val_fraction,
            "in [0, 1)",
        )
        _check(self.optim.lr > 0, "optim.lr", self.optim.lr, "> 0")
        _check(
            self.optim.weight_decay >= 0,
            "optim.weight_decay",
            self.optim.weight_decay,
            ">= 0",
        )
        _check(
            self.schedule.unit in ("epoch", "step"),
            "schedule.unit",
            self.schedule.unit,
            "'epoch' or 'step'",
        )
        _check(self.schedule.warmup >= 0, "schedule.warmup", self.schedule.warmup, ">= 0")
        self._validate_binary()
        _check(self.train.epochs >= 1, "train.epochs", self.train.epochs, ">= 1")
        if self.train.max_steps is not None:
            _check(self.train.max_steps >= 1, "train.max_steps", self.train.max_steps, ">= 1")
        _check(
            self.train.task in ("classification", "segmentation"),
            "train.task",
            self.train.task,
            "'classification' or 'segmentation'",
        )
        _check(self.train.amp in ("none", "bf16"), "train.amp", self.train.amp, "'none' or 'bf16'")
        _check(self.train.eval_every >= 1, "train.eval_every", self.train.eval_every, ">= 1")
        _check(
            self.train.checkpoint_every >= 0,
            "train.checkpoint_every",
            self.train.checkpoint_every,
            ">= 0",
        )
        _check(
            0.0 <= self.train.label_smoothing < 1.0,
            "train.label_smoothing",
            self.train.label_smoothing,
            "in [0, 1)",
        )
        if self.train.grad_clip is not None:
            _check(self.train.grad_clip > 0, "train.grad_clip", self.train.grad_clip, "> 0")
        return self

    def _validate_binary(self) -> None:
        o, b, t = self.optim, self.binary_schedule, self.train
        if o.binary is not None:
            _check(
                o.binary in BINARY_OPTIMIZERS,
                "optim.binary",
                o.binary,
                " or ".join(repr(n) for n in BINARY_OPTIMIZERS) + " (or no value: no Bop)",
            )
        _check(0.0 < o.bop_gamma <= 1.0, "optim.bop_gamma", o.bop_gamma, "in (0, 1], e.g. 1e-4")
        _check(o.bop_threshold >= 0, "optim.bop_threshold", o.bop_threshold, ">= 0, e.g. 1e-8")
        _check(
            o.bop_flip_test in FLIP_TESTS,
            "optim.bop_flip_test",
            o.bop_flip_test,
            " or ".join(repr(n) for n in FLIP_TESTS),
        )
        _check(b.unit in ("epoch", "step"), "binary_schedule.unit", b.unit, "'epoch' or 'step'")
        _check(b.warmup >= 0, "binary_schedule.warmup", b.warmup, ">= 0")
        _check(
            bool(b.keys) and all(k in ("gamma", "threshold") for k in b.keys),
            "binary_schedule.keys",
            b.keys,
            'Bop hyperparameters out of "gamma", "threshold"',
        )
        if t.stop_after_flipless_epochs is not None:
            _check(
                t.stop_after_flipless_epochs >= 1,
                "train.stop_after_flipless_epochs",
                t.stop_after_flipless_epochs,
                ">= 1",
            )
            _check(
                o.binary is not None,
                "train.stop_after_flipless_epochs",
                t.stop_after_flipless_epochs,
                "no value without a binary optimizer (flips are Bop's: set optim.binary = 'bop')",
            )


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise UserError(f"config value {key}={value!r} is invalid: expected {expected}")


#: How a config in TOML spells None (TOML has no null): the word `--set key=none` takes.
NONE = "none"


def _allows_none(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in (
        typing.get_args(hint)
    )


def _refuse_none(value: Any, key: str) -> None:
    """A None that TOML cannot hold (in a free-form table or list, or in a key whose type has
    no None): refused by name rather than dropped (dropped, it would read back as something
    else, e.g. the default)."""
    if value is None:
        raise UserError(
            f"config value {key}=None cannot be written to TOML (it has no null, and "
            f'"{NONE}" here would read back as a string): expected a value, or the key left out'
        )
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_none(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _refuse_none(v, f"{key}[{i}]")


def list_recipes() -> list[str]:
    """Names of the recipes shipped with lightnets."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """Resolve a recipe given as a file path or as the name of a shipped recipe."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPE_DIR / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped
    names = list_recipes()
    raise UserError(
        f"unknown recipe {str(name_or_path)!r}{did_you_mean(str(name_or_path), names)}: "
        f"expected a TOML file path or one of {', '.join(names)}"
    )


def load_config(recipe: str | Path | dict | None = None, overrides: list[str] = ()) -> Config:
    """Build a validated Config from a recipe (name, path or dict) and `a.b=value` overrides."""
    if recipe is None:
        raw: dict[str, Any] = {}
    elif isinstance(recipe, dict):
        raw = recipe
    else:
        path = recipe_path(recipe)
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"recipe {path} is not valid TOML: {err}") from None
    config = _build(Config, raw, "")
    for item in overrides:
        apply_override(config, item)
    if isinstance(recipe, (str, Path)) and config.output.name is None:
        config.output.name = Path(str(recipe)).stem
    return config.validate()


#: Keys that were renamed: old dotted key -> what to write instead.
RENAMED_KEYS = {
    "optim.bop_inclusive": 'optim.bop_flip_test = "inclusive" (for true) or "strict" (for false)',
}


def _check_renamed(dotted: str) -> None:
    if dotted in RENAMED_KEYS:
        raise UserError(f"config key {dotted!r} was renamed: expected {RENAMED_KEYS[dotted]}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"config section {prefix or '<root>'} must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        _check_renamed(full)
        if key not in names:
            raise UserError(
                f"unknown config key {full!r}{did_you_mean(key, names)}: valid keys in "
                f"{prefix.rstrip('.') or 'the recipe'} are {', '.join(names)}"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, hint, full)
    return cls(**kwargs)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert `value` to the annotated type, or explain which type was expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except UserError:
                continue
        names = " or ".join(_type_name(a) for a in args)
        raise UserError(f"config value {key}={value!r} has the wrong type: expected {names}")
    if origin is list:
        if isinstance(value, str):  # "100,150" from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
            value = [_parse_literal(v) for v in value]
        if not isinstance(value, (list, tuple)):
            raise UserError(
                f"config value {key}={value!r} has the wrong type: expected a list of "
                f"{_type_name(args[0])}"
            )
        return [_coerce(v, args[0], key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config value {key}={value!r} has the wrong type: expected a table")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise UserError(f"config value {key}={value!r} has the wrong type: expected {_type_name(hint)}")


def _parse_literal(text: str) -> Any:
    """Parse a command-line value as a TOML literal; bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(config: Config, item: str) -> None:
    """Apply one `section.key=value` (or `section.args.key=value`) override in place."""
    if "=" not in item:
        raise UserError(f"override {item!r} is malformed: expected section.key=value")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    sections = [f.name for f in dataclasses.fields(Config)]
    if len(parts) < 2 or parts[0] not in sections:
        raise UserError(
            f"override {dotted!r} must start with a section{did_you_mean(parts[0], sections)}: "
            f"one of {', '.join(sections)}"
        )
    target = getattr(config, parts[0])
    key = parts[1]
    names = [f.name for f in dataclasses.fields(target)]
    _check_renamed(f"{parts[0]}.{key}")
    if key not in names:
        raise UserError(
            f"unknown config key {parts[0]}.{key}{did_you_mean(key, names)}: valid keys in "
            f"{parts[0]} are {', '.join(names)}"
        )
    value = _parse_literal(text.strip())
    hint = typing.get_type_hints(type(target))[key]
    if len(parts) > 2:
        if typing.get_origin(hint) is not dict:
            raise UserError(f"config key {parts[0]}.{key} is not a table: cannot set {dotted}")
        table = getattr(target, key)
        for part in parts[2:-1]:
            table = table.setdefault(part, {})
        table[parts[-1]] = value
        return
    setattr(target, key, _coerce(value, hint, dotted))


def save_config(config: Config, path: Path) -> None:
    """Write the fully resolved config as TOML (re-usable as a recipe; None as "none")."""
    atomic_write_bytes(path, tomli_w.dumps(config.to_toml_dict()).encode())
