"""Model registry: every model is built by name, so recipes and the CLI can refer to it.

The families register their models when `lightnets.models` is imported, which Python does
before it runs this module (a package's __init__ comes first), so the registry is complete
whenever one of its functions is called and imports no family itself.

Factories declare their keyword arguments; `create_model` checks the caller's keywords
against that signature so a misspelled option is refused instead of silently ignored, and
records the name and keywords on the model it returns (`model_spec(model)`; a plain attribute,
so copies keep it), so that a file can name the model instead of pickling it.

A family with several variants of one class (finet_small / finet_large / ..., resnet18 /
resnet50 / resnet_mini) registers each with `register_variant`: one line naming the class, the
arguments the variant fixes (widths, depths, ...) and its docstring, instead of a function that
repeats every keyword argument of the class.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lightnets.errors import UserError, did_you_mean
from lightnets.registry import Registry

#: Model factories by name.
MODELS: Registry[Callable[..., torch.nn.Module]] = Registry("model")


def register_model(fn: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
    """Decorator: register a model factory under its function name."""
    return MODELS.add(fn.__name__, fn)


def register_variant(
    name: str,
    build: Callable[..., torch.nn.Module],
    doc: str,
    *,
    fixed: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Callable[..., torch.nn.Module]:
    """Register `name` as a variant of `build` (a model class or function) and return it.

    Calling the variant builds ``build(**fixed, **options)``, plus ``name=name`` when build
    takes a `name` (for its error messages). Its keyword arguments, the signature that
    `create_model` checks keywords against and `model_arguments` shows, are build's in build's
    order, less the `fixed` ones and `name`, with `defaults` replacing build's defaults; each of
    them must have a default. Positional calls bind in that order, as a written-out function's.
    """
    fixed = dict(fixed or {})
    defaults = dict(defaults or {})
    params = inspect.signature(build).parameters
    unknown = sorted((set(fixed) | set(defaults)) - set(params))
    if unknown:
        raise ValueError(f"variant {name!r}: {build.__name__} takes no {', '.join(unknown)}")
    options = []
    for p in params.values():
        if p.name in fixed or p.name == "name":
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ValueError(f"variant {name!r}: {build.__name__} takes *args or **kwargs")
        p = p.replace(default=defaults.get(p.name, p.default))
        if p.default is p.empty:
            raise ValueError(f"variant {name!r}: {p.name} has no default and is not fixed")
        options.append(p)
    signature = inspect.Signature(options, return_annotation="nn.Module")
    named = {"name": name} if "name" in params else {}

    def variant(*args: Any, **kwargs: Any) -> torch.nn.Module:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return build(**fixed, **named, **bound.arguments)

    variant.__name__ = variant.__qualname__ = name
    variant.__doc__ = doc
    variant.__module__ = build.__module__
    variant.__signature__ = signature  # type: ignore[attr-defined]
    return register_model(variant)


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return MODELS.names()


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
    return MODELS.lookup(name)
