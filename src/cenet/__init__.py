"""cenet: Channel Equilibrium Networks (Shao et al., ICML 2020) in PyTorch."""

from cenet import layers, models
from cenet.convert import convert_ce
from cenet.layers import ChannelEquilibrium
from cenet.models import create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "ChannelEquilibrium", "__version__", "convert_ce", "create_model", "layers", "list_models",
    "models",
]
