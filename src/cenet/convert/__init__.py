"""Insert CE blocks into existing networks (torchvision, timm or one's own).

``convert`` builds on :mod:`cenet.layers` only (never on ``models`` or ``train``).
"""

from cenet.convert.frozen import freeze_norms
from cenet.convert.insert import (
    ALL_NORM_TYPES,
    CEAct,
    NormCE,
    convert_ce,
    norm_channels,
    select_norms,
)
from cenet.convert.keys import ce_keys_from_model, ce_keys_to_model
from cenet.convert.sync import convert_sync_ce, revert_sync_ce

__all__ = [
    "ALL_NORM_TYPES", "CEAct", "NormCE", "ce_keys_from_model", "ce_keys_to_model", "convert_ce",
    "convert_sync_ce", "freeze_norms", "norm_channels", "revert_sync_ce", "select_norms",
]
