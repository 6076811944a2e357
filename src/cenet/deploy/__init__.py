"""Deployment: inference fusion (:func:`fuse`) and its tensor maths."""

from cenet.deploy.bench import BenchConfig, run_bench
from cenet.deploy.export import (
    export_onnx,
    export_program,
    load_program,
    onnx_session,
    parity,
    randomize_eval_state,
    save_program,
)
from cenet.deploy.fused_model import Folded, FusedModel, affine_map, fuse
from cenet.deploy.fusion import (
    fuse_conv_affine_weights,
    fuse_conv_bd_weights,
    whitening_affine,
)

__all__ = [
    "BenchConfig", "run_bench",
    "Folded", "FusedModel", "affine_map", "fuse", "fuse_conv_affine_weights",
    "fuse_conv_bd_weights", "whitening_affine",
    "export_onnx", "export_program", "load_program", "onnx_session", "parity",
    "randomize_eval_state", "save_program",
]
