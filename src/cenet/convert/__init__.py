"""Insert CE blocks into existing networks (torchvision, timm or one's own).

``convert`` builds on :mod:`cenet.layers` only (never on ``models`` or ``train``).
"""

from cenet.convert.insert import (
    ALL_NORM_TYPES,
    CEAct,
    NormCE,
    convert_ce,
    norm_channels,
    select_norms,
)

__all__ = ["ALL_NORM_TYPES", "CEAct", "NormCE", "convert_ce", "norm_channels", "select_norms"]
