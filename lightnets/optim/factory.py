"""Optimizers by name, with separate weight decay for normalization parameters and biases.

Decaying the affine parameters of normalization layers (and biases) usually hurts small
networks, so recipes can give them their own decay. A small registry lets later optimizers
(e.g. Bop for binary weights) plug into the same `build_optimizer(model, name, lr, ...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lightnets.errors import UserError
from lightnets.optim.bop import named_binary_parameters
from lightnets.registry import Registry

__all__ = [
    "NORM_LAYER_TYPES",
    "build_optimizer",
    "is_norm_layer",
    "list_optimizers",
    "param_groups",
    "register_optimizer",
]

NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

# Parameters named like this belong to a normalization even inside a conv (FBN's affine).
_NORM_PARAM_SUFFIXES = ("norm_weight", "norm_bias")

OptimizerBuilder = Callable[..., torch.optim.Optimizer]
#: Optimizer builders by lower-case name (names are case-insensitive).
OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer", normalize=str.lower)


def is_norm_layer(module: nn.Module) -> bool:
    """True for torch's normalization layers and for layers that declare `is_norm_layer = True`."""
    return isinstance(module, NORM_LAYER_TYPES) or getattr(module, "is_norm_layer", False) is True


def param_groups(
    model: nn.Module,
    weight_decay: float,
    norm_weight_decay: float | None = None,
    bias_weight_decay: float | None = None,
    exclude: Iterable[torch.Tensor] = (),
) -> list[dict[str, Any]]:
    """Split trainable parameters into weight / norm / bias groups, each with its own decay.

    `None` means "same as weight_decay". Groups with equal decay are merged (the name joins
    theirs with '+'), empty groups are dropped, and a shared parameter appears only once.
    Parameters in `exclude` are left out (e.g. binary weights that Bop trains).
    """
    excluded = {id(p) for p in exclude}
    decays = {
        "weight": weight_decay,
        "norm": weight_decay if norm_weight_decay is None else norm_weight_decay,
        "bias": weight_decay if bias_weight_decay is None else bias_weight_decay,
    }
    norm_prefixes = [name for name, module in model.named_modules() if is_norm_layer(module)]
    buckets: dict[str, list[nn.Parameter]] = {"weight": [], "norm": [], "bias": []}
    # named_parameters() already skips a parameter seen under an earlier name (shared params).
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in excluded:
            continue
        owner, _, leaf = name.rpartition(".")
        if _inside_any(owner, norm_prefixes) or leaf.endswith(_NORM_PARAM_SUFFIXES):
            buckets["norm"].append(param)
        elif leaf == "bias" and param.ndim == 1:
            buckets["bias"].append(param)
        else:
            buckets["weight"].append(param)

    groups: list[dict[str, Any]] = []
    for kind in ("weight", "norm", "bias"):
        if not buckets[kind]:
            continue
        decay = float(decays[kind])
        same = next((g for g in groups if g["weight_decay"] == decay), None)
        if same is None:
            groups.append({"params": list(buckets[kind]), "weight_decay": decay, "name": kind})
        else:
            same["params"].extend(buckets[kind])
            same["name"] += f"+{kind}"
    return groups


def _inside_any(module_name: str, prefixes: list[str]) -> bool:
    """True when `module_name` is one of `prefixes` or a submodule of one ('' is the root)."""
    for prefix in prefixes:
        if prefix == "" or module_name == prefix or module_name.startswith(prefix + "."):
            return True
    return False


def register_optimizer(name: str) -> Callable[[OptimizerBuilder], OptimizerBuilder]:
    """Register `builder(params, lr, **options) -> Optimizer` under `name` (a decorator).

    `params` is what torch optimizers accept (a list of param-group dicts or of tensors);
    `options` holds every keyword of `build_optimizer` (momentum, nesterov, weight_decay,
    betas, eps, ...) plus `model` (the module, or None), so a builder can pick what it needs.
    """
    return OPTIMIZERS.register(name.lower())


def list_optimizers() -> list[str]:
    """Names `build_optimizer` accepts, sorted."""
    return OPTIMIZERS.names()


