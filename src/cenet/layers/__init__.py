"""Layers of cenet: the CE block and its parts (pure ``torch.nn``).

The CE maths as pure functions of tensors is :mod:`cenet.layers.functional`.
"""

from cenet.layers.batch_decorrelation import BatchDecorrelation
from cenet.layers.channel_equilibrium import CE_MODES, ChannelEquilibrium
from cenet.layers.create_attn import attn_names, create_attn, get_attn
from cenet.layers.frozen_ce import FrozenChannelEquilibrium
from cenet.layers.functional import (
    GroupStatistics,
    batch_covariance,
    batch_inv_std,
    group_statistics,
    instance_gate,
    instance_variance,
    newton_schulz_isqrt,
    trace_normalize,
    whitening_matrix,
)
from cenet.layers.gct import GCT_MODES, GatedChannelTransformation, gct_no_decay_parameters
from cenet.layers.instance_reweighting import InstanceReweighting
from cenet.layers.squeeze_excite import SqueezeExcitation
from cenet.layers.sync_ce import (
    SyncBatchDecorrelation,
    SyncChannelEquilibrium,
    SyncInstanceReweighting,
)
from cenet.layers.whitening_norm import DecorrelatedBatchNorm, IterNorm

__all__ = [
    "CE_MODES",
    "GCT_MODES",
    "BatchDecorrelation",
    "ChannelEquilibrium",
    "DecorrelatedBatchNorm",
    "FrozenChannelEquilibrium",
    "GatedChannelTransformation",
    "InstanceReweighting",
    "IterNorm",
    "SqueezeExcitation",
    "SyncBatchDecorrelation",
    "SyncChannelEquilibrium",
    "SyncInstanceReweighting",
    "attn_names",
    "create_attn",
    "get_attn",
    "GroupStatistics",
    "batch_covariance",
    "batch_inv_std",
    "gct_no_decay_parameters",
    "group_statistics",
    "instance_gate",
    "instance_variance",
    "newton_schulz_isqrt",
    "trace_normalize",
    "whitening_matrix",
]
