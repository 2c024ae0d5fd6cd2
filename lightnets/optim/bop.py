"""Bop, the binary optimizer of paper 004 (eq. 5-7), and the binary / real parameter split.

Bop keeps one exponential moving average of the gradient per binary weight and flips the
weight when that average is strong (past a threshold tau) and consistent with the weight's own
sign, as the original code does (read from its public code, see papers/README.md):

    m <- m + gamma * (g - m)                  m starts at 0, no bias correction      (eq. 5)
    w <- -w  where |m| > tau and sign(m) = sign(w)                                    (eq. 6)

Arithmetic: the moving average is computed exactly as larq computes it (larq 0.14's Bop, the
original code's optimizer): d = g - m, d = gamma * d, m = m + d, each rounded to the weights'
dtype, with gamma and tau rounded to that dtype too. (1 - gamma) m + gamma g is the same
number in exact arithmetic but not in float32: it drifts about 1e-6 relative from larq's over
a few hundred steps and moves single flips by a step now and then. The same arithmetic and
the same seeded gradients give bit-identical averages and weights (tests/optim/
test_bop_larq.py emulates larq's float32 steps; the LCE lane checks larq itself).

Flip test (`flip_test`, per param group). For w in {-1, +1} the product w * m is exact, and
w * m > tau >= 0 holds exactly when sign(m) = sign(w) and |m| > tau:

- ``"strict"`` (default): flip where w * m > tau, the original code's rule and the original
  paper's Algorithm 2.
- ``"inclusive"``: flip where w * m >= tau, the [Re] paper's eq. 6 (|m| >= tau); a zero
  average is never a signal, so with tau = 0 weights whose m is exactly 0 do not flip.
- ``"larq"``: larq's expression, w <- sign(-sign(w * m - tau) * w) with sign(0) = +1: flip
  where w * m > tau, and where w * m == tau the weight becomes +1 (a tie zeroes the inner
  sign). It matters at tau = 0 with zero gradients (the paper's Fig. 2 setting): there every
  -1 weight whose m is 0 turns +1 on the first step.

m is not reset after a flip. `gamma`, `threshold` and `flip_test` are per param group;
`gamma` and `threshold` are plain numbers in each group, so `lightnets.optim.Scheduler(...,
keys=("gamma",))` schedules them like a learning rate (the paper's CIFAR run: gamma x0.1
every 100 epochs). Learning rate and weight decay do not apply: a param group with any other
key (e.g. ``weight_decay``) is refused, so that a setting that would be silently ignored is
not taken for one that works.

No silent freezing. A gradient with a NaN or an infinity would make m non-finite for good and
freeze the weight. Bop skips it instead: that tensor's m and weights stay as they are for the
step, and the skip is counted without a device sync (`nonfinite_skips`); when the flip counts
are next read (the trainer does at its log interval) a warning says how many tensor-steps
were skipped since the last warning. A parameter that stops being +1/-1 after it was added
(another optimizer, weight decay or a load changed it) is an error at the next step, naming
it. To cost nothing when nothing else writes them, the step checks the values of only the
weights torch's version counter says were written in place since Bop's last step (optimizers,
weight decay, load_state_dict and nn.init all count); writes through ``.data``, which torch
does not count, are caught by `check_binary(full=True)` (the trainer calls it every epoch). On
CPU the error comes at that step; on accelerators the check runs on the device and raises
when the counts are next read (or `check_binary()` is called), since raising at once would
need a sync every step.

m has the parameter's dtype (torch keeps optimizer state in it on load), so train +1/-1
weights in float32 even under bfloat16 autocast.

Flips are counted every step without a device sync: `last_flips_tensor` (still no sync),
`last_flips`, `last_flips_per_group` and `last_log_flip_ratio` (eq. 7, pi_t = ln(flips / n +
1e-9), n = all elements in the optimizer) read the counts when asked.

`binary_parameters(model)` are the weights of binary layers in bop mode (found by module type
and mode, see lightnets.nn.binary), `real_parameters(model)` every other trainable parameter
(latent weights, BatchNorm, biases) for a real-valued optimizer such as Adam.
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightnets.errors import UserError
from lightnets.nn.binary import is_binary_layer, is_binary_parameter

__all__ = [
    "Bop",
    "binary_parameters",
    "log_flip_ratio",
    "named_binary_parameters",
    "real_parameters",
]

#: The term eq. 7 adds inside the log so that a step without flips gives a finite value.
LOG_FLIP_EPS = 1e-9


def log_flip_ratio(flips: int | float, n: int) -> float:
    """pi = ln(flips / n + 1e-9), eq. 7 of paper 004 (n: the number of binary weights)."""
    if n <= 0:
        raise ValueError(f"log_flip_ratio needs n > 0 weights, got n={n}")
    return math.log(flips / n + LOG_FLIP_EPS)


def named_binary_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of every trainable binary-layer weight in bop mode, once each."""

    ids = set()
    for module in model.modules():
        if is_binary_layer(module):
            ids.update(id(p) for p in module.binary_parameters() if p.requires_grad)
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def binary_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable +1/-1 weights for Bop: binary layers in bop mode, by module, not by name."""
    return [p for _, p in named_binary_parameters(model)]


def real_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable parameter that is not a bop weight (latent weights, norms, biases)."""
    binary = {id(p) for p in binary_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in binary]


