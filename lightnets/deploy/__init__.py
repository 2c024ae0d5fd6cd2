"""Deployment: fold normalization away (fuse), convert a model's normalization, pack binary
weights into bits (pack_binary) and save / load packed models."""

from lightnets.deploy.convert import convert_norm
from lightnets.deploy.folding import fuse
from lightnets.deploy.pack import load_packed, pack_binary, save_packed

__all__ = ["convert_norm", "fuse", "load_packed", "pack_binary", "save_packed"]
