"""Layers of cenet: the CE block and its parts (pure ``torch.nn``)."""

from cenet.layers.batch_decorrelation import BatchDecorrelation
from cenet.layers.channel_equilibrium import CE_MODES, ChannelEquilibrium
from cenet.layers.create_attn import attn_names, create_attn, get_attn
from cenet.layers.gct import GCT_MODES, GatedChannelTransformation, gct_no_decay_parameters
from cenet.layers.instance_reweighting import InstanceReweighting
from cenet.layers.moments import (
    batch_covariance,
    group_moments,
    instance_variance,
    spatial_variance,
)
from cenet.layers.newton import newton_schulz_isqrt, trace_normalize
from cenet.layers.squeeze_excite import SqueezeExcitation
from cenet.layers.whitening_norm import DecorrelatedBatchNorm, IterNorm

__all__ = [
    "CE_MODES",
    "GCT_MODES",
    "BatchDecorrelation",
    "ChannelEquilibrium",
    "DecorrelatedBatchNorm",
    "GatedChannelTransformation",
    "InstanceReweighting",
    "IterNorm",
    "SqueezeExcitation",
    "attn_names",
    "create_attn",
    "get_attn",
    "batch_covariance",
    "gct_no_decay_parameters",
    "group_moments",
    "instance_variance",
    "newton_schulz_isqrt",
    "spatial_variance",
    "trace_normalize",
]
