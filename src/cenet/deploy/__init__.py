"""Deployment: inference fusion (:func:`fuse`) and its tensor maths."""

from cenet.deploy.fused_model import Folded, FusedModel, affine_map, fuse
from cenet.deploy.fusion import (
    fuse_conv_affine_weights,
    fuse_conv_bd_weights,
    whitening_affine,
)

__all__ = [
    "Folded", "FusedModel", "affine_map", "fuse", "fuse_conv_affine_weights",
    "fuse_conv_bd_weights", "whitening_affine",
]
