"""Training and evaluation of cenet models: config, optimizer, LR schedule, loop, checkpoints.

The entry points are :func:`train` (new or resumed run), :func:`resume_training`,
:func:`evaluate_checkpoint` and :func:`load_config`.
"""

from cenet.train.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_save,
    load_checkpoint,
)
from cenet.train.config import (
    SCHEDULES,
    TrainConfig,
    bundled_configs,
    config_from_dict,
    config_keys,
    load_config,
    parse_overrides,
    read_yaml_config,
)
from cenet.train.evaluate import EvalResult, evaluate, evaluate_checkpoint
from cenet.train.loop import TrainResult, resume_training, train
from cenet.train.metrics import MetricsLog, topk_correct
from cenet.train.optim import build_optimizer, param_groups
from cenet.train.rundir import RESUME_MUTABLE, resume_config, run_dir_of
from cenet.train.schedule import build_scheduler

__all__ = [
    "FORMAT_VERSION",
    "RESUME_MUTABLE",
    "SCHEDULES",
    "CheckpointError",
    "EvalResult",
    "MetricsLog",
    "TrainConfig",
    "TrainResult",
    "atomic_save",
    "build_optimizer",
    "build_scheduler",
    "bundled_configs",
    "config_from_dict",
    "config_keys",
    "evaluate",
    "evaluate_checkpoint",
    "load_checkpoint",
    "load_config",
    "param_groups",
    "parse_overrides",
    "read_yaml_config",
    "resume_config",
    "resume_training",
    "run_dir_of",
    "topk_correct",
    "train",
]
