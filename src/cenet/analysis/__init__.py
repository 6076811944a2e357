"""Measurements of the CE paper's analyses on any ``nn.Module`` (Sec. 5.2, appendix F).

Inhibited channels (Sec. 2, Fig. 1, 4c), normalization parameter conditions (Tables 6, 9),
cumulative ablation curves (Fig. 1c, 4c, 7), channel magnitude maps (Fig. 3), channel
correlation (Fig. 5) and GCT gate statistics (GCT paper Fig. 3). Imports only ``torch`` and
:mod:`cenet.layers`; results are tensors, dicts of floats or dataclasses with ``to_dict()``.
"""

from cenet.analysis.ablation import (
    ABLATION_ORDERS,
    DEFAULT_RATIOS,
    AblationCurve,
    ablation_curve,
    channel_masks,
)
from cenet.analysis.correlation import (
    CorrelationRecorder,
    channel_correlation,
    channel_correlations,
)
from cenet.analysis.evaluate import evaluate_top1
from cenet.analysis.gct_gates import GCTParameters, gct_gate_values, gct_parameters
from cenet.analysis.hooks import call_key, forward_hooks, record_outputs
from cenet.analysis.inhibited import (
    InhibitedChannels,
    LayerInhibition,
    activation_means,
    inhibited_channels,
)
from cenet.analysis.magnitude import channel_magnitude_map, magnitude_map
from cenet.analysis.norm_params import (
    NORM_TYPES,
    NormConditions,
    NormParameterConditions,
    norm_parameter_conditions,
)
from cenet.analysis.selection import (
    RECTIFIERS,
    LayerSpec,
    feature_rectifiers,
    select_modules,
)

__all__ = [
    "ABLATION_ORDERS",
    "DEFAULT_RATIOS",
    "NORM_TYPES",
    "RECTIFIERS",
    "feature_rectifiers",
    "AblationCurve",
    "CorrelationRecorder",
    "GCTParameters",
    "InhibitedChannels",
    "LayerInhibition",
    "LayerSpec",
    "NormConditions",
    "NormParameterConditions",
    "ablation_curve",
    "activation_means",
    "call_key",
    "channel_correlation",
    "channel_correlations",
    "channel_magnitude_map",
    "channel_masks",
    "evaluate_top1",
    "forward_hooks",
    "gct_gate_values",
    "gct_parameters",
    "inhibited_channels",
    "magnitude_map",
    "norm_parameter_conditions",
    "record_outputs",
    "select_modules",
]
