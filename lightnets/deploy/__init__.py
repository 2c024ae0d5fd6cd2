"""Deployment: fold normalization away (fuse) and convert a model's normalization."""

from lightnets.deploy.convert import convert_norm
from lightnets.deploy.fuse import fuse

__all__ = ["convert_norm", "fuse"]
