"""cenet: Channel Equilibrium Networks (Shao et al., ICML 2020) in PyTorch."""

from importlib import metadata as _metadata

from cenet import layers, models
from cenet.convert import (
    ce_keys_from_model,
    ce_keys_to_model,
    convert_ce,
    convert_sync_ce,
    freeze_norms,
    revert_sync_ce,
)
from cenet.deploy.fused_model import fuse
from cenet.layers import ChannelEquilibrium
from cenet.models import create_model, list_models

try:
    __version__ = _metadata.version("cenet")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "ChannelEquilibrium", "__version__", "ce_keys_from_model", "ce_keys_to_model", "convert_ce",
    "convert_sync_ce", "create_model", "freeze_norms", "fuse", "layers", "list_models", "models",
    "revert_sync_ce",
]
