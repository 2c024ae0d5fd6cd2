"""Layers: each file one concept (see DESIGN.md)."""

from lightnets.nn.fbn import FBNConv2d
from lightnets.nn.norm import NORM_KINDS, BatchRenorm, FrozenBatchNorm, NormSpec, make_norm

__all__ = ["NORM_KINDS", "BatchRenorm", "FBNConv2d", "FrozenBatchNorm", "NormSpec", "make_norm"]
