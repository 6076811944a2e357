"""Networks with CE and their plain twins, and the registry."""

from cenet.models import (  # noqa: F401  (importing registers the networks)
    cifar_resnet,
    cifar_vgg,
    mobilenetv2,
    resnet,
    shufflenetv2,
)
from cenet.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
