"""Model registry: every model is built by name, so recipes and the CLI can refer to it.

Factories declare their keyword arguments; `create_model` checks the caller's keywords
against that signature so a misspelled option is refused instead of silently ignored, and
records the name and keywords on the model it returns (`model_spec(model)`; a plain attribute,
so copies keep it), so that a file can name the model instead of pickling it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from lightnets.errors import UserError, did_you_mean

_MODELS: dict[str, Callable[..., torch.nn.Module]] = {}


def register_model(fn: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
    """Decorator: register a model factory under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    _load_builtin()
    return sorted(_MODELS)


def model_arguments(name: str) -> dict[str, inspect.Parameter]:
    """Keyword arguments the factory of `name` accepts."""
    return dict(inspect.signature(_factory(name)).parameters)


def create_model(name: str, **kwargs) -> torch.nn.Module:
    """Build a registered model by name, refusing keyword arguments it does not take."""
    factory = _factory(name)
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        valid = [n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL]
        for key in kwargs:
            if key not in params:
                raise UserError(
                    f"model {name!r} has no option {key!r}{did_you_mean(key, valid)}: "
                    f"valid options are {', '.join(valid)}"
                )
    try:
        model = factory(**kwargs)
    except UserError as err:
        if "not divisible by G=" not in str(err) or "norm" not in kwargs:
            raise
        raise UserError(_group_advice(name, kwargs, err)) from None
    if isinstance(model, torch.nn.Module):
        # what built it, for files that rebuild the model by name (lightnets.save_packed)
        model.__dict__[_SPEC_ATTR] = (name, dict(kwargs))
    return model


def _group_advice(name: str, kwargs: dict[str, Any], err: UserError) -> str:
    """A group-norm error for the whole model: one layer's valid G may fail the next, so list
    the G that divide every norm layer's channels (found on the BN version of the model)."""
    plain = {k: v for k, v in kwargs.items() if k != "norm_kwargs"}
    try:
        channels = sorted(
            {
                m.num_features
                for m in _factory(name)(**{**plain, "norm": "bn"}).modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            }
        )
    except Exception:  # the advice is a bonus: never hide the original error behind another
        return str(err)
    if not channels:
        return str(err)
    common = math.gcd(*channels)
    valid = [g for g in range(1, common + 1) if common % g == 0]
    return (
        f"model {name!r} with norm={kwargs['norm']!r}: {err}. The groups must divide the "
        f"channels of every norm layer of this model ({', '.join(map(str, channels))}): "
        f"expected norm_kwargs={{'num_groups': G}} with G in {', '.join(map(str, valid))}"
    )


_SPEC_ATTR = "_lightnets_model_spec"


def model_spec(model: torch.nn.Module) -> tuple[str, dict[str, Any]] | None:
    """(name, kwargs) that `create_model` built `model` (or the model it was copied from)
    with, or None for a model built otherwise."""
    spec = model.__dict__.get(_SPEC_ATTR)
    if spec is None:
        return None
    name, kwargs = spec
    return name, dict(kwargs)


def _factory(name: str) -> Callable[..., torch.nn.Module]:
    _load_builtin()
    if name not in _MODELS:
        names = sorted(_MODELS)
        raise UserError(
            f"unknown model {name!r}{did_you_mean(name, names)}: expected one of {', '.join(names)}"
        )
    return _MODELS[name]


def _load_builtin() -> None:
    """Import the model families so their @register_model decorators run."""
    import lightnets.models  # noqa: F401
