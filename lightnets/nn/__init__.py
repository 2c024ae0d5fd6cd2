"""Layers: each file one concept (see DESIGN.md)."""

from lightnets.nn.fbn import FBNConv2d

__all__ = ["FBNConv2d"]
