"""Bop, the binary optimizer of paper 004 (eq. 5-7), and the binary / real parameter split.

Bop keeps one exponential moving average of the gradient per binary weight and flips the
weight when that average is strong (past a threshold tau) and consistent with the weight's own
sign, as the original code does (read from its public code, see papers/README.md):

    m <- (1 - gamma) * m + gamma * g          m starts at 0, no bias correction      (eq. 5)
    w <- -w  where |m| > tau and sign(m) = sign(w)                                    (eq. 6)

m is not reset after a flip. For w in {-1, +1} the flip test is the original code's
``w * m > tau``: the product is exact (|w| = 1), and w * m > tau >= 0 holds exactly when
sign(m) = sign(w) and |m| = w * m > tau. The [Re] paper's eq. 6 writes ``|m| >= tau``:
``inclusive=True`` selects it (flip where w * m >= tau and w * m > 0; a zero average is never
a signal, so threshold=0 does not flip weights whose m is exactly 0). The default,
``inclusive=False``, is the strict ``>`` of the original code and of the original paper's
Algorithm 2.

`gamma`, `threshold` and `inclusive` are per param group; `gamma` and `threshold` are plain
numbers in each group, so `lightnets.optim.Scheduler(..., keys=("gamma",))` schedules them like
a learning rate (the paper's CIFAR run: gamma x0.1 every 100 epochs). Learning rate and weight
decay do not apply. Parameters must hold exactly +1/-1 (checked when they are added, naming the
offending parameter); those without a gradient are skipped. m has the parameter's dtype (torch
keeps optimizer state in it on load), so train +1/-1 weights in float32 even under bfloat16
autocast.

Flips are counted every step without a device sync: `last_flips_tensor` (still no sync),
`last_flips`, `last_flips_per_group` and `last_log_flip_ratio` (eq. 7, pi_t = ln(flips / n +
1e-9), n = all elements in the optimizer) read the counts when asked.

`binary_parameters(model)` are the weights of binary layers in bop mode (found by module type
and mode, see lightnets.nn.binary), `real_parameters(model)` every other trainable parameter
(latent weights, BatchNorm, biases) for a real-valued optimizer such as Adam.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightnets.errors import UserError

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
    from lightnets.nn.binary import is_binary_layer

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


#: Elements per chunk and chunks per window of the step: a window's weights, gradients and
#: averages (3 x 4 x 2^16 x 4 bytes = 3 MiB) stay in cache between the moving-average update
#: and the flip test; whole tensors (binarynet's 8.4M-weight layer is 33 MB each) do not.
_CHUNK = 1 << 16
_WINDOW = 4


def _windows(
    params: list[Tensor], grads: list[Tensor], averages: list[Tensor]
) -> Iterator[tuple[list[Tensor], list[Tensor], list[Tensor]]]:
    """(params, grads, averages) in cache-sized windows of flat chunks (views, same storage)."""
    chunks: list[tuple[Tensor, Tensor, Tensor]] = []
    for p, g, m in zip(params, grads, averages):
        if p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and p.numel() > _CHUNK:
            chunks += zip(
                p.view(-1).split(_CHUNK), g.view(-1).split(_CHUNK), m.view(-1).split(_CHUNK)
            )
        else:
            chunks.append((p, g, m))
    for i in range(0, len(chunks), _WINDOW):
        ps, gs, ms = zip(*chunks[i : i + _WINDOW])
        yield list(ps), list(gs), list(ms)


_NAMES_HINT = (
    "; pass (name, tensor) pairs, e.g. lightnets.optim.named_binary_parameters(model), "
    "for errors that name the parameter"
)


def _is_binary_weight(p: Tensor) -> bool:
    from lightnets.nn.binary import is_binary_parameter

    return is_binary_parameter(p)


class Bop(torch.optim.Optimizer):
    """Binary optimizer (paper 004, eq. 5-6): flip +1/-1 weights on a strong, consistent average.

    Args:
        params: +1/-1 tensors, (name, tensor) pairs, or param-group dicts (as torch optimizers);
            e.g. ``lightnets.optim.binary_parameters(model)``.
        threshold: tau; a weight flips when w * m > tau.
        gamma: adaptivity rate of the moving average m, 0 < gamma <= 1.
        inclusive: False (default): flip when |m| > tau, as the original code;
            True: |m| >= tau, as the [Re] paper's eq. 6.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
        threshold: float = 1e-8,
        gamma: float = 1e-4,
        *,
        inclusive: bool = False,
    ) -> None:
        defaults = {
            "threshold": _check_hyper("threshold", threshold, ""),
            "gamma": _check_hyper("gamma", gamma, ""),
            "inclusive": self._check_inclusive(inclusive, ""),
        }
        self._last_counts: list[Tensor] | None = None
        super().__init__(params, defaults)

    @staticmethod
    def _check_inclusive(value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise UserError(f"Bop inclusive={value!r}{where}: expected True or False")
        return value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, then a check of the group's values and +1/-1 parameters."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        where = f" in param group {index}"
        for key in ("threshold", "gamma"):
            group[key] = _check_hyper(key, group[key], where)
        self._check_inclusive(group["inclusive"], where)
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if not p.is_floating_point():
                raise UserError(
                    f"Bop: {self._describe(i, index, p, names)} has dtype {p.dtype}: "
                    "expected a floating-point tensor of +1/-1"
                )
            with torch.no_grad():
                ok = bool(((p == 1) | (p == -1)).all())
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

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Update every m, flip the weights that pass the test, count the flips."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        counts: list[Tensor] = []
        for group in self.param_groups:
            params, grads, averages = [], [], []
            for p in group["params"]:
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
            # on the weights' device even for a group without gradients: gathering the counts
            # must not copy from the host (a blocking copy is a device sync)
            home = group["params"][0].device if group["params"] else torch.device("cpu")
            count = torch.zeros((), dtype=torch.int64, device=home)
            if params:
                gamma, tau = float(group["gamma"]), float(group["threshold"])
                # tau = 0 inclusive: a zero average is no signal, so > as well
                inclusive = bool(group["inclusive"]) and tau > 0
                sums = []
                for ps, gs, ms in _windows(params, grads, averages):
                    torch._foreach_mul_(ms, 1.0 - gamma)
                    torch._foreach_add_(ms, gs, alpha=gamma)
                    for p, m in zip(ps, ms):
                        product = torch.mul(m, p)  # w * m, exact for w = +-1
                        flip = product >= tau if inclusive else product > tau
                        p.addcmul_(p, flip, value=-2)  # w <- w - 2 w = -w where flip
                        sums.append(flip.sum())
                count = torch.stack([s.to(sums[0].device) for s in sums]).sum()
            counts.append(count)
        self._last_counts = counts
        return loss

    # --------------------------------------------------------------------- flip metrics

    @property
    def num_binary(self) -> int:
        """Number of elements in all parameters of the optimizer (n of eq. 7)."""
        return sum(p.numel() for g in self.param_groups for p in g["params"])

    @property
    def last_flips_per_group(self) -> list[int] | None:
        """Weights flipped by the last step in each param group (None before the first step)."""
        if self._last_counts is None:
            return None
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
