"""Training: model preparation, the loop, optimizers and schedules, checkpoints, reporting, several GPUs, plots.

The package is ``edgeft.training`` so that it never shadows the API verb ``edgeft.train(cfg)``
(:func:`edgeft.pipeline.train`): importing a subpackage binds its name on ``edgeft``. It imports nothing of the
pipeline or the CLI.
"""

from .checkpoint import CheckpointManager, list_checkpoints
from .loop import LossModule, Sampler, backward_window, evaluate_loss, lm_loss_sum, train_loop
from .model import prepare_model, save_adapter
from .optim import OPTIMIZERS, build_optimizer, build_scheduler, lr_factor, param_groups
from .plots import plot_loss, read_metrics
from .settings import Checkpointing, Evaluation, Optimization, Placement, Reporting, TrainData

__all__ = [
    "CheckpointManager",
    "Checkpointing",
    "Evaluation",
    "LossModule",
    "OPTIMIZERS",
    "Optimization",
    "Placement",
    "Reporting",
    "Sampler",
    "TrainData",
    "backward_window",
    "build_optimizer",
    "build_scheduler",
    "evaluate_loss",
    "list_checkpoints",
    "lm_loss_sum",
    "lr_factor",
    "param_groups",
    "plot_loss",
    "prepare_model",
    "read_metrics",
    "save_adapter",
    "train_loop",
]
