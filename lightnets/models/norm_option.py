"""The normalization option of the models: one convention for every family.

Every model with normalization takes

- ``norm``: a kind of `lightnets.nn.NORM_KINDS` (bn, sync_bn, frozen_bn, gn, ln, in, brn, fbn,
  none), or a `lightnets.nn.NormSpec`;
- ``norm_kwargs``: a table of that kind's layer options (``{num_groups = 2}`` for GN), whose
  names are checked when the model is built and whose values each layer checks.

Models with FBN positions (``finet_*``: the blocks' two 1x1 convs; ``resnet*``: every conv + norm
pair but the stem's) also take ``fbn_groups`` (G, default 1), ``fbn_impl`` and, for Finet,
``fbn_channels_per_group`` (c). Their meaning is the layer's, `lightnets.nn.fbn.fbn_group_count`
(G = max(1, C_in // c) for c), and every FBN conv checks them for its own inputs. The FBN
positions are FBN convs when ``norm="fbn"`` or when an FBN option asks for groups (fbn_groups
other than 1, or fbn_channels_per_group); every other norm position is ``norm``, or BN when
``norm="fbn"``, with ``norm_kwargs``. So ``finet_large(fbn_groups=4)`` and
``finet_large(norm="fbn", fbn_groups=4)`` are one model, ``resnet18(fbn_groups=2)`` is
``resnet18(norm="fbn", fbn_groups=2)``, ``norm="fbn"`` with G = 1 gives FBN convs of one group
(equal to Conv2d + BN: a reference), and ``finet_small(norm="gn", fbn_groups=2)`` has FBN in its
1x1 convs and GN everywhere else.

Models without FBN positions (vgg16, res_unet, fused_unet, mnist_cnn) refuse ``norm="fbn"``
and name ``convert_norm(model, "fbn", fbn_groups=G)``, which turns any model's conv + BN pairs
into FBN convs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightnets.checks import check_table, is_int
from lightnets.errors import UserError
from lightnets.nn.norm import LAYER_NORM_KINDS, NormSpec

__all__ = ["ModelNorms", "model_norms", "plain_norm"]

_EXAMPLE = "{num_groups = 32}"


def _spec(model: str, norm: Any, norm_kwargs: Any, hint: str = "") -> NormSpec:
    options = check_table(norm_kwargs, "norm_kwargs", model, _EXAMPLE)
    try:
        return NormSpec.of(norm, **options)
    except UserError as err:
        raise UserError(f"{model}: {err}{hint}") from None


def plain_norm(model: str, norm: str | NormSpec = "bn", norm_kwargs: Any = None) -> NormSpec:
    """The norm of a model without FBN positions: `norm` with `norm_kwargs`, never fbn."""
    spec = _spec(model, norm, norm_kwargs)
    if spec.kind == "fbn":
        raise UserError(
            f"{model}: norm='fbn' is invalid: this model has no FBN positions (convs it builds "
            f"as FBN convs): expected one of {', '.join(LAYER_NORM_KINDS)}, or "
            "lightnets.convert_norm(model, 'fbn', fbn_groups=G) to turn its conv + BN pairs "
            "into FBN convs"
        )
    return spec


@dataclass(frozen=True)
class ModelNorms:
    """The two norms of a model with FBN positions: `fbn_positions` for those (an fbn spec, or
    the plain norm when FBN is off), `plain` for every other norm position."""

    plain: NormSpec
    fbn_positions: NormSpec

    @property
    def uses_fbn(self) -> bool:
        return self.fbn_positions.kind == "fbn"


def model_norms(
    model: str,
    norm: str | NormSpec = "bn",
    norm_kwargs: Any = None,
    *,
    fbn_groups: Any = 1,
    fbn_channels_per_group: Any = None,
    fbn_impl: Any = "auto",
) -> ModelNorms:
    """The norms of a model with FBN positions, by the convention of this module.

    The FBN options are passed to every FBN conv as they were given (the layer checks them);
    anything but the int 1 for fbn_groups (``True`` included) asks for FBN.
    """
    fbn_asked = fbn_channels_per_group is not None or not (is_int(fbn_groups) and fbn_groups == 1)
    is_fbn = (norm.kind if isinstance(norm, NormSpec) else norm) == "fbn"
    fbn_options: dict[str, Any] = {"fbn_groups": fbn_groups, "impl": fbn_impl}
    if fbn_channels_per_group is not None:
        fbn_options["channels_per_group"] = fbn_channels_per_group
    if is_fbn:
        extra = dict(norm.kwargs) if isinstance(norm, NormSpec) else {}
        hint = (
            " (with norm='fbn', norm_kwargs are the options of the BN layers outside the FBN "
            "positions; FBN's own are the model's fbn_groups, fbn_impl arguments)"
        )
        plain = _spec(model, "bn", norm_kwargs, hint)
        return ModelNorms(plain, NormSpec("fbn", {**fbn_options, **extra}))
    plain = _spec(model, norm, norm_kwargs)
    if fbn_asked:
        return ModelNorms(plain, NormSpec("fbn", fbn_options))
    return ModelNorms(plain, plain)