def _check_hyper(what: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"Bop {what}={value!r}{where}: expected a number")
    value = float(value)
    if what == "gamma" and not 0.0 < value <= 1.0:
        raise UserError(f"Bop gamma={value}{where}: expected 0 < gamma <= 1 (e.g. 1e-4)")
    if what == "threshold" and not (value >= 0.0 and math.isfinite(value)):
        raise UserError(f"Bop threshold={value}{where}: expected a finite threshold >= 0")
    return value


#: The flip tests Bop knows (see the module docstring).
FLIP_TESTS = ("strict", "inclusive", "larq")
#: Keys a Bop param group may hold (torch adds "params"; "param_names" with named params).
GROUP_KEYS = frozenset({"params", "param_names", "gamma", "threshold", "flip_test"})

#: Elements per chunk and chunks per window of the step: a window's weights, gradients and
#: averages (3 x 4 x 2^16 x 4 bytes = 3 MiB) stay in cache between the moving-average update
#: and the flip test; whole tensors (binarynet's 8.4M-weight layer is 33 MB each) do not.
_CHUNK = 1 << 16
_WINDOW = 4


class _Slice:
    """One chunk of one tensor's step: views of p, g, m, and the tensor's index in the group."""

    __slots__ = ("g", "index", "m", "p")

    def __init__(self, p: Tensor, g: Tensor, m: Tensor, index: int) -> None:
        self.p, self.g, self.m, self.index = p, g, m, index


def _windows(params: list[Tensor], grads: list[Tensor], averages: list[Tensor]) -> Iterator[list]:
    """Cache-sized windows of flat chunks (views, same storage) of each tensor's p, g, m."""
    chunks: list[_Slice] = []
    for i, (p, g, m) in enumerate(zip(params, grads, averages)):
        if p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and p.numel() > _CHUNK:
            for pc, gc, mc in zip(
                p.view(-1).split(_CHUNK), g.view(-1).split(_CHUNK), m.view(-1).split(_CHUNK)
            ):
                chunks.append(_Slice(pc, gc, mc, i))
        else:
            chunks.append(_Slice(p, g, m, i))
    for start in range(0, len(chunks), _WINDOW):
        yield chunks[start : start + _WINDOW]


_STRUCT_CODES = {torch.float64: "d", torch.float32: "f", torch.float16: "e"}


