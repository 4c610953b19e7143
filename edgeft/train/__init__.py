"""Training: model preparation, the loop, optimizers and schedules, checkpoints, reporting, several GPUs, plots.

``edgeft.train`` is both this package and the API verb ``edgeft.train(cfg)``: importing a subpackage binds
it on its parent, which would shadow the verb, so the package itself is callable and forwards to
:func:`edgeft.pipeline.train`.
"""

import sys
import types
from typing import Any

from .checkpoint import CheckpointManager, list_checkpoints
from .loop import LossModule, Sampler, backward_window, evaluate_loss, lm_loss_sum, train_loop
from .model import prepare_model, save_adapter
from .optim import OPTIMIZERS, build_optimizer, build_scheduler, lr_factor, param_groups
from .plots import plot_loss, read_metrics

__all__ = [
    "CheckpointManager", "LossModule", "OPTIMIZERS", "Sampler", "backward_window", "build_optimizer",
    "build_scheduler", "evaluate_loss", "list_checkpoints", "lm_loss_sum", "lr_factor", "param_groups",
    "plot_loss", "prepare_model", "read_metrics", "save_adapter", "train_loop",
]


class _CallableTrainPackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from edgeft.pipeline import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableTrainPackage
