"""Model families; importing them registers their models by name."""

from lightnets.models import binarynet, finet, resnet, simple, unet, vgg  # noqa: F401
from lightnets.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