def _in_dtype(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to `dtype`, as larq casts its hyperparameters to the variable's dtype
    (on the host: struct for IEEE formats, torch only for bfloat16)."""
    code = _STRUCT_CODES.get(dtype)
    if code is None:
        return float(torch.tensor(value, dtype=torch.float64).to(dtype))
    try:
        return struct.unpack(code, struct.pack(code, value))[0]
    except OverflowError:  # beyond the format's range: what the cast would give
        return math.copysign(math.inf, value)


_NAMES_HINT = (
    "; pass (name, tensor) pairs, e.g. lightnets.optim.named_binary_parameters(model), "
    "for errors that name the parameter"
)


def _is_binary_weight(p: Tensor) -> bool:

    return is_binary_parameter(p)


def _host_reads_are_free(device: torch.device) -> bool:
    """CPU values are read without a device sync, so CPU steps check and skip at once."""
    return device.type == "cpu"


def _not_binary(p: Tensor) -> Tensor:
    """0-dim bool on p's device: whether any element of p is not +1/-1 (NaN included)."""
    return torch.ne(p.abs(), 1).any()


class Bop(torch.optim.Optimizer):
    """Binary optimizer (paper 004, eq. 5-6): flip +1/-1 weights on a strong, consistent average.

    Args:
        params: +1/-1 tensors, (name, tensor) pairs, or param-group dicts (as torch optimizers);
            e.g. ``lightnets.optim.binary_parameters(model)``.
        threshold: tau; a weight flips when w * m > tau.
        gamma: adaptivity rate of the moving average m, 0 < gamma <= 1.
        flip_test: "strict" (w * m > tau, the original code), "inclusive" (>=, the [Re]
            paper's eq. 6) or "larq" (larq's arithmetic: > flips, == sets +1).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
        threshold: float = 1e-8,
        gamma: float = 1e-4,
        *,
        flip_test: str = "strict",
    ) -> None:
        defaults = {
            "threshold": _check_hyper("threshold", threshold, ""),
            "gamma": _check_hyper("gamma", gamma, ""),
            "flip_test": self._check_flip_test(flip_test, ""),
        }
        self._last_counts: list[Tensor] | None = None
        self._nonfinite: Tensor | None = None  # tensor-steps skipped, on the weights' device
        self._nonfinite_warned = 0
        self._not_binary: list[tuple[Tensor, str]] = []  # device flags not yet read
        self._versions: dict[int, int] = {}  # id(p) -> p._version when Bop last saw it right
        super().__init__(params, defaults)

    @staticmethod
    def _check_flip_test(value: Any, where: str) -> str:
        if value not in FLIP_TESTS:
            hint = ""
            if isinstance(value, bool):
                hint = ' (inclusive=True is now flip_test="inclusive")'
            raise UserError(
                f"Bop flip_test={value!r}{where}: expected one of "
                f"{', '.join(repr(t) for t in FLIP_TESTS)}{hint}"
            )
        return value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, then a check of the group's keys, values and +1/-1 weights."""
        index = len(self.param_groups)
        unknown = sorted(set(param_group) - GROUP_KEYS) if isinstance(param_group, dict) else []
        if unknown:
            raise UserError(
                f"Bop param group {index} has {', '.join(repr(k) for k in unknown)}: Bop has no "
                "learning rate or weight decay; expected only gamma, threshold and flip_test "
                "beside params (e.g. give weight decay to the optimizer of the real parameters)"
            )
        super().add_param_group(param_group)
        group = self.param_groups[index]
        where = f" in param group {index}"
        for key in ("threshold", "gamma"):
            group[key] = _check_hyper(key, group[key], where)
        self._check_flip_test(group["flip_test"], where)
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if not p.is_floating_point():
                raise UserError(
                    f"Bop: {self._describe(i, index, p, names)} has dtype {p.dtype}: "
                    "expected a floating-point tensor of +1/-1"
                )
            with torch.no_grad():
                ok = not bool(_not_binary(p))
            self._versions[id(p)] = p._version
            if not ok:
                raise UserError(
                    f"Bop: {self._describe(i, index, p, names)} has values other than +1/-1: "
                    "expected binary weights (e.g. lightnets.optim.binary_parameters(model), "
                    "the weights of BinaryConv2d/BinaryLinear with mode='bop')"
                    + ("" if names else _NAMES_HINT)
                )
            if p.numel() > 1 and bool((p == 1).all()) and not _is_binary_weight(p):
                warnings.warn(
                    f"Bop: {self._describe(i, index, p, names)} is +1 everywhere, like a "
                    "freshly initialised norm weight and unlike a binary weight (the sign of a "
                    "He-normal draw has both signs): pass lightnets.optim.binary_parameters("
                    "model), not model.parameters()" + ("" if names else _NAMES_HINT),
                    UserWarning,
                    stacklevel=4,  # add_param_group <- Optimizer.__init__ <- Bop() <- caller
                )

    @staticmethod
    def _describe(i: int, group: int, p: Tensor, names: list[str] | None) -> str:
        label = f"parameter {names[i]!r}" if names else f"parameter {i}"
        return f"{label} of param group {group} (shape {tuple(p.shape)})"

    def _not_binary_error(self, what: str) -> UserError:
        return UserError(
            f"Bop: {what} is no longer +1/-1 (it was when Bop took it): something else changed "
            "it, e.g. a second optimizer given the same weights (pass lightnets.optim."
            "real_parameters(model) to it), weight decay on them, or a load of latent weights; "
            "expected Bop to be the only writer of binary weights"
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Update every m (larq's arithmetic), flip the weights that pass the test, count them."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.check_binary()  # flags left by the last step on an accelerator
        counts: list[Tensor] = []
        for index, group in enumerate(self.param_groups):
            params, grads, averages, labels = [], [], [], []
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Bop does not support sparse gradients")
                state = self.state[p]
                if "m" not in state:
                    state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                averages.append(state["m"])
                labels.append(self._describe(i, index, p, names))
            # on the weights' device even for a group without gradients: gathering the counts
            # must not copy from the host (a blocking copy is a device sync)
            home = group["params"][0].device if group["params"] else torch.device("cpu")
            count = torch.zeros((), dtype=torch.int64, device=home)
            if params:
                count = self._step_group(group, params, grads, averages, labels)
            counts.append(count)
        self._last_counts = counts
        return loss

    def _step_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        averages: list[Tensor],
        labels: list[str],
    ) -> Tensor:
        test = group["flip_test"]
        gammas = [_in_dtype(group["gamma"], p.dtype) for p in params]
        taus = [_in_dtype(group["threshold"], p.dtype) for p in params]
        # A non-finite gradient is skipped per tensor: its m gets + 0 (m + 0 == m), so no
        # weight of it flips (the test on an unchanged m flips nothing that it did not already).
        finite = self._finite_flags(grads)
        on_cpu = _host_reads_are_free(params[0].device)
        skip = {i for i, ok in enumerate(finite) if not bool(ok)} if on_cpu else set()
        self._check_written(params, labels, on_cpu)
        sums = []
        for window in _windows(params, grads, averages):
            if on_cpu:
                window = [c for c in window if c.index not in skip]
                if not window:
                    continue
            ms = [c.m for c in window]
            ds = torch._foreach_sub([c.g for c in window], ms)  # d = g - m
            torch._foreach_mul_(ds, [gammas[c.index] for c in window])  # d = gamma d
            if not on_cpu:  # sync-free: zero the update of tensors with non-finite gradients
                ds = [torch.where(finite[c.index], d, 0) for c, d in zip(window, ds)]
            torch._foreach_add_(ms, ds)  # m = m + d
            for c in window:
                p, m, tau = c.p, c.m, taus[c.index]
                product = torch.mul(m, p)  # w * m, exact for w = +-1
                if test == "strict":
                    flip = product > tau
                elif test == "inclusive":
                    flip = product >= tau if tau > 0 else product > tau  # 0 is no signal
                else:  # larq: > flips, == turns the weight +1 (flips only the -1s)
                    flip = (product > tau) | ((product == tau) & (p < 0))
                p.addcmul_(p, flip, value=-2)  # w <- w - 2 w = -w where flip
                sums.append(flip.sum())
        for p in params:
            self._versions[id(p)] = p._version
        self._record_nonfinite(finite, skip, on_cpu)
        if not sums:
            return torch.zeros((), dtype=torch.int64, device=params[0].device)
        return torch.stack([s.to(sums[0].device) for s in sums]).sum()

    @staticmethod
    def _finite_flags(grads: list[Tensor]) -> list[Tensor]:
        """Per tensor, a 0-dim bool on its device: whether every gradient element is finite
        (the sum is NaN or infinite if any element is; a vectorized pass, unlike max |g|)."""
        wide = (torch.float16, torch.bfloat16)  # their own sum overflows at 65504 / late
        return [
            torch.isfinite(g.sum(dtype=torch.float32 if g.dtype in wide else None)) for g in grads
        ]

    def _check_written(self, params: list[Tensor], labels: list[str], on_cpu: bool) -> None:
        """Check the values of the weights something else wrote in place since Bop last did.

        torch counts in-place writes per tensor (its version counter: optimizers, weight decay,
        load_state_dict and nn.init all bump it), so only those weights need the elementwise
        check; an error now on CPU, at the next read of the counts on an accelerator.
        """
        for p, label in zip(params, labels):
            if self._versions.get(id(p)) == p._version:
                continue
            flag = _not_binary(p)
            if on_cpu:
                if bool(flag):
                    raise self._not_binary_error(label)
            else:
                self._not_binary.append((flag, label))

    def _record_nonfinite(self, finite: list[Tensor], skip: set[int], on_cpu: bool) -> None:
        if on_cpu:
            if not skip:
                return
            n = torch.tensor(len(skip), dtype=torch.int64)
        else:
            n = (~torch.stack(finite)).sum()
        self._nonfinite = (
            n if self._nonfinite is None else self._nonfinite + n.to(self._nonfinite.device)
        )

    @torch.no_grad()
    def check_binary(self, full: bool = False) -> None:
        """Raise if a weight stopped being +1/-1: the device checks of past steps (a sync), and
        with ``full`` every weight now (for writes torch does not count, through ``.data``)."""
        flags, self._not_binary = self._not_binary, []
        for flag, label in flags:
            if bool(flag):
                raise self._not_binary_error(label)
        if full:
            for index, group in enumerate(self.param_groups):
                names = group.get("param_names")
                for i, p in enumerate(group["params"]):
                    if bool(_not_binary(p)):
                        raise self._not_binary_error(self._describe(i, index, p, names))

    @property
    def nonfinite_skips(self) -> int:
        """Tensor-steps skipped so far because a gradient held a NaN or an infinity."""
        return 0 if self._nonfinite is None else int(self._nonfinite)

    def warn_nonfinite(self) -> None:
        """Warn once about the tensor updates skipped for non-finite gradients since the last
        warning (a sync on accelerators)."""
        total = self.nonfinite_skips
        if total > self._nonfinite_warned:
            warnings.warn(
                f"Bop skipped {total - self._nonfinite_warned} tensor update(s) since the last "
                f"report ({total} in all) because their gradient held a NaN or an infinity: "
                "those weights and averages were left as they were; expected finite gradients "
                "(check the loss, the learning rate of the real parameters, or mixed precision)",
                RuntimeWarning,
                stacklevel=3,
            )
            self._nonfinite_warned = total

    # --------------------------------------------------------------------- flip metrics

    @property
    def num_binary(self) -> int:
        """Number of elements in all parameters of the optimizer (n of eq. 7)."""
        return sum(p.numel() for g in self.param_groups for p in g["params"])

    @property
    def last_flips_per_group(self) -> list[int] | None:
        """Weights flipped by the last step in each param group (None before the first step).

        Reading them (a sync on accelerators) also raises for weights that stopped being
        +1/-1 and warns about skipped non-finite gradients."""
        if self._last_counts is None:
            return None
        self.check_binary()
        self.warn_nonfinite()
        return [int(c) for c in self._last_counts]

    @property
    def last_flips_tensor(self) -> Tensor | None:
        """Weights flipped by the last step, all groups, as a 0-dim int64 tensor on the weights'
        device, without a device sync (None before the first step)."""
        counts = self._last_counts
        if counts is None:
            return None
        # every group counts on its weights' device; gather on the accelerator, if any
        device = next((c.device for c in counts if c.device.type != "cpu"), counts[0].device)
        return torch.stack([c.to(device) for c in counts]).sum()

    @property
    def last_flips(self) -> int | None:
        """Weights flipped by the last step, all groups (None before the first step)."""
        per_group = self.last_flips_per_group
        return None if per_group is None else sum(per_group)

    @property
    def last_log_flip_ratio(self) -> float | None:
        """pi_t = ln(last_flips / num_binary + 1e-9), eq. 7 (None before the first step)."""
        flips = self.last_flips
        return None if flips is None else log_flip_ratio(flips, self.num_binary)
