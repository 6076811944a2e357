"""Networks with CE and their plain twins, and the registry."""

from cenet.models import cifar_resnet, cifar_vgg  # noqa: F401  (registers the networks)
from cenet.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