def build_optimizer(
    model_or_params: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    name: str,
    lr: float,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    norm_weight_decay: float | None = None,
    bias_weight_decay: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    exclude: Iterable[torch.Tensor] = (),
) -> torch.optim.Optimizer:
    """Build a registered optimizer ("sgd", "adam", "adamw", ...) by name, case-insensitive.

    Given a module, its parameters (less those in `exclude`) are split by `param_groups`;
    given tensors or param-group dicts, they are passed on as they are (per-group decays then
    need a module). A module's +1/-1 weights of binary layers in bop mode must be excluded:
    a real-valued step would make them real (`build_binary_optimizer` gives them to Bop).
    """
    key = OPTIMIZERS.key(name)
    _check_number("lr", lr, positive=True)
    for what, value in (
        ("weight_decay", weight_decay),
        ("norm_weight_decay", norm_weight_decay),
        ("bias_weight_decay", bias_weight_decay),
    ):
        if value is not None:
            _check_number(what, value, positive=False)
    if not 0.0 <= float(momentum) < 1.0:
        raise UserError(f"momentum={momentum} is out of range: expected 0 <= momentum < 1")

    model = model_or_params if isinstance(model_or_params, nn.Module) else None
    if model is not None:
        exclude = list(exclude)
        _refuse_binary(model, exclude, key)
        params: list[Any] = param_groups(
            model, weight_decay, norm_weight_decay, bias_weight_decay, exclude=exclude
        )
    else:
        params = list(model_or_params)
        for what, value in (
            ("norm_weight_decay", norm_weight_decay),
            ("bias_weight_decay", bias_weight_decay),
        ):
            if value is not None and value != weight_decay:
                raise UserError(
                    f"{what}={value} needs the model to find normalization layers and biases: "
                    "expected build_optimizer(model, ...) rather than a list of parameters"
                )
    if not params or all(isinstance(g, dict) and not list(g["params"]) for g in params):
        raise UserError("the model has no trainable parameters: expected at least one")
    return OPTIMIZERS[key](
        params,
        float(lr),
        model=model,
        momentum=float(momentum),
        nesterov=bool(nesterov),
        weight_decay=float(weight_decay),
        norm_weight_decay=norm_weight_decay,
        bias_weight_decay=bias_weight_decay,
        betas=(float(betas[0]), float(betas[1])),
        eps=float(eps),
    )


def _refuse_binary(model: nn.Module, exclude: list[torch.Tensor], name: str) -> None:
    """Refuse to give bop-mode binary weights (+1/-1, for Bop) to a real-valued optimizer."""

    excluded = {id(p) for p in exclude}
    left = [n for n, p in named_binary_parameters(model) if id(p) not in excluded]
    if left:
        shown = ", ".join(left[:3]) + (", ..." if len(left) > 3 else "")
        raise UserError(
            f"{len(left)} weight(s) of binary layers in mode='bop' ({shown}) would be trained "
            f"by {name!r}, which would make them real: expected Bop for them (optim.binary = "
            "'bop' in a recipe, or lightnets.optim.build_binary_optimizer), or the layers in "
            "mode='latent'"
        )


def _check_number(what: str, value: float, *, positive: bool) -> None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what}={value!r} is not a number: expected a float") from None
    if positive and not number > 0:
        raise UserError(f"{what}={value} must be positive: expected {what} > 0")
    if not positive and not number >= 0:
        raise UserError(f"{what}={value} is negative: expected {what} >= 0")


def _check_adam(betas: tuple[float, float], eps: float) -> None:
    if not all(0.0 <= b < 1.0 for b in betas):
        raise UserError(f"betas={tuple(betas)} are out of range: expected 0 <= beta < 1")
    if not eps > 0:
        raise UserError(f"eps={eps} must be positive: expected eps > 0")


@register_optimizer("sgd")
def _sgd(params, lr: float, *, momentum: float, nesterov: bool, weight_decay: float, **_):
    if nesterov and momentum == 0:
        raise UserError("nesterov=True needs momentum: expected momentum > 0 (e.g. 0.9)")
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, foreach=None
    )


@register_optimizer("adam")
def _adam(params, lr: float, *, betas, eps: float, weight_decay: float, **_):
    _check_adam(betas, eps)
    return torch.optim.Adam(
        params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=None
    )


@register_optimizer("adamw")
def _adamw(params, lr: float, *, betas, eps: float, weight_decay: float, **_):
    _check_adam(betas, eps)
    return torch.optim.AdamW(
        params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=None
    )
